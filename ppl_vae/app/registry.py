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

from ..data import Dataset, load
from ..distributions import check_support, get_likelihood, one_hot
from ..errors import (
    ConfigError,
)
from ..guides.amortized import amortized_guide, delta_guide, masking_noise
from ..guides.discrete import bernoulli_guide, categorical_guide
from ..guides.flows import IAFEncoder
from ..inference.dispatch import OpMode
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

__all__ = [
    "Built",
    "GUIDES",
    "MODELS",
    "MODEL_OPTIONS",
    "MODEL_SPECS",
    "NamedModel",
    "build",
    "build_checked",
    "objective_name",
]


MIXTURE_COMPONENTS, PSEUDO_INPUTS, SPARSE_L1 = 10, 50, 0.1

VQ_LATENTS, VQ_CODES = 8, 64
#: VQ-VAE-2: (positions, codes) of the top and the bottom level
VQ2_TOP, VQ2_BOTTOM = (2, 16), (8, 64)


#: the ``--guide`` values: a diagonal or full-covariance Gaussian, or an inverse autoregressive flow
GUIDES = ("diagonal", "full", "iaf")
#: the options only some models use (:attr:`NamedModel.options`): ``--components`` sets the size of a mixture prior, ``--noise`` a
#: denoising autoencoder's masking, ``--contractive`` the contractive one's penalty, ``--pretrain-epochs`` a stacked one's pretraining
MODEL_OPTIONS = ("likelihood", "layers", "components", "noise", "contractive", "pretrain_epochs")
#: a :class:`~ppl_vae.app.config.Config`: that module reads this one's table, so the type is named here, not imported
RunConfig = Any


@dataclass(frozen=True)
class NamedModel:
    """One named model of ``--model``: what it is, which options it takes, and how to build it; declared once, in :data:`MODEL_SPECS`.

    Every rule of :meth:`~ppl_vae.app.config.Config.validate`, the command line's list of models and
    :func:`build` read these records.

    Attributes
    ----------
    name, description : str
        Its ``--model`` value and what it is, in a line.
    build : callable
        ``build(cfg, data_dim, image_shape, num_classes) -> Built``: its networks, model and guide
        (:func:`build` seeds it).
    latents : {"continuous", "discrete", "point"}
        Its latent sites: continuous, discrete (no pathwise gradient), or a
        point-mass encoder (an autoencoder: no density, no ELBO).
    guides, archs : tuple of str
        The ``--guide`` and ``--arch`` values it can be built with.
    mean_field : bool
        Its guide factorises over the latent sites (analytic KL applies).
    labels : bool
        It is conditioned on class labels (the data need them).
    standard_prior : bool
        Its (top) latent has the N(0, I) prior the latent pictures draw in.
    hidden_optional : bool
        ``--hidden ""`` builds linear maps.
    needs_beta : bool
        It needs ``--beta`` different from 1 (the beta-VAE).
    options : tuple of str
        The options of :data:`MODEL_OPTIONS` it takes (``layers``: its layer widths, the last one the code,
        ``--latent-dim``); set away from its default, any other one is refused (the model would ignore it).
    layers_replace_hidden : bool
        ``--hidden`` is only the default of its ``--layers``: giving both is refused.
    defaults : mapping
        Its own defaults of options whose :class:`~ppl_vae.app.config.Config` default is None
        (``components``).
    objective : str
        What its training objective is, as reported.
    """

    name: str
    description: str
    build: Callable[[RunConfig, int, Any, int | None], Built]
    latents: str = "continuous"
    guides: tuple[str, ...] = ("diagonal", "full")
    archs: tuple[str, ...] = ("mlp",)
    mean_field: bool = True
    labels: bool = False
    standard_prior: bool = False
    hidden_optional: bool = False
    needs_beta: bool = False
    options: tuple[str, ...] = ("likelihood",)
    layers_replace_hidden: bool = False
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    objective: str = "ELBO"

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def ignores(self) -> tuple[str, ...]:
        """The options of :data:`MODEL_OPTIONS` it would ignore (refused away from their defaults)."""
        return tuple(k for k in MODEL_OPTIONS if k not in self.options)


