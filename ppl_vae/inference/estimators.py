r"""Gradient estimators of the ELBO, chosen by argument; model and guide stay the same.

.. math::

    \mathcal{L}(\theta, \phi) = \mathbb{E}_{q_\phi(z \mid x)}
        [\log p_\theta(x, z) - \log q_\phi(z \mid x)]

* :class:`Reparameterized` (pathwise): :math:`z = g_\phi(\epsilon)`, gradient
  :math:`\mathbb{E}_\epsilon[\nabla_\phi (\log p(x, g_\phi(\epsilon)) - \log q_\phi(g_\phi(\epsilon)))]`.
* :class:`ScoreFunction` (REINFORCE): samples are detached and the gradient is
  :math:`\mathbb{E}_q[(\log p(x,z) - \log q_\phi(z)) \nabla_\phi \log q_\phi(z)]`.
* :class:`AnalyticKL`: pathwise reconstruction term, closed-form
  :math:`\mathrm{KL}(q \,\|\, p)` where one is registered (Pyro's
  ``TraceMeanField_ELBO``).
* :class:`ScoreFunction` with a ``baseline`` (``"average"``, ``"nvil"``,
  ``"loo"``): the learning signal :math:`f - b` with a baseline :math:`b` that
  does not depend on the sample it multiplies, so the gradient stays unbiased
  and its variance drops (Mnih & Gregor 2014; Kool, van Hoof & Welling 2019).
* :class:`IWAE`: the importance-weighted bound
  :math:`\log \frac1K \sum_k w_k` per datapoint (Burda et al. 2016), with
  VIMCO's leave-one-out signal for discrete sites (Mnih & Rezende 2016).
* :class:`Relaxed`: straight-through Gumbel-softmax / relaxed Bernoulli
  samples for discrete guide sites with the analytic discrete KL (Jang, Gu &
  Poole 2017; Maddison et al. 2017).
* :class:`Enumerated`: model-side discrete sites marked
  ``infer={"enumerate": "parallel"}`` summed out (Pyro's ``TraceEnum_ELBO``).

Every estimator here returns a loss whose *value* is the negative objective
(ELBO, or IWAE bound) and whose *gradient* is the estimator's.

Pyro decides per sample site by ``fn.has_rsample``. The score-function mode
makes every guide site non-reparameterised by swapping the class of the
innermost distribution for a subclass whose *class attribute* ``has_rsample``
is False: unlike ``has_rsample_(False)`` on an ``Independent`` (a read-only
property in Pyro 1.9) it survives the ``expand`` done by plates and by
vectorised particles.

References
----------
Williams (1992), Simple statistical gradient-following algorithms for
connectionist reinforcement learning. Kingma & Welling (2014), Auto-Encoding
Variational Bayes. Mohamed et al. (2020), Monte Carlo Gradient Estimation in
Machine Learning. Mnih & Gregor (2014), Neural Variational Inference and
Learning in Belief Networks. Burda, Grosse & Salakhutdinov (2016), Importance
Weighted Autoencoders. Mnih & Rezende (2016), Variational Inference for Monte
Carlo Objectives. Jang, Gu & Poole (2017), Categorical Reparameterization
with Gumbel-Softmax. Kool, van Hoof & Welling (2019), Buy 4 REINFORCE Samples,
Get a Baseline for Free!
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import pyro.infer
import torch
from pyro import poutine
from pyro.distributions.distribution import Distribution as _PyroDistribution
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.util import MultiFrameTensor, get_plate_stacks, is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match
from torch import nn
from torch.distributions import kl_divergence

from ..errors import ConfigError, NotReparameterizableError
from .traces import per_datapoint, plate_nesting

__all__ = [
    "Estimator",
    "EstimatorLoss",
    "Reparameterized",
    "ScoreFunction",
    "AnalyticKL",
    "IWAE",
    "Relaxed",
    "Enumerated",
    "ParticleTerms",
    "particle_terms",
    "get_estimator",
    "ESTIMATORS",
    "BASELINES",
    "is_latent",
]

PARTICLES = "num_particles_vectorized"  # the name of Pyro's vectorised-particle plate
BASELINES = ("average", "nvil", "loo")
_DEFAULT_SCORE_PARTS = (
    _PyroDistribution.score_parts
)  # Pyro's: the log-density, a score or an entropy term by has_rsample


def _not_a_guess(record: logging.LogRecord) -> bool:
    """Drop Pyro's INFO line ``Guessed max_plate_nesting = k``: a Pyro ELBO run here guesses it on its first step, and
    Pyro's own handler would print the line to the console of every Python session that trains (nothing else is muted)."""
    return not record.getMessage().startswith("Guessed max_plate_nesting")


@contextlib.contextmanager
def _no_guess_line() -> Iterator[None]:
    """Within the block, Pyro's ELBO logger drops its ``Guessed max_plate_nesting`` line (:func:`_not_a_guess`); the
    logger is as it was after it, so the package changes no logging of its user's at import or elsewhere."""
    logger = logging.getLogger("pyro.infer.elbo")
    logger.addFilter(_not_a_guess)
    try:
        yield
    finally:
        logger.removeFilter(_not_a_guess)


def _pyro_loss(
    elbo: pyro.infer.ELBO, model: Callable[..., object], guide: Callable[..., object]
) -> Callable[..., torch.Tensor]:
    """Pyro's own differentiable loss of ``elbo``, its guess line muted."""

    def loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        with _no_guess_line():
            return elbo.differentiable_loss(model, guide, *args, **kwargs)

    return loss


