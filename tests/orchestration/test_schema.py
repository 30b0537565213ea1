"""The config schema (orchestration/schema/): unknown keys, types and ranges fail before any
data is touched, naming the key and what is allowed; every command exits 2 for them."""

from __future__ import annotations

import types
import typing

import pytest
from sslstream.conf.typed import MinLen, walk_fields
from sslstream.orchestration.cli import main
from sslstream.orchestration.errors import ConfigError
from sslstream.orchestration.schema import compose_checked, compose_config
from sslstream.orchestration.schema.config import Config


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
    assert "Keys of eval:" in str(e) and "knn_k" in str(e) and "config_key" not in str(e)
    e = _error(["+trainer.foo=1"])  # the key itself is named, not its section
    assert e.key == "trainer.foo" and "did you mean trainer?" not in str(e)
    assert "unknown config key trainer.foo" in str(e) and "Keys of trainer:" in str(e)
    e = _error(["trainer.knn_k=3"])  # a key of another section
    assert "did you mean eval.knn_k?" in str(e)


def test_unknown_choice_lists_the_options():
    e = _error(["method=simcrl"])
    assert "byol, simclr" in str(e) and "did you mean simclr" in str(e)
    e = _error(["data=cifar11"])
    assert "one of: cifar10, shards, synthetic" in str(e) and "did you mean cifar10" in str(e)


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
    ("tracking.enabled=maybe", "tracking.enabled=maybe"),
    ("seed=-1", "seed=-1"),
    ("data.test=null", "data.test is not set"),
    ("augment.view1.crop_scale=[0.9,0.2]", "augment.view1.crop_scale=[0.9, 0.2] is not allowed"),
    ("retrain.lock.heartbeat_s=400", "must be below retrain.lock.ttl_s=300"),
    ("retrain.lock.url=http://x/lease", "retrain.lock.url=http://x/lease is not allowed"),
])
def test_wrong_types_and_ranges_name_the_key_and_what_is_allowed(override, expected):
    e = _error([override])
    assert expected in str(e), str(e)
    assert override.split("=")[0].startswith(e.key)


@pytest.mark.parametrize("overrides", [
    ["+data.storage_options.anon=true"],            # free-form below a mapping
    ["data.storage_options.anon=true"],             # (with or without +)
    ["retrain.storage_options={key: v}"],           # free-form below a null default
    ["trainer.grad_clip=null", "trainer.max_steps=7", "trainer.loader_threads=3"],
    ["method=mocov2", "optim.nesterov=true"],       # keys of the chosen optimiser
    ["optim=adamw", "optim.betas=[0.9,0.95]"],
    ["data=shards", "data.train=s3://b/train-{000000..000003}.tar", "data.test=s3://b/t.tar"],
    ["trainer.precision=bf16", "trainer.channels_last=true", "retrain.lock.held_exit_code=0"],
    ["tracking.uri=http://127.0.0.1:5000", "tracking.registry.margin=0.01"],
    ["tracking.uri=postgresql+psycopg2://u@h/db"], ["tracking.uri=./runs/mlflow"],
])
def test_valid_configs_pass(overrides):
    compose_checked(overrides)


def test_values_are_stored_with_their_types():
    cfg = compose_checked(["optim.lr=1", "trainer.warmup_epochs=2", "trainer.precision=16"])
    assert type(cfg.optim.lr) is float and type(cfg.trainer.warmup_epochs) is float
    assert cfg.trainer.precision == "16"  # an int given for a string choice


def test_mandatory_value_left_unset_is_named():
    e = _error(["data=shards"])
    assert "data.train must be set" in str(e)
    compose_config(["data=shards"])  # `--cfg` still prints it