@dataclass(frozen=True)
class Built:
    """The networks, model and guide of one config, and how to read latents off them.

    ``exact`` is the model itself when it has closed forms (PPCA's exact
    posterior, marginal likelihood and linear decoder), for the pictures and
    the exact test log-likelihood; ``extra`` holds model-specific pieces
    (read-only), e.g. ``sample_prior(n, generator)``.
    """

    config: RunConfig
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
    cfg: RunConfig, data_dim: int, image_shape: tuple[int, int, int], num_classes: int | None
) -> Built:
    """Networks, model and guide for ``cfg`` (its :class:`NamedModel`'s builder); their initialisation is seeded by ``cfg.seed`` (the caller's RNG is left as it was)."""
    with seeded(cfg.seed):
        return cfg.spec.build(cfg, data_dim, image_shape, num_classes)


def load_splits(cfg: RunConfig) -> dict[str, Dataset]:
    kw = dict(
        data_dir=cfg.data_dir,
        download=cfg.download,
        binarize=cfg.binarize,
        limit=cfg.limit,
        seed=cfg.seed,
    )
    return {s: load(cfg.dataset, s, **kw) for s in ("train", "valid", "test")}  # type: ignore[arg-type]


def split_tensors(cfg: RunConfig, ds: Dataset) -> tuple[torch.Tensor, ...]:
    return ds.tensors(with_labels=cfg.spec.labels)


def _check(cfg: RunConfig, built: Built, splits: dict[str, Dataset]) -> None:
    for name, ds in splits.items():
        tensors = as_tensors(split_tensors(cfg, ds), f"{cfg.dataset} {name} split")
        if built.likelihood is not None:
            check_support(tensors[0], built.likelihood, f"{cfg.dataset} {name} split")


def objective_name(cfg: RunConfig) -> str:
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


class _AllocationGuard(OpMode):
    """Refuse (``MemoryError``) a tensor creation that would take the running total of bytes created past ``limit``.

    Networks are built by creating their parameters (``torch.empty`` of the layer's shape, then an
    initialiser writing into it); on a machine that overcommits memory a parameter of a terabyte is
    "allocated" and its initialiser then fills memory page by page for minutes. Counting the bytes
    of every tensor creation before it happens refuses such a build at once.
    """

    def __init__(self, limit: float) -> None:
        super().__init__()
        self.limit, self.total = limit, 0

    def op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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


def build_checked(cfg: RunConfig, splits: dict[str, Dataset]) -> Built:
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


def _body(data_dim: int, hidden: Sequence[int]) -> nn.Module:
    """The MLP encoder body: ``hidden[:-1]`` hidden layers, output ``hidden[-1]`` wide."""
    return MLP(data_dim, list(hidden[:-1]), hidden[-1])


def _mlp_decoder(code: int, hidden: Sequence[int], data_dim: int) -> nn.Module:
    """The MLP decoder: the encoder's hidden widths in reverse."""
    return MLP(code, list(hidden[::-1]), data_dim)


def _point_encoder(body: nn.Module, hidden: Sequence[int], code: int) -> nn.Module:
    """An autoencoder's encoder: the body, a ReLU and a linear map to the code."""
    return nn.Sequential(body, nn.ReLU(), nn.Linear(hidden[-1], code))


def _decoded(likelihood: nn.Module, dec: nn.Module, draw: Any) -> Any:
    """``sample_prior(n, generator)``: the likelihood's mean of ``dec`` at ``draw(n, generator)``."""
    return lambda n, generator=None: likelihood.mean(dec(draw(n, generator))).detach()


def _ppca(cfg: RunConfig, data_dim: int, image_shape: Any, num_classes: int | None) -> Built:
    d, hidden = cfg.latent_dim, list(cfg.hidden)
    ppca = PPCA(data_dim, d)
    encoder = GaussianEncoder(MLP(data_dim, [], hidden[-1]), hidden[-1], d, cfg.guide)
    return Built(cfg, ppca, amortized_guide(encoder), None, encoder, None, exact=ppca)


