"""Observation distributions p(x | decoder output).

A likelihood is a callable ``decoder_output -> distribution`` with one event
dimension (the pixels). Changing the likelihood never touches the model code.
Likelihoods with learnable parameters are ``nn.Module`` so that ``fit`` finds
and trains them like any network the model calls. :func:`noise_draw` makes a
reparameterised draw of a (transformed) Gaussian or of a family drawn from uniforms
from noise the caller gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import (
    ExpandedDistribution,
    MaskedDistribution,
)
from torch import distributions as D
from torch import nn
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical
from torch.distributions.utils import clamp_probs
from torch.nn import functional as F

from .errors import ConfigError, DataError

__all__ = [
    "Bernoulli",
    "Gaussian",
    "ContinuousBernoulli",
    "Beta",
    "get_likelihood",
    "LIKELIHOODS",
    "check_support",
    "gaussian_from_params",
    "gaussian_mixture",
    "one_hot",
    "gaussian_draw",
    "gaussian_base",
    "noise_draw",
    "noise_leaf",
    "BY_ICDF",
    "point_mass",
]


class Bernoulli(nn.Module):
    """Bernoulli with the decoder output as logits; for binary data."""

    support = "binary"

    def forward(self, logits: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=logits).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)


class Gaussian(nn.Module):
    """Gaussian with the decoder output as mean; scale fixed or learned.

    Parameters
    ----------
    scale : float
        The (initial) standard deviation.
    learn_scale : bool
        Learn one scale per output dimension.
    dim : int
        Output dimension (needed when ``learn_scale``).
    """

    support = "real"

    def __init__(self, scale: float = 1.0, learn_scale: bool = False, dim: int = 1) -> None:
        super().__init__()
        if not scale > 0:
            raise ConfigError(f"Gaussian scale must be positive, got {scale}")
        init = torch.full((dim if learn_scale else 1,), math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_scale", init)

    def forward(self, loc: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(loc, self.log_scale.exp().expand_as(loc)).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out


class ContinuousBernoulli(nn.Module):
    """Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019) with logits; intensities in [0, 1]."""

    support = "unit"

    def forward(self, logits: torch.Tensor) -> dist.TorchDistribution:
        return dist.ContinuousBernoulli(logits=logits).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.distributions.ContinuousBernoulli(logits=out).mean


class Beta(nn.Module):
    """Beta with mean ``sigmoid(out)`` and a learned concentration; intensities in (0, 1).

    Exact 0 and 1 have zero density: use :class:`ContinuousBernoulli` for data
    that contain them.
    """

    support = "open_unit"

    def __init__(self, concentration: float = 10.0) -> None:
        super().__init__()
        self.log_concentration = nn.Parameter(torch.tensor(math.log(concentration)))

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        mean = torch.sigmoid(out).clamp(1e-4, 1 - 1e-4)
        k = self.log_concentration.exp()
        return dist.Beta(mean * k, (1 - mean) * k).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)


LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-learned", "continuous-bernoulli", "beta")


def get_likelihood(name: str, *, dim: int = 1, scale: float = 1.0) -> nn.Module:
    """A likelihood by name: one of :data:`LIKELIHOODS`."""
    if name == "bernoulli":
        return Bernoulli()
    if name == "gaussian":
        return Gaussian(scale)
    if name == "gaussian-learned":
        return Gaussian(scale, learn_scale=True, dim=dim)
    if name == "continuous-bernoulli":
        return ContinuousBernoulli()
    if name == "beta":
        return Beta()
    raise ConfigError(f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)}")


def check_support(x: torch.Tensor, likelihood: nn.Module, what: str = "data") -> None:
    """Raise :class:`DataError` if ``x`` lies outside the likelihood's support."""
    support = getattr(likelihood, "support", "real")
    name = type(likelihood).__name__
    if support == "binary" and not bool(((x == 0) | (x == 1)).all()):
        raise DataError(
            f"{what} is not binary but the likelihood is {name}; binarise it or choose continuous-bernoulli"
        )
    if support == "unit" and not bool(((x >= 0) & (x <= 1)).all()):
        raise DataError(f"{what} has values outside [0, 1] but the likelihood is {name}")
    if support == "open_unit" and not bool(((x > 0) & (x < 1)).all()):
        raise DataError(
            f"{what} has values outside the open interval (0, 1) but the likelihood is {name}; use continuous-bernoulli"
        )


