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

:func:`vqvae2` is the two-level VQ-VAE-2: top and bottom codes in two
codebooks, the bottom code conditioned on the top one, a learned
autoregressive prior over the top codes (:class:`AutoregressiveCodePrior`) and
one over the bottom codes given the top ones.

References
----------
van den Oord, Vinyals & Kavukcuoglu (2017), Neural Discrete Representation
Learning. Razavi, van den Oord & Vinyals (2019), Generating Diverse
High-Fidelity Images with VQ-VAE-2. Germain, Gregor, Murray & Larochelle
(2015), MADE: Masked Autoencoder for Distribution Estimation.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from ..errors import ConfigError

__all__ = [
    "Codebook",
    "CodePrior",
    "vqvae",
    "perplexity",
    "QuantizedDecoder",
    "AutoregressiveCodePrior",
    "vqvae2",
    "vqvae2_guide",
    "vqvae2_sample",
    "VQ2Encoder",
    "VQ2Decoder",
]


class Codebook(nn.Module):
    """``K`` code vectors of width ``code_dim``; ``forward(z_e [..., m, d]) -> (codes [..., m], e_codes [..., m, d])``."""

    def __init__(self, num_codes: int, code_dim: int, *, seed: int = 0) -> None:
        super().__init__()
        if num_codes < 2 or code_dim < 1:
            raise ConfigError(
                f"a codebook needs >= 2 codes of width >= 1, got {num_codes} x {code_dim}"
            )
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
    def sample_codes(
        self, num_samples: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
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


# --------------------------------------------------------------------------- VQ-VAE-2


class AutoregressiveCodePrior(nn.Module):
    r"""A learned prior :math:`\prod_j p(c_j \mid c_{<j}, \text{context})` over the codes of ``num_latents`` positions.

    The logits of position ``j`` come from the one-hot codes of the positions before it
    through one masked hidden layer (MADE; Germain et al. 2015), plus an optional
    ``context`` vector (e.g. the one-hot top codes, for the bottom level of a VQ-VAE-2).
    Calling it on codes gives the distribution that scores them (teacher forcing); :meth:`sample_codes`
    draws them position by position.
    """

    def __init__(
        self, num_latents: int, num_codes: int, *, hidden: int = 64, context_dim: int = 0
    ) -> None:
        super().__init__()
        if num_latents < 1 or num_codes < 2 or hidden < 1:
            raise ConfigError(
                f"an autoregressive code prior needs >= 1 position, >= 2 codes and >= 1 hidden unit, got {num_latents}, {num_codes}, {hidden}"
            )
        m, k = num_latents, num_codes
        self.num_latents, self.num_codes = m, k
        self.inp = nn.Linear(m * k, hidden)
        self.out = nn.Linear(hidden, m * k)
        self.context = nn.Linear(context_dim, hidden) if context_dim else None
        degree_in = torch.arange(1, m + 1).repeat_interleave(
            k
        )  # position j's one-hot block has degree j
        degree_hidden = torch.arange(hidden) % max(m - 1, 1) + 1  # 1..m-1
        degree_out = torch.arange(1, m + 1).repeat_interleave(k)
        self.register_buffer(
            "mask_in", (degree_hidden[:, None] >= degree_in[None, :]).float(), persistent=False
        )
        self.register_buffer(
            "mask_out", (degree_out[:, None] > degree_hidden[None, :]).float(), persistent=False
        )

    def logits(self, codes: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., m, K]`` logits of each position given the codes before it (and ``context``)."""
        onehot = (
            torch.nn.functional.one_hot(codes.long(), self.num_codes)
            .to(self.inp.weight.dtype)
            .flatten(-2)
        )
        h = torch.nn.functional.linear(onehot, self.inp.weight * self.mask_in, self.inp.bias)
        if self.context is not None:
            if context is None:
                raise ConfigError("this code prior is conditional: give its context")
            h = h + self.context(context)
        out = torch.nn.functional.linear(
            torch.relu(h), self.out.weight * self.mask_out, self.out.bias
        )
        return out.reshape(*codes.shape, self.num_codes)

    def forward(
        self, codes: torch.Tensor, context: torch.Tensor | None = None
    ) -> dist.TorchDistribution:
        """The prior as a distribution to score the observed ``codes`` with (their log-probability is the autoregressive one).

        Called as the module (``prior(codes)``), so that ``fit`` finds its parameters.
        """
        return dist.Categorical(logits=self.logits(codes, context)).to_event(1)

    @torch.no_grad()
    def sample_codes(
        self,
        num_samples: int,
        *,
        context: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``[num_samples, m]`` codes drawn position by position (``context``: ``[num_samples, context_dim]``)."""
        device = self.inp.weight.device
        codes = torch.zeros(num_samples, self.num_latents, dtype=torch.long, device=device)
        for j in range(self.num_latents):
            probs = torch.softmax(self.logits(codes, context)[:, j], -1)
            codes[:, j] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return codes


def _quantise(
    codebook: Codebook, z: torch.Tensor, positions: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, straight-through z_q [..., m * d], codebook loss, commitment loss)`` of a flat encoder output ``z``."""
    z_e = z.reshape(*z.shape[:-1], positions, codebook.code_dim)
    codes, e = codebook(z_e)
    return (
        codes,
        (z_e + (e - z_e).detach()).flatten(-2),
        (z_e.detach() - e).pow(2).sum((-2, -1)),
        (z_e - e.detach()).pow(2).sum((-2, -1)),
    )


def vqvae2(
    decoder: nn.Module,
    likelihood: nn.Module,
    codebooks: tuple[Codebook, Codebook],
    priors: tuple[AutoregressiveCodePrior, AutoregressiveCodePrior],
    positions: tuple[int, int],
    *,
    commitment: float = 0.25,
) -> Callable[..., None]:
    r"""VQ-VAE-2 (Razavi et al. 2019) with two levels of codes, top and bottom, as a Pyro model.

    Sites ``"z_top"`` and ``"z_bottom"`` are the encoders' continuous outputs (point-mass guide,
    :func:`vqvae2_guide`); each is quantised in its own codebook. The top codes are observed
    under a learned autoregressive prior, the bottom codes under one conditioned on the top
    codes; ``decoder`` maps the quantised bottom and top codes (concatenated) to the
    likelihood. The VQ terms of both levels are one ``pyro.factor``.
    """
    (top_book, bottom_book), (top_prior, bottom_prior), (m_top, m_bottom) = (
        codebooks,
        priors,
        positions,
    )
    if commitment < 0:
        raise ConfigError(f"commitment weight must be >= 0, got {commitment}")

    def model(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            zt = pyro.sample(
                "z_top", dist.ImproperUniform(constraints.real, (), (m_top * top_book.code_dim,))
            )
            zb = pyro.sample(
                "z_bottom",
                dist.ImproperUniform(constraints.real, (), (m_bottom * bottom_book.code_dim,)),
            )
            ct, qt, book_t, commit_t = _quantise(top_book, zt, m_top)
            cb, qb, book_b, commit_b = _quantise(bottom_book, zb, m_bottom)
            pyro.sample("codes_top", top_prior(ct), obs=ct)
            context = torch.nn.functional.one_hot(ct, top_book.num_codes).to(zt.dtype).flatten(-2)
            pyro.sample("codes_bottom", bottom_prior(cb, context), obs=cb)
            pyro.factor("vq", -(book_t + book_b + commitment * (commit_t + commit_b)))
            pyro.sample("x", likelihood(decoder(torch.cat([qb, qt], -1))), obs=x)

    return model


def vqvae2_guide(
    encoder: nn.Module,
    top_encoder: nn.Module,
    bottom_head: nn.Module,
    top_codebook: Codebook,
    top_positions: int,
) -> Callable[..., None]:
    """Point masses at the encoders' outputs: ``h = encoder(x)``; top ``top_encoder(h)``; bottom ``bottom_head([h, quantised top])``.

    The bottom code sees the quantised top code (straight-through), as VQ-VAE-2's bottom
    level is conditioned on the top one.
    """

    codes = VQ2Encoder(encoder, top_encoder, bottom_head, top_codebook, top_positions)

    def guide(x: torch.Tensor) -> None:
        zb, zt = codes.parts(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z_top", dist.Delta(zt).to_event(1))
            pyro.sample("z_bottom", dist.Delta(zb).to_event(1))

    return guide


@torch.no_grad()
def vqvae2_sample(
    decoder: nn.Module,
    likelihood: nn.Module,
    codebooks: tuple[Codebook, Codebook],
    priors: tuple[AutoregressiveCodePrior, AutoregressiveCodePrior],
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Means of ``p(x | codes)`` for codes drawn from the priors: top codes first, then bottom codes given them."""
    (top_book, bottom_book), (top_prior, bottom_prior) = codebooks, priors
    ct = top_prior.sample_codes(num_samples, generator=generator)
    context = (
        torch.nn.functional.one_hot(ct, top_book.num_codes).to(top_book.embedding.dtype).flatten(-2)
    )
    cb = bottom_prior.sample_codes(num_samples, context=context, generator=generator)
    z = torch.cat([bottom_book.embedding[cb].flatten(-2), top_book.embedding[ct].flatten(-2)], -1)
    return likelihood.mean(decoder(z))