class _NotReparameterized(dist.TorchDistribution):
    """``base`` with ``has_rsample = False``: sampled without a pathwise gradient, scored by its own ``log_prob``.

    A wrapper, as Pyro's ``MaskedDistribution`` is, so the user's distribution
    object is never changed. ``has_rsample`` is a class attribute and
    :meth:`expand` returns a wrapper, so the flag survives the ``expand`` done
    by plates and by vectorised particles (``Normal(...).has_rsample_(False)``
    does not: torch's ``expand`` builds a new instance without the instance
    attribute, and torch's ``Independent`` cannot have it set).
    """

    has_rsample = False
    arg_constraints: dict = {}

    def __init__(self, base: torch.distributions.Distribution) -> None:
        self.base = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self) -> Any:  # type: ignore[override]
        return self.base.support

    @property
    def has_enumerate_support(self) -> bool:  # type: ignore[override]
        return self.base.has_enumerate_support

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        return self.base.enumerate_support(expand)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.base.sample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.base.log_prob(value)

    def expand(self, batch_shape: Any, _instance: Any = None) -> _NotReparameterized:
        return _NotReparameterized(self.base.expand(batch_shape))

    @property
    def mean(self) -> torch.Tensor:
        return self.base.mean

    @property
    def variance(self) -> torch.Tensor:
        return self.base.variance


def _leaf(fn: Any) -> Any:
    """The innermost distribution of ``fn`` (through ``Independent``, ``Expanded``, wrappers ...)."""
    while hasattr(fn, "base_dist") or isinstance(fn, (_NotReparameterized, _StraightThroughSample)):
        fn = (
            fn.base
            if isinstance(fn, (_NotReparameterized, _StraightThroughSample))
            else fn.base_dist
        )
    return fn


def is_latent(msg: dict[str, Any]) -> bool:
    """A latent sample site: unobserved and not a plate's subsample site."""
    return msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg)


class _DetachGuideSamples(Messenger):
    def _process_message(self, msg: dict[str, Any]) -> None:
        if is_latent(msg):
            if isinstance(msg["fn"], torch.distributions.TransformedDistribution) and any(
                getattr(t, "_cache_size", 0) for t in msg["fn"].transforms
            ):
                # log q(z) of a draw would reuse the transforms' cached, gradient-free inverse: no score signal at all
                raise ConfigError(
                    f"site {msg['name']!r} is a flow with cached transforms; the score-function estimators cannot differentiate its log-density: use --estimator reparam"
                )
            if msg["fn"].has_rsample:
                msg["fn"] = _NotReparameterized(msg["fn"])


class _RequireRsample(Messenger):
    def _process_message(self, msg: dict[str, Any]) -> None:
        if is_latent(msg) and not msg["fn"].has_rsample:
            if msg["infer"].get("enumerate"):
                return
            name = type(msg["fn"]).__name__
            raise NotReparameterizableError(
                f"guide site {msg['name']!r} ({name}) has no reparameterised sampler; use estimator='score'"
            )


class EstimatorLoss:
    """``loss(*args)`` of an estimator, and the networks it trains itself (NVIL's baseline).

    ``parameters(*example)`` builds those networks for data like ``example``
    (they are built once) and returns their trainable parameters; ``fit``
    adds them to the optimiser after the model's and guide's own.
    ``state_dict()`` / ``load_state_dict()`` save and restore the running
    statistics an estimator keeps between steps (a moving-average baseline),
    as plain numbers, so a resumed run continues bit for bit.
    ``warns``: the loss may run Pyro code that warns of a NaN at any step (one of
    Pyro's own ELBOs), a warning ``fit`` silences (it names the site itself); the
    losses here warn only under validation, and say ``warns=False``.
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        build: Callable[..., list[nn.Module]] | None = None,
        state: Any = None,
        *,
        warns: bool = True,
    ) -> None:
        self.fn, self._build, self.modules, self._state = fn, build, (), state
        self.warns = warns

    def state_dict(self) -> dict[str, Any]:
        """The estimator's running statistics (``{}`` for a stateless estimator)."""
        return self._state.state_dict() if self._state is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if self._state is not None:
            self._state.load_state_dict(state)
        elif state:
            raise ValueError(f"this estimator keeps no state, got {sorted(state)}")

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.fn(*args, **kwargs)

    def networks(self, *example: torch.Tensor) -> tuple[nn.Module, ...]:
        """The networks this estimator trains itself, built once for data like ``example`` (none for most)."""
        if self._build is not None and not self.modules:
            self.modules = tuple(self._build(*example))
        return self.modules

    def parameters(self, *example: torch.Tensor) -> list[torch.Tensor]:
        """The trainable parameters of :meth:`networks` (``fit`` adds them to the optimiser after the model's and guide's)."""
        return [p for m in self.networks(*example) for p in m.parameters() if p.requires_grad]