def gaussian_from_params(params: object) -> dist.TorchDistribution:
    """The Gaussian an encoder's output describes.

    ``(loc, scale)`` with equal shapes gives a diagonal Gaussian;
    ``(loc, scale_tril)`` with one more dimension a full-covariance one; a
    distribution is returned unchanged.
    """
    if isinstance(params, torch.distributions.Distribution):
        return params  # type: ignore[return-value]
    if not (isinstance(params, Sequence) and len(params) == 2):
        raise TypeError("encoder must return (loc, scale), (loc, scale_tril) or a distribution")
    loc, second = params
    if second.dim() == loc.dim() + 1:
        return dist.MultivariateNormal(loc, scale_tril=second)
    return dist.Normal(loc, second).to_event(1)


class _DiagonalGaussianMixture(dist.MixtureSameFamily):
    r"""A mixture of K diagonal Gaussians in D dimensions whose log density costs three matrix products.

    ``MixtureSameFamily`` evaluates every component at every point, a ``[..., K, D]`` tensor of
    elementwise terms: for a VampPrior of K = 500 pseudo-inputs in D = 50 dimensions and the 5000
    draws of one image's IWAE estimate, 125 million terms per image. Expanding the square,
    :math:`\sum_d (z_d - \mu_{kd})^2 / \sigma_{kd}^2 = z^2 \cdot \sigma_k^{-2} - 2\, z \cdot
    \mu_k \sigma_k^{-2} + \mu_k^2 \cdot \sigma_k^{-2}`, gives the same numbers as ``[..., D] x [D, K]``
    matrix products (the same value up to rounding: the expansion's terms cancel, so its absolute
    error is the working precision times their size, about 1e-3 nats in float32 for scales near 0.05).
    """

    #: the unexpanded ``(logits [K], loc [K, D], scale [K, D])``: kept through ``expand`` (a plate over the data),
    #: whose broadcast copies would bring back the ``[..., K, D]`` work
    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    def expand(
        self, batch_shape: torch.Size, _instance: _DiagonalGaussianMixture | None = None
    ) -> _DiagonalGaussianMixture:
        new = super().expand(batch_shape, _instance)
        new.parts = self.parts
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, loc, scale = self.parts
        precision = scale.reciprocal().square()
        quadratic = (
            value.square() @ precision.T
            - 2 * value @ (loc * precision).T
            + (loc.square() * precision).sum(-1)
        )
        log_components = (
            -0.5 * quadratic.clamp(min=0)
            - scale.log().sum(-1)
            - 0.5 * loc.shape[-1] * math.log(2 * math.pi)
        )
        return torch.logsumexp(log_components + logits, -1)


