"""Fit the model family on the embedded 8x8 digits, each a few lines of Pyro (each well under a minute on one core).

python examples/model_family.py
"""

from __future__ import annotations

import torch
from torch import nn

from ppl_vae.data import load
from ppl_vae.distributions import get_likelihood
from ppl_vae.guides.amortized import amortized_guide, delta_guide
from ppl_vae.inference import pretrain_layerwise, stacked_guide
from ppl_vae.inference.elbo import evaluate_elbo
from ppl_vae.inference.svi import fit
from ppl_vae.models.autoencoders import contractive_autoencoder, sparse_autoencoder
from ppl_vae.models.discrete import GaussianMixturePrior
from ppl_vae.models.hierarchical import hierarchical_guide, hierarchical_vae
from ppl_vae.models.ladder import ladder_networks
from ppl_vae.models.priors import VampPrior, vae_with_prior
from ppl_vae.models.stacked import stacked_autoencoder
from ppl_vae.models.vqvae import (
    AutoregressiveCodePrior,
    Codebook,
    CodePrior,
    perplexity,
    vqvae,
    vqvae2,
    vqvae2_guide,
)
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
ladder = ladder_networks(D, (16, 8, 4, 2), H, bern)  # 4 stochastic layers, top-down inference
books = (
    Codebook(8, 2, seed=0),
    Codebook(16, 2, seed=1),
)  # VQ-VAE-2: 2 top positions of 8 codes, 6 bottom ones of 16
vq2_enc, vq2_top, vq2_bottom = (
    nn.Sequential(MLP(D, [], H), nn.ReLU()),
    nn.Linear(H, 4),
    MLP(H + 4, [], 12),
)
vq2_priors = (AutoregressiveCodePrior(2, 8), AutoregressiveCodePrior(6, 16, context_dim=16))
stack = stacked_autoencoder(D, (32, 16, 4), bern)
pretrain_layerwise(
    stack, train, epochs=10, noise=0.2, batch_size=64, lr=3e-3
)  # greedy: each layer a DAE on the codes below; fine-tuned below
models = {
    "hierarchical VAE": (
        hierarchical_vae(MLP(4, [H], D), GaussianEncoder(MLP(d, [], 16), 16, 4), bern, d),
        hierarchical_guide(
            GaussianEncoder(MLP(D, [], H), H, 4), GaussianEncoder(MLP(4, [], 16), 16, d)
        ),
    ),
    "mixture-of-Gaussians prior": (
        vae_with_prior(MLP(d, [H], D), bern, GaussianMixturePrior(10, d).marginal),
        amortized_guide(enc),
    ),
    "VampPrior": (
        vae_with_prior(MLP(d, [H], D), bern, VampPrior(vamp_enc, torch.rand(20, D))),
        amortized_guide(vamp_enc),
    ),
    "VQ-VAE (objective, not a bound)": (
        vqvae(vq_dec, bern, codebook, CodePrior(4, 16), 4),
        delta_guide(vq_enc),
    ),
    "sparse AE (objective, not a bound)": (
        sparse_autoencoder(MLP(8, [H], D), bern, 8, l1=0.1),
        delta_guide(MLP(D, [H], 8)),
    ),
    "contractive AE (objective, not a bound)": (
        contractive_autoencoder(MLP(8, [H], D), bern, cae_enc, 8, weight=0.01),
        delta_guide(cae_enc),
    ),
    "4-layer ladder VAE": (ladder.model, ladder.guide),
    "VQ-VAE-2 (objective, not a bound)": (
        vqvae2(MLP(16, [H], D), bern, books, vq2_priors, (2, 6)),
        vqvae2_guide(vq2_enc, vq2_top, vq2_bottom, books[0], 2),
    ),
    "stacked DAE, fine-tuned (not a bound)": (stack.model, stacked_guide(stack, 0.2)),
}
for name, (model, guide) in models.items():
    warmup = (
        10 if "ladder" in name else 0
    )  # the KL warm-up keeps the ladder's layers from collapsing
    fit(
        model,
        guide,
        train,
        epochs=30,
        batch_size=64,
        lr=3e-3,
        kl_warmup=warmup,
        seed=0,
        progress=False,
    )
    print(
        f"{name:40s} test objective {evaluate_elbo(model, guide, (test,)).value.mean():8.2f} nats"
    )
with torch.no_grad():
    codes, _ = codebook(vq_enc(test).reshape(len(test), 4, 2))
print(f"VQ-VAE codebook perplexity {perplexity(codes, 16):.1f} of 16 codes")