def _discrete(cfg: RunConfig, data_dim: int, image_shape: Any, num_classes: int | None) -> Built:
    likelihood = get_likelihood(cfg.likelihood, dim=data_dim)
    model, guide, decoder, means = discrete_vae(
        cfg.model, data_dim, cfg.latent_dim, cfg.hidden, likelihood
    )
    return Built(cfg, model, guide, decoder, means, likelihood)


def _cvae(cfg: RunConfig, data_dim: int, image_shape: Any, num_classes: int | None) -> Built:
    if num_classes is None:
        raise ConfigError(f"cvae needs labels; dataset {cfg.dataset!r} has none")
    d, hidden = cfg.latent_dim, list(cfg.hidden)
    likelihood = get_likelihood(cfg.likelihood, dim=data_dim)
    decoder = Concat(MLP(d + num_classes, hidden[::-1], data_dim))
    encoder = GaussianEncoder(
        Concat(MLP(data_dim + num_classes, hidden[:-1], hidden[-1])), hidden[-1], d, cfg.guide
    )
    guide = amortized_guide(encoder, inputs=lambda x, y: (x, one_hot(y, num_classes)))
    model = cvae(decoder, likelihood, d, num_classes)
    return Built(cfg, model, guide, decoder, encoder, likelihood, num_classes)


