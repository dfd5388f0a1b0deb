r"""A deep hierarchical VAE with L stochastic layers and ladder (top-down) inference (Sønderby et al. 2016).

.. math::

    p(z_L) \prod_{l=1}^{L-1} p_\theta(z_l \mid z_{l+1})\; p_\theta(x \mid z_1),
    \qquad
    q_\phi(z_L \mid x) \prod_{l=1}^{L-1} q_\phi(z_l \mid z_{l+1}, x)

with :math:`p(z_L) = N(0, I)` and diagonal Gaussian conditionals. The guide
first runs a deterministic bottom-up pass :math:`h_l = f_l(h_{l-1})`,
:math:`h_0 = x`, whose heads give a Gaussian "likelihood" term
:math:`(\hat\mu_l, \hat\sigma_l)` per layer; then it samples top-down, each
layer combining its term with the **generative** conditional
:math:`p_\theta(z_l \mid z_{l+1})` (the same networks as the model: the
inference shares the generative path) by precision weighting:

.. math::

    \sigma_{q,l}^{-2} = \hat\sigma_l^{-2} + \sigma_{p,l}^{-2}, \qquad
    \mu_{q,l} = \sigma_{q,l}^{2}\,(\hat\mu_l \hat\sigma_l^{-2} + \mu_{p,l} \sigma_{p,l}^{-2}).

Sites ``"z1"`` (next to the data) to ``"zL"`` (top). The guide's sites depend
on each other, so it is in none of the gap decomposition's families: pass
``families=("full",)`` to :func:`~ppl_vae.inference.decompose`. The per-layer
KL terms of the ELBO come from :func:`~ppl_vae.inference.elbo.kl_per_site`.

References
----------
Sønderby, Raiko, Maaløe, Sønderby & Winther (2016), Ladder Variational Autoencoders. NeurIPS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..distributions import gaussian_from_params
from ..errors import ConfigError
from ..nn import MLP, GaussianEncoder

__all__ = [
    "ladder_vae",
    "ladder_guide",
    "precision_weighted",
    "LadderNetworks",
    "ladder_networks",
    "ancestral_means",
]


def _sites(num_layers: int) -> list[str]:
    return [f"z{layer}" for layer in range(1, num_layers + 1)]


def ladder_vae(
    decoder: nn.Module, priors: Sequence[nn.Module], likelihood: nn.Module, top_dim: int
) -> Callable[..., None]:
    r"""Model :math:`p(z_L) \prod_l p(z_l \mid z_{l+1})\, p(x \mid z_1)` with ``L = len(priors) + 1`` stochastic layers.

    ``priors[l - 1]`` maps :math:`z_{l+1}` to ``(loc, scale)`` of :math:`p(z_l \mid z_{l+1})`;
    ``decoder`` maps :math:`z_1` to the likelihood's parameters.
    """
    if not isinstance(top_dim, int) or top_dim <= 0:
        raise ConfigError(f"latent dimension must be a positive integer, got {top_dim!r}")
    names = _sites(len(priors) + 1)

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(names[-1], dist.Normal(x.new_zeros(top_dim), 1.0).to_event(1))
            for level in range(len(priors), 0, -1):  # z_{L-1}, ..., z_1
                z = pyro.sample(names[level - 1], gaussian_from_params(priors[level - 1](z)))
            pyro.sample("x", likelihood(decoder(z)), obs=x)

    return model


def precision_weighted(
    term: tuple[torch.Tensor, torch.Tensor], prior: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc, scale)`` of the product of two diagonal Gaussians (normalised): the ladder's combination of its bottom-up term and the prior."""
    (m1, s1), (m2, s2) = term, prior
    p1, p2 = s1.pow(-2), s2.pow(-2)
    var = 1.0 / (p1 + p2)
    return var * (m1 * p1 + m2 * p2), var.sqrt()


