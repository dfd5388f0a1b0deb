"""The named models of the command line: option values -> networks, model and guide.

This is the only place that maps model names to Pyro functions; the library
itself never dispatches on names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..data import Dataset, load
from ..distributions import check_support, get_likelihood, one_hot
from ..errors import (
    ConfigError,
)
from ..guides.amortized import amortized_guide, delta_guide, masking_noise
from ..guides.discrete import bernoulli_guide, categorical_guide
from ..guides.flows import IAFEncoder
from ..inference.estimators import get_estimator
from ..inference.pretrain import pretrain_layerwise, stacked_guide
from ..inference.random import seeded
from ..inference.svi import as_tensors
from ..models.autoencoders import contractive_autoencoder, sparse_autoencoder
from ..models.discrete import (
    DISCRETE_MODELS,
    GaussianMixturePrior,
    bernoulli_vae,
    categorical_vae,
)
from ..models.hierarchical import (
    TopDecoder,
    TopEncoder,
    hierarchical_guide,
    hierarchical_vae,
)
from ..models.ladder import ancestral_means, ladder_networks
from ..models.ppca import PPCA
from ..models.priors import VampPrior, vae_with_prior
from ..models.stacked import stacked_autoencoder
from ..models.vae import Model, autoencoder, cvae, vae
from ..models.vqvae import (
    AutoregressiveCodePrior,
    Codebook,
    CodePrior,
    QuantizedDecoder,
    VQ2Decoder,
    VQ2Encoder,
    vqvae,
    vqvae2,
    vqvae2_guide,
    vqvae2_sample,
)
from ..nn import MLP, Concat, ConvDecoder, ConvEncoder, GaussianEncoder
from .config import Config

__all__ = ["Built", "build", "objective_name", "build_checked", "build_family"]


#: the models :func:`build_family` builds (the others are built by :func:`build` itself)
FAMILY_MODELS = (
    "hvae",
    "lvae",
    "mog-vae",
    "vampprior",
    "vqvae",
    "vqvae2",
    "sparse-ae",
    "cae",
    "sdae",
)
MIXTURE_COMPONENTS, PSEUDO_INPUTS, SPARSE_L1 = 10, 50, 0.1

VQ_LATENTS, VQ_CODES = 8, 64
#: VQ-VAE-2: (positions, codes) of the top and the bottom level
VQ2_TOP, VQ2_BOTTOM = (2, 16), (8, 64)


@dataclass(frozen=True)
class Built:
    """The networks, model and guide of one config, and how to read latents off them.

    ``exact`` is the model itself when it has closed forms (PPCA's exact
    posterior, marginal likelihood and linear decoder), for the pictures and
    the exact test log-likelihood; ``extra`` holds model-specific pieces
    (read-only), e.g. ``sample_prior(n, generator)``.
    """

    config: Config
    model: Callable[..., None]
    guide: Callable[..., None]
    decoder: nn.Module | None
    encoder: nn.Module | None
    likelihood: nn.Module | None
    num_classes: int | None = None
    exact: PPCA | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    @property
    def conditional(self) -> bool:
        return self.config.spec.labels

    def encoder_inputs(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if self.conditional:
            assert y is not None and self.num_classes is not None
            return (x, one_hot(y, self.num_classes))
        return (x,)

    @torch.no_grad()
    def latent_mean(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The guide's mean of ``z`` per row of ``x`` (the exact posterior mean for PPCA; for a flow, the base mean pushed through it)."""
        if self.exact is not None:
            return self.exact.posterior(x).mean
        assert self.encoder is not None
        out = self.encoder(*self.encoder_inputs(x, y))
        if isinstance(
            out, torch.distributions.TransformedDistribution
        ):  # a flow: push the base mean through it
            z = out.base_dist.mean
            for t in out.transforms:
                z = t(z)
            return z
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of ``p(x | z)`` at the latent mean."""
        z = self.latent_mean(x, y)
        if self.exact is not None:
            return z @ self.exact.W.T + self.exact.mu
        assert self.decoder is not None and self.likelihood is not None
        out = self.decoder(z, one_hot(y, self.num_classes)) if self.conditional else self.decoder(z)  # type: ignore[arg-type]
        return self.likelihood.mean(out)


def build(
    cfg: Config, data_dim: int, image_shape: tuple[int, int, int], num_classes: int | None
) -> Built:
    """Networks, model and guide for ``cfg``; their initialisation is seeded by ``cfg.seed`` (the caller's RNG is left as it was)."""
    with seeded(cfg.seed):
        return _build(cfg, data_dim, image_shape, num_classes)


def _build(
    cfg: Config, data_dim: int, image_shape: tuple[int, int, int], num_classes: int | None
) -> Built:
    d, hidden = cfg.latent_dim, list(cfg.hidden)
    if cfg.model == "ppca":
        ppca = PPCA(data_dim, d)
        encoder = GaussianEncoder(MLP(data_dim, [], hidden[-1]), hidden[-1], d, cfg.guide)
        return Built(cfg, ppca, amortized_guide(encoder), None, encoder, None, exact=ppca)
    likelihood = get_likelihood(cfg.likelihood, dim=data_dim)
    if (
        cfg.model in FAMILY_MODELS
    ):  # hierarchical, mixture/Vamp prior, VQ-VAE, sparse and contractive AE
        return build_family(cfg, data_dim)
    if (
        cfg.model in DISCRETE_MODELS
    ):  # latent_dim Bernoulli latents, or latent_dim categoricals of 10 classes
        model, guide, decoder, means = discrete_vae(cfg.model, data_dim, d, hidden, likelihood)
        return Built(cfg, model, guide, decoder, means, likelihood)
    if cfg.model == "cvae":
        if num_classes is None:
            raise ConfigError(f"cvae needs labels; dataset {cfg.dataset!r} has none")
        decoder: nn.Module = Concat(MLP(d + num_classes, hidden[::-1], data_dim))
        encoder: nn.Module = GaussianEncoder(
            Concat(MLP(data_dim + num_classes, hidden[:-1], hidden[-1])), hidden[-1], d, cfg.guide
        )
        guide = amortized_guide(encoder, inputs=lambda x, y: (x, one_hot(y, num_classes)))
        return Built(
            cfg,
            cvae(decoder, likelihood, d, num_classes),
            guide,
            decoder,
            encoder,
            likelihood,
            num_classes,
        )
    conv = cfg.arch == "conv"
    decoder = ConvDecoder(d, image_shape) if conv else MLP(d, hidden[::-1], data_dim)
    body: nn.Module = (
        ConvEncoder(image_shape, hidden[-1]) if conv else MLP(data_dim, hidden[:-1], hidden[-1])
    )
    if cfg.model in ("ae", "dae"):
        encoder = nn.Sequential(body, nn.ReLU(), nn.Linear(hidden[-1], d))
        corruption = masking_noise(cfg.noise) if cfg.model == "dae" else None
        return Built(
            cfg,
            autoencoder(decoder, likelihood, d),
            delta_guide(encoder, corruption=corruption),
            decoder,
            encoder,
            likelihood,
        )
    if cfg.guide == "iaf":
        encoder = IAFEncoder(body, hidden[-1], d, num_flows=cfg.flows)
    else:
        encoder = GaussianEncoder(body, hidden[-1], d, cfg.guide)
    return Built(
        cfg, vae(decoder, likelihood, d), amortized_guide(encoder), decoder, encoder, likelihood
    )


def load_splits(cfg: Config) -> dict[str, Dataset]:
    kw = dict(
        data_dir=cfg.data_dir,
        download=cfg.download,
        binarize=cfg.binarize,
        limit=cfg.limit,
        seed=cfg.seed,
    )
    return {s: load(cfg.dataset, s, **kw) for s in ("train", "valid", "test")}  # type: ignore[arg-type]


def split_tensors(cfg: Config, ds: Dataset) -> tuple[torch.Tensor, ...]:
    return ds.tensors(with_labels=cfg.spec.labels)


def _check(cfg: Config, built: Built, splits: dict[str, Dataset]) -> None:
    for name, ds in splits.items():
        tensors = as_tensors(split_tensors(cfg, ds), f"{cfg.dataset} {name} split")
        if built.likelihood is not None:
            check_support(tensors[0], built.likelihood, f"{cfg.dataset} {name} split")


def objective_name(cfg: Config) -> str:
    return cfg.spec.objective


_MEMORY = ("can't allocate memory", "not enough memory", "out of memory", "overflow")


def _memory_error(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, (RuntimeError, TypeError)) and any(
        h in str(exc).lower() for h in _MEMORY
    )


def _physical_memory() -> float:
    """Bytes of physical memory (infinite where the platform does not say)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return math.inf


class _AllocationGuard(TorchDispatchMode):
    """Refuse (``MemoryError``) a tensor creation that would take the running total of bytes created past ``limit``.

    Networks are built by creating their parameters (``torch.empty`` of the layer's shape, then an
    initialiser writing into it); on a machine that overcommits memory a parameter of a terabyte is
    "allocated" and its initialiser then fills memory page by page for minutes. Counting the bytes
    of every tensor creation before it happens refuses such a build at once.
    """

    def __init__(self, limit: float) -> None:
        super().__init__()
        self.limit, self.total = limit, 0

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        schema = func._schema
        if (
            schema.arguments
            and schema.arguments[0].name == "size"
            and isinstance(args[0], (list, tuple))
        ):
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            self.total += math.prod(int(s) for s in args[0]) * dtype.itemsize
            if self.total > self.limit:
                raise MemoryError
        return func(*args, **kwargs)


#: parameters, their gradients and Adam's two moments: the memory of training is at least this many times the parameters'
PARAMETER_COPIES = 4


def build_checked(cfg: Config, splits: dict[str, Dataset]) -> Built:
    """:func:`build`, the data checks, and one loss evaluation on a first batch (a probe).

    The probe makes a run whose networks or particles cannot be allocated
    fail here, before any folder is made, with a :class:`ConfigError` naming
    the options, instead of inside the first training step. Its random draws
    do not matter: ``fit`` reseeds.
    """
    train = splits["train"]
    try:
        rows = min(cfg.batch_size, len(train))
        # every model draws z and scores x once per particle and row: a lower bound of one step's memory; refusing
        # what surely cannot fit here spares the probe from filling the memory with allocations that do succeed
        if _physical_memory() < 4 * cfg.num_particles * rows * (cfg.latent_dim + train.x.shape[1]):
            raise MemoryError
        with _AllocationGuard(
            _physical_memory() / PARAMETER_COPIES
        ):  # every parameter, before it is allocated
            built = build(cfg, train.x.shape[1], train.image_shape, train.num_classes)
        _check(cfg, built, splits)
        batch = tuple(t[: cfg.batch_size] for t in split_tensors(cfg, train))
        loss = get_estimator(cfg.estimator).loss(built.model, built.guide, cfg.num_particles)
        with torch.no_grad():
            loss(*batch)
    except Exception as exc:
        if not _memory_error(exc):
            raise
        hidden = ",".join(map(str, cfg.hidden))
        raise ConfigError(
            f"this run does not fit in memory (--latent-dim {cfg.latent_dim}, --hidden {hidden}, "
            f"--num-particles {cfg.num_particles}, --batch-size {cfg.batch_size}): choose smaller values"
        ) from None
    return built


def build_family(cfg: Config, data_dim: int) -> Built:
    """Networks, model and guide of a :data:`FAMILY_MODELS` config (MLP networks).

    ``Built.encoder`` / ``Built.decoder`` are the views the pictures use: the
    top latent of the hierarchical VAE, the quantised decoder of the VQ-VAE.
    ``Built.extra["sample_prior"](n, generator)`` draws decoded samples from
    the model's own prior.
    """

    d, hidden = cfg.latent_dim, list(cfg.hidden)
    likelihood = get_likelihood(cfg.likelihood, dim=data_dim)
    body = MLP(data_dim, hidden[:-1], hidden[-1])
    extra: dict[str, Any] = {}

    def decoded(dec: nn.Module, draw: Any) -> Any:
        return lambda n, generator=None: likelihood.mean(dec(draw(n, generator))).detach()

    if cfg.model == "hvae":
        d1 = 2 * d
        enc1, enc2 = (
            GaussianEncoder(body, hidden[-1], d1),
            GaussianEncoder(MLP(d1, [], hidden[-1]), hidden[-1], d),
        )
        dec1, dec2 = (
            MLP(d1, hidden[::-1], data_dim),
            GaussianEncoder(MLP(d, [], hidden[-1]), hidden[-1], d1),
        )
        model, guide = hierarchical_vae(dec1, dec2, likelihood, d), hierarchical_guide(enc1, enc2)
        extra["sample_prior"] = lambda n, generator=None: ancestral_means(
            dec1, [dec2], likelihood, d, n, generator=generator
        )
        return Built(
            cfg,
            model,
            guide,
            TopDecoder(dec1, dec2),
            TopEncoder(enc1, enc2),
            likelihood,
            extra=extra,
        )
    if cfg.model == "lvae":
        nets = ladder_networks(data_dim, layer_widths(cfg), hidden[-1], likelihood)
        extra["sample_prior"] = lambda n, generator=None: ancestral_means(
            nets.decoder,
            list(nets.priors),
            likelihood,
            layer_widths(cfg)[-1],
            n,
            generator=generator,
        )
        return Built(
            cfg, nets.model, nets.guide, nets.top_decoder, nets.top_encoder, likelihood, extra=extra
        )
    if cfg.model in ("mog-vae", "vampprior"):
        encoder = GaussianEncoder(body, hidden[-1], d, cfg.guide)
        decoder = MLP(d, hidden[::-1], data_dim)
        if cfg.model == "mog-vae":
            prior: Any = GaussianMixturePrior(cfg.components or MIXTURE_COMPONENTS, d).marginal
        else:
            k = cfg.components or PSEUDO_INPUTS
            prior = VampPrior(
                encoder, torch.rand(k, data_dim, generator=torch.Generator().manual_seed(cfg.seed))
            )
        extra["sample_prior"] = decoded(decoder, lambda n, g: _sample_with(prior().sample, (n,), g))
        return Built(
            cfg,
            vae_with_prior(decoder, likelihood, prior),
            amortized_guide(encoder),
            decoder,
            encoder,
            likelihood,
            extra=extra,
        )
    if cfg.model == "vqvae":
        codebook, code_prior = Codebook(VQ_CODES, d, seed=cfg.seed), CodePrior(VQ_LATENTS, VQ_CODES)
        encoder = nn.Sequential(body, nn.ReLU(), nn.Linear(hidden[-1], VQ_LATENTS * d))
        decoder = MLP(VQ_LATENTS * d, hidden[::-1], data_dim)
        model = vqvae(decoder, likelihood, codebook, code_prior, VQ_LATENTS)
        extra["sample_prior"] = decoded(
            decoder,
            lambda n, g: codebook.embedding[code_prior.sample_codes(n, generator=g)].flatten(-2),
        )
        extra["codebook"], extra["code_prior"] = codebook, code_prior
        return Built(
            cfg,
            model,
            delta_guide(encoder),
            QuantizedDecoder(codebook, decoder),
            encoder,
            likelihood,
            extra=extra,
        )
    if cfg.model == "vqvae2":
        (m_t, k_t), (m_b, k_b) = VQ2_TOP, VQ2_BOTTOM
        books = (Codebook(k_t, d, seed=cfg.seed), Codebook(k_b, d, seed=cfg.seed + 1))
        priors = (
            AutoregressiveCodePrior(m_t, k_t),
            AutoregressiveCodePrior(m_b, k_b, context_dim=m_t * k_t),
        )
        encoder = nn.Sequential(body, nn.ReLU())
        top, bottom = nn.Linear(hidden[-1], m_t * d), MLP(hidden[-1] + m_t * d, [], m_b * d)
        decoder = MLP((m_t + m_b) * d, hidden[::-1], data_dim)
        model = vqvae2(decoder, likelihood, books, priors, (m_t, m_b))
        extra["sample_prior"] = lambda n, generator=None: vqvae2_sample(
            decoder, likelihood, books, priors, n, generator=generator
        )
        extra["codebooks"], extra["code_priors"] = books, priors
        return Built(
            cfg,
            model,
            vqvae2_guide(encoder, top, bottom, books[0], m_t),
            VQ2Decoder(decoder, books, (m_t, m_b)),
            VQ2Encoder(encoder, top, bottom, books[0], m_t),
            likelihood,
            extra=extra,
        )
    if cfg.model == "sparse-ae":
        encoder = nn.Sequential(body, nn.ReLU(), nn.Linear(hidden[-1], d))
        decoder = MLP(d, hidden[::-1], data_dim)
        return Built(
            cfg,
            sparse_autoencoder(decoder, likelihood, d, l1=SPARSE_L1),
            delta_guide(encoder),
            decoder,
            encoder,
            likelihood,
        )
    if cfg.model == "sdae":
        stack = stacked_autoencoder(data_dim, layer_widths(cfg), likelihood)
        extra["pretrain"] = lambda x, progress=False: pretrain_layerwise(
            stack,
            x,
            epochs=cfg.pretrain_epochs,
            noise=cfg.noise,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=cfg.seed,
            progress=progress,
        )
        return Built(
            cfg,
            stack.model,
            stacked_guide(stack, cfg.noise),
            stack.decoder,
            stack.encoder,
            likelihood,
            extra=extra,
        )
    if cfg.model == "cae":
        encoder = nn.Sequential(body, nn.ReLU(), nn.Linear(hidden[-1], d))
        decoder = MLP(d, hidden[::-1], data_dim)
        model = contractive_autoencoder(decoder, likelihood, encoder, d, weight=cfg.contractive)
        return Built(cfg, model, delta_guide(encoder), decoder, encoder, likelihood)
    raise ConfigError(f"unknown model {cfg.model!r}")


def layer_widths(cfg: Config) -> tuple[int, ...]:
    """The widths of a layered model's layers: ``--layers``, or its default (lvae: 8d, 4d, 2d, d; sdae: --hidden, then d)."""
    d = cfg.latent_dim
    if cfg.layers:
        return cfg.layers
    return (*cfg.hidden, d) if cfg.model == "sdae" else (8 * d, 4 * d, 2 * d, d)


def _sample_with(
    sample: Any, shape: tuple[int, ...], generator: torch.Generator | None
) -> torch.Tensor:
    """``sample(shape)`` under a torch RNG seeded from ``generator`` (distributions take no generator)."""
    with seeded(
        int(torch.randint(2**31 - 1, (1,), generator=generator)) if generator is not None else None
    ):
        return sample(shape).detach()


def discrete_vae(
    kind: str,
    data_dim: int,
    latent_dim: int,
    hidden: Sequence[int],
    likelihood: nn.Module,
    *,
    num_classes: int = 10,
) -> tuple[Model, Callable[..., None], nn.Module, nn.Module]:
    """``(model, guide, decoder, mean_encoder)`` of a ``bernoulli-vae`` or ``categorical-vae`` with MLPs.

    ``hidden=()`` gives linear maps (784-200-784 is ``latent_dim=200``).
    For ``categorical-vae`` ``latent_dim`` counts the categorical variables,
    of ``num_classes`` classes each. ``mean_encoder`` maps ``x`` to the
    guide's mean of ``z`` (probabilities, flattened).
    """

    width = latent_dim if kind == "bernoulli-vae" else latent_dim * num_classes
    encoder = MLP(data_dim, list(hidden), width)
    decoder = MLP(width, list(hidden)[::-1], data_dim)
    if kind == "bernoulli-vae":
        return (
            bernoulli_vae(decoder, likelihood, latent_dim),
            bernoulli_guide(encoder),
            decoder,
            nn.Sequential(encoder, nn.Sigmoid()),
        )
    if kind == "categorical-vae":
        means = nn.Sequential(
            encoder, nn.Unflatten(-1, (latent_dim, num_classes)), nn.Softmax(-1), nn.Flatten(-2)
        )
        model = categorical_vae(decoder, likelihood, latent_dim, num_classes)
        return model, categorical_guide(encoder, latent_dim, num_classes), decoder, means
    raise ConfigError(
        f"unknown discrete model {kind!r}; choose one of {', '.join(DISCRETE_MODELS)}"
    )