@dataclass(frozen=True)
class Estimator:
    """Base of the estimators: a Pyro ELBO plus a handler applied to the guide.

    ``compiles`` says whether a step of it can be traced once and compiled (``fit(compile=True)``):
    no value of it is read back to the host at each step; ``compiles_not`` says why not.
    ``pathwise_only``: it needs a pathwise sampler (or enumeration) at every latent guide site, so a
    guide with discrete latents is refused. ``scores``: it takes score-function gradients for every
    guide site, so a guide whose log-density has no gradient in its parameters (a cached flow's)
    trains nothing.
    """

    name: ClassVar[str] = ""
    pathwise_only: ClassVar[bool] = True
    scores: ClassVar[bool] = False

    @property
    def compiles(self) -> bool:
        return not self.compiles_not

    @property
    def compiles_not(self) -> str:
        return ""

    def elbo(self, num_particles: int, vectorize: bool = True) -> pyro.infer.ELBO:
        return pyro.infer.Trace_ELBO(
            num_particles=num_particles, vectorize_particles=vectorize and num_particles > 1
        )

    def guide_handler(self) -> Messenger:
        return _RequireRsample()

    def validate(self, num_particles: int) -> None:
        """Raise :class:`ConfigError` if the estimator cannot run with ``num_particles``."""

    def handled(self, guide: Callable[..., object]) -> Callable[..., object]:
        """``guide`` run under this estimator's guide handler."""
        handler = self.guide_handler()

        def handled_guide(*args: Any, **kwargs: Any) -> object:
            with handler:
                return guide(*args, **kwargs)

        return handled_guide

    def loss(
        self,
        model: Callable[..., object],
        guide: Callable[..., object],
        num_particles: int = 1,
        *,
        vectorize: bool = True,
    ) -> EstimatorLoss:
        """``loss(*args)``: a differentiable negative ELBO whose gradient is this estimator's.

        ``vectorize=False`` draws the particles one after another (Pyro's ``vectorize_particles=False``),
        for code that cannot run them at once; an estimator whose terms need the particles side by
        side refuses it by name.
        """
        self.validate(num_particles)
        elbo, handled_guide = self.elbo(num_particles, vectorize), self.handled(guide)
        if isinstance(
            elbo, pyro.infer.TraceEnum_ELBO
        ):  # Pyro's own (it reads each site's value back to the host)
            return EstimatorLoss(_pyro_loss(elbo, model, handled_guide))
        particles = Particles(num_particles, vectorize)
        mean_field = isinstance(elbo, pyro.infer.TraceMeanField_ELBO)
        if not mean_field:
            return EstimatorLoss(
                lambda *args, **kwargs: trace_loss(
                    particles(model, handled_guide, args, kwargs), num_particles
                ),
                warns=False,
            )

        def mean_field_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
            # Pyro only warns when it cannot verify a mean-field guide, and its closed-form KL terms are then wrong
            # (a structured q(z2 | z1) is not independent of z1): refuse by name instead. Pyro checks under
            # validation only (fit's first step), so the other steps take the plain loss.
            if not is_validation_enabled():
                return trace_loss(
                    particles(model, handled_guide, args, kwargs), num_particles, mean_field=True
                )
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message="Failed to verify mean field restriction")
                try:
                    return _pyro_loss(elbo, model, handled_guide)(*args, **kwargs)
                except UserWarning as exc:
                    model_sites, _, guide_sites = (
                        str(exc).partition("Model sites:")[2].partition("Guide sites:")
                    )
                    raise ConfigError(
                        f"{self.name} takes KL terms in closed form, which needs a mean-field guide whose sites come in the model's order; "
                        f"Pyro could not verify this guide (model sites {', '.join(model_sites.split())}; guide sites "
                        f"{', '.join(guide_sites.split())}); use estimator='reparam'"
                    ) from None

        return EstimatorLoss(mean_field_loss, warns=False)  # Pyro's ELBO under validation only


@dataclass(frozen=True)
class Reparameterized(Estimator):
    """Pathwise gradients; fails loudly on a guide site that cannot be reparameterised."""

    name: ClassVar[str] = "reparam"


# ---------------------------------------------------------------------------
# the traces of a step's particles, and Pyro's Trace_ELBO / TraceMeanField_ELBO surrogate losses on them


class Particles:
    """The ``(model_trace, guide_trace)`` pairs of one step's particles: one pair with the particles vectorised in a plate left of
    the model's (Pyro's ``vectorize_particles``), else one per particle; log-densities and score parts computed where a loss
    needs them (:func:`site_log_prob`, :func:`site_score_parts`), all of them under validation, by Pyro.

    How many plates deep the model goes is found on the first call and kept, and so are the handlers
    that trace the guide and replay the model on its draws (Pyro's ``trace`` and ``replay``, built once
    for a model and guide, not at every step).
    """

    def __init__(self, num_particles: int, vectorize: bool = True) -> None:
        self.num_particles, self.vectorize, self.nesting = (
            num_particles,
            vectorize and num_particles > 1,
            None,
        )
        self._handlers: tuple[
            Any, ...
        ] = ()  # (model, guide, traced guide, replay, traced replayed model)

    def __call__(
        self, model: Callable[..., object], guide: Callable[..., object], args: tuple, kwargs: dict
    ) -> list[tuple[Any, Any]]:
        if not self.vectorize:
            return [self._run(model, guide, args, kwargs) for _ in range(self.num_particles)]
        if self.nesting is None:
            self.nesting = plate_nesting(model, guide, *args)
        return [self._run(model, guide, args, kwargs)]

    def _vectorized(self, fn: Callable[..., object]) -> Callable[..., object]:
        dim, k = -(self.nesting + 1), self.num_particles  # type: ignore[operator]

        def run(*a: Any, **kw: Any) -> object:
            with pyro.plate(PARTICLES, k, dim=dim):
                return fn(*a, **kw)

        return run

    def _traced(
        self, model: Callable[..., object], guide: Callable[..., object]
    ) -> tuple[Any, ...]:
        """The handlers of ``model`` and ``guide``: built on the first call, kept while they are the same."""
        if not self._handlers or self._handlers[0] is not model or self._handlers[1] is not guide:
            run_model, run_guide = (
                (self._vectorized(model), self._vectorized(guide))
                if self.vectorize
                else (model, guide)
            )
            replay = ReplayMessenger(trace=Trace())
            self._handlers = (
                model,
                guide,
                poutine.trace(run_guide),
                replay,
                poutine.trace(replay(run_model)),
            )
        return self._handlers[2:]

    def _run(
        self, model: Callable[..., object], guide: Callable[..., object], args: tuple, kwargs: dict
    ) -> tuple[Any, Any]:
        traced_guide, replay, traced_model = self._traced(model, guide)
        traced_guide(*args, **kwargs)
        guide_tr = traced_guide.trace  # a new trace at each run: the handler keeps none
        replay.trace = guide_tr
        try:
            traced_model(*args, **kwargs)
        finally:
            replay.trace = _EMPTY
        model_tr = traced_model.trace
        if (
            is_validation_enabled()
        ):  # a first step: Pyro's own checks, below its warnings on every site
            check_model_guide_match(model_tr, guide_tr)
        model_tr, guide_tr = _pruned(model_tr), _pruned(guide_tr)
        if is_validation_enabled():
            model_tr.compute_log_prob()
            guide_tr.compute_score_parts()
        # otherwise the log-densities are computed where a loss needs them (:func:`site_log_prob`)
        return model_tr, guide_tr


