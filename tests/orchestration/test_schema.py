"""The config schema (orchestration/schema/): unknown keys, types and ranges fail before any
data is touched, naming the key and what is allowed; every command exits 2 for them."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf, open_dict
from sslstream.orchestration.cli import main
from sslstream.orchestration.errors import ConfigError
from sslstream.orchestration.schema import (
    check_config,
    check_overrides,
    compose_checked,
    compose_config,
)


def _error(overrides: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        compose_checked(overrides)
    return ei.value


@pytest.mark.parametrize("override", ["trainer.max_stepz=5", "+trainer.max_stepz=5"])
def test_unknown_key_with_or_without_plus_names_the_nearest(override):
    e = _error([override])
    assert e.key == "trainer.max_stepz"
    assert "did you mean trainer.max_steps?" in str(e)
    assert "+trainer" not in str(e).split("(in")[1].split(")")[1]  # no "+key=" hint


def test_unknown_key_without_near_match_lists_the_keys_of_its_parent():
    e = _error(["eval.zzzz=1"])
    assert "Keys of eval:" in str(e) and "knn_k" in str(e)


def test_unknown_group_option_lists_the_options():
    e = _error(["method=simcrl"])
    assert "one of: barlow_twins, byol" in str(e) and "did you mean simclr" in str(e)


@pytest.mark.parametrize(("override", "expected"), [
    ("trainer.batch_size=-4", "trainer.batch_size=-4 is not allowed: expected an integer >= 1"),
    ("trainer.batch_size=abc", "expected an integer >= 1"),
    ("trainer.epochs=1.5", "trainer.epochs=1.5"),
    ("trainer.device=gpu", "expected auto | cpu | cuda; did you mean cpu?"),
    ("trainer.compile=yes", "expected true | false"),
    ("trainer.loader_threads=0", "expected an integer >= 1 or auto"),
    ("trainer.grad_clip=0", "expected a number > 0 or null"),
    ("data.max_bad_fraction=2", "expected a number >= 0 and <= 1"),
    ("eval.knn_t=0", "eval.knn_t=0"),
    ("augment.view1.flip_p=1.5", "augment.view1.flip_p=1.5"),
    ("retrain.init=warm", "expected scratch | champion"),
    ("tracking.enabled=maybe", "tracking.enabled=maybe"),   # type of the default (no rule)
    ("seed=-1", "seed=-1"),
    ("data.test=null", "data.test is not set"),
    ("augment.view1.crop_scale=[0.9,0.2]", "augment.crop_scale=(0.9, 0.2) must satisfy"),
])
def test_wrong_types_and_ranges_name_the_key_and_what_is_allowed(override, expected):
    e = _error([override])
    assert expected in str(e), str(e)
    assert override.split("=")[0].startswith(e.key)


@pytest.mark.parametrize("overrides", [
    ["+data.storage_options.anon=true"],            # free-form below an empty default
    ["retrain.storage_options={key: v}"],           # free-form below a null default
    ["trainer.grad_clip=null", "trainer.max_steps=7", "trainer.loader_threads=3"],
    ["method=mocov2", "optim.nesterov=true"],       # keys of the chosen group option
    ["data=shards", "data.train=s3://b/train-{000000..000003}.tar", "data.test=s3://b/t.tar"],
    ["trainer.precision=bf16", "trainer.channels_last=true", "retrain.lock.held_exit_code=0"],
])
def test_valid_configs_pass(overrides):
    compose_checked(overrides)


@pytest.mark.parametrize(("method", "data"), [
    ("barlow_twins", "synthetic"), ("byol", "cifar10"), ("contrastive", "shards"),
    ("mocov2", "cifar10"), ("simclr", "synthetic"), ("simsiam", "cifar10"), ("vicreg", "shards"),
])
def test_every_shipped_default_satisfies_the_rules(method, data):
    """The rules table narrows values; it must never reject conf/'s own defaults."""
    compose_checked([f"method={method}", f"data={data}"], allow_missing=data == "shards")


def test_keys_new_in_conf_are_known_without_editing_the_schema():
    """A key another branch adds to conf/ (e.g. a `recipe` group) is accepted from the tree
    of defaults, and its type comes from its default."""
    reference = compose_config([])
    with open_dict(reference):
        reference.recipe = {"grad_clip": 1.0, "name": "x"}
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parse = OverridesParser.create().parse_overrides
    check_overrides(parse(["recipe.grad_clip=2.0"]), reference)
    with pytest.raises(ConfigError, match="did you mean recipe.grad_clip"):
        check_overrides(parse(["recipe.grad_clp=2.0"]), reference)
    cfg = OmegaConf.create(OmegaConf.to_container(reference))
    cfg.recipe.grad_clip = "abc"
    with pytest.raises(ConfigError, match="recipe.grad_clip=abc is not allowed: expected a number"):
        check_config(cfg, reference)


def test_mandatory_value_left_unset_is_named():
    e = _error(["data=shards"])
    assert "data.train must be set" in str(e)
    compose_checked(["data=shards"], allow_missing=True)  # `--cfg` still prints it


@pytest.mark.parametrize("argv", [
    ["train", "trainer.batch_size=-4"],
    ["train", "+trainer.max_stepz=5"],
    ["eval", "--checkpoint", "x.pt", "trainer.batch_size=-4"],
    ["eval", "--model", "models:/x/1", "eval.knn_kk=3"],
    ["retrain", "trainer.batch_size=-4"],
    ["retrain", "+trainer.max_stepz=5"],
    ["retrain", "retrain.init=warm"],
])
def test_every_command_exits_2_before_touching_data(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SSLSTREAM_DATA_DIR", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no synthetic data, no mlflow.db, no outputs


def test_method_config_error_is_a_config_error():
    """sslstream.models.methods.base.MethodConfigError (a bad `method.*` key) maps to exit 2."""
    from sslstream.models.methods.base import MethodConfigError
    from sslstream.orchestration.cli import _is_config_error

    assert _is_config_error(MethodConfigError("method.tau_base: ..."))
    assert not _is_config_error(ValueError("a bug"))


def test_a_plain_value_error_shows_its_traceback(monkeypatch):
    """Only user errors are one line; anything else is a bug and keeps its traceback."""
    import sslstream.orchestration.train.loop as loop

    def boom(cfg):
        raise ValueError("internal bug")

    monkeypatch.setattr(loop, "run_from_config", boom)
    with pytest.raises(ValueError, match="internal bug"):
        main(["train", "tracking.enabled=false"])
