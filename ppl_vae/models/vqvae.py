r"""VQ-VAE: a discrete latent code, quantised by nearest neighbour in a learned codebook.

The encoder's continuous output :math:`z_e(x) \in \mathbb{R}^{m \times d}` is
the latent site ``"z"`` (point-mass guide, flat prior, as in
:func:`ppl_vae.models.autoencoder`). The model snaps each of its ``m`` rows to
the nearest of ``K`` codebook vectors, :math:`k_j = \arg\min_k \|z_{e,j} - e_k\|`,
decodes with straight-through gradients
:math:`z = z_e + \mathrm{sg}(e_k - z_e)`, and adds the two VQ terms as a
``pyro.factor``:

.. math::

    \log p_\theta(x \mid e_{k}) + \log \pi(k)
    - \|\mathrm{sg}(z_e) - e_k\|^2 - \beta \|z_e - \mathrm{sg}(e_k)\|^2

The codes are observed under a learned categorical prior :math:`\pi` (one
distribution per position, independent): trained jointly, it is the maximum-
likelihood fit of the code frequencies, and :meth:`CodePrior.sample_codes`
draws new codes to decode.

References
----------
van den Oord, Vinyals & Kavukcuoglu (2017), Neural Discrete Representation
Learning.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from ..errors import ConfigError

__all__ = ["Codebook", "CodePrior", "vqvae", "perplexity", "QuantizedDecoder"]


class Codebook(nn.Module):
    """``K`` code vectors of width ``code_dim``; ``forward(z_e [..., m, d]) -> (codes [..., m], e_codes [..., m, d])``."""

    def __init__(self, num_codes: int, code_dim: int, *, seed: int = 0) -> None:
        super().__init__()
        if num_codes < 2 or code_dim < 1:
            raise ConfigError(f"a codebook needs >= 2 codes of width >= 1, got {num_codes} x {code_dim}")
        gen = torch.Generator().manual_seed(seed)
        self.num_codes, self.code_dim = num_codes, code_dim
        self.embedding = nn.Parameter(torch.randn(num_codes, code_dim, generator=gen))

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = z_e.detach().reshape(-1, self.code_dim)
        codes = torch.cdist(flat, self.embedding.detach()).argmin(-1).reshape(z_e.shape[:-1])
        return codes, self.embedding[codes]


class CodePrior(nn.Module):
    """Independent categorical prior over the code of each of ``num_latents`` positions."""

    def __init__(self, num_latents: int, num_codes: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_latents, num_codes))

    def forward(self) -> dist.TorchDistribution:
        return dist.Categorical(logits=self.logits).to_event(1)

    @torch.no_grad()
    def sample_codes(self, num_samples: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[num_samples, num_latents]`` codes drawn from the prior."""
        probs = torch.softmax(self.logits, -1)
        draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
        return draws.T


def vqvae(
    decoder: nn.Module,
    likelihood: nn.Module,
    codebook: Codebook,
    prior: CodePrior,
    num_latents: int,
    *,
    commitment: float = 0.25,
) -> Callable[..., None]:
    r"""The VQ-VAE as a Pyro model over the encoder output ``z`` (``[..., num_latents * code_dim]``).

    Pair with :func:`ppl_vae.guides.delta_guide` around an encoder that
    outputs ``num_latents * codebook.code_dim`` numbers. The objective
    ``fit`` maximises is the reconstruction log-likelihood, plus the code
    prior's log-probability, minus the codebook and commitment terms
    (weight ``commitment``, :math:`\beta` of the paper).
    """
    m, d = num_latents, codebook.code_dim
    if commitment < 0:
        raise ConfigError(f"commitment weight must be >= 0, got {commitment}")

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.ImproperUniform(constraints.real, (), (m * d,)))
            z_e = z.reshape(*z.shape[:-1], m, d)
            codes, e = codebook(z_e)
            pyro.sample("codes", prior(), obs=codes)
            codebook_loss = (z_e.detach() - e).pow(2).sum((-2, -1))
            commitment_loss = (z_e - e.detach()).pow(2).sum((-2, -1))
            pyro.factor("vq", -(codebook_loss + commitment * commitment_loss))
            z_q = z_e + (e - z_e).detach()  # straight-through: forward e, backward identity
            pyro.sample("x", likelihood(decoder(z_q.flatten(-2))), obs=x)

    return model


class QuantizedDecoder(nn.Module):
    """``z_e -> `` decoder output at the quantised code: how the VQ-VAE decodes a latent, for pictures."""

    def __init__(self, codebook: Codebook, decoder: nn.Module) -> None:
        super().__init__()
        self.codebook, self.decoder = codebook, decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _, e = self.codebook(z.reshape(*z.shape[:-1], -1, self.codebook.code_dim))
        return self.decoder(e.flatten(-2))


def perplexity(codes: torch.Tensor, num_codes: int) -> float:
    r"""Codebook perplexity :math:`\exp(-\sum_k p_k \log p_k)` of the code frequencies (1 = one code used, ``K`` = all equally)."""
    p = torch.bincount(codes.reshape(-1), minlength=num_codes).double()
    p = p / p.sum()
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