_EMPTY = Trace()  # what the model replays between steps (the last guide trace is not kept)


def _pruned(tr: Trace) -> Trace:
    """``tr`` (a trace of this step's own) without its subsample sites, in place (Pyro's ``prune_subsample_sites`` copies it)."""
    for name in [name for name, site in tr.nodes.items() if site_is_subsample(site)]:
        tr.remove_node(name)
    return tr


def _named(what: str, tr: Trace, site: dict[str, Any], e: ValueError) -> ValueError:
    """A ``ValueError`` met computing a site's ``what``, named as Pyro's ``Trace.compute_log_prob`` names it (the site, the trace's shapes)."""
    shapes = tr.format_shapes(last_site=site["name"])
    return ValueError(f"Error while computing {what} at site '{site['name']}':\n{e}\n{shapes}")


def site_log_prob(tr: Trace, site: dict[str, Any]) -> torch.Tensor:
    """A sample site's scaled, masked log-density (``site["log_prob"]``), computed on first use and kept in the site with its
    ``log_prob_sum`` and ``unscaled_log_prob``, as Pyro's ``Trace.compute_log_prob`` keeps them: a loss computes only the
    log-densities it uses (a mean-field loss skips those of the sites whose KL it takes in closed form)."""
    if "log_prob" not in site:
        try:
            log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
        except ValueError as e:
            raise _named("log_prob", tr, site, e).with_traceback(e.__traceback__) from e
        site["unscaled_log_prob"] = log_p
        log_p = scale_and_mask(log_p, site["scale"], site["mask"])
        site["log_prob"], site["log_prob_sum"] = log_p, log_p.sum()
    return site["log_prob"]


def site_score_parts(tr: Trace, site: dict[str, Any]) -> ScoreParts:
    """A guide site's score parts (``site["score_parts"]``), as Pyro's ``Trace.compute_score_parts`` computes them, on first use.

    For a distribution with Pyro's default ``score_parts`` (every one but a partially reparameterised
    or masked one), the scaled log-density is computed once and stands for the entropy term too (Pyro
    computes the same product twice), and a log-density already computed is used as it is.
    """
    if "score_parts" in site:
        return site["score_parts"]
    fn = site["fn"]
    if type(fn).score_parts is _DEFAULT_SCORE_PARTS:
        log_p = site_log_prob(tr, site)
        unscaled = site["unscaled_log_prob"]
        parts = ScoreParts(log_p, 0, log_p) if fn.has_rsample else ScoreParts(log_p, unscaled, 0)
    else:
        try:
            raw = fn.score_parts(site["value"], *site["args"], **site["kwargs"])
        except ValueError as e:
            raise _named("score_parts", tr, site, e).with_traceback(e.__traceback__) from e
        site["unscaled_log_prob"] = raw.log_prob
        parts = raw.scale_and_mask(site["scale"], site["mask"])
        site["log_prob"], site["log_prob_sum"] = parts.log_prob, parts.log_prob.sum()
    site["score_parts"] = parts
    return parts


def _log_r(model_tr: Any, guide_tr: Any) -> MultiFrameTensor:
    """Each model site's log p minus the guide's log q, detached, kept per plate frame: the cost a score-function term multiplies
    (summed to a site's own plates, so a datapoint's term meets its own cost only: Pyro's Rao-Blackwellisation over plates)."""
    log_r, stacks = MultiFrameTensor(), get_plate_stacks(model_tr)
    for name, site in model_tr.nodes.items():
        if site["type"] == "sample":
            term = (
                site_log_prob(model_tr, site)
                if site["is_observed"]
                else site_log_prob(model_tr, site) - site_log_prob(guide_tr, guide_tr.nodes[name])
            )
            log_r.add((stacks[name], term.detach()))
    return log_r


class _Sums:
    """The ELBO and the surrogate of :func:`trace_loss`, summed term by term in Pyro's order; one sum while their terms are the
    same tensors (every site pathwise: the surrogate's entropy term is the guide's log-density), two from the first that differs."""

    def __init__(self) -> None:
        self.elbo: torch.Tensor | float | None = None
        self.surrogate: torch.Tensor | float | None = None  # None: the same as elbo
        self.split = False

    @staticmethod
    def _add(total: Any, term: Any, sign: float) -> Any:
        if total is None:
            return term if sign > 0 else -term
        return total + term if sign > 0 else total - term

    def add(self, term: Any, sign: float = 1.0, surrogate: Any = ...) -> None:
        """Add ``term`` to the ELBO and ``surrogate`` (default: ``term``) to the surrogate, times ``sign``."""
        if surrogate is not ... and surrogate is not term and not self.split:
            self.split, self.surrogate = True, self.elbo
        self.elbo = self._add(self.elbo, term, sign)
        if self.split:
            if surrogate is ...:
                surrogate = term
            if surrogate is not None:
                self.surrogate = self._add(self.surrogate, surrogate, sign)

    def score(self, term: torch.Tensor) -> None:
        """Add a score-function term to the surrogate only."""
        if not self.split:
            self.split, self.surrogate = True, self.elbo
        self.surrogate = self._add(self.surrogate, term, 1.0)

    def loss(self, num_particles: int) -> torch.Tensor:
        """``-(elbo.detach() + surrogate - surrogate.detach()) / num_particles``: the ELBO's value, the surrogate's gradient."""
        elbo, surrogate = (self.elbo, self.surrogate) if self.split else (self.elbo, self.elbo)
        like = next(
            t for t in (elbo, surrogate) if torch.is_tensor(t)
        )  # (torch.as_tensor would take torch's default device)
        elbo_t = elbo if torch.is_tensor(elbo) else like.new_tensor(elbo or 0.0)
        surrogate_t = surrogate if torch.is_tensor(surrogate) else like.new_tensor(surrogate or 0.0)
        loss = -(elbo_t.detach() + surrogate_t - surrogate_t.detach())
        return loss / num_particles if num_particles != 1 else loss