def _unbounded(hint: object) -> list[str]:
    """The bare int / float / str types inside ``hint`` (any value of the type passes)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return [] if args[1:] else _unbounded(args[0])
    if origin in (typing.Union, types.UnionType, list, tuple):
        return [t for a in args if a is not Ellipsis for t in _unbounded(a)]
    return [hint.__name__] if hint in (int, float, str) else []


# keys where any value of the type is fine, and why
ANY_VALUE = {
    "augment.name": "a label for logs",
    "augment.view1.mean": "any per-channel mean", "augment.view2.mean": "any per-channel mean",
    "augment.local.mean": "any per-channel mean (null: the global views')",
    "retrain.schedule": "informational only",
    "retrain.torchrun_args": "passed to torchrun, which checks them",
    "retrain.run_key_ignore": "dotted keys; an unknown one ignores nothing",
}


def test_every_key_has_a_declared_range_or_a_reason():
    """Each number and string key of the schema says what it accepts (a bound, choices, a
    Check) or is in ANY_VALUE with the reason; the registries' methods and optimisers too."""
    from sslstream.models.methods import METHODS
    from sslstream.models.optim import OPTIMIZERS

    fields = list(walk_fields(Config))
    fields += [kv for m in METHODS.values() for kv in walk_fields(m.config_class, "method")]
    fields += [kv for o in OPTIMIZERS.values() for kv in walk_fields(o, "optim")]
    loose = sorted({key for key, hint in fields if _unbounded(hint)} - set(ANY_VALUE))
    assert not loose, f"keys without a range: {loose}"
    assert _unbounded(int) and not _unbounded(typing.Annotated[int, MinLen(1)])  # the probe works


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
    """A config dataclass's error outside the schema (conf/typed.py's ConfigValueError,
    e.g. MethodConfigError) maps to exit 2."""
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


# Issue 21's list: values that used to reach the data step unchecked (each exited 1 later or
# not at all; eval.knn_bank_chunk=-1 trained, scored chance and registered a champion).
# (overrides, environment, the key the message must name)
REFUSED = [
    (["eval.knn_query_chunk=0"], {}, "eval.knn_query_chunk"),
    (["eval.knn_bank_chunk=-1"], {}, "eval.knn_bank_chunk"),
    (["eval.bank_samples=-5"], {}, "eval.bank_samples"),
    (["eval.bank_max_per_class=-3"], {}, "eval.bank_max_per_class"),
    (["eval.knn_dtype=int8"], {}, "eval.knn_dtype"),
    (["data.max_pixels=-1"], {}, "data.max_pixels"),
    (["data.label_key=bogus"], {}, "data.label_key"),
    (["data.image_keys=[]"], {}, "data.image_keys"),
    (["tracking.max_param_length=-1"], {}, "tracking.max_param_length"),
    (["~trainer.epochs"], {}, "trainer.epochs"),
    (["~trainer.batch_size"], {}, "trainer.batch_size"),
    (["trainer.output_dir="], {}, "trainer.output_dir"),
    (["method=simclr", "method.temperature=0"], {}, "method.temperature"),
    (["method=simclr", "method.temperature=-1"], {}, "method.temperature"),
    (["optim.eta=-1"], {}, "optim.eta"),
    (["method=mocov2", "method.queue_size=0"], {}, "method.queue_size"),
    (["method.tau_base=2"], {}, "method.tau_base"),
    (["backbone.name=resnet9999"], {}, "backbone.name"),
    (["tracking.uri=notaurl://x"], {}, "tracking.uri"),
    ([], {"MLFLOW_TRACKING_URI": "notaurl://x"}, "MLFLOW_TRACKING_URI"),
    (["tracking.registry.name="], {}, "tracking.registry.name"),
    ([], {"SSLSTREAM_DATA_DIR": ""}, "SSLSTREAM_DATA_DIR"),
    (["+trainer.foo=1"], {}, "trainer.foo"),
]


@pytest.mark.parametrize("command", ["train", "retrain"])
@pytest.mark.parametrize(("overrides", "env", "key"), REFUSED,
                         ids=[" ".join(o) or next(iter(e)) for o, e, _ in REFUSED])
