"""Augmentation recipes as data: the recipe files' augment blocks, validation, and the
host-drawn parameters checked against torchvision's RandomResizedCrop and binomial frequencies."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from sslstream.orchestration.schema import augment_recipe, compose_config
from sslstream.orchestration.schema.recipes import recipe_names
from sslstream.pipelines.views.recipes import (
    TwoViewRecipe,
    ViewRecipe,
    batch_rng,
    sample_crops,
    sample_view_params,
)
from torchvision.transforms import RandomResizedCrop

# Recipes that take another method's augmentation (their sources say so): the same views.
SAME_VIEWS = {
    "barlow_twins_imagenet": "byol_imagenet",   # the papers reuse these recipes
    "simsiam_imagenet": "mocov2_imagenet",
    "contrastive_imagenet": "simclr_imagenet",
    "barlow_twins_cifar": "byol_cifar",
    "contrastive_cifar": "simclr_cifar",
}


def test_every_recipe_file_holds_a_valid_augmentation():
    for name in recipe_names():
        r = augment_recipe(name)
        if name.endswith("_cifar"):
            # no blur on 32 px views (the SimCLR paper's CIFAR appendix, solo-learn's
            # asymmetric views, lightly's CIFAR-10 benchmark)
            assert r.size == 32 and r.view1.blur_p == r.view2.blur_p == 0.0, name
            assert r.view1.mean == (0.4914, 0.4822, 0.4465), name
        else:
            assert r.size == 224 and r.view1.mean == (0.485, 0.456, 0.406), name


def test_recipes_that_borrow_an_augmentation_hold_its_values():
    for name, base in SAME_VIEWS.items():
        assert augment_recipe(name).views == augment_recipe(base).views, name
    # SimSiam's CIFAR views: SimCLR's but weaker jitter (solo-learn symmetric_weak.yaml)
    a, b = augment_recipe("simsiam_cifar"), augment_recipe("simclr_cifar")
    weak = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
    assert a.views == (dataclasses.replace(b.view1, **weak), dataclasses.replace(b.view2, **weak))


def test_default_config_composes_to_cifar_byol_and_a_view_key_overrides_one_view():
    recipe = TwoViewRecipe.from_config(compose_config([]).augment)
    assert recipe == augment_recipe("byol_cifar") and recipe.name == "cifar_byol"
    over = compose_config(["recipe=imagenet", "augment.view2.solarize_p=0.3"]).augment
    assert (over.view1.solarize_p, over.view2.solarize_p) == (0.0, 0.3)  # views stay apart


def test_published_values():
    byol = augment_recipe("byol_imagenet")
    assert (byol.view1.blur_p, byol.view2.blur_p) == (1.0, 0.1)
    assert (byol.view1.solarize_p, byol.view2.solarize_p) == (0.0, 0.2)
    assert (byol.view1.brightness, byol.view1.contrast, byol.view1.saturation, byol.view1.hue) == \
        (0.4, 0.4, 0.2, 0.1)
    assert byol.size == 224 and byol.view1.crop_scale == (0.08, 1.0)
    simclr = augment_recipe("simclr_imagenet")
    assert simclr.view1 == simclr.view2 and simclr.view1.brightness == 0.8 and simclr.view1.hue == 0.2
    assert augment_recipe("mocov2_imagenet").view1.crop_scale == (0.2, 1.0)
    cifar_byol = augment_recipe("byol_cifar")
    assert cifar_byol.view2.solarize_p == 0.2 and cifar_byol.view1.crop_scale == (0.08, 1.0)
    vicreg = augment_recipe("vicreg_cifar")
    assert vicreg.view1.crop_scale == (0.2, 1.0) and vicreg.view1.solarize_p == vicreg.view2.solarize_p == 0.1


def test_errors_name_the_field_in_python_and_from_a_mapping():
    with pytest.raises(ValueError, match=r"augment\.view2\.solarize_p=1\.5 is not allowed"):
        TwoViewRecipe.from_config({"view2": {"solarize_p": 1.5}})
    with pytest.raises(ValueError, match="solarise_p; did you mean augment.view1.solarize_p"):
        TwoViewRecipe.from_config({"view1": {"solarise_p": 0.1}})
    with pytest.raises(ValueError, match=r"crop_scale=\[0\.5, 0\.2\] is not allowed: expected 2 "
                                         r"numbers \(0 < lo <= hi <= 1\)"):
        ViewRecipe(crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="share one output size"):
        TwoViewRecipe(view1=ViewRecipe(size=32), view2=ViewRecipe(size=64))
    with pytest.raises(ValueError, match=r"std=\[0\.2, 0\.0, 0\.2\] is not allowed"):
        ViewRecipe(std=(0.2, 0.0, 0.2))


def test_crop_fallback_equals_torchvision():
    """When no draw fits (full-area crops of a 10x1000 strip), the centre crop with the
    ratio clamped is what torchvision's get_params returns too."""
    img = torch.zeros(3, 10, 1000)
    tv = RandomResizedCrop.get_params(img, scale=[1.0, 1.0], ratio=[0.75, 4 / 3])
    ours = sample_crops(np.random.default_rng(0), np.array([[10, 1000]]), (1.0, 1.0), (0.75, 4 / 3))
    assert tuple(int(v) for v in ours[0]) == tuple(tv)


