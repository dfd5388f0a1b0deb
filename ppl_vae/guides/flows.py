r"""An amortised inverse-autoregressive-flow posterior (Kingma et al. 2016), from Pyro's transforms.

.. math::

    z_0 \sim N(\mu(x), \operatorname{diag}\sigma^2(x)), \qquad
    z_k = \sigma_k(z_{k-1}, h) \odot z_{k-1} + m_k(z_{k-1}, h), \quad k = 1..K,

where :math:`h = h(x)` are the encoder's features and each :math:`(m_k,
\sigma_k)` is a conditional MADE (:class:`pyro.nn.ConditionalAutoRegressiveNN`)
with its own random variable order. Each step is Pyro's
:class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive`, so the
log-density of a draw costs one pass (Pyro caches the draw's inverse).

References
----------
Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling (2016), Improved
Variational Inference with Inverse Autoregressive Flow.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.nn import functional as F

__all__ = ["IAFEncoder"]


class IAFEncoder(nn.Module):
    """Encoder whose output is a flow distribution: use it with :func:`~ppl_vae.guides.amortized_guide`.

    Parameters
    ----------
    body : nn.Module
        Maps the inputs to ``[batch, feature_dim]`` features ``h``.
    feature_dim, latent_dim : int
        Widths of ``h`` and of ``z``.
    num_flows : int
        Number of IAF steps ``K`` (0 gives the diagonal Gaussian).
    flow_hidden : int, optional
        Hidden width of each MADE (default ``max(2 * latent_dim, feature_dim)``;
        must be at least ``latent_dim``).

    Examples
    --------
    >>> from ppl_vae.nn import MLP
    >>> from ppl_vae.guides import amortized_guide
    >>> guide = amortized_guide(IAFEncoder(MLP(784, [200], 200), 200, 50, num_flows=2))
    """

    def __init__(
        self,
        body: nn.Module,
        feature_dim: int,
        latent_dim: int,
        *,
        num_flows: int = 2,
        flow_hidden: int | None = None,
    ) -> None:
        super().__init__()
        if num_flows < 0:
            raise ValueError(f"num_flows must be >= 0, got {num_flows}")
        if latent_dim < 2 and num_flows > 0:
            raise ValueError("an autoregressive flow needs latent_dim >= 2")
        hidden = flow_hidden if flow_hidden is not None else max(2 * latent_dim, feature_dim)
        if hidden < latent_dim:
            raise ValueError(f"flow_hidden must be >= latent_dim ({latent_dim}), got {hidden}")
        self.body, self.latent_dim, self.feature_dim = body, latent_dim, feature_dim
        self.loc = nn.Linear(feature_dim, latent_dim)
        self.scale = nn.Linear(feature_dim, latent_dim)
        self.flows = nn.ModuleList(
            ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(latent_dim, feature_dim, [hidden])
            )
            for _ in range(num_flows)
        )
        for flow in self.flows:  # start each step at the identity: the flow begins as the Gaussian
            last = flow.nn.layers[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def features(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.body(*inputs)

    def base(self, h: torch.Tensor) -> dist.TorchDistribution:
        """The Gaussian :math:`q(z_0 \\mid x)` given features ``h``."""
        return dist.Normal(self.loc(h), F.softplus(self.scale(h)) + 1e-5).to_event(1)

    def forward(self, *inputs: torch.Tensor) -> dist.TorchDistribution:
        h = self.features(*inputs)
        base = self.base(h)
        if not self.flows:
            return base
        return dist.TransformedDistribution(base, [flow.condition(h) for flow in self.flows])
