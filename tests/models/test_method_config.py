"""The per-method config dataclasses: built from conf/method/*.yaml, typed, strict.

The yaml files are the reference: every preset of every method must build a config whose
fields equal the resolved yaml values (so no key or default was lost in the move from
``from_config`` to the dataclasses), and mistakes must raise ``MethodConfigError`` naming
``method.<key>``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from sslstream.models.backbones import build_backbone
from sslstream.models.methods import (
    BYOL,
    METHODS,
    BYOLConfig,
    MethodConfigError,
    MoCoV2Config,
    VICRegConfig,
    build_method,
)

from tests.conftest import REPO_ROOT
from tests.models.test_training_toy import SMALL_HEADS, TINY_BACKBONE, method_cfg

pytestmark = pytest.mark.timeout(60)


def _yaml(name: str, preset: str) -> dict:
    cfg = OmegaConf.load(REPO_ROOT / "conf" / "method" / f"{name}.yaml")
    cfg.preset = preset
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("preset", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_preset_builds_a_config_equal_to_its_yaml(name: str, preset: str) -> None:
    raw = _yaml(name, preset)
    config_class = METHODS[name].config_class
    config = config_class.from_mapping(OmegaConf.create(raw))
    hyper = {k: v for k, v in raw.items() if k not in config_class.META_KEYS}
    assert set(hyper) <= set(config_class.keys())
    got = dataclasses.asdict(config)
    for key, value in hyper.items():
        assert got[key] == value and type(got[key]) is type(value), (name, preset, key)
    # keys the yaml leaves out take the dataclass default (MoCo: tau_final follows tau_base)
    for key in set(config_class.keys()) - set(hyper):
        field = next(f for f in dataclasses.fields(config_class) if f.name == key)
        assert got[key] == field.default, (name, key)


def test_unknown_keys_are_rejected_with_the_allowed_keys_and_a_near_miss() -> None:
    cfg = method_cfg("byol")
    cfg.tau_bsae = 0.9
    with pytest.raises(MethodConfigError,
                       match=r"method\.tau_bsae is not a key of method 'byol' "
                             r"\(did you mean 'tau_base'\?\); allowed keys: .*pred_hidden_dim"
                             r".*tau_base, tau_final"):
        build_method(cfg, TINY_BACKBONE)
    cfg = method_cfg("vicreg")
    cfg.covv_coeff = 1.0
    with pytest.raises(MethodConfigError, match=r"method\.covv_coeff .*did you mean 'cov_coeff'"):
        build_method(cfg, TINY_BACKBONE)
    # nothing close: no guess, still the allowed keys
    with pytest.raises(MethodConfigError) as err:
        VICRegConfig.from_mapping({**_yaml("vicreg", "cifar"), "zebra": 1})
    assert "did you mean" not in str(err.value) and "sim_coeff" in str(err.value)
    # the yaml's bookkeeping keys are not errors
    assert VICRegConfig.from_mapping(_yaml("vicreg", "imagenet")).proj_hidden_dim == 8192


@pytest.mark.parametrize(("name", "key", "value", "message"), [
    ("byol", "proj_hidden_dim", "wide", r"method\.proj_hidden_dim must be int, got 'wide' \(str\)"),
    ("byol", "proj_hidden_dim", 4096.0, r"method\.proj_hidden_dim must be int, got 4096\.0"),
    ("byol", "pred_hidden_dim", True, r"method\.pred_hidden_dim must be int, got True \(bool\)"),
    ("byol", "tau_base", "0.99", r"method\.tau_base must be float, got '0\.99' \(str\)"),
    ("byol", "sync_bn", "false", r"method\.sync_bn must be bool, got 'false'"),
    ("mocov2", "symmetric", 1, r"method\.symmetric must be bool, got 1 \(int\)"),
    ("mocov2", "temperature", False, r"method\.temperature must be float, got False"),
    ("mocov2", "bn", "shufle", r"method\.bn must be one of shuffle, sync, none, got 'shufle' "
                               r"\(did you mean 'shuffle'\?\) \(method 'mocov2'\)"),
    ("mocov2", "bn", 3, r"method\.bn must be one of shuffle, sync, none, got 3"),
])
def test_wrong_types_name_the_key(name: str, key: str, value: object, message: str) -> None:
    cfg = OmegaConf.to_container(method_cfg(name, **SMALL_HEADS))
    cfg[key] = value
    with pytest.raises(MethodConfigError, match=message):
        build_method(cfg, TINY_BACKBONE)


def test_accepted_values_are_normalised_and_null_means_the_default() -> None:
    raw = {**_yaml("mocov2", "imagenet"), "tau_base": 1, "bn": "SYNC", "tau_final": None}
    config = MoCoV2Config.from_mapping(raw)
    assert config.tau_base == 1.0 and type(config.tau_base) is float  # an int is a float
    assert config.bn == "sync"  # case-insensitive, as before
    assert config.tau_final == 1.0  # null: follows tau_base
    assert isinstance(MethodConfigError("x"), ValueError)  # callers catching ValueError


def test_missing_keys_and_python_built_configs() -> None:
    raw = _yaml("byol", "cifar")
    del raw["tau_base"], raw["pred_hidden_dim"]
    with pytest.raises(MethodConfigError,
                       match=r"method\.pred_hidden_dim, method\.tau_base are missing "
                             r"\(method 'byol'\)"):
        BYOLConfig.from_mapping(raw)
    # the same checks hold for a config written in Python
    with pytest.raises(MethodConfigError, match=r"method\.proj_output_dim must be int"):
        BYOLConfig(proj_hidden_dim=64, proj_output_dim="32", pred_hidden_dim=32, tau_base=0.99)
    config = BYOLConfig(proj_hidden_dim=64, proj_output_dim=32, pred_hidden_dim=32,
                        tau_base=0.99)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tau_base = 0.5  # type: ignore[misc]
    # passed whole: a ready config builds the method (the class comes from its type)
    torch.manual_seed(0)
    method = build_method(config, TINY_BACKBONE)
    assert isinstance(method, BYOL) and method.config is config
    assert method.predictor[-1].out_features == 32
    with pytest.raises(TypeError, match="BYOL takes a BYOLConfig"):
        BYOL(build_backbone(TINY_BACKBONE), OmegaConf.to_container(method_cfg("byol")))
    with pytest.raises(MethodConfigError, match=r"method\.name='byl'.*did you mean 'byol'"):
        build_method({"name": "byl"}, TINY_BACKBONE)
