"""Runs as the command line makes them: a config -> networks, model, guide, ``fit``, outputs.

This is the only place that maps option names to models; the library itself
never dispatches on names. A run directory holds ``config.json``,
``checkpoint.pt``, ``history.csv``, ``metrics.json`` and the figures, and
:func:`load_run` rebuilds a trained model from it.

:func:`run` checks everything before it touches the directory: the options
(:meth:`Config.validate`), the data, and that the networks and one loss
evaluation on a first batch fit in memory. Only then does it take the
directory (:func:`ppl_vae.io.prepare_run_dir`: locked, cleared with
``force``). A new run that fails or is interrupted before its first
checkpoint leaves nothing behind. ``metrics.json`` is written last, so it
exists only for a finished run; a resume removes the old one first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import io
from .data import Dataset, load
from .errors import CheckpointError, ConfigError, Interrupted, TrainingDiverged
from .experiments_extra import FAMILY_MODELS, build_family
from .guides import IAFEncoder, amortized_guide, delta_guide, masking_noise
from .inference import discover, elbo_per_datapoint, fit
from .inference.estimators import get_estimator
from .inference.svi import CHECKPOINT, SCHEDULES, as_tensors
from .models import DISCRETE_MODELS, LIKELIHOODS, PPCA, autoencoder, cvae, get_likelihood, one_hot, vae
from .models.discrete import discrete_vae
from .models.likelihoods import check_support
from .nn import MLP, Concat, ConvDecoder, ConvEncoder, GaussianEncoder

__all__ = ["Config", "Built", "MODELS", "RESUMABLE", "build", "run", "load_run", "read_config", "CONFIG", "METRICS"]

MODELS = ("vae", "beta-vae", "cvae", "ae", "dae", "ppca", *DISCRETE_MODELS, *FAMILY_MODELS)
GUIDES = ("diagonal", "full", "iaf")
CONFIG, METRICS = "config.json", "metrics.json"
#: options ``--resume`` may change (recorded in config.json's ``resumed`` list); every other one defines the run
RESUMABLE = ("epochs", "patience", "data_dir", "download")

_KINDS: dict[str, tuple[str, tuple[type, ...], bool]] = {  # key -> (what, types, None allowed)
    **{k: ("a string", (str,), False) for k in ("model", "dataset", "arch", "likelihood", "guide", "estimator")},
    **{k: ("a string", (str,), True) for k in ("data_dir", "binarize", "lr_schedule")},
    **{k: ("an integer", (int,), False) for k in ("latent_dim", "flows", "num_particles", "epochs", "batch_size", "seed")},
    **{k: ("an integer", (int,), True) for k in ("limit", "patience")},
    **{k: ("a number", (int, float), False) for k in ("beta", "noise", "lr")},
    "download": ("true or false", (bool,), False),
}


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


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
    #: what each ``--resume`` changed: ``{"at_epoch": N, "changed": {key: [old, new]}}``
    resumed: tuple[dict[str, Any], ...] = ()

    def _check_types(self) -> None:
        for key, (what, types, optional) in _KINDS.items():
            value = getattr(self, key)
            if value is None and optional:
                continue
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ConfigError(f"{key} must be {what}{' or null' if optional else ''}, got {value!r} ({type(value).__name__})")
        if not (isinstance(self.hidden, tuple) and all(isinstance(h, int) and not isinstance(h, bool) for h in self.hidden)):
            raise ConfigError(f"hidden must be a list of integers (layer widths), got {self.hidden!r}")
        if not (isinstance(self.resumed, tuple) and all(isinstance(r, Mapping) for r in self.resumed)):
            raise ConfigError(f"resumed must be a list of records of earlier resumptions, got {self.resumed!r}")

    def validate(self) -> Config:
        """``self`` if every option is possible; else :class:`ConfigError`, one line naming the option."""
        self._check_types()
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
        if not self.hidden and self.model not in DISCRETE_MODELS:  # the discrete-latent models take none: linear maps
            raise ConfigError(f"hidden must list at least one layer width for {self.model}, e.g. --hidden 200,200")
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
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.seed <= 2**32 - 1:  # Pyro's set_rng_seed seeds numpy, whose seeds are 32-bit
            raise ConfigError(f"seed must be in [0, 2**32 - 1], got {self.seed}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be positive, got {self.limit}")
        if self.lr_schedule is not None and self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(SCHEDULES)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["resumed"] = [dict(r) for r in self.resumed]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        """The config of a ``config.json`` (not yet validated: call :meth:`validate`)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
        d = dict(d)
        for key in ("hidden", "resumed"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
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


_MEMORY = ("can't allocate memory", "not enough memory", "out of memory", "overflow")


def _memory_error(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, (RuntimeError, TypeError)) and any(h in str(exc).lower() for h in _MEMORY)


def _physical_memory() -> float:
    """Bytes of physical memory (infinite where the platform does not say)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return math.inf


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
        built = build(cfg, train.x.shape[1], train.image_shape, train.num_classes)
        _check(cfg, built, splits)
        batch = tuple(t[: cfg.batch_size] for t in _tensors(cfg, train))
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


def _resumed(cfg: Config, out: Path) -> tuple[Config, dict[str, list[Any]]]:
    """``cfg`` checked against the run's saved config: only :data:`RESUMABLE` options may differ."""
    if not out.is_dir():
        raise CheckpointError(f"cannot resume: run directory {out} does not exist")
    if not (out / CONFIG).is_file():
        raise CheckpointError(f"cannot resume: no {CONFIG} in {out}")
    saved = read_config(out / CONFIG)
    changed = {
        f.name: [getattr(saved, f.name), getattr(cfg, f.name)]
        for f in dataclasses.fields(Config)
        if f.name != "resumed" and getattr(saved, f.name) != getattr(cfg, f.name)
    }
    fixed = {k: v for k, v in changed.items() if k not in RESUMABLE}
    if fixed:
        listed = ", ".join(f"{_option(k)} ({old!r} -> {new!r})" for k, (old, new) in fixed.items())
        raise ConfigError(
            f"--resume cannot change {listed}: they define the run in {out}; only "
            f"{', '.join(map(_option, RESUMABLE))} may change (start a new run with --force or another --out)"
        )
    changed = {k: [list(o) if isinstance(o, tuple) else o for o in v] for k, v in changed.items()}
    return dataclasses.replace(cfg, resumed=saved.resumed), changed


def _discard(out: Path, created: bool) -> None:
    """Remove what a new run wrote before its first checkpoint (the folder too, if this run made it)."""
    for entry in out.iterdir():
        if entry.name == io.LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if created:
        io.release_run_dir(out)
        try:
            out.rmdir()
        except OSError:  # someone else's files appeared meanwhile: leave the folder
            pass


def run(cfg: Config, out: str | Path, *, force: bool = False, resume: bool = False, progress: bool = True, figures: bool = True) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out``; write metrics, history, checkpoint, figures.

    With ``resume`` the run in ``out`` continues to ``cfg.epochs`` (the new
    total, at least the epochs done); ``cfg`` may differ from the saved
    config only in :data:`RESUMABLE` options, and ``config.json`` records
    what changed in its ``resumed`` list. A longer run re-plans a learning
    rate schedule for the new total from the epoch reached on.

    Raises
    ------
    ConfigError, DataError, CheckpointError, RunDirectoryError
        Before anything is written, except a full disk during training
        (the last checkpoint is kept).
    Interrupted
        On Ctrl-C, saying which checkpoint is kept.
    """
    out = Path(out)
    if force and resume:
        raise ConfigError("give either --force (start the run afresh) or --resume (continue it), not both")
    changed: dict[str, list[Any]] = {}
    if resume:  # contradictions first: they explain more than a failed check of the combination
        cfg, changed = _resumed(cfg, out)
    cfg = cfg.validate()
    with io.holding():
        try:
            return _run(cfg, out, changed, force=force, resume=resume, progress=progress, figures=figures)
        except KeyboardInterrupt as exc:
            if isinstance(exc, Interrupted):
                raise
            where = f"the run in {out} is unchanged" if resume else "there is no checkpoint (nothing was written)"
            raise Interrupted(f"interrupted before training; {where}") from None


def _run(cfg: Config, out: Path, changed: dict[str, list[Any]], *, force: bool, resume: bool, progress: bool, figures: bool) -> dict[str, Any]:
    splits = _splits(cfg)  # every input check happens before anything is written
    train = splits["train"]
    built = build_checked(cfg, splits)
    done: int | None = None
    if resume:  # read the checkpoint before anything is written
        ckpt = io.load_checkpoint(out / CHECKPOINT)
        done = ckpt.get("epoch")
        if not isinstance(done, int):
            raise CheckpointError(f"checkpoint {out / CHECKPOINT} is corrupted or incomplete (no epoch count)")
        if cfg.epochs < done:
            raise ConfigError(f"--epochs {cfg.epochs} is fewer than the {done} epochs the run in {out} has done")
        bad = ckpt.get("bad_epochs", 0)
        if ckpt.get("stopped_early") and cfg.patience is not None and bad >= cfg.patience and cfg.epochs > done:
            raise ConfigError(f"the run in {out} stopped early at epoch {done} ({bad} epochs without improvement); resume it with a --patience above {bad} to train on")
        cfg = dataclasses.replace(cfg, resumed=(*cfg.resumed, {"at_epoch": done, "changed": changed}))
    created = not out.exists()
    io.prepare_run_dir(out, force=force, resume=resume)
    try:
        io.write_json(out / CONFIG, cfg.to_dict())
        if resume:  # it describes the run before this resume; rewritten when this one finishes
            (out / METRICS).unlink(missing_ok=True)
        t0 = time.perf_counter()
        result = fit(
            built.model, built.guide, _tensors(cfg, train), validation=_tensors(cfg, splits["valid"]),
            estimator=cfg.estimator, num_particles=cfg.num_particles, epochs=cfg.epochs, batch_size=cfg.batch_size,
            lr=cfg.lr, lr_schedule=cfg.lr_schedule, patience=cfg.patience, beta=cfg.beta, seed=cfg.seed,
            out=out, resume=resume, progress=progress,
        )
        done = result.epochs
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
            "best_epoch": result.best_epoch,
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
    except BaseException as exc:
        discarded = not resume and not (out / CHECKPOINT).exists()
        if discarded:
            _discard(out, created)
        if isinstance(exc, Interrupted):
            raise Interrupted(str(exc) + (f" (the unfinished new run in {out} was removed)" if discarded else ""), epoch=exc.epoch) from None
        if isinstance(exc, KeyboardInterrupt):
            where = f"the last checkpoint is epoch {done} (in {out}); {METRICS} was not written" if done else "there is no checkpoint"
            raise Interrupted(f"interrupted; {where}", epoch=done) from None
        if isinstance(exc, TrainingDiverged) and discarded:
            raise TrainingDiverged(f"{exc} (no epoch finished: the new run in {out} was removed)", step=exc.step, site=exc.site) from None
        raise


def read_config(path: str | Path, **overrides: Any) -> Config:
    """The validated :class:`Config` saved at ``path`` (``config.json``), with ``overrides``.

    Raises
    ------
    ConfigError
        One line naming the file and the key: unreadable, not JSON, an
        unknown key, a value of the wrong type or an impossible one.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"expected a JSON object, got {type(data).__name__}")
        return Config.from_dict({**data, **overrides}).validate()
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_run(run_dir: str | Path) -> tuple[Built, dict[str, Dataset]]:
    """Rebuild the trained model of a run directory (config + checkpoint) and its data.

    The checkpoint is read with ``weights_only=True`` (a file holding other
    objects is refused, never executed) and refused if a parameter is NaN
    or infinite.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG})")
    cfg = read_config(run_dir / CONFIG)
    ckpt = io.load_checkpoint(run_dir / CHECKPOINT)  # weights_only: never executes code; finite parameters
    splits = _splits(cfg)
    train = splits["train"]
    built = build(cfg, train.x.shape[1], train.image_shape, train.num_classes)
    found = discover(built.model, built.guide, tuple(t[:2] for t in _tensors(cfg, train)))
    # a run that stopped early is its best epoch's parameters (what its metrics describe)
    saved = ckpt["best_params"] if ckpt.get("stopped_early") and ckpt.get("best_params") else ckpt["params"]
    # an estimator's own networks (NVIL's baseline) are saved after the model's and guide's parameters
    if saved is None or len(saved) < len(found.params) or any(s.shape != p.shape for s, p in zip(saved, found.params)):
        raise CheckpointError(f"checkpoint in {run_dir} does not match its config")
    with torch.no_grad():
        for p, s in zip(found.params, saved):
            p.copy_(s)
    found.train(False)
    return built, splits
