"""Encoder and decoder blocks (plain torch modules).

Data are always flat ``[batch, D]`` tensors; the convolutional blocks reshape
to and from ``image_shape`` themselves, so models and guides never care which
block they were given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MLP", "ConvEncoder", "ConvDecoder", "GaussianEncoder", "Concat", "concat_broadcast"]


class MLP(nn.Sequential):
    """Fully connected network ``in_dim -> hidden... -> out_dim``.

    Parameters
    ----------
    in_dim, out_dim : int
        Input and output widths.
    hidden : sequence of int
        Widths of the hidden layers (may be empty: a linear map).
    activation : type of nn.Module
        Non-linearity after every hidden layer.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = []
        widths = [in_dim, *hidden]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), activation()]
        layers.append(nn.Linear(widths[-1], out_dim))
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim


def concat_broadcast(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate on the last axis after broadcasting the leading ones (vectorised draws or an enumerated label add dimensions in front)."""
    shape = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(*shape, t.shape[-1]) for t in tensors], -1)


class Concat(nn.Module):
    """Concatenate all inputs on the last axis (:func:`concat_broadcast`), then apply ``net``.

    Turns a network of one input into one conditioned on a label:
    ``Concat(MLP(784 + 10, [200], 50))(x, y_onehot)``; a latent with vectorised draws in front
    (``[S, N, d]``) meets labels ``[N, C]`` broadcast to ``[S, N, C]``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.net(concat_broadcast(*inputs))


def _conv_out(size: int) -> int:
    # kernel 4, stride 2, padding 1 halves a size (rounding up for odd sizes via ceil)
    return math.floor((size + 2 - 4) / 2) + 1


class ConvEncoder(nn.Module):
    """Two strided convolutions and a linear layer: flat image -> features.

    Parameters
    ----------
    image_shape : (C, H, W)
        Shape of one image; the input is ``[batch, C*H*W]``.
    out_dim : int
        Output width.
    channels : (int, int)
        Channels of the two convolutions.
    """

    def __init__(
        self, image_shape: Sequence[int], out_dim: int, channels: tuple[int, int] = (32, 64)
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        self.image_shape = tuple(image_shape)
        self.conv = nn.Sequential(
            nn.Conv2d(c, channels[0], 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels[0], channels[1], 4, stride=2, padding=1),
            nn.ReLU(),
        )
        flat = channels[1] * _conv_out(_conv_out(h)) * _conv_out(_conv_out(w))
        self.head = nn.Linear(flat, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.reshape(*x.shape[:-1], *self.image_shape).reshape(-1, *self.image_shape))
        return self.head(F.relu(h.flatten(1))).reshape(*x.shape[:-1], self.out_dim)


class ConvDecoder(nn.Module):
    """Linear layer and two transposed convolutions: latent -> flat image parameters.

    ``H`` and ``W`` must be divisible by 4 (8x8 digits and 28x28 MNIST are).
    """

    def __init__(
        self, in_dim: int, image_shape: Sequence[int], channels: tuple[int, int] = (64, 32)
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"ConvDecoder needs image sides divisible by 4, got {h}x{w}")
        self.image_shape = tuple(image_shape)
        self.start = (channels[0], h // 4, w // 4)
        self.head = nn.Linear(in_dim, channels[0] * (h // 4) * (w // 4))
        self.deconv = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(channels[0], channels[1], 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(channels[1], c, 4, stride=2, padding=1),
        )
        self.in_dim, self.out_dim = in_dim, c * h * w

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        h = self.head(z.reshape(-1, z.shape[-1])).reshape(-1, *self.start)
        return self.deconv(h).reshape(*batch, self.out_dim)


class GaussianEncoder(nn.Module):
    """Body network plus a Gaussian head: ``x -> (loc, scale)`` or ``(loc, scale_tril)``.

    Parameters
    ----------
    body : nn.Module
        Maps the inputs to ``[batch, feature_dim]`` features.
    feature_dim, latent_dim : int
        Widths of the features and of the latent variable.
    covariance : {"diagonal", "full"}
        ``"diagonal"`` returns ``(loc, scale)``; ``"full"`` returns
        ``(loc, scale_tril)``, a lower-triangular Cholesky factor with a
        positive diagonal.
    """

    def __init__(
        self, body: nn.Module, feature_dim: int, latent_dim: int, covariance: str = "diagonal"
    ) -> None:
        super().__init__()
        if covariance not in ("diagonal", "full"):
            raise ValueError(f"covariance must be 'diagonal' or 'full', got {covariance!r}")
        self.body, self.latent_dim, self.covariance = body, latent_dim, covariance
        self.loc = nn.Linear(feature_dim, latent_dim)
        self.scale = nn.Linear(feature_dim, latent_dim)
        if covariance == "full":
            self.offdiag = nn.Linear(feature_dim, latent_dim * (latent_dim - 1) // 2)
            self.register_buffer(
                "_tril", torch.tril_indices(latent_dim, latent_dim, offset=-1), persistent=False
            )

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(*inputs)
        loc = self.loc(h)
        scale = F.softplus(self.scale(h)) + 1e-5
        if self.covariance == "diagonal":
            return loc, scale
        tril = torch.diag_embed(scale)
        tril[..., self._tril[0], self._tril[1]] = self.offdiag(h)
        return loc, tril