def _networks(
    cfg: RunConfig, data_dim: int, image_shape: Any
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(likelihood, decoder, encoder body)`` of ``--arch``: MLPs, or convolutional networks of the images."""
    d, hidden = cfg.latent_dim, list(cfg.hidden)
    likelihood = get_likelihood(cfg.likelihood, dim=data_dim)
    if cfg.arch == "conv":
        return likelihood, ConvDecoder(d, image_shape), ConvEncoder(image_shape, hidden[-1])
    return likelihood, _mlp_decoder(d, hidden, data_dim), _body(data_dim, hidden)


def _vae(cfg: RunConfig, data_dim: int, image_shape: Any, num_classes: int | None) -> Built:
    d, width = cfg.latent_dim, cfg.hidden[-1]
    likelihood, decoder, body = _networks(cfg, data_dim, image_shape)
    if cfg.guide == "iaf":
        encoder: nn.Module = IAFEncoder(body, width, d, num_flows=cfg.flows)
    else:
        encoder = GaussianEncoder(body, width, d, cfg.guide)
    model = vae(decoder, likelihood, d)
    return Built(cfg, model, amortized_guide(encoder), decoder, encoder, likelihood)


def _autoencoder(cfg: RunConfig, data_dim: int, image_shape: Any, num_classes: int | None) -> Built:
    d = cfg.latent_dim
    likelihood, decoder, body = _networks(cfg, data_dim, image_shape)
    encoder = _point_encoder(body, cfg.hidden, d)
    corruption = masking_noise(cfg.noise) if "noise" in cfg.spec.options else None
    guide = delta_guide(encoder, corruption=corruption)
    return Built(cfg, autoencoder(decoder, likelihood, d), guide, decoder, encoder, likelihood)


def _hvae(cfg: RunConfig, data_dim: int, image_shape: Any, num_classes: int | None) -> Built:
    """Two Gaussian latent layers: ``z1`` of ``2 d`` dimensions under ``z2`` of ``d``."""
    d, hidden = cfg.latent_dim, list(cfg.hidden)
    likelihood, d1 = get_likelihood(cfg.likelihood, dim=data_dim), 2 * d
    body = _body(data_dim, hidden)
    enc1 = GaussianEncoder(body, hidden[-1], d1)
    enc2 = GaussianEncoder(MLP(d1, [], hidden[-1]), hidden[-1], d)
    dec1 = _mlp_decoder(d1, hidden, data_dim)
    dec2 = GaussianEncoder(MLP(d, [], hidden[-1]), hidden[-1], d1)
    model, guide = hierarchical_vae(dec1, dec2, likelihood, d), hierarchical_guide(enc1, enc2)
    extra = {
        "sample_prior": lambda n, generator=None: ancestral_means(
            dec1, [dec2], likelihood, d, n, generator=generator
        )
    }
    return Built(
        cfg, model, guide, TopDecoder(dec1, dec2), TopEncoder(enc1, enc2), likelihood, extra=extra
    )


def _lvae(cfg: RunConfig, data_dim: int, image_shape: Any, num_classes: int | None) -> Built:
    hidden, widths = list(cfg.hidden), layer_widths(cfg)
    likelihood = get_likelihood(cfg.likelihood, dim=data_dim)
    _body(
        data_dim, hidden
    )  # unused: drawn as before the table, so a seeded lvae is the one earlier versions built
    nets = ladder_networks(data_dim, widths, hidden[-1], likelihood)
    extra = {
        "sample_prior": lambda n, generator=None: ancestral_means(
            nets.decoder, list(nets.priors), likelihood, widths[-1], n, generator=generator
        )
    }
    return Built(
        cfg, nets.model, nets.guide, nets.top_decoder, nets.top_encoder, likelihood, extra=extra
    )


def _mixture_prior(cfg: RunConfig, encoder: nn.Module, data_dim: int) -> Any:
    """The prior of ``mog-vae`` (a learnt Gaussian mixture) or ``vampprior`` (the encoder at learnt pseudo-inputs)."""
    k = cfg.components or cfg.spec.defaults["components"]
    if cfg.model == "mog-vae":
        return GaussianMixturePrior(k, cfg.latent_dim).marginal
    pseudo = torch.rand(k, data_dim, generator=torch.Generator().manual_seed(cfg.seed))
    return VampPrior(encoder, pseudo)


def _prior_vae(cfg: RunConfig, data_dim: int, image_shape: Any, num_classes: int | None) -> Built:
    """A VAE with a learnt prior (:func:`_mixture_prior`)."""
    d, hidden = cfg.latent_dim, list(cfg.hidden)
    likelihood, body = get_likelihood(cfg.likelihood, dim=data_dim), _body(data_dim, hidden)
    encoder = GaussianEncoder(body, hidden[-1], d, cfg.guide)
    decoder = _mlp_decoder(d, hidden, data_dim)
    prior = _mixture_prior(cfg, encoder, data_dim)
    draw = _decoded(likelihood, decoder, lambda n, g: _sample_with(prior().sample, (n,), g))
    model = vae_with_prior(decoder, likelihood, prior)
    return Built(
        cfg,
        model,
        amortized_guide(encoder),
        decoder,
        encoder,
        likelihood,
        extra={"sample_prior": draw},
    )


def _vqvae(cfg: RunConfig, data_dim: int, image_shape: Any, num_classes: int | None) -> Built:
    d, hidden = cfg.latent_dim, list(cfg.hidden)
    likelihood, body = get_likelihood(cfg.likelihood, dim=data_dim), _body(data_dim, hidden)
    codebook, code_prior = Codebook(VQ_CODES, d, seed=cfg.seed), CodePrior(VQ_LATENTS, VQ_CODES)
    encoder = _point_encoder(body, hidden, VQ_LATENTS * d)
    decoder = _mlp_decoder(VQ_LATENTS * d, hidden, data_dim)
    model = vqvae(decoder, likelihood, codebook, code_prior, VQ_LATENTS)
    draw = _decoded(
        likelihood,
        decoder,
        lambda n, g: codebook.embedding[code_prior.sample_codes(n, generator=g)].flatten(-2),
    )
    extra = {"sample_prior": draw, "codebook": codebook, "code_prior": code_prior}
    quantized = QuantizedDecoder(codebook, decoder)
    return Built(cfg, model, delta_guide(encoder), quantized, encoder, likelihood, extra=extra)


def _vqvae2(cfg: RunConfig, data_dim: int, image_shape: Any, num_classes: int | None) -> Built:
    """Two levels of codes (:data:`VQ2_TOP`, :data:`VQ2_BOTTOM`), each under an autoregressive prior."""
    d, hidden = cfg.latent_dim, list(cfg.hidden)
    likelihood, body = get_likelihood(cfg.likelihood, dim=data_dim), _body(data_dim, hidden)
    (m_t, k_t), (m_b, k_b) = VQ2_TOP, VQ2_BOTTOM
    books = (Codebook(k_t, d, seed=cfg.seed), Codebook(k_b, d, seed=cfg.seed + 1))
    priors = (
        AutoregressiveCodePrior(m_t, k_t),
        AutoregressiveCodePrior(m_b, k_b, context_dim=m_t * k_t),
    )
    encoder = nn.Sequential(body, nn.ReLU())
    top, bottom = nn.Linear(hidden[-1], m_t * d), MLP(hidden[-1] + m_t * d, [], m_b * d)
    decoder = _mlp_decoder((m_t + m_b) * d, hidden, data_dim)
    model = vqvae2(decoder, likelihood, books, priors, (m_t, m_b))
    extra = {
        "sample_prior": lambda n, generator=None: vqvae2_sample(
            decoder, likelihood, books, priors, n, generator=generator
        ),
        "codebooks": books,
        "code_priors": priors,
    }
    return Built(
        cfg,
        model,
        vqvae2_guide(encoder, top, bottom, books[0], m_t),
        VQ2Decoder(decoder, books, (m_t, m_b)),
        VQ2Encoder(encoder, top, bottom, books[0], m_t),
        likelihood,
        extra=extra,
    )


def _penalised_ae(
    cfg: RunConfig, data_dim: int, image_shape: Any, num_classes: int | None
) -> Built:
    """The sparse (L1 penalty on the code) or the contractive (penalty on the encoder's Jacobian) autoencoder."""
    d, hidden = cfg.latent_dim, list(cfg.hidden)
    likelihood, body = get_likelihood(cfg.likelihood, dim=data_dim), _body(data_dim, hidden)
    encoder = _point_encoder(body, hidden, d)
    decoder = _mlp_decoder(d, hidden, data_dim)
    if cfg.model == "cae":
        model = contractive_autoencoder(decoder, likelihood, encoder, d, weight=cfg.contractive)
    else:
        model = sparse_autoencoder(decoder, likelihood, d, l1=SPARSE_L1)
    return Built(cfg, model, delta_guide(encoder), decoder, encoder, likelihood)


def _sdae(cfg: RunConfig, data_dim: int, image_shape: Any, num_classes: int | None) -> Built:
    """A stacked denoising autoencoder; ``extra["pretrain"](x)`` pretrains it layer by layer."""
    likelihood = get_likelihood(cfg.likelihood, dim=data_dim)
    _body(
        data_dim, cfg.hidden
    )  # unused: drawn as before the table, so a seeded sdae is the one earlier versions built
    stack = stacked_autoencoder(data_dim, layer_widths(cfg), likelihood)
    extra = {
        "pretrain": lambda x, progress=False: pretrain_layerwise(
            stack,
            x,
            epochs=cfg.pretrain_epochs,
            noise=cfg.noise,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=cfg.seed,
            progress=progress,
        )
    }
    guide = stacked_guide(stack, cfg.noise)
    return Built(cfg, stack.model, guide, stack.decoder, stack.encoder, likelihood, extra=extra)


def layer_widths(cfg: RunConfig) -> tuple[int, ...]:
    """The widths of a layered model's layers: ``--layers``, or its default (lvae: 8d, 4d, 2d, d; sdae: --hidden, then d)."""
    d = cfg.latent_dim
    if cfg.layers:
        return cfg.layers
    return (*cfg.hidden, d) if cfg.spec.layers_replace_hidden else (8 * d, 4 * d, 2 * d, d)


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


_AE = "reconstruction log-likelihood (not a bound)"
_PENALISED = "reconstruction log-likelihood minus penalties (not a bound)"
_POINT = dict(latents="point", guides=("diagonal",))
_NAMED = (
    NamedModel(
        "vae", "a Gaussian VAE", _vae, guides=GUIDES, archs=("mlp", "conv"), standard_prior=True
    ),
    NamedModel(
        "beta-vae",
        "a VAE whose KL term is weighted by --beta",
        _vae,
        guides=GUIDES,
        archs=("mlp", "conv"),
        standard_prior=True,
        needs_beta=True,
    ),
    NamedModel(
        "cvae", "a VAE conditioned on the class labels", _cvae, labels=True, standard_prior=True
    ),
    NamedModel(
        "ae",
        "a deterministic autoencoder",
        _autoencoder,
        **_POINT,
        archs=("mlp", "conv"),
        standard_prior=True,
        objective=_AE,
    ),
    NamedModel(
        "dae",
        "a denoising autoencoder (inputs masked with probability --noise)",
        _autoencoder,
        **_POINT,
        archs=("mlp", "conv"),
        standard_prior=True,
        options=("likelihood", "noise"),
        objective=_AE,
    ),
    # its likelihood is Gaussian, with a learnt variance
    NamedModel(
        "ppca",
        "probabilistic PCA, with its exact posterior",
        _ppca,
        standard_prior=True,
        options=(),
    ),
    NamedModel(
        "bernoulli-vae",
        "a VAE of --latent-dim Bernoulli latents",
        _discrete,
        latents="discrete",
        guides=("diagonal",),
        hidden_optional=True,
    ),
    NamedModel(
        "categorical-vae",
        "a VAE of --latent-dim categorical latents of 10 classes",
        _discrete,
        latents="discrete",
        guides=("diagonal",),
        hidden_optional=True,
    ),
    NamedModel(
        "hvae",
        "a VAE of two Gaussian latent layers",
        _hvae,
        guides=("diagonal",),
        mean_field=False,
        standard_prior=True,
    ),
    NamedModel(
        "lvae",
        "a ladder VAE of --layers stochastic layers",
        _lvae,
        guides=("diagonal",),
        mean_field=False,
        standard_prior=True,
        options=("likelihood", "layers"),
    ),
    NamedModel(
        "mog-vae",
        "a VAE with a learnt mixture-of-Gaussians prior",
        _prior_vae,
        options=("likelihood", "components"),
        defaults={"components": MIXTURE_COMPONENTS},
    ),
    NamedModel(
        "vampprior",
        "a VAE with the VampPrior (the encoder at learnt pseudo-inputs)",
        _prior_vae,
        options=("likelihood", "components"),
        defaults={"components": PSEUDO_INPUTS},
    ),
    NamedModel("vqvae", "a vector-quantised autoencoder", _vqvae, **_POINT, objective=_PENALISED),
    NamedModel(
        "vqvae2",
        "a two-level vector-quantised autoencoder",
        _vqvae2,
        **_POINT,
        objective=_PENALISED,
    ),
    NamedModel(
        "sparse-ae",
        "an autoencoder with an L1 penalty on its code",
        _penalised_ae,
        **_POINT,
        objective=_PENALISED,
    ),
    NamedModel(
        "cae",
        "a contractive autoencoder (a penalty on the encoder's Jacobian, weight --contractive)",
        _penalised_ae,
        **_POINT,
        options=("likelihood", "contractive"),
        objective=_PENALISED,
    ),
    NamedModel(
        "sdae",
        "a stacked denoising autoencoder, pretrained layer by layer",
        _sdae,
        **_POINT,
        options=("likelihood", "layers", "noise", "pretrain_epochs"),
        layers_replace_hidden=True,
        objective=_AE,
    ),
)
#: the named models, by name, in the order the command line lists them
MODEL_SPECS: Mapping[str, NamedModel] = MappingProxyType({m.name: m for m in _NAMED})
MODELS = tuple(MODEL_SPECS)
