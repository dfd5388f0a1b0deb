"""Everything that defines a run, as the command line names it: :class:`Config` and its checks.

Every compatibility rule between options lives in :meth:`Config.validate`,
stated in terms of the properties of the named model (its record,
:class:`~ppl_vae.app.registry.NamedModel`, in :data:`MODEL_SPECS`, which
also builds it) and guide, so ``fit``, ``gaps``, ``compare`` and
``grad-variance`` agree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..distributions import LIKELIHOODS
from ..errors import (
    ConfigError,
    check_seed,
)
from ..inference.estimators import ESTIMATORS, get_estimator
from ..inference.svi import SCHEDULES
from .registry import GUIDES, MODEL_OPTIONS, MODEL_SPECS, MODELS, NamedModel

__all__ = [
    "Config",
    "NamedModel",
    "MODEL_SPECS",
    "MODELS",
    "MODEL_OPTIONS",
    "GUIDES",
    "LAUNCH",
    "RESUMABLE",
]


#: the keys every ``config.json`` has held since the first release: a saved config without one is damaged. The options added
#: since (``flows``, ``resumed``, ``kl_warmup``, ``layers``, ``pretrain_epochs``, ``contractive``, ``components``) may be absent
#: from an older run's file, which was trained with their default.
REQUIRED = (
    "model",
    "dataset",
    "data_dir",
    "download",
    "binarize",
    "limit",
    "latent_dim",
    "hidden",
    "arch",
    "likelihood",
    "guide",
    "estimator",
    "num_particles",
    "beta",
    "noise",
    "epochs",
    "batch_size",
    "lr",
    "lr_schedule",
    "patience",
    "seed",
)

#: ``fit``'s options for where and how it runs (Lightning Fabric); recorded in the config, so that ``--resume`` repeats them
LAUNCH = ("accelerator", "devices", "strategy", "precision", "num_nodes")

#: options ``--resume`` may change (recorded in config.json's ``resumed`` list); every other one defines the run
RESUMABLE = ("epochs", "patience", "data_dir", "download")

_KINDS: dict[str, tuple[str, tuple[type, ...], bool]] = {  # key -> (what, types, None allowed)
    **{
        k: ("a string", (str,), False)
        for k in ("model", "dataset", "arch", "likelihood", "guide", "estimator")
    },
    **{
        k: ("a string", (str,), True)
        for k in ("data_dir", "binarize", "lr_schedule", "accelerator", "strategy", "precision")
    },
    **{
        k: ("an integer", (int,), False)
        for k in (
            "latent_dim",
            "flows",
            "num_particles",
            "epochs",
            "batch_size",
            "seed",
            "kl_warmup",
            "pretrain_epochs",
        )
    },
    **{
        k: ("an integer", (int,), True)
        for k in ("limit", "patience", "components", "devices", "num_nodes")
    },
    **{k: ("a number", (int, float), False) for k in ("beta", "noise", "contractive", "lr")},
    "download": ("true or false", (bool,), False),
    "compile": ("true or false", (bool,), False),
}


def _default(key: str) -> Any:
    """The default of :class:`Config`'s option ``key``."""
    return Config.__dataclass_fields__[key].default


