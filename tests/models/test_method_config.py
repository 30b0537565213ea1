"""The per-method config dataclasses: typed, ranged, strict, built from the recipe files.

Every recipe file's method block must build a config whose fields equal the yaml's values
(so nothing is lost between the file and the dataclass), and mistakes must raise
``MethodConfigError`` naming ``method.<key>`` with what is allowed, also for a config
written in Python. The methods come from the registry, so a new method is checked too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from sslstream.models.backbones import build_backbone
from sslstream.models.methods import BYOL, METHODS, MethodConfigError, build_method
from sslstream.models.methods.byol import BYOLConfig
from sslstream.models.methods.moco import MoCoV2Config
from sslstream.models.methods.vicreg import VICRegConfig

from tests.models.test_training_toy import SMALL_HEADS, TINY_BACKBONE, method_cfg

pytestmark = pytest.mark.timeout(60)


def _yaml(name: str, regime: str = "cifar") -> dict:
    return OmegaConf.to_container(method_cfg(name, regime), resolve=True)


@pytest.mark.parametrize("regime", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_recipe_builds_a_config_equal_to_its_yaml(name: str, regime: str) -> None:
    raw = _yaml(name, regime)
    config_class = METHODS[name].config_class
    config = config_class.from_mapping(OmegaConf.create(raw))
    assert raw.pop("name") == config_class.name == name
    assert set(raw) <= set(config_class.keys())
    got = dataclasses.asdict(config)
    for key, value in raw.items():
        assert got[key] == value and type(got[key]) is type(value), (name, regime, key)
    # keys the yaml leaves out take the dataclass default (MoCo: tau_final follows tau_base)
    for key in set(config_class.keys()) - set(raw):
        field = next(f for f in dataclasses.fields(config_class) if f.name == key)
        assert got[key] == field.default, (name, key)


def test_unknown_keys_are_rejected_with_a_near_miss_or_the_allowed_keys() -> None:
    cfg = method_cfg("byol")
    cfg.tau_bsae = 0.9
    with pytest.raises(MethodConfigError,
                       match=r"unknown config key method\.tau_bsae; did you mean method\.tau_base\?"):
        build_method(cfg, TINY_BACKBONE)
    cfg = method_cfg("vicreg")
    cfg.covv_coeff = 1.0
    with pytest.raises(MethodConfigError, match=r"method\.covv_coeff; did you mean method\.cov_coeff"):
        build_method(cfg, TINY_BACKBONE)
    # nothing close: no guess, the allowed keys instead
    with pytest.raises(MethodConfigError) as err:
        VICRegConfig.from_mapping({**_yaml("vicreg"), "zebra": 1})
    assert "did you mean" not in str(err.value) and "sim_coeff" in str(err.value)
    assert err.value.key == "method.zebra"
    # another method's name in the block is refused, naming it
    with pytest.raises(MethodConfigError, match=r"method\.name must be 'vicreg'"):
        VICRegConfig.from_mapping({**_yaml("vicreg"), "name": "byol"})


@pytest.mark.parametrize(("name", "key", "value", "message"), [
    ("byol", "proj_hidden_dim", "wide", r"method\.proj_hidden_dim=wide is not allowed: expected an integer >= 1"),
    ("byol", "proj_hidden_dim", 4096.0, r"method\.proj_hidden_dim=4096\.0 is not allowed"),
    ("byol", "pred_hidden_dim", True, r"method\.pred_hidden_dim=true is not allowed"),
    ("byol", "pred_hidden_dim", 0, r"method\.pred_hidden_dim=0 is not allowed: expected an integer >= 1"),
    ("byol", "tau_base", "0.99", r"method\.tau_base='0\.99' is not allowed: expected a number >= 0 and <= 1"),
    ("byol", "tau_base", 2, r"method\.tau_base=2 is not allowed: expected a number >= 0 and <= 1"),
    ("byol", "sync_bn", "false", r"method\.sync_bn='false' is not allowed: expected true \| false"),
    ("mocov2", "symmetric", 1, r"method\.symmetric=1 is not allowed"),
    ("mocov2", "temperature", False, r"method\.temperature=false is not allowed"),
    ("mocov2", "queue_size", 0, r"method\.queue_size=0 is not allowed: expected an integer >= 1"),
    ("simclr", "temperature", 0, r"method\.temperature=0 is not allowed: expected a number > 0"),
    ("simclr", "temperature", -1, r"method\.temperature=-1 is not allowed: expected a number > 0"),
    ("mocov2", "bn", "shufle", r"method\.bn=shufle is not allowed: expected shuffle \| sync \| none; "
                               r"did you mean shuffle\?"),
    ("mocov2", "bn", 3, r"method\.bn=3 is not allowed: expected shuffle \| sync \| none"),
    ("vicreg", "std_coeff", -1.0, r"method\.std_coeff=-1\.0 is not allowed: expected a number >= 0"),
    ("contrastive", "margin", 0.0, r"method\.margin=0\.0 is not allowed: expected a number > 0"),
])
def test_wrong_types_and_ranges_name_the_key(name: str, key: str, value: object, message: str) -> None:
    cfg = OmegaConf.to_container(method_cfg(name, **SMALL_HEADS))
    cfg[key] = value
    with pytest.raises(MethodConfigError, match=message) as err:
        build_method(cfg, TINY_BACKBONE)
    assert err.value.key == f"method.{key}"


def test_accepted_values_are_normalised() -> None:
    raw = {**_yaml("mocov2", "imagenet"), "tau_base": 1, "bn": "SYNC", "tau_final": None}
    config = MoCoV2Config.from_mapping(raw)
    assert config.tau_base == 1.0 and type(config.tau_base) is float  # an int is a float
    assert config.bn == "sync"  # case-insensitive, stored as the Literal writes it
    assert config.tau_final == 1.0  # null: follows tau_base
    assert isinstance(MethodConfigError("x"), ValueError)  # callers catching ValueError


def test_missing_keys_and_python_built_configs() -> None:
    raw = _yaml("byol")
    del raw["tau_base"], raw["pred_hidden_dim"]
    with pytest.raises(MethodConfigError, match=r"method\.pred_hidden_dim must be set"):
        BYOLConfig.from_mapping(raw)
    # the same checks hold for a config written in Python
    with pytest.raises(MethodConfigError, match=r"method\.proj_output_dim='32' is not allowed"):
        BYOLConfig(proj_hidden_dim=64, proj_output_dim="32", pred_hidden_dim=32, tau_base=0.99)
    with pytest.raises(MethodConfigError, match=r"method\.tau_base=1\.5 is not allowed"):
        BYOLConfig(proj_hidden_dim=64, proj_output_dim=32, pred_hidden_dim=32, tau_base=1.5)
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
    with pytest.raises(MethodConfigError, match=r"method\.name='byl'.*did you mean byol"):
        build_method({"name": "byl"}, TINY_BACKBONE)


def test_the_class_name_is_the_registry_name() -> None:
    """One name per method: its config class's, which the method class and METHODS use."""
    for name, cls in METHODS.items():
        assert cls.name == cls.config_class.name == name