def ladder_guide(
    bottom_up: Sequence[nn.Module], heads: Sequence[nn.Module], priors: Sequence[nn.Module]
) -> Callable[..., None]:
    r"""Top-down guide :math:`q(z_L \mid x) \prod_l q(z_l \mid z_{l+1}, x)` sharing ``priors`` with :func:`ladder_vae`.

    ``bottom_up[l]`` maps :math:`h_l` to :math:`h_{l+1}` (:math:`h_0 = x`); ``heads[l]`` maps
    :math:`h_{l+1}` to the ``(loc, scale)`` of layer :math:`l + 1`'s bottom-up term.
    """
    if not (len(bottom_up) == len(heads) == len(priors) + 1):
        raise ConfigError(
            f"a ladder of L layers needs L bottom-up networks and heads and L - 1 priors, got {len(bottom_up)}, {len(heads)}, {len(priors)}"
        )
    names = _sites(len(heads))

    def guide(x: torch.Tensor) -> None:
        terms, h = [], x
        for f, head in zip(bottom_up, heads):
            h = f(h)
            terms.append(head(h))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(names[-1], dist.Normal(*terms[-1]).to_event(1))
            for level in range(len(priors), 0, -1):
                loc, scale = precision_weighted(terms[level - 1], priors[level - 1](z))
                z = pyro.sample(names[level - 1], dist.Normal(loc, scale).to_event(1))

    return guide


@dataclass(frozen=True)
class LadderNetworks:
    """The networks of one ladder VAE and its model and guide; ``top_encoder`` gives :math:`q(z_L \\mid x)` (for pictures)."""

    model: Callable[..., None]
    guide: Callable[..., None]
    decoder: nn.Module
    priors: nn.ModuleList
    bottom_up: nn.ModuleList
    heads: nn.ModuleList
    top_encoder: nn.Module
    top_decoder: nn.Module


class _Top(nn.Module):
    """``x -> (loc, scale)`` of :math:`q(z_L \\mid x)`: the bottom-up pass and the top head (no top-down step above the top)."""

    def __init__(self, bottom_up: nn.ModuleList, heads: nn.ModuleList) -> None:
        super().__init__()
        self.bottom_up, self.head = bottom_up, heads[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        for f in self.bottom_up:
            h = f(h)
        return self.head(h)


class _TopDown(nn.Module):
    """``z_L -> `` likelihood parameters, each lower layer at its conditional mean: decoded top latents, for pictures."""

    def __init__(self, decoder: nn.Module, priors: nn.ModuleList) -> None:
        super().__init__()
        self.decoder, self.priors = decoder, priors

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for prior in reversed(self.priors):
            z = prior(z)[0]
        return self.decoder(z)


def ladder_networks(
    data_dim: int, dims: Sequence[int], hidden: int, likelihood: nn.Module
) -> LadderNetworks:
    """MLP networks for a ladder VAE with stochastic layers of widths ``dims`` (bottom ``z1`` first, top last), ``hidden`` units per layer."""
    dims = list(dims)
    if len(dims) < 2 or any(not isinstance(d, int) or d <= 0 for d in dims):
        raise ConfigError(
            f"a ladder VAE needs at least 2 stochastic layers of positive width, got {dims}"
        )
    bottom_up = nn.ModuleList(
        [
            nn.Sequential(nn.Linear(data_dim if i == 0 else hidden, hidden), nn.ELU())
            for i in range(len(dims))
        ]
    )
    heads = nn.ModuleList([GaussianEncoder(nn.Identity(), hidden, d) for d in dims])
    priors = nn.ModuleList(
        [
            GaussianEncoder(
                nn.Sequential(nn.Linear(dims[i + 1], hidden), nn.ELU()), hidden, dims[i]
            )
            for i in range(len(dims) - 1)
        ]
    )
    decoder = MLP(dims[0], [hidden], data_dim)
    model = ladder_vae(decoder, list(priors), likelihood, dims[-1])
    guide = ladder_guide(list(bottom_up), list(heads), list(priors))
    return LadderNetworks(
        model,
        guide,
        decoder,
        priors,
        bottom_up,
        heads,
        _Top(bottom_up, heads),
        _TopDown(decoder, priors),
    )


@torch.no_grad()
def ancestral_means(
    decoder: nn.Module,
    priors: Sequence[nn.Module],
    likelihood: nn.Module,
    top_dim: int,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Means of :math:`p(x \mid z_1)` for ancestral draws :math:`z_L \sim N(0, I)`, :math:`z_l \sim p(z_l \mid z_{l+1})` (``priors[l - 1]``).

    Every layer is drawn, not set to its conditional mean: a hierarchy whose top layers
    collapsed to their priors keeps its variety in the lower ones.
    """
    first = next(iter(decoder.parameters()))
    z = torch.randn(
        num_samples, top_dim, generator=generator, device=first.device, dtype=first.dtype
    )
    for prior in reversed(list(priors)):
        loc, scale = prior(z)
        z = loc + scale * torch.randn(
            loc.shape, generator=generator, device=loc.device, dtype=loc.dtype
        )
    return likelihood.mean(decoder(z))
