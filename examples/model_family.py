"""Fit the model family on the embedded 8x8 digits, each a few lines of Pyro (about a minute on one core).

    python examples/model_family.py
"""

from __future__ import annotations

import torch
from torch import nn

from ppl_vae.data import load
from ppl_vae.distributions import get_likelihood
from ppl_vae.guides.amortized import amortized_guide, delta_guide
from ppl_vae.inference.elbo import evaluate_elbo
from ppl_vae.inference.svi import fit
from ppl_vae.models.autoencoders import contractive_autoencoder, sparse_autoencoder
from ppl_vae.models.discrete import GaussianMixturePrior
from ppl_vae.models.hierarchical import hierarchical_guide, hierarchical_vae
from ppl_vae.models.priors import VampPrior, vae_with_prior
from ppl_vae.models.vqvae import Codebook, CodePrior, perplexity, vqvae
from ppl_vae.nn import MLP, GaussianEncoder

train = load("digits", "train", binarize="threshold").x
test = load("digits", "test", binarize="threshold").x
D, H, d = train.shape[1], 64, 2
bern = get_likelihood("bernoulli")
torch.manual_seed(0)

enc = GaussianEncoder(MLP(D, [], H), H, d)
vamp_enc = GaussianEncoder(MLP(D, [], H), H, d)
vq_enc, vq_dec, codebook = MLP(D, [H], 8), MLP(8, [H], D), Codebook(16, 2)
cae_enc = nn.Sequential(MLP(D, [], H), nn.ReLU(), nn.Linear(H, 8))
models = {
    "hierarchical VAE": (
        hierarchical_vae(MLP(4, [H], D), GaussianEncoder(MLP(d, [], 16), 16, 4), bern, d),
        hierarchical_guide(GaussianEncoder(MLP(D, [], H), H, 4), GaussianEncoder(MLP(4, [], 16), 16, d)),
    ),
    "mixture-of-Gaussians prior": (vae_with_prior(MLP(d, [H], D), bern, GaussianMixturePrior(10, d).marginal), amortized_guide(enc)),
    "VampPrior": (vae_with_prior(MLP(d, [H], D), bern, VampPrior(vamp_enc, torch.rand(20, D))), amortized_guide(vamp_enc)),
    "VQ-VAE (objective, not a bound)": (vqvae(vq_dec, bern, codebook, CodePrior(4, 16), 4), delta_guide(vq_enc)),
    "sparse AE (objective, not a bound)": (sparse_autoencoder(MLP(8, [H], D), bern, 8, l1=0.1), delta_guide(MLP(D, [H], 8))),
    "contractive AE (objective, not a bound)": (contractive_autoencoder(MLP(8, [H], D), bern, cae_enc, 8, weight=0.01), delta_guide(cae_enc)),
}
for name, (model, guide) in models.items():
    fit(model, guide, train, epochs=30, batch_size=64, lr=3e-3, seed=0, progress=False)
    print(f"{name:36s} test objective {evaluate_elbo(model, guide, (test,)).value.mean():8.2f} nats")
with torch.no_grad():
    codes, _ = codebook(vq_enc(test).reshape(len(test), 4, 2))
print(f"VQ-VAE codebook perplexity {perplexity(codes, 16):.1f} of 16 codes")
