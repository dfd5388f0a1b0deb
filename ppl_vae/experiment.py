"""Runs as the command line makes them: a config -> networks, model, guide, ``fit``, outputs.

This is the only place that maps option names to models; the library itself
never dispatches on names. A run directory holds ``config.json``,
``checkpoint.pt``, ``history.csv``, ``metrics.json`` and the figures, and
:func:`load_run` rebuilds a trained model from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import io
from .data import Dataset, load
from .errors import CheckpointError, ConfigError
from .experiments_extra import FAMILY_MODELS, build_family
from .guides import IAFEncoder, amortized_guide, delta_guide, masking_noise
from .inference import discover, elbo_per_datapoint, fit
from .inference.estimators import get_estimator
from .inference.svi import CHECKPOINT, as_tensors
from .models import DISCRETE_MODELS, LIKELIHOODS, PPCA, autoencoder, cvae, get_likelihood, one_hot, vae
from .models.discrete import discrete_vae
from .models.likelihoods import check_support
from .nn import MLP, Concat, ConvDecoder, ConvEncoder, GaussianEncoder

__all__ = ["Config", "Built", "MODELS", "build", "run", "load_run", "read_config", "CONFIG", "METRICS"]

MODELS = ("vae", "beta-vae", "cvae", "ae", "dae", "ppca", *DISCRETE_MODELS, *FAMILY_MODELS)
GUIDES = ("diagonal", "full", "iaf")
CONFIG, METRICS = "config.json", "metrics.json"


@dataclass(frozen=True)
class Config:
    """Everything that defines a run (saved as ``config.json``)."""

    model: str = "vae"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    binarize: str | None = None
    limit: int | None = None
    latent_dim: int = 2
    hidden: tuple[int, ...] = (200, 200)
    arch: str = "mlp"
    likelihood: str = "bernoulli"
    guide: str = "diagonal"
    flows: int = 2
    estimator: str = "reparam"
    num_particles: int = 1
    beta: float = 1.0
    noise: float = 0.25
    epochs: int = 20
    batch_size: int = 100
    lr: float = 1e-3
    lr_schedule: str | None = None
    patience: int | None = None
    seed: int = 0

    def validate(self) -> Config:
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if not isinstance(self.latent_dim, int) or self.latent_dim <= 0:
            raise ConfigError(f"latent dimension must be a positive integer, got {self.latent_dim!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(f"unknown likelihood {self.likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")
        get_estimator(self.estimator).validate(self.num_particles)  # ConfigError for unknown names, bad options
        if self.model in DISCRETE_MODELS and self.estimator in ("reparam", "analytic-kl"):
            raise ConfigError(f"{self.model} has discrete latents: use --estimator score, score+average, score+nvil, score+loo, iwae or relaxed")
        if self.guide not in GUIDES:
            raise ConfigError(f"unknown guide {self.guide!r}; choose one of {', '.join(GUIDES)}")
        if self.guide == "iaf" and self.estimator.startswith("score"):
            raise ConfigError("--guide iaf needs a pathwise estimator (reparam or iwae): its cached flow log-density gives the score function no gradient")
        if self.estimator.split(":")[0] == "iwae" and self.beta != 1.0:
            raise ConfigError("--estimator iwae is not defined with --beta != 1 (the bound is not a sum of per-site terms)")
        if self.model in DISCRETE_MODELS and self.estimator == "enum":
            raise ConfigError(f"{self.model} has no enumerable latents in its guide: use --estimator score, score+average, score+nvil, score+loo, iwae or relaxed")
        if self.guide == "iaf" and self.model not in ("vae", "beta-vae"):
            raise ConfigError(f"--guide iaf is available for vae and beta-vae, not {self.model}")
        if self.guide == "iaf" and (self.flows < 1 or self.latent_dim < 2):
            raise ConfigError(f"--guide iaf needs --flows >= 1 and --latent-dim >= 2, got {self.flows} and {self.latent_dim}")
        if self.arch not in ("mlp", "conv"):
            raise ConfigError(f"unknown arch {self.arch!r}; choose mlp or conv")
        if self.arch == "conv" and self.model in ("cvae", "ppca"):
            raise ConfigError(f"--arch conv is not available for {self.model}")
        if any(h <= 0 for h in self.hidden):
            raise ConfigError(f"hidden widths must be positive, got {self.hidden}")
        if self.model in ("ae", "dae") and self.estimator != "reparam":
            raise ConfigError(f"{self.model} has a point-estimate encoder: only --estimator reparam applies")
        if self.model == "beta-vae" and self.beta == 1.0:
            raise ConfigError("beta-vae needs --beta different from 1 (beta=1 is the vae)")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta must be positive, got {self.beta}")
        for name in ("epochs", "batch_size", "num_particles"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.noise < 1:
            raise ConfigError(f"noise must be in [0, 1), got {self.noise}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)


@dataclass
class Built:
    """The networks, model and guide of one config, and how to read latents off them."""

    config: Config
    model: Callable[..., None]
    guide: Callable[..., None]
    decoder: nn.Module | None
    encoder: nn.Module | None
    likelihood: nn.Module | None
    num_classes: int | None = None
    ppca: PPCA | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def conditional(self) -> bool:
        return self.config.model == "cvae"

    def encoder_inputs(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        if self.conditional:
            assert y is not None and self.num_classes is not None
            return (x, one_hot(y, self.num_classes))
        return (x,)

    @torch.no_grad()
    def latent_mean(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The guide's mean of ``z`` per row of ``x`` (the exact posterior mean for PPCA; for a flow, the base mean pushed through it)."""
        if self.ppca is not None:
            return self.ppca.posterior(x).mean
        assert self.encoder is not None
        out = self.encoder(*self.encoder_inputs(x, y))
        if isinstance(out, torch.distributions.TransformedDistribution):  # a flow: push the base mean through it
            z = out.base_dist.mean
            for t in out.transforms:
                z = t(z)
            return z
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of ``p(x | z)`` at the latent mean."""
        z = self.latent_mean(x, y)
        if self.ppca is not None:
            return z @ self.ppca.W.T + self.ppca.mu
        assert self.decoder is not None and self.likelihood is not None
        out = self.decoder(z, one_hot(y, self.num_classes)) if self.conditional else self.decoder(z)  # type: ignore[arg-type]
        return self.likelihood.mean(out)


def build(cfg: Config, data_dim: int, image_shape: tuple[int, int, int], num_classes: int | None) -> Built:
    """Networks, model and guide for ``cfg``; seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    d, hidden = cfg.latent_dim, list(cfg.hidden)
    if cfg.model == "ppca":
        ppca = PPCA(data_dim, d)
        encoder = GaussianEncoder(MLP(data_dim, [], hidden[-1]), hidden[-1], d, cfg.guide)
        return Built(cfg, ppca, amortized_guide(encoder), None, encoder, None, ppca=ppca)
    likelihood = get_likelihood(cfg.likelihood, dim=data_dim)
    if cfg.model in FAMILY_MODELS:  # hierarchical, mixture/Vamp prior, VQ-VAE, sparse AE
        return build_family(cfg, data_dim)
    if cfg.model in DISCRETE_MODELS:  # latent_dim Bernoulli latents, or latent_dim categoricals of 10 classes
        model, guide, decoder, means = discrete_vae(cfg.model, data_dim, d, hidden, likelihood)
        return Built(cfg, model, guide, decoder, means, likelihood)
    if cfg.model == "cvae":
        if num_classes is None:
            raise ConfigError(f"cvae needs labels; dataset {cfg.dataset!r} has none")
        decoder: nn.Module = Concat(MLP(d + num_classes, hidden[::-1], data_dim))
        encoder: nn.Module = GaussianEncoder(Concat(MLP(data_dim + num_classes, hidden[:-1], hidden[-1])), hidden[-1], d, cfg.guide)
        guide = amortized_guide(encoder, inputs=lambda x, y: (x, one_hot(y, num_classes)))
        return Built(cfg, cvae(decoder, likelihood, d, num_classes), guide, decoder, encoder, likelihood, num_classes)
    conv = cfg.arch == "conv"
    decoder = ConvDecoder(d, image_shape) if conv else MLP(d, hidden[::-1], data_dim)
    body: nn.Module = ConvEncoder(image_shape, hidden[-1]) if conv else MLP(data_dim, hidden[:-1], hidden[-1])
    if cfg.model in ("ae", "dae"):
        encoder = nn.Sequential(body, nn.ReLU(), nn.Linear(hidden[-1], d))
        corruption = masking_noise(cfg.noise) if cfg.model == "dae" else None
        return Built(cfg, autoencoder(decoder, likelihood, d), delta_guide(encoder, corruption=corruption), decoder, encoder, likelihood)
    if cfg.guide == "iaf":
        encoder = IAFEncoder(body, hidden[-1], d, num_flows=cfg.flows)
    else:
        encoder = GaussianEncoder(body, hidden[-1], d, cfg.guide)
    return Built(cfg, vae(decoder, likelihood, d), amortized_guide(encoder), decoder, encoder, likelihood)


