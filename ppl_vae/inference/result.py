r"""What :func:`~ppl_vae.inference.fit` returns: the fitted model's record with the analyses of the model.

:class:`FitResult` is :class:`~.fitted.FitRecord` (the training record and the
trained model: ``history``, ``save``, ``load``, ``sample``, ``scope``), which the
training loop builds without knowing any analysis, with the three analyses that
need the bounds and the samplers:

* :meth:`~FitResult.posterior` -- the guide's :math:`q(z \mid x)` or batched
  HMC's :math:`p(z \mid x)` for new data, as an ArviZ object.
* :meth:`~FitResult.elbo` / :meth:`~FitResult.iwae` -- per-datapoint bounds on
  :math:`\log p(x)` as :class:`~.elbo.Estimate` (value, standard error, draws).

It sits above :mod:`.gaps` and :mod:`.mcmc` (which know nothing of training or of
this class), and below :func:`~.svi.fit`, :meth:`FitResult.load` and
:func:`ppl_vae.app.runs.load_run`, which give it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from ..errors import ConfigError
from .elbo import Estimate, evaluate_elbo
from .fitted import FitRecord
from .gaps.bounds import importance_bounds
from .mcmc.hmc import hmc_latent
from .mcmc.vi import vi_draws
from .random import seeded

__all__ = ["FitResult"]


class FitResult(FitRecord):
    """What a ``fit`` run produced, and (when it holds one) the trained model. ELBOs are in nats per datapoint."""

    def posterior(
        self,
        *data: torch.Tensor,
        method: Literal["vi", "hmc"] = "vi",
        num_samples: int = 1000,
        seed: int = 0,
        **hmc_options: Any,
    ) -> Any:
        r"""The posterior of every latent site given new rows ``data``, as an ArviZ object (``InferenceData``; ``DataTree`` under ArviZ 1.x).

        ``method="vi"``: ``num_samples`` draws of the guide's :math:`q(z \mid x_n)`
        per row, with their importance log-weights (:func:`~.mcmc.vi.vi_draws`).
        ``method="hmc"``: batched HMC of :math:`p(z \mid x_n)` (:func:`~.mcmc.hmc.hmc_latent`:
        ``num_samples`` draws after as many warm-up steps per chain, 4 chains
        unless ``num_chains`` is given; other options pass through). A model
        these cannot handle (a discrete or global latent) is refused by name.
        """
        t = self._model("posterior")
        if method == "vi" and hmc_options:
            raise ConfigError(
                f"posterior: {', '.join(sorted(hmc_options))} are options of method='hmc', not of the guide's draws"
            )
        if method not in ("vi", "hmc"):
            raise ConfigError(f"posterior: method must be 'vi' or 'hmc', got {method!r}")
        model, guide = t.programs("posterior")
        with t.scope():
            if method == "vi":
                draws = vi_draws(
                    model, guide, *data, num_samples=num_samples, seed=seed, method="vi"
                )
            else:
                hmc_options.setdefault("warmup_steps", num_samples)
                draws = hmc_latent(model, *data, num_samples=num_samples, seed=seed, **hmc_options)
        return draws.to_inference_data()

    def elbo(
        self,
        *data: torch.Tensor,
        num_particles: int = 10,
        batch_size: int = 1000,
        seed: int = 0,
        index: torch.Tensor | None = None,
    ) -> Estimate:
        """The ELBO of each row of ``data`` (nats), averaged over ``num_particles`` guide draws, with its standard error.

        ``index``: the rows' dataset indices (the data plate's indices inside the model and guide: a guide
        with per-datapoint parameters scores each row with its own); default ``0..N-1``. For a model that
        subsamples its data plate itself, ``data`` is the whole data and ``index`` the rows to score.
        """
        t = self._model("elbo")
        with seeded(seed), t.scope():
            return evaluate_elbo(
                t.model,
                t.guide,
                data,
                batch_size=batch_size,
                num_particles=num_particles,
                plate=t.plate,
                index=index,
            )

    def iwae(
        self, *data: torch.Tensor, K: int = 1000, batch_size: int = 100, seed: int = 0
    ) -> Estimate:
        """The importance-weighted bound (``K`` guide draws) on ``log p(x)`` of each row of ``data``, with its delta-method standard error."""
        t = self._model("iwae")
        model, guide = t.programs("iwae")
        with t.scope():
            bounds = importance_bounds(
                model, guide, *data, num_samples=K, batch_size=batch_size, seed=seed
            )
        return Estimate(bounds.iwae, bounds.iwae_se, K)