def trace_loss(
    pairs: list[tuple[Any, Any]], num_particles: int, *, mean_field: bool = False
) -> torch.Tensor:
    r"""Pyro's ``Trace_ELBO`` (or, with ``mean_field``, ``TraceMeanField_ELBO``) loss on traced particles, read back nowhere.

    The value is the negative ELBO; the gradient is the surrogate's: the pathwise terms of reparameterised
    sites (their entropy terms), and the score function of the others times their downstream cost,

    .. math::

        \nabla \mathcal{L} = \mathbb{E}\big[\nabla (\log p - \log q)_{\text{pathwise}}
            + (\log p - \log q)_{\text{downstream}} \nabla \log q_{\text{score}}\big].

    With ``mean_field`` a latent site's KL term is taken in closed form where torch registers it
    (``kl_divergence``), scaled and masked as the site is; the log-densities of such a site are not
    computed. Pyro's own implementations read each site's value back to the host (``torch_item``, a NaN
    check); here everything stays a tensor, so one step reads back only what its caller asks for.
    """
    sums = _Sums()
    for model_tr, guide_tr in pairs:
        log_r, closed = None, set()
        for name, site in model_tr.nodes.items():
            if site["type"] != "sample":
                continue
            kl_sum = (
                _kl_sum(guide_tr.nodes[name], site)
                if mean_field and not site["is_observed"]
                else None
            )
            if kl_sum is None:
                site_log_prob(model_tr, site)
                sums.add(site["log_prob_sum"])
            else:
                closed.add(name)
                sums.add(kl_sum, -1.0)
        for name, site in guide_tr.nodes.items():
            if site["type"] != "sample" or name in closed:
                continue
            _, score, entropy = site_score_parts(guide_tr, site)
            sums.add(
                site["log_prob_sum"],
                -1.0,
                None
                if is_identically_zero(entropy)
                else site["log_prob_sum"]
                if entropy is site["log_prob"]
                else entropy.sum(),
            )
            if not is_identically_zero(score):
                log_r = _log_r(model_tr, guide_tr) if log_r is None else log_r
                sums.score((log_r.sum_to(site["cond_indep_stack"]) * score).sum())
    return sums.loss(num_particles)


def _kl_sum(q_site: dict[str, Any], p_site: dict[str, Any]) -> torch.Tensor | float | None:
    """The closed-form KL of a guide site from its model site, summed, scaled and masked as the guide site is; None where torch registers none."""
    try:
        kl = scale_and_mask(
            kl_divergence(q_site["fn"], p_site["fn"]), scale=q_site["scale"], mask=q_site["mask"]
        )
    except NotImplementedError:
        return None
    return kl.sum() if torch.is_tensor(kl) else kl * torch.Size(q_site["fn"].batch_shape).numel()


# ---------------------------------------------------------------------------
# per-particle, per-datapoint terms on vectorised traces


@dataclass(frozen=True)
class ParticleTerms:
    r"""Per-particle, per-datapoint pieces of one (vectorised) ELBO draw, each ``[K, N]``.

    ``log_weight`` is :math:`\sum_\text{model} s \log p - \sum_\text{guide} s \log q`
    with the sites' scales :math:`s` (minibatch, beta) and all pathwise
    gradients; ``pathwise`` is the same with Pyro's entropy term in place of
    :math:`\log q` (zero for a non-reparameterised site); ``score`` is the
    unscaled :math:`\sum \log q(z)` of the non-reparameterised guide sites
    (their score-function term). ``scale`` is the one scale shared by every
    site, or None.
    """

    log_weight: torch.Tensor
    pathwise: torch.Tensor
    score: torch.Tensor
    has_score: bool
    scale: float | None


def _reduce(lp: Any, site: dict[str, Any], plate: str, zero: torch.Tensor) -> torch.Tensor:
    """Sum a site's (scaled, masked) log-density over everything but the particle and ``plate`` dims: ``[K or 1, N]`` (on ``zero``'s
    device), by :func:`~.traces.per_datapoint`."""
    lp = per_datapoint(
        site,
        plate,
        torch.as_tensor(lp, device=zero.device),
        draws=PARTICLES,
        masked=True,
        what="estimators",
    )
    return lp if any(f.name == PARTICLES for f in site["cond_indep_stack"]) else lp.unsqueeze(0)


def _common_scale(sites: list[dict[str, Any]]) -> float | None:
    scales = set()
    for site in sites:
        sc = site["scale"]
        if torch.is_tensor(sc):
            if sc.numel() != 1:
                return None
            sc = sc.item()
        scales.add(float(sc))
    return scales.pop() if len(scales) == 1 else None


