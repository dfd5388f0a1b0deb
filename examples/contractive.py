"""A contractive autoencoder against a plain one on the embedded 8x8 digits: the penalty, its effect, a figure (about 15 s).

    python examples/contractive.py [--out docs/figures/models/cae-jacobian-spectrum.png]

Both have the same networks (64-64-ReLU-8 encoder, 8-64-64 decoder), seed and budget (30 epochs, Adam 3e-3,
batch 64); the CAE adds the penalty 0.01 * ||d e(x) / d x||_F^2. Printed: the test images' mean reconstruction
log-likelihood and mean squared Jacobian norm, each with its standard error over the 180 test images. The figure
shows the singular values of the encoder's Jacobian at the test images (mean over images, largest first): the CAE's
code moves along few input directions (Rifai et al. 2011, their Figure 1).
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from ppl_vae.data import load
from ppl_vae.distributions import get_likelihood
from ppl_vae.guides.amortized import delta_guide
from ppl_vae.inference.svi import fit
from ppl_vae.models.autoencoders import contractive_autoencoder, jacobian_norm
from ppl_vae.models.vae import autoencoder
from ppl_vae.nn import MLP

WEIGHT = 0.01


def train_pair(
    train: torch.Tensor, weight: float = WEIGHT
) -> dict[float, tuple[nn.Module, nn.Module]]:
    """A plain (weight 0) and a contractive autoencoder: the same networks, seed and budget; ``{weight: (encoder, decoder)}``."""
    bern, out = get_likelihood("bernoulli"), {}
    for w in (0.0, weight):
        torch.manual_seed(0)
        encoder, decoder = (
            nn.Sequential(MLP(64, [], 64), nn.ReLU(), nn.Linear(64, 8)),
            MLP(8, [64], 64),
        )
        model = (
            contractive_autoencoder(decoder, bern, encoder, 8, weight=w)
            if w
            else autoencoder(decoder, bern, 8)
        )
        fit(
            model,
            delta_guide(encoder),
            train,
            epochs=30,
            batch_size=64,
            lr=3e-3,
            seed=0,
            progress=False,
        )
        out[w] = (encoder, decoder)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the singular-value figure here (PNG)")
    args = parser.parse_args()
    train = load("digits", binarize="threshold").x
    test = load("digits", split="test", binarize="threshold").x
    bern = get_likelihood("bernoulli")
    spectra = {}
    for w, (encoder, decoder) in train_pair(train).items():
        name = f"contractive AE ({w:g})" if w else "plain AE"
        with torch.no_grad():
            rec = bern(decoder(encoder(test))).log_prob(test)
        jac = jacobian_norm(encoder, test).detach()
        full = torch.func.vmap(torch.func.jacrev(encoder))(test).detach()  # [N, 8, 64]
        spectra[name] = torch.linalg.svdvals(full).mean(0)
        print(
            f"{name:22s} reconstruction {rec.mean():7.3f} ± {rec.std() / math.sqrt(len(rec)):.3f} nats/image   "
            f"||J||_F^2 {jac.mean():8.2f} ± {jac.std() / math.sqrt(len(jac)):.2f}"
        )
    if args.out:
        figure(spectra, args.out)
        print(f"wrote {args.out}")


def figure(spectra: dict[str, torch.Tensor], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, s in spectra.items():
        ax.plot(range(1, len(s) + 1), s.numpy(), marker="o", label=name)
    ax.set(
        yscale="log",
        xlabel="singular value index (largest first)",
        ylabel="singular value of d e(x) / d x",
        title="Encoder Jacobian at the 180 test digits (mean)",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