class VQ2Encoder(nn.Module):
    """``x -> [z_bottom, z_top]``: both encoder outputs of a VQ-VAE-2, concatenated (the guide's point masses), for pictures."""

    def __init__(
        self,
        encoder: nn.Module,
        top_encoder: nn.Module,
        bottom_head: nn.Module,
        top_codebook: Codebook,
        top_positions: int,
    ) -> None:
        super().__init__()
        self.encoder, self.top_encoder, self.bottom_head, self.top_codebook, self.top_positions = (
            encoder,
            top_encoder,
            bottom_head,
            top_codebook,
            top_positions,
        )

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_bottom, z_top)``: the bottom code sees the encoder's features and the quantised top code (straight-through)."""
        h = self.encoder(x)
        zt = self.top_encoder(h)
        _, qt, _, _ = _quantise(self.top_codebook, zt, self.top_positions)
        return self.bottom_head(torch.cat([h, qt], -1)), zt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.parts(x), -1)


class VQ2Decoder(nn.Module):
    """``[z_bottom, z_top] -> `` decoder output at both quantised codes: how the VQ-VAE-2 decodes, for pictures."""

    def __init__(
        self, decoder: nn.Module, codebooks: tuple[Codebook, Codebook], positions: tuple[int, int]
    ) -> None:
        super().__init__()
        self.decoder, self.top_codebook, self.bottom_codebook = decoder, codebooks[0], codebooks[1]
        self.positions = positions

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        m_top, m_bottom = self.positions
        split = m_bottom * self.bottom_codebook.code_dim
        _, qb, _, _ = _quantise(self.bottom_codebook, z[..., :split], m_bottom)
        _, qt, _, _ = _quantise(self.top_codebook, z[..., split:], m_top)
        return self.decoder(torch.cat([qb, qt], -1))