def particle_terms(
    particles: Particles,
    model: Callable[..., object],
    guide: Callable[..., object],
    args: tuple,
    kwargs: dict,
    plate: str = "data",
) -> ParticleTerms:
    """One draw of the (vectorised) particles' traces (:class:`Particles`) cut into :class:`ParticleTerms`."""
    model_tr, guide_tr = particles(model, guide, args, kwargs)[0]
    data = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
    zero = data.new_zeros(()) if data is not None else torch.zeros((), device="cpu")
    log_p, log_q, entropy, score, has_score = zero, zero, zero, zero, False
    sites = []
    for site in model_tr.nodes.values():
        if site["type"] == "sample":
            sites.append(site)
            log_p = log_p + _reduce(site_log_prob(model_tr, site), site, plate, zero)
    for site in guide_tr.nodes.values():
        if site["type"] == "sample":
            sites.append(site)
            parts = site_score_parts(guide_tr, site)
            log_q = log_q + _reduce(parts.log_prob, site, plate, zero)
            if not is_identically_zero(parts.entropy_term):
                entropy = entropy + _reduce(parts.entropy_term, site, plate, zero)
            if not is_identically_zero(parts.score_function):
                score, has_score = score + _reduce(parts.score_function, site, plate, zero), True
    return ParticleTerms(log_p - log_q, log_p - entropy, score, has_score, _common_scale(sites))


def _value_preserving(objective: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A tensor with the value of ``value`` and the gradient of ``objective``."""
    return objective - objective.detach() + value.detach()


class _Running:
    """Bias-corrected exponential moving averages of the mean and variance of ``f`` (Adam-style)."""

    def __init__(self, decay: float) -> None:
        self.decay, self.steps, self.m1, self.m2 = decay, 0, 0.0, 0.0

    def mean_sd(self) -> tuple[float, float]:
        if self.steps == 0:
            return 0.0, 1.0
        c = 1 - self.decay**self.steps
        mean, sq = self.m1 / c, self.m2 / c
        return mean, math.sqrt(max(sq - mean * mean, 0.0)) + 1e-6

    def update(self, f: torch.Tensor) -> None:
        self.steps += 1
        self.m1 = self.decay * self.m1 + (1 - self.decay) * f.mean().item()
        self.m2 = self.decay * self.m2 + (1 - self.decay) * (f * f).mean().item()

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "steps": self.steps, "m1": self.m1, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("decay") != self.decay:
            raise ValueError(
                f"baseline decay {state.get('decay')!r} does not match this estimator's {self.decay}"
            )
        self.steps, self.m1, self.m2 = int(state["steps"]), float(state["m1"]), float(state["m2"])


def _nvil_net(x: torch.Tensor, hidden: int) -> nn.Module:
    """The NVIL baseline network, built on ``x``'s device and dtype."""
    with torch.device(x.device):
        net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(x[0].numel(), hidden, dtype=x.dtype),
            nn.Tanh(),
            nn.Linear(hidden, 1, dtype=x.dtype),
        )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


@dataclass(frozen=True)
class ScoreFunction(Estimator):
    r"""Score-function (REINFORCE) gradients for every guide site, optionally with a baseline.

    .. math::

        \nabla_\phi \mathcal{L} \approx \frac1K \sum_{k=1}^K
            (f_k - b_k)\, \nabla_\phi \log q_\phi(z_k \mid x),
        \qquad f_k = \log p(x, z_k) - \log q_\phi(z_k \mid x)

    plus the pathwise gradient of :math:`\log p_\theta` for the model's
    parameters. Per datapoint, with :math:`K` = ``num_particles``:

    * ``baseline=None``: :math:`b = 0`, Pyro's ``Trace_ELBO`` as is.
    * ``"average"``: :math:`b` = a bias-corrected exponential moving average
      (``decay``) of :math:`f` over past steps (Pyro's decaying-average
      baseline, Williams 1992).
    * ``"nvil"``: :math:`b(x) = \bar f + \hat\sigma_f\, B_\psi(x)`, the moving
      average plus a learned input-dependent network :math:`B_\psi` (an MLP,
      ``hidden`` units) trained by least squares on the standardised signal
      (Mnih & Gregor 2014). Its parameters are trained by ``fit``.
    * ``"loo"``: :math:`b_k = \frac{1}{K-1} \sum_{j \ne k} f_j`, the
      leave-one-out mean of the other particles (REINFORCE-LOO, Kool et al.
      2019); needs ``num_particles >= 2``.

    No baseline depends on the sample it multiplies, so every estimator is
    unbiased. The loss's value is the negative ELBO; the moving averages live
    in the loss object ``fit`` makes, which checkpoints them
    (:meth:`EstimatorLoss.state_dict`).
    """

    pathwise_only: ClassVar[bool] = False
    scores: ClassVar[bool] = True

    baseline: str | None = None
    decay: float = 0.9
    hidden: int = 100

    def __post_init__(self) -> None:
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ConfigError(
                f"unknown baseline {self.baseline!r}; choose one of {', '.join(BASELINES)} or None"
            )
        if not 0 <= self.decay < 1:
            raise ConfigError(f"baseline decay must be in [0, 1), got {self.decay}")

    @property  # type: ignore[override]
    def name(self) -> str:  # type: ignore[override]
        return "score" if self.baseline is None else f"score+{self.baseline}"

    def guide_handler(self) -> Messenger:
        return _DetachGuideSamples()

    @property
    def compiles_not(self) -> str:
        if self.baseline in ("average", "nvil"):
            return "keeps its moving-average baseline as numbers updated on the host at each step"
        return ""

    def validate(self, num_particles: int) -> None:
        if self.baseline == "loo" and num_particles < 2:
            raise ConfigError(
                f"the leave-one-out baseline needs --num-particles >= 2, got {num_particles}"
            )

    def loss(
        self,
        model: Callable[..., object],
        guide: Callable[..., object],
        num_particles: int = 1,
        *,
        vectorize: bool = True,
    ) -> EstimatorLoss:
        if self.baseline is None:
            return super().loss(model, guide, num_particles, vectorize=vectorize)
        self.validate(num_particles)
        _side_by_side(self.name, num_particles, vectorize)
        return _BaselineLoss(self, Particles(num_particles), model, self.handled(guide))