def _splits(cfg: Config) -> dict[str, Dataset]:
    kw = dict(data_dir=cfg.data_dir, download=cfg.download, binarize=cfg.binarize, limit=cfg.limit, seed=cfg.seed)
    return {s: load(cfg.dataset, s, **kw) for s in ("train", "valid", "test")}  # type: ignore[arg-type]


def _tensors(cfg: Config, ds: Dataset) -> tuple[torch.Tensor, ...]:
    return ds.tensors(with_labels=cfg.model == "cvae")


def _check(cfg: Config, built: Built, splits: dict[str, Dataset]) -> None:
    for name, ds in splits.items():
        tensors = as_tensors(_tensors(cfg, ds), f"{cfg.dataset} {name} split")
        if built.likelihood is not None:
            check_support(tensors[0], built.likelihood, f"{cfg.dataset} {name} split")


def objective_name(cfg: Config) -> str:
    if cfg.model in ("vqvae", "sparse-ae"):
        return "reconstruction log-likelihood minus penalties (not a bound)"
    return "reconstruction log-likelihood (not a bound)" if cfg.model in ("ae", "dae") else "ELBO"


def run(cfg: Config, out: str | Path, *, force: bool = False, resume: bool = False, progress: bool = True, figures: bool = True) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out``; write metrics, history, checkpoint, figures."""
    cfg = cfg.validate()
    out = Path(out)
    splits = _splits(cfg)  # every input check happens before anything is written
    train = splits["train"]
    built = build(cfg, train.x.shape[1], train.image_shape, train.num_classes)
    _check(cfg, built, splits)
    if resume:  # read the checkpoint before anything is written
        ckpt = io.load_torch(out / CHECKPOINT)
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get("params"), list)):
            raise CheckpointError(f"checkpoint {out / CHECKPOINT} is corrupted or incomplete")
    io.prepare_run_dir(out, force=force, resume=resume)
    io.write_json(out / CONFIG, cfg.to_dict())
    t0 = time.perf_counter()
    result = fit(
        built.model, built.guide, _tensors(cfg, train), validation=_tensors(cfg, splits["valid"]),
        estimator=cfg.estimator, num_particles=cfg.num_particles, epochs=cfg.epochs, batch_size=cfg.batch_size,
        lr=cfg.lr, lr_schedule=cfg.lr_schedule, patience=cfg.patience, beta=cfg.beta, seed=cfg.seed,
        out=out, resume=resume, progress=progress,
    )
    test = _tensors(cfg, splits["test"])
    test_elbo, _ = elbo_per_datapoint(built.model, built.guide, *test)
    metrics: dict[str, Any] = {
        "objective": objective_name(cfg),
        "units": "nats per datapoint",
        "train_elbo": result.train_elbo,
        "val_elbo": result.val_elbo,
        "test_elbo": test_elbo.mean().item(),
        "test_elbo_se": (test_elbo.std() / math.sqrt(len(test_elbo))).item(),
        "epochs": result.epochs,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "train_wall_time_s": result.wall_time,
        "wall_time_s": time.perf_counter() - t0,
        "num_train": len(train),
        "num_test": len(splits["test"]),
        "options": cfg.to_dict(),
    }
    if built.ppca is not None:
        metrics["test_log_px_exact"] = built.ppca.log_marginal(test[0]).mean().item()
    if figures:
        from . import plotting

        plotting.run_figures(built, splits, result.to_dataframe(), out)
    io.write_json(out / METRICS, metrics)
    return metrics


def read_config(path: str | Path, **overrides: Any) -> Config:
    """The :class:`Config` saved at ``path`` (``config.json``), with ``overrides``."""
    try:
        return Config.from_dict({**json.loads(Path(path).read_text()), **overrides})
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None


def load_run(run_dir: str | Path) -> tuple[Built, dict[str, Dataset]]:
    """Rebuild the trained model of a run directory (config + checkpoint) and its data."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG})")
    cfg = read_config(run_dir / CONFIG).validate()
    ckpt = io.load_torch(run_dir / CHECKPOINT)
    splits = _splits(cfg)
    train = splits["train"]
    built = build(cfg, train.x.shape[1], train.image_shape, train.num_classes)
    found = discover(built.model, built.guide, tuple(t[:2] for t in _tensors(cfg, train)))
    saved = ckpt.get("params") if isinstance(ckpt, dict) else None
    # an estimator's own networks (NVIL's baseline) are saved after the model's and guide's parameters
    if saved is None or len(saved) < len(found.params) or any(s.shape != p.shape for s, p in zip(saved, found.params)):
        raise CheckpointError(f"checkpoint in {run_dir} does not match its config")
    with torch.no_grad():
        for p, s in zip(found.params, saved):
            p.copy_(s)
    found.train(False)
    return built, splits
