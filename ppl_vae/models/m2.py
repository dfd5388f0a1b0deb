r"""Semi-supervised VAE (Kingma et al. 2014, "M2"): the label is a latent variable where it is missing.

.. math::

    p(y)\,p(z)\,p_\theta(x \mid y, z), \qquad
    q_\phi(y \mid x)\,q_\phi(z \mid x, y)

Data come as ``(x, y)`` with ``y = -1`` for unlabelled rows. For a labelled
row ``y`` is observed; for an unlabelled one it is sampled by the classifier
:math:`q_\phi(y \mid x)` -- and summed out exactly when trained with
``fit(..., estimator="enum")`` (Pyro's ``TraceEnum_ELBO``; the guide marks
its ``y`` for parallel enumeration). A minibatch may mix both kinds of rows:
``pyro.sample(..., obs_mask=labelled)`` splits the model's ``y`` into an
observed and an unobserved site, and the guide samples the unobserved one
under ``poutine.mask(~labelled)`` (a batch whose rows are all labelled has
nothing to enumerate: score it with ``Trace_ELBO``). The classifier also gets the auxiliary
loss of the paper on labelled rows, written as an observed site scaled by
``alpha``:

.. math::

    \mathcal{J}^\alpha = \sum_{\text{labelled}} \big[\mathcal{L}(x, y)
        + \alpha \log q_\phi(y \mid x)\big]
        + \sum_{\text{unlabelled}} \mathcal{U}(x)

Per-datapoint bounds (:func:`ppl_vae.inference.elbo_per_datapoint`) of this
model include the auxiliary term (unscaled) on labelled rows.

References
----------
Kingma, Rezende, Mohamed & Welling (2014), Semi-Supervised Learning with Deep
Generative Models. Pyro's SS-VAE tutorial (https://pyro.ai/examples/ss-vae.html).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn import functional as F

from ..distributions import gaussian_from_params
from ..errors import ConfigError
from ..nn import concat_broadcast

__all__ = ["m2", "m2_guide", "classify", "UNLABELLED"]

UNLABELLED = -1


def _one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(y.long(), num_classes).to(torch.get_default_dtype())


def _split(y: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(labels with -1 replaced by 0, labelled mask)``; the mask is None when all rows are labelled."""
    if y is None:
        return None, None
    labelled = y != UNLABELLED
    return y.clamp(min=0), (None if bool(labelled.all()) else labelled)


def m2(
    decoder: nn.Module,
    likelihood: nn.Module,
    classifier: nn.Module,
    latent_dim: int,
    num_classes: int,
    *,
    alpha: float = 50.0,
) -> Callable[..., None]:
    r"""The M2 model ``model(x, y=None)``.

    Parameters
    ----------
    decoder : nn.Module
        ``[z, one_hot(y)] -> `` likelihood parameters (input width
        ``latent_dim + num_classes``).
    likelihood : nn.Module
        Decoder output -> distribution over ``x``.
    classifier : nn.Module
        ``x -> `` class logits: the guide's :math:`q(y \mid x)`, used here
        only for the auxiliary loss on labelled rows.
    alpha : float
        Weight of the auxiliary classification log-likelihood per labelled row.
    """
    if not alpha >= 0:
        raise ConfigError(f"alpha must be >= 0, got {alpha}")
    uniform = torch.zeros(num_classes)

    def model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        labels, mask = _split(y)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(latent_dim), 1.0).to_event(1))
            y_all = pyro.sample(
                "y", dist.Categorical(logits=uniform.to(x)), obs=labels, obs_mask=mask
            )
            pyro.sample(
                "x", likelihood(decoder(concat_broadcast(z, _one_hot(y_all, num_classes)))), obs=x
            )
            if labels is not None and alpha > 0:
                with poutine.scale(scale=alpha), poutine.mask(mask=True if mask is None else mask):
                    pyro.sample("y_aux", dist.Categorical(logits=classifier(x)), obs=labels)

    return model


def m2_guide(encoder: nn.Module, classifier: nn.Module, num_classes: int) -> Callable[..., None]:
    r"""The M2 guide :math:`q(y \mid x)\,q(z \mid x, y)`; ``y`` is enumerated where it is missing.

    ``encoder`` maps ``[x, one_hot(y)]`` to ``(loc, scale)``.
    """

    def guide(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        labels, mask = _split(y)
        with pyro.plate("data", x.shape[0]):
            q_y = dist.Categorical(logits=classifier(x))
            if labels is None:
                y_all = pyro.sample("y", q_y, infer={"enumerate": "parallel"})
            elif mask is None:
                y_all = labels
            else:
                with poutine.mask(mask=~mask):
                    y_draw = pyro.sample("y_unobserved", q_y, infer={"enumerate": "parallel"})
                y_all = torch.where(mask, labels, y_draw)
            pyro.sample(
                "z",
                gaussian_from_params(encoder(concat_broadcast(x, _one_hot(y_all, num_classes)))),
            )

    return guide


@torch.no_grad()
def classify(classifier: nn.Module, x: torch.Tensor, *, batch_size: int = 1000) -> torch.Tensor:
    """Most probable class under :math:`q(y \\mid x)`, per row."""
    return torch.cat(
        [classifier(x[i : i + batch_size]).argmax(-1) for i in range(0, x.shape[0], batch_size)]
    )