def gaussian_mixture(
    logits: torch.Tensor, components: torch.distributions.Distribution
) -> dist.TorchDistribution:
    """The mixture ``softmax(logits)`` of Gaussian ``components`` (batch shape ``[K]``, one event dimension).

    Diagonal components (``Normal(loc [K, D], scale [K, D]).to_event(1)``) get a log density by matrix
    products instead of ``MixtureSameFamily``'s ``[..., K, D]`` tensor (the same numbers, far faster
    for many components); others (e.g. full covariance) are ``MixtureSameFamily`` as they are.
    """
    mixture = dist.Categorical(logits=logits)
    base = components.base_dist if isinstance(components, torch.distributions.Independent) else None
    if (
        isinstance(base, torch.distributions.Normal)
        and components.reinterpreted_batch_ndims == 1
        and base.loc.dim() == 2
    ):
        fast = _DiagonalGaussianMixture(mixture, components)
        fast.parts = (mixture.logits, base.loc, base.scale)
        return fast
    return dist.MixtureSameFamily(mixture, components)


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot encoding of integer labels."""
    return F.one_hot(y.long(), num_classes).to(torch.get_default_dtype())


Noise = Callable[[torch.Size, torch.dtype], torch.Tensor]

#: the families drawn as ``icdf(u)`` of U(0, 1) noise ``u``: their ``icdf`` is closed-form and differentiable in the parameters
BY_ICDF: tuple[type, ...] = (D.Uniform, D.Exponential, D.Laplace, D.Cauchy, dist.Logistic)
#: every family :func:`noise_draw` reads, wrappers first: a subclass that samples otherwise (one that overrides ``rsample``) is not read
_WRAPPERS: tuple[type, ...] = (
    D.Independent,
    MaskedDistribution,
    ExpandedDistribution,
    D.TransformedDistribution,
)
_GAUSSIANS: tuple[type, ...] = (D.Normal, D.MultivariateNormal, D.LowRankMultivariateNormal)
_BY_UNIFORMS: tuple[type, ...] = (*BY_ICDF, LogitRelaxedBernoulli, ExpRelaxedCategorical)
_RSAMPLES = frozenset(c.rsample for c in (*_WRAPPERS, *_GAUSSIANS, *_BY_UNIFORMS))


def _inner(fn: torch.distributions.Distribution) -> torch.distributions.Distribution | None:
    """The distribution a wrapper draws from (an ``ExpandedDistribution``'s base expanded to its batch shape), None if it cannot be expanded so."""
    if isinstance(fn, ExpandedDistribution):
        try:
            inner = fn.base_dist.expand(fn.batch_shape)
        except NotImplementedError:
            return None
        return None if isinstance(inner, ExpandedDistribution) else inner
    return fn.base_dist


def noise_leaf(fn: torch.distributions.Distribution) -> torch.distributions.Distribution | None:
    """The family under ``fn``'s wrappers that :func:`noise_draw` draws from noise, or None (``fn`` is drawn otherwise).

    Wrappers read: ``Independent``, ``MaskedDistribution``, ``ExpandedDistribution``,
    ``TransformedDistribution`` (``LogNormal``, ``Gumbel``, ``Weibull``, ``HalfCauchy``, flows such as
    IAF, ...); families: the Gaussians (``Normal``, ``MultivariateNormal``,
    ``LowRankMultivariateNormal``), the families of :data:`BY_ICDF` and the relaxed Bernoulli and
    one-hot categorical; a class that draws itself from noise (``draw_from_noise``, as
    :class:`~ppl_vae.guides.local.Mixture`) where it says it can. A class that overrides its
    family's ``rsample`` is not read.
    """
    while not _own_draw(fn) and type(fn).rsample in _RSAMPLES and isinstance(fn, _WRAPPERS):
        inner = _inner(fn)
        if inner is None:
            return None
        fn = inner
    if _own_draw(fn):
        return fn if fn.drawn_from_noise else None  # type: ignore[attr-defined]
    return (
        fn
        if type(fn).rsample in _RSAMPLES and isinstance(fn, (*_GAUSSIANS, *_BY_UNIFORMS))
        else None
    )


def _own_draw(fn: torch.distributions.Distribution) -> bool:
    """Whether ``fn``'s class makes its draws from noise itself: a ``draw_from_noise(normal, uniform)`` method and a
    ``drawn_from_noise`` property saying whether this instance can (as :class:`~ppl_vae.guides.local.Mixture`)."""
    return callable(getattr(type(fn), "draw_from_noise", None))


def noise_draw(
    fn: torch.distributions.Distribution, normal: Noise, uniform: Noise
) -> torch.Tensor | None:
    r"""A reparameterised draw of ``fn`` made from given noise, or None if :func:`noise_leaf` finds no family to draw so.

    ``normal(shape, dtype)`` and ``uniform(shape, dtype)`` return standard-normal and U(0, 1) (open
    interval) draws; ``shape`` is the family's ``batch_shape + event_shape`` (a low-rank Gaussian
    asks for ``batch_shape + (rank + d,)``: its factor's noise, then its diagonal's). The value is
    what ``rsample`` computes from such noise:

    * Gaussians: :math:`\mu + L\varepsilon` (``Normal``: :math:`L = \sigma`; low rank:
      :math:`\mu + W\varepsilon_W + \sqrt{D}\,\varepsilon_D`), then any transforms;
    * :data:`BY_ICDF`: the inverse CDF :math:`F^{-1}(u)`;
    * relaxed Bernoulli: :math:`(\operatorname{logit} u + \operatorname{logit} p) / \tau`; relaxed
      one-hot categorical: :math:`\operatorname{log\,softmax}((\ell + g) / \tau)`,
      :math:`g = -\log(-\log u)` (Maddison et al. 2017; Jang et al. 2017).

    So a caller chooses where the noise comes from (a stream per datapoint). Families drawn by
    rejection or by a number of uniforms that depends on the value (``Gamma``, ``Beta``,
    ``Dirichlet``, ``StudentT``, ``VonMises``) and discrete ones have no such draw.

    References
    ----------
    C. J. Maddison, A. Mnih and Y. W. Teh, "The concrete distribution", ICLR 2017.
    E. Jang, S. Gu and B. Poole, "Categorical reparameterization with Gumbel-softmax", ICLR 2017.
    """
    if noise_leaf(fn) is None:
        return None
    return _draw(fn, normal, uniform)


def _draw(fn: torch.distributions.Distribution, normal: Noise, uniform: Noise) -> torch.Tensor:
    if _own_draw(fn):
        return fn.draw_from_noise(normal, uniform)  # type: ignore[attr-defined]
    if isinstance(fn, _WRAPPERS):
        v = _draw(_inner(fn), normal, uniform)  # type: ignore[arg-type]
        if isinstance(fn, D.TransformedDistribution):
            for t in fn.transforms:
                v = t(v)
        return v
    shape = fn.batch_shape + fn.event_shape
    if isinstance(fn, D.Normal):
        return fn.loc.expand(shape) + fn.scale.expand(shape) * normal(shape, fn.loc.dtype)
    if isinstance(fn, D.MultivariateNormal):
        return fn.loc.expand(shape) + (
            fn.scale_tril @ normal(shape, fn.loc.dtype).unsqueeze(-1)
        ).squeeze(-1)
    if isinstance(fn, D.LowRankMultivariateNormal):
        rank = fn.cov_factor.shape[-1]
        eps = normal(shape[:-1] + (rank + shape[-1],), fn.loc.dtype)
        return (
            fn.loc
            + (fn.cov_factor @ eps[..., :rank].unsqueeze(-1)).squeeze(-1)
            + fn.cov_diag.sqrt() * eps[..., rank:]
        )
    if isinstance(fn, LogitRelaxedBernoulli):
        p = clamp_probs(fn.probs.expand(shape))
        u = uniform(shape, p.dtype)
        return (u.log() - (-u).log1p() + p.log() - (-p).log1p()) / fn.temperature
    if isinstance(fn, ExpRelaxedCategorical):
        scores = (fn.logits - (-uniform(shape, fn.logits.dtype).log()).log()) / fn.temperature
        return scores - scores.logsumexp(dim=-1, keepdim=True)
    param = (
        fn.low
        if isinstance(fn, D.Uniform)
        else fn.rate
        if isinstance(fn, D.Exponential)
        else fn.loc
    )
    return fn.icdf(uniform(shape, param.dtype))


def gaussian_draw(
    fn: torch.distributions.Distribution, noise: Callable[[torch.Size], torch.Tensor]
) -> torch.Tensor | None:
    """A reparameterised draw of ``fn`` made from given standard-normal noise, or None if ``fn`` is not a transformed Gaussian.

    ``noise(shape)`` returns standard-normal draws of the Gaussian's ``batch_shape + event_shape``
    (a low-rank Gaussian: ``batch_shape + (rank + d,)``); read as :func:`noise_draw`, so the value
    is the one ``rsample`` would give for that noise.
    """
    if gaussian_base(fn) is None:
        return None
    return _draw(fn, lambda shape, dtype: noise(shape), lambda shape, dtype: noise(shape))


def gaussian_base(fn: torch.distributions.Distribution) -> torch.distributions.Distribution | None:
    """The Gaussian under ``fn``'s wrappers (:func:`noise_leaf`; None: there is none, and :func:`gaussian_draw` cannot draw ``fn``)."""
    leaf = noise_leaf(fn)
    return leaf if isinstance(leaf, _GAUSSIANS) else None


def point_mass(fn: object) -> bool:
    """Whether ``fn`` is a ``Delta`` (under ``Independent`` wrappers): a value, not a draw."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)
