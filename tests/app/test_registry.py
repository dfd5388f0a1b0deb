"""The named models' records (``MODEL_SPECS``) match the models the registry builds, as it built them before.

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

from ppl_vae.app.config import MODEL_SPECS, MODELS, Config
from ppl_vae.app.registry import build
from ppl_vae.data import load
from ppl_vae.errors import ConfigError
from ppl_vae.inference.latent import guide_in_latent_space, latent_of
from ppl_vae.inference.params import discover

DIGITS = load("digits", "train", binarize="threshold", limit=8)


def built(name: str, seed: int = 0):
    spec = MODEL_SPECS[name]
    cfg = Config(
        model=name,
        dataset="digits",
        binarize="threshold",
        latent_dim=2,
        hidden=(8,),
        seed=seed,
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


#: (encoder class, decoder class, parameter tensors, parameter count) of each named model at 64 pixels, --hidden 8,
#: --latent-dim 2, as the builders before the one table of named models built them: e.g. the vae's MLP body 64*8+8,
#: its two Gaussian heads 2*(8*2+2) and its decoder 2*8+8 + 8*64+64 make 1156 in 10 tensors
SHAPES = {
    "vae": ("GaussianEncoder", "MLP", 10, 1156),
    "beta-vae": ("GaussianEncoder", "MLP", 10, 1156),
    "cvae": ("GaussianEncoder", "Concat", 10, 1316),
    "ae": ("Sequential", "MLP", 8, 1138),
    "dae": ("Sequential", "MLP", 8, 1138),
    "ppca": ("GaussianEncoder", "NoneType", 9, 749),
    "bernoulli-vae": ("Sequential", "MLP", 8, 1138),
    "categorical-vae": ("Sequential", "MLP", 8, 1444),
    "hvae": ("TopEncoder", "TopDecoder", 22, 1380),
    "lvae": ("_Top", "_TopDown", 46, 2628),
    "mog-vae": ("GaussianEncoder", "MLP", 13, 1206),
    "vampprior": ("GaussianEncoder", "MLP", 11, 4356),
    "vqvae": ("Sequential", "QuantizedDecoder", 10, 2016),
    "vqvae2": ("VQ2Encoder", "VQ2Decoder", 22, 74084),
    "sparse-ae": ("Sequential", "MLP", 8, 1138),
    "cae": ("Sequential", "MLP", 8, 1138),
    "sdae": ("Sequential", "Sequential", 8, 1138),
}


def seeded_params(name: str, seed: int) -> tuple[object, tuple[torch.Tensor, ...]]:
    b = built(name, seed)
    return b, discover(b.model, b.guide, data(name)).params


def test_every_named_model_has_one_record_and_its_expected_shapes():
    assert tuple(MODEL_SPECS) == MODELS == tuple(SHAPES)
    assert all(name == spec.name and spec.description for name, spec in MODEL_SPECS.items())


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_a_seeded_build_is_the_same_family_shapes_and_values(name):
    b, params = seeded_params(name, 3)
    encoder, decoder, tensors, count = SHAPES[name]
    assert (type(b.encoder).__name__, type(b.decoder).__name__) == (encoder, decoder)
    assert (len(params), sum(p.numel() for p in params)) == (tensors, count)
    _, again = seeded_params(name, 3)
    assert all(torch.equal(p, q) for p, q in zip(params, again, strict=True))
    _, other = seeded_params(name, 4)
    assert not all(torch.equal(p, q) for p, q in zip(params, other, strict=True))


#: a value away from its default for each option only some models take
AWAY = {
    "likelihood": "gaussian",
    "layers": (4, 2),
    "components": 3,
    "noise": 0.5,
    "contractive": 0.5,
    "pretrain_epochs": 2,
}


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_an_option_a_record_does_not_take_is_refused_by_name(name):
    spec = MODEL_SPECS[name]
    assert sorted(spec.ignores + spec.options) == sorted(AWAY)
    base = dict(
        model=name,
        latent_dim=2,
        beta=2.0 if spec.needs_beta else 1.0,
        estimator="score" if spec.latents == "discrete" else "reparam",
    )
    for key in spec.ignores:
        flag = "--" + key.replace("_", "-")
        with pytest.raises(ConfigError, match=f"^{flag} applies to .*; {name} would ignore it$"):
            Config(**base, **{key: AWAY[key]}).validate()
    for key in spec.options:  # and one it takes is not refused for being set
        Config(**base, **{key: AWAY[key]}).validate()