def test_crop_distribution_matches_torchvision():
    """Area fraction and log aspect of 4000 crops of a 300x400 image: same means as
    torchvision's own sampler (5 sigma of the difference), every crop inside the image."""
    n, hw = 4000, np.array([[300, 400]] * 4000)
    ours = sample_crops(np.random.default_rng(1), hw, (0.08, 1.0), (0.75, 4 / 3)).astype(np.float64)
    torch.manual_seed(0)
    img = torch.zeros(3, 300, 400)
    tv = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [0.75, 4 / 3]) for _ in range(n)],
                  dtype=np.float64)
    for c in (ours, tv):
        assert (c[:, 0] >= 0).all() and (c[:, 1] >= 0).all()
        assert (c[:, 0] + c[:, 2] <= 300).all() and (c[:, 1] + c[:, 3] <= 400).all()
    for stat in (lambda c: c[:, 2] * c[:, 3] / 120_000, lambda c: np.log(c[:, 3] / c[:, 2]),
                 lambda c: (c[:, 1] + c[:, 3] / 2) / 400):
        a, b = stat(ours), stat(tv)
        se = math.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 5 * se, (a.mean(), b.mean())


def test_coin_frequencies_and_factor_ranges():
    view = augment_recipe("byol_imagenet").view2
    hw = np.array([[64, 64]] * 20_000)
    p = sample_view_params(view, hw, batch_rng(0, 0, 0, 0, 1))
    n = len(hw)
    for drawn, prob in ((p.flip, view.flip_p), (p.jitter, view.jitter_p),
                        (p.grayscale, view.grayscale_p), (p.blur, view.blur_p),
                        (p.solarize, view.solarize_p)):
        assert abs(drawn.mean() - prob) <= 5 * math.sqrt(prob * (1 - prob) / n)
    assert p.brightness.min() >= 0.6 and p.brightness.max() <= 1.4
    assert p.saturation.min() >= 0.8 and p.saturation.max() <= 1.2
    assert np.abs(p.hue).max() <= 0.1 and p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    assert abs(p.brightness.mean() - 1.0) < 0.01  # uniform on [1 - b, 1 + b]


def test_parameters_are_a_function_of_their_key():
    view, hw = augment_recipe("byol_cifar").view1, np.array([[32, 32]] * 64)
    a = sample_view_params(view, hw, batch_rng(0, 1, 0, 5, 0))
    b = sample_view_params(view, hw, batch_rng(0, 1, 0, 5, 0))
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("crop", "flip", "hue"))
    for other in ((1, 1, 0, 5, 0), (0, 2, 0, 5, 0), (0, 1, 1, 5, 0), (0, 1, 0, 6, 0), (0, 1, 0, 5, 1)):
        c = sample_view_params(view, hw, batch_rng(*other))
        assert not np.array_equal(a.crop, c.crop), other
    # a probability change does not shift the other draws
    d = sample_view_params(ViewRecipe(size=32, solarize_p=0.9, mean=view.mean, std=view.std),
                           hw, batch_rng(0, 1, 0, 5, 0))
    assert np.array_equal(a.crop, d.crop) and np.array_equal(a.flip, d.flip)