class _BaselineLoss(EstimatorLoss):
    """The score-function loss with a baseline (:class:`ScoreFunction`); it owns the baseline's state and network."""

    def __init__(
        self,
        est: ScoreFunction,
        particles: Particles,
        model: Callable[..., object],
        guide: Callable[..., object],
    ) -> None:
        self.est, self.particles, self.model, self.guide = est, particles, model, guide
        self.running = _Running(est.decay)
        build = (lambda x, *rest: [_nvil_net(x, est.hidden)]) if est.baseline == "nvil" else None
        super().__init__(
            self._loss,
            build=build,
            state=self.running if est.baseline != "loo" else None,
            warns=False,
        )

    def _loss(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        t = particle_terms(self.particles, self.model, self.guide, args, kwargs)
        f = t.log_weight.detach()
        extra = f.new_zeros(())
        if self.est.baseline == "loo":
            b = (f.sum(0, keepdim=True) - f) / (f.shape[0] - 1)
        else:
            mean, sd = self.running.mean_sd()
            b = torch.full_like(f[:1], mean)
            if self.est.baseline == "nvil":
                (net,) = self.networks(*args)
                out = net(args[0]).squeeze(-1)
                b = b + sd * out.detach()
                mse = ((((f - mean) / sd) - out) ** 2).mean()
                extra = mse - mse.detach()  # trains the network, adds nothing to the value
            self.running.update(f)
        objective = (t.pathwise + (f - b) * t.score).mean(0).sum()
        return -_value_preserving(objective, t.log_weight.detach().mean(0).sum()) + extra


def _side_by_side(name: str, num_particles: int, vectorize: bool) -> None:
    """Refuse, by name, particles one after another for an estimator whose terms compare them side by side."""
    if not vectorize and num_particles > 1:
        raise ConfigError(
            f"estimator {name} compares its {num_particles} particles side by side, and the model or guide cannot run them at "
            "once (vectorised); use num_particles=1, or an estimator whose particles run one after another (reparam, score)"
        )


def _mean_field_elbo(num_particles: int, vectorize: bool = True) -> pyro.infer.ELBO:
    """Pyro's ``TraceMeanField_ELBO``: closed-form KL terms where registered, pathwise the rest."""
    return pyro.infer.TraceMeanField_ELBO(
        num_particles=num_particles, vectorize_particles=vectorize and num_particles > 1
    )


@dataclass(frozen=True)
class AnalyticKL(Estimator):
    """Pathwise reconstruction term and closed-form KL where registered (mean-field)."""

    name: ClassVar[str] = "analytic-kl"

    def elbo(self, num_particles: int, vectorize: bool = True) -> pyro.infer.ELBO:
        return _mean_field_elbo(num_particles, vectorize)


@dataclass(frozen=True)
class IWAE(Estimator):
    r"""The importance-weighted bound with ``K = num_particles`` samples per datapoint.

    .. math::

        \mathcal{L}_K(x) = \mathbb{E}\Big[\log \frac1K \sum_{k=1}^K
            \frac{p(x, z_k)}{q(z_k \mid x)}\Big] \le \log p(x)

    (Burda et al. 2016): the ELBO for ``K = 1``, tighter as ``K`` grows; Pyro's
    ``RenyiELBO(alpha=0)`` computes it for the whole batch at once, this one
    per datapoint, so minibatches are scaled correctly. Reparameterised sites
    get pathwise gradients; a non-reparameterised (discrete) site gets the
    score function with VIMCO's leave-one-out signal
    :math:`\hat{\mathcal L} - \hat{\mathcal L}_{-k}` where the :math:`k`-th
    log-weight is replaced by the mean of the others (Mnih & Rezende 2016).
    The loss value is the negative bound; beta-weighting does not apply.
    """

    pathwise_only: ClassVar[bool] = False

    name: ClassVar[str] = "iwae"

    def loss(
        self,
        model: Callable[..., object],
        guide: Callable[..., object],
        num_particles: int = 1,
        *,
        vectorize: bool = True,
    ) -> EstimatorLoss:
        _side_by_side(self.name, num_particles, vectorize)
        particles = Particles(num_particles)

        def fn(*args: Any, **kwargs: Any) -> torch.Tensor:
            t = particle_terms(particles, model, guide, args, kwargs)
            if t.scale is None:
                raise ConfigError(
                    "iwae needs one scale on every site (beta-weighting is not defined for the IWAE bound)"
                )
            lw = t.log_weight / t.scale
            k = lw.shape[0]
            bound = torch.logsumexp(lw, 0) - math.log(k)
            objective = bound.sum()
            if t.has_score:
                d = lw.detach()
                if k > 1:
                    loo = d.unsqueeze(0).repeat(k, 1, 1)  # [K (left out), K, N]
                    idx = torch.arange(k)
                    loo[idx, idx] = (d.sum(0, keepdim=True) - d) / (k - 1)
                    signal = bound.detach() - (torch.logsumexp(loo, 1) - math.log(k))
                else:
                    signal = bound.detach().unsqueeze(0)
                objective = objective + (signal * (t.score - t.score.detach())).sum()
            return -t.scale * objective

        return EstimatorLoss(fn, warns=False)


# ---------------------------------------------------------------------------
# straight-through relaxation of discrete guide sites


def _relaxed(fn: Any, temperature: float) -> Any:
    """The straight-through relaxation of a Bernoulli or one-hot categorical (inside any ``Independent`` layers)."""
    if isinstance(fn, torch.distributions.Independent):
        return dist.Independent(_relaxed(fn.base_dist, temperature), fn.reinterpreted_batch_ndims)
    t = torch.tensor(temperature, dtype=fn.logits.dtype, device=fn.logits.device)
    if isinstance(fn, torch.distributions.Bernoulli):
        return dist.RelaxedBernoulliStraightThrough(t, logits=fn.logits)
    return dist.RelaxedOneHotCategoricalStraightThrough(t, logits=fn.logits)


class _StraightThroughSample(dist.TorchDistribution):
    """A Bernoulli / one-hot categorical ``base`` whose ``rsample`` is its straight-through Gumbel-softmax relaxation.

    The draw is exactly discrete (its ``log_prob`` is ``base``'s), the
    gradient flows through the relaxed sample; a wrapper, so the user's
    distribution is never changed. Its KL to any distribution is ``base``'s
    (registered below), so the discrete KL stays in closed form.
    """

    has_rsample = True
    arg_constraints: dict = {}

    def __init__(self, base: torch.distributions.Distribution, temperature: float) -> None:
        self.base, self.temperature = base, temperature
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self) -> Any:  # type: ignore[override]
        return self.base.support

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return _relaxed(self.base, self.temperature).rsample(sample_shape)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.base.sample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.base.log_prob(value)

    def expand(self, batch_shape: Any, _instance: Any = None) -> _StraightThroughSample:
        return _StraightThroughSample(self.base.expand(batch_shape), self.temperature)

    @property
    def mean(self) -> torch.Tensor:
        return self.base.mean


