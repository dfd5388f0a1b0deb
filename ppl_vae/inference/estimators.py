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
Machine Learning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pyro.infer
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ..errors import ConfigError, NotReparameterizableError

__all__ = ["Estimator", "Reparameterized", "ScoreFunction", "AnalyticKL", "get_estimator", "ESTIMATORS"]


_SCORE_CLASSES: dict[type, type] = {}


def _score_class(cls: type) -> type:
    if cls not in _SCORE_CLASSES:
        _SCORE_CLASSES[cls] = type(f"ScoreFunction{cls.__name__}", (cls,), {"has_rsample": False, "__module__": __name__})
    return _SCORE_CLASSES[cls]


def detach_sampling(fn: Any) -> Any:
    """Make ``fn`` (and whatever it wraps) non-reparameterised, in place; returns ``fn``."""
    leaf = fn
    while hasattr(leaf, "base_dist"):
        leaf = leaf.base_dist
    if leaf.has_rsample:
        leaf.__class__ = _score_class(type(leaf))
    return fn


def is_latent(msg: dict[str, Any]) -> bool:
    """A latent sample site: unobserved and not a plate's subsample site."""
    return msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg)


class _DetachGuideSamples(Messenger):
    def _process_message(self, msg: dict[str, Any]) -> None:
        if is_latent(msg):
            msg["fn"] = detach_sampling(msg["fn"])


class _RequireRsample(Messenger):
    def _process_message(self, msg: dict[str, Any]) -> None:
        if is_latent(msg) and not msg["fn"].has_rsample:
            if msg["infer"].get("enumerate"):
                return
            name = type(msg["fn"]).__name__
            raise NotReparameterizableError(
                f"guide site {msg['name']!r} ({name}) has no reparameterised sampler; use estimator='score'"
            )


@dataclass(frozen=True)
class Estimator:
    """Base of the estimators: a Pyro ELBO plus a handler applied to the guide."""

    name: ClassVar[str] = ""

    def elbo(self, num_particles: int) -> pyro.infer.ELBO:
        return pyro.infer.Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)

    def guide_handler(self) -> Messenger:
        return _RequireRsample()

    def loss(self, model: Callable[..., object], guide: Callable[..., object], num_particles: int = 1) -> Callable[..., torch.Tensor]:
        """``loss(*args)``: a differentiable negative ELBO whose gradient is this estimator's."""
        elbo, handler = self.elbo(num_particles), self.guide_handler()

        def handled_guide(*args: Any, **kwargs: Any) -> object:
            with handler:
                return guide(*args, **kwargs)

        return lambda *args, **kwargs: elbo.differentiable_loss(model, handled_guide, *args, **kwargs)


@dataclass(frozen=True)
class Reparameterized(Estimator):
    """Pathwise gradients; fails loudly on a guide site that cannot be reparameterised."""

    name: ClassVar[str] = "reparam"


@dataclass(frozen=True)
class ScoreFunction(Estimator):
    """Score-function (REINFORCE) gradients for every guide site, no baseline."""

    name: ClassVar[str] = "score"

    def guide_handler(self) -> Messenger:
        return _DetachGuideSamples()


@dataclass(frozen=True)
class AnalyticKL(Estimator):
    """Pathwise reconstruction term and closed-form KL where registered (mean-field)."""

    name: ClassVar[str] = "analytic-kl"

    def elbo(self, num_particles: int) -> pyro.infer.ELBO:
        return pyro.infer.TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)


ESTIMATORS: dict[str, type[Estimator]] = {cls.name: cls for cls in (Reparameterized, ScoreFunction, AnalyticKL)}


def get_estimator(estimator: str | Estimator) -> Estimator:
    """An :class:`Estimator` from itself or its name (``reparam``, ``score``, ``analytic-kl``)."""
    if isinstance(estimator, Estimator):
        return estimator
    if estimator in ESTIMATORS:
        return ESTIMATORS[estimator]()
    raise ConfigError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
