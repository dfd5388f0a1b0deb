"""The named models' declared properties (``MODEL_SPECS``) match the models the registry builds.

Every rule of ``Config.validate`` and every refusal of ``gaps``, ``compare``
and ``plot`` reads these properties, so each is checked against the Pyro
model and guide itself: labels against the model's signature, latent kinds
against the traced sites, mean-field against the guide's dependence
structure, the standard prior against the prior's parameters.
"""

from __future__ import annotations

import inspect

import pyro
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ppl_vae.app.config import MODEL_SPECS, Config
from ppl_vae.app.registry import build
from ppl_vae.data import load
from ppl_vae.errors import ConfigError
from ppl_vae.inference.latent import guide_in_latent_space, latent_of

DIGITS = load("digits", "train", binarize="threshold", limit=8)


def built(name: str):
    spec = MODEL_SPECS[name]
    cfg = Config(
        model=name,
        dataset="digits",
        binarize="threshold",
        latent_dim=2,
        hidden=(8,),
        beta=2.0 if spec.needs_beta else 1.0,
        estimator="score" if spec.latents == "discrete" else "reparam",
    )
    return build(cfg.validate(), DIGITS.x.shape[1], DIGITS.image_shape, 10)


def data(name: str) -> tuple[torch.Tensor, ...]:
    return DIGITS.tensors(with_labels=MODEL_SPECS[name].labels)


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_declared_properties_match_the_built_model(name):
    spec, b = MODEL_SPECS[name], built(name)
    args = data(name)
    required = [
        p
        for p in inspect.signature(b.model).parameters.values()
        if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    assert (len(required) == 2) == spec.labels, (
        f"{name}: labels={spec.labels} but the model takes {len(required)} arguments"
    )
    with torch.no_grad(), poutine.block():
        guide_tr = poutine.trace(b.guide).get_trace(*args)
        model_tr = poutine.trace(poutine.replay(b.model, trace=guide_tr)).get_trace(*args)
    latent = [
        s
        for s in model_tr.nodes.values()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    ]
    discrete = any(s["fn"].support.is_discrete for s in latent)
    point = any(
        type(s["fn"]).__name__ == "Delta"
        or type(getattr(s["fn"], "base_dist", None)).__name__ == "Delta"
        for s in guide_tr.nodes.values()
        if s["type"] == "sample"
    )
    kind = "discrete" if discrete else "point" if point else "continuous"
    assert kind == spec.latents, f"{name}: declared {spec.latents}, built {kind}"
    if spec.latents == "continuous":
        lat = latent_of(b.model, *args, guide=b.guide)
        q, why = guide_in_latent_space(b.guide, lat, *args)
        depends = "depends on another site" in why
        assert depends == (not spec.mean_field), (
            f"{name}: mean_field={spec.mean_field}, guide: {why or 'in a family'}"
        )
        top = next(s for s in latent if not any(f.name != "data" for f in s["cond_indep_stack"]))
        prior = top["fn"]
        standard = isinstance(
            getattr(prior, "base_dist", prior), pyro.distributions.Normal
        ) and bool((prior.mean == 0).all() and (prior.stddev == 1).all())
        if name != "hvae":  # its top latent z2 is sampled first; the others have one latent site
            assert standard == spec.standard_prior, (
                f"{name}: standard_prior={spec.standard_prior}, prior {prior}"
            )


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (
            {"model": "bernoulli-vae", "arch": "conv", "estimator": "score"},
            "--arch conv is not available for bernoulli-vae",
        ),
        ({"model": "hvae", "estimator": "analytic-kl"}, "hvae's guide is not mean-field"),
        ({"model": "ae", "guide": "full"}, "--guide full is available for"),
        ({"model": "cvae", "guide": "iaf"}, "--guide iaf is available for vae, beta-vae, not cvae"),
        ({"model": "vqvae", "estimator": "score"}, "vqvae has a point-estimate encoder"),
        ({"model": "categorical-vae", "estimator": "enum"}, "categorical-vae has discrete latents"),
    ],
)
def test_rules_follow_the_declared_properties(options, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        Config(**options).validate()