@torch.distributions.kl.register_kl(_StraightThroughSample, torch.distributions.Distribution)
def _kl_straight_through(
    p: _StraightThroughSample, q: torch.distributions.Distribution
) -> torch.Tensor:
    return torch.distributions.kl.kl_divergence(p.base, q)


class _StraightThrough(_RequireRsample):
    """Relax Bernoulli / one-hot categorical latent sites, then require every site to be pathwise."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def _process_message(self, msg: dict[str, Any]) -> None:
        if is_latent(msg) and not msg["infer"].get("enumerate"):
            if isinstance(
                _leaf(msg["fn"]),
                (torch.distributions.Bernoulli, torch.distributions.OneHotCategorical),
            ):
                msg["fn"] = _StraightThroughSample(msg["fn"], self.temperature)
        super()._process_message(msg)


@dataclass(frozen=True)
class Relaxed(Estimator):
    r"""Straight-through Gumbel-softmax gradients for Bernoulli and one-hot categorical guide sites.

    The guide draws an exact discrete sample :math:`z = \mathrm{hard}(y)` of
    the relaxed :math:`y \sim \mathrm{Concrete}(\text{logits}, \tau)` and
    back-propagates through :math:`y` (straight-through); the KL term of the
    discrete distributions is analytic (Pyro's ``TraceMeanField_ELBO``), as
    in Jang, Gu & Poole (2017). The ELBO's *value* is that of the discrete
    model; the gradient is biased, with less bias as ``temperature`` -> 0
    and more variance. Other sites are pathwise.
    """

    pathwise_only: ClassVar[bool] = False

    temperature: float = 1.0
    name: ClassVar[str] = "relaxed"

    def __post_init__(self) -> None:
        if not (
            isinstance(self.temperature, (int, float))
            and self.temperature > 0
            and math.isfinite(self.temperature)
        ):
            raise ConfigError(
                f"relaxation temperature must be positive and finite, got {self.temperature}"
            )

    def elbo(self, num_particles: int, vectorize: bool = True) -> pyro.infer.ELBO:
        return _mean_field_elbo(
            num_particles, vectorize
        )  # the discrete KL in closed form, the rest pathwise

    def guide_handler(self) -> Messenger:
        return _StraightThrough(float(self.temperature))


@dataclass(frozen=True)
class Enumerated(Estimator):
    """Sum out model sites marked ``infer={"enumerate": "parallel"}`` exactly (``TraceEnum_ELBO``); pathwise elsewhere."""

    name: ClassVar[str] = "enum"

    @property
    def compiles_not(self) -> str:
        return "sums out its discrete sites with Pyro's TraceEnum_ELBO, which reads each site's value back to the host"

    def elbo(self, num_particles: int, vectorize: bool = True) -> pyro.infer.ELBO:
        return pyro.infer.TraceEnum_ELBO(
            num_particles=num_particles, vectorize_particles=vectorize and num_particles > 1
        )


ESTIMATORS: dict[str, Callable[[], Estimator]] = {
    "reparam": Reparameterized,
    "score": ScoreFunction,
    **{f"score+{b}": functools.partial(ScoreFunction, baseline=b) for b in BASELINES},
    "analytic-kl": AnalyticKL,
    "iwae": IWAE,
    "relaxed": Relaxed,
    "enum": Enumerated,
}


def get_estimator(estimator: str | Estimator) -> Estimator:
    """An :class:`Estimator` from itself or its name.

    Names: ``reparam``, ``score``, ``score+average``, ``score+nvil``,
    ``score+loo``, ``analytic-kl``, ``iwae``, ``relaxed`` (temperature 1) or
    ``relaxed:T``, ``enum``.
    """
    if isinstance(estimator, Estimator):
        return estimator
    if estimator in ESTIMATORS:
        return ESTIMATORS[estimator]()
    name, _, arg = str(estimator).partition(":")
    if name == "relaxed" and arg:
        try:
            temperature = float(arg)
        except ValueError:
            raise ConfigError(f"relaxation temperature must be a number, got {arg!r}") from None
        return Relaxed(temperature)
    head, plus, tail = name.partition("+")
    if plus and head in ESTIMATORS and head != "score":
        raise ConfigError(
            f"a baseline ({tail!r}) applies to the score-function estimator only, not {head!r}; use score+{tail}"
        )
    raise ConfigError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