def option_flag(key: str) -> str:
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
    #: widths of the layers of a layered model, the last one the code (lvae: its stochastic layers, bottom first;
    #: sdae: its encoder's layers); () = its default
    layers: tuple[int, ...] = ()
    #: sdae: epochs of each layer's greedy pretraining (before --epochs of fine-tuning)
    pretrain_epochs: int = 5
    arch: str = "mlp"
    likelihood: str = "bernoulli"
    guide: str = "diagonal"
    flows: int = 2
    #: mixture components of the prior: mog-vae's Gaussians, vampprior's pseudo-inputs; None = the model's default
    components: int | None = None
    estimator: str = "reparam"
    num_particles: int = 1
    beta: float = 1.0
    kl_warmup: int = 0
    noise: float = 0.25
    contractive: float = 0.01
    epochs: int = 20
    batch_size: int = 100
    lr: float = 1e-3
    lr_schedule: str | None = None
    patience: int | None = None
    seed: int = 0
    #: where and how ``fit`` ran (Lightning Fabric's options, :data:`LAUNCH`); None: its default (one process, where the data is).
    #: A resumed run takes them from here, so that it continues on the same processes.
    accelerator: str | None = None
    devices: int | None = None
    strategy: str | None = None
    precision: str | None = None
    num_nodes: int | None = None
    #: the steps after the first run as one traced graph under ``torch.compile`` (:mod:`ppl_vae.inference.compiled`)
    compile: bool = False
    #: what each ``--resume`` changed: ``{"at_epoch": N, "changed": {key: [old, new]}}``
    resumed: tuple[dict[str, Any], ...] = ()

    def _check_types(self) -> None:
        for key, (what, types, optional) in _KINDS.items():
            value = getattr(self, key)
            if value is None and optional:
                continue
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ConfigError(
                    f"{key} must be {what}{' or null' if optional else ''}, got {value!r} ({type(value).__name__})"
                )
        for key in ("hidden", "layers"):
            value = getattr(self, key)
            if not (
                isinstance(value, tuple)
                and all(isinstance(h, int) and not isinstance(h, bool) for h in value)
            ):
                raise ConfigError(f"{key} must be a list of integers (layer widths), got {value!r}")
        if not (
            isinstance(self.resumed, tuple) and all(isinstance(r, Mapping) for r in self.resumed)
        ):
            raise ConfigError(
                f"resumed must be a list of records of earlier resumptions, got {self.resumed!r}"
            )

    def validate(self) -> Config:
        """``self`` if every option is possible; else :class:`ConfigError`, one line naming the option."""
        self._check_types()
        self._check_names()
        est = self._check_estimator()
        self._check_guide(est)
        self._check_model_options()
        self._check_networks()
        self._check_numbers()
        return self

    def _check_names(self) -> None:
        """The model and the likelihood are named ones; the latent dimension is positive."""
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if not isinstance(self.latent_dim, int) or self.latent_dim <= 0:
            raise ConfigError(
                f"latent dimension must be a positive integer, got {self.latent_dim!r}"
            )
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(
                f"unknown likelihood {self.likelihood!r}; choose one of {', '.join(LIKELIHOODS)}"
            )

    def _check_estimator(self) -> Any:
        """The estimator: its options, ``--compile``, and whether the model's latents allow it; returns it."""
        est = get_estimator(self.estimator)  # ConfigError for an unknown name
        est.validate(self.num_particles)  # and for bad options
        if self.compile and not est.compiles:
            raise ConfigError(
                f"--compile: estimator {self.estimator} {est.compiles_not}; train it without --compile"
            )
        spec, estimator = self.spec, self.estimator.split(":")[0]
        if spec.latents == "discrete" and est.pathwise_only:
            able = ", ".join(name for name, make in ESTIMATORS.items() if not make().pathwise_only)
            raise ConfigError(
                f"{self.model} has discrete latents (its guide has no pathwise sampler to reparameterise or enumerate): "
                f"use --estimator {able}"
            )
        if spec.latents == "point" and estimator != "reparam":
            raise ConfigError(
                f"{self.model} has a point-estimate encoder: only --estimator reparam applies"
            )
        if estimator == "analytic-kl" and not spec.mean_field:
            raise ConfigError(
                f"{self.model}'s guide is not mean-field (its sites depend on each other): --estimator analytic-kl would optimise the wrong objective"
            )
        return est

    def _check_guide(self, est: Any) -> None:
        """The guide: available for the model, and with the estimator ``est`` and ``--beta``."""
        if self.guide not in GUIDES:
            raise ConfigError(f"unknown guide {self.guide!r}; choose one of {', '.join(GUIDES)}")
        if self.guide not in self.spec.guides:
            able = ", ".join(m for m, s in MODEL_SPECS.items() if self.guide in s.guides)
            raise ConfigError(f"--guide {self.guide} is available for {able}, not {self.model}")
        if self.guide == "iaf" and est.scores:
            raise ConfigError(
                "--guide iaf needs a pathwise estimator (reparam or iwae): its cached flow log-density gives the score function no gradient"
            )
        if self.estimator.split(":")[0] == "iwae" and self.beta != 1.0:
            raise ConfigError(
                "--estimator iwae is not defined with --beta != 1 (the bound is not a sum of per-site terms)"
            )
        if self.guide == "iaf" and (self.flows < 1 or self.latent_dim < 2):
            raise ConfigError(
                f"--guide iaf needs --flows >= 1 and --latent-dim >= 2, got {self.flows} and {self.latent_dim}"
            )

    def _check_model_options(self) -> None:
        """An option the model would ignore is refused, unless it is left at its default (:attr:`NamedModel.options`)."""
        spec = self.spec
        for key in spec.ignores:
            if getattr(self, key) != _default(key):
                able = [m for m, s in MODEL_SPECS.items() if key in s.options]
                others = [m for m in MODELS if m not in able]
                where = (
                    ", ".join(able)
                    if len(able) <= len(others)
                    else "every model but " + ", ".join(others)
                )
                raise ConfigError(
                    f"{option_flag(key)} applies to {where}; {self.model} would ignore it"
                )
        if spec.layers_replace_hidden and self.layers and self.hidden != _default("hidden"):
            raise ConfigError(
                f"{self.model}'s --hidden is only the default of its --layers: give one of them, not both"
            )
        if self.flows != _default("flows") and self.guide != "iaf":
            raise ConfigError(f"--flows applies to --guide iaf, not --guide {self.guide}")
        if self.components is not None and self.components < 1:
            raise ConfigError(f"components must be >= 1, got {self.components}")

    def _check_networks(self) -> None:
        """``--arch``, ``--hidden`` and ``--layers``: available for the model, and positive widths."""
        spec = self.spec
        if self.arch not in ("mlp", "conv"):
            raise ConfigError(f"unknown arch {self.arch!r}; choose mlp or conv")
        if self.arch not in spec.archs:
            raise ConfigError(f"--arch {self.arch} is not available for {self.model}")
        if not self.hidden and not spec.hidden_optional:
            raise ConfigError(
                f"hidden must list at least one layer width for {self.model}, e.g. --hidden 200,200"
            )
        if any(h <= 0 for h in self.hidden):
            raise ConfigError(f"hidden widths must be positive, got {self.hidden}")
        if self.layers and (len(self.layers) < 2 or any(w <= 0 for w in self.layers)):
            raise ConfigError(
                f"--layers needs at least 2 positive widths, got {','.join(map(str, self.layers))}"
            )
        if self.layers and self.layers[-1] != self.latent_dim:
            raise ConfigError(
                f"the last of --layers is the code: it must equal --latent-dim ({self.layers[-1]} vs {self.latent_dim})"
            )

    def _check_numbers(self) -> None:
        """The numeric options are in their ranges; ``--lr-schedule`` is a named one."""
        if self.spec.needs_beta and self.beta == 1.0:
            raise ConfigError(f"{self.model} needs --beta different from 1 (beta=1 is the vae)")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta must be positive, got {self.beta}")
        if self.pretrain_epochs < 0:
            raise ConfigError(f"pretrain-epochs must be >= 0, got {self.pretrain_epochs}")
        if self.kl_warmup < 0:
            raise ConfigError(f"kl-warmup must be >= 0 epochs, got {self.kl_warmup}")
        for name in ("epochs", "batch_size", "num_particles"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if not 0 <= self.noise < 1:
            raise ConfigError(f"noise must be in [0, 1), got {self.noise}")
        if not (math.isfinite(self.contractive) and self.contractive >= 0):
            raise ConfigError(
                f"contractive weight must be a finite number >= 0, got {self.contractive}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr}")
        # a 32-bit seed, as numpy's (unchanged from earlier versions, so old configs stay valid)
        check_seed(self.seed)
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be positive, got {self.limit}")
        if self.lr_schedule is not None and self.lr_schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(SCHEDULES)}"
            )

    @property
    def spec(self) -> NamedModel:
        """The named model's record (:data:`MODEL_SPECS`): its properties and its builder."""
        try:
            return MODEL_SPECS[self.model]
        except KeyError:
            raise ConfigError(
                f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}"
            ) from None

    def launch(self) -> dict[str, Any]:
        """The :data:`LAUNCH` options this run gives (those left at None take ``fit``'s defaults)."""
        return {k: getattr(self, k) for k in LAUNCH if getattr(self, k) is not None}

    def fit_options(self) -> dict[str, Any]:
        """The options ``fit`` records in its checkpoint that this config fixes (all but ``epochs`` and ``patience``, which a resume may change)."""
        return {
            "estimator": get_estimator(self.estimator).name,
            "num_particles": self.num_particles,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "beta": self.beta,
            "kl_warmup": self.kl_warmup,
            "seed": self.seed,
            "lr_schedule": self.lr_schedule,
        }

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["layers"] = list(self.layers)
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
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise ConfigError(
                f"no {', '.join(missing)} (every saved config lists the options that define its run; it was not filled with a default)"
            )
        d = dict(d)
        for key in ("hidden", "layers", "resumed"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)