def test_issue_21_values_exit_2_naming_the_key(command, overrides, env, key, tmp_path,
                                               monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "SSLSTREAM_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert main([command, *overrides]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # no synthetic data, no mlflow.db, no outputs


MIX = ["data=shards", "eval.at_end=false"]


def test_weighted_sources_as_the_issue_writes_them() -> None:
    cfg = compose_checked([*MIX, 'data.train=[{url: "s3://a/train-{000000..000099}.tar", '
                                 'weight: 3}, {url: s3://b/new-{000000..000009}.tar, weight: 1}]'])
    train = [dict(s) for s in cfg.data.train]
    assert [s["url"] for s in train] == ["s3://a/train-{000000..000099}.tar",
                                         "s3://b/new-{000000..000009}.tar"]
    assert [s["weight"] for s in train] == [3.0, 1.0]
    assert list(cfg.retrain.source) == list(cfg.data.train) == list(cfg.data.bank)
    # a plain list and a string keep their meaning
    assert list(compose_checked([*MIX, "data.train=[s3://a/x.tar,s3://b/y.tar]"]).data.train) \
        == ["s3://a/x.tar", "s3://b/y.tar"]
    plain = compose_checked([*MIX, "data.train=s3://a/train-{000000..000099}.tar"])
    assert plain.data.train == "s3://a/train-{000000..000099}.tar"


@pytest.mark.parametrize(("train", "key", "words"), [
    ("[{url: a, weight: 3}, {url: b, weight: -1}]", "data.train[1].weight", "is not allowed"),
    ("[{url: a, weight: 3}, {url: b, weight: .inf}]", "data.train[1].weight", "is not allowed"),
    ("[{url: a, weight: 0}]", "data.train[0].weight", "expected a number > 0"),
    ("[{url: a, weight: 1, repeat: 2}]", "data.train[0].repeat", "sets weight and repeat"),
    ("[{url: a, weight: 1}, {url: b, samples: 5}]", "data.train[1].weight", "is not set while other"),
    ("[{url: a, weight: 1}, b]", "data.train[1].weight", "is not set while other"),
    ("[{url: a, samples: 0}]", "data.train[0].samples", "is not allowed"),
    ("[{url: a, wieght: 1}]", "data.train[0].wieght", "did you mean data.train[0].weight"),
    ("[{weight: 1}]", "data.train[0].url", "must be set"),
])
def test_a_bad_source_is_named_before_anything_runs(train, key, words, capsys) -> None:
    e = _error([*MIX, f"data.train={train}"])
    assert e.key == key and words in str(e), str(e)
    assert main(["train", *MIX, f"data.train={train}"]) == 2
    assert key in capsys.readouterr().err


# Issue 22's list: multi-crop, ViT and method values refused before any data is read.
ISSUE_22 = [
    (["method=swav", "method.n_prototypes=0"], "method.n_prototypes"),
    (["method=swav", "method.n_prototypes=-3"], "method.n_prototypes"),
    (["method=dino", "method.out_dim=0"], "method.out_dim"),
    (["backbone=vit_tiny_cifar", "backbone.patch_size=5"], "backbone.patch_size"),
    (["backbone=vit_tiny_cifar", "augment.view1.size=30", "augment.view2.size=30"],
     "augment.view1.size"),
    (["method=dino", "backbone=vit_tiny_cifar", "augment.local.count=2",
      "augment.local.size=18"], "augment.local.size"),
    (["method=dino", "augment.local.count=2", "augment.local.size=48"], "augment.local.size"),
    (["method=byol", "augment.local.count=6", "augment.local.size=16"], "augment.local.count"),
    (["method=mocov3", "augment.local.count=2", "augment.local.size=16"], "augment.local.count"),
]


@pytest.mark.parametrize(("overrides", "key"), ISSUE_22, ids=[" ".join(o) for o, _ in ISSUE_22])
def test_issue_22_values_exit_2_naming_the_key(overrides, key, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "SSLSTREAM_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert f"config error: {key}=" in err, err  # the message starts with the bad key
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no synthetic data, no mlflow.db, no outputs


def test_issue_22_multi_crop_and_vit_configs_pass():
    """The accepted neighbours of the refused values: local crops for DINO / SwAV, a ViT whose
    patch divides every crop."""
    compose_checked(["method=dino", "augment.local.count=2", "augment.local.size=16"])
    compose_checked(["method=swav", "backbone=vit_tiny_cifar", "augment.local.count=6",
                     "augment.local.size=16"])
    compose_checked(["method=mocov3", "backbone=vit_tiny_cifar_p8"])
