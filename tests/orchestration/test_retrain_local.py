"""`sslstream retrain` with the embedded default, in a fresh directory: synthetic data
generated on first use, local sqlite MLflow, the lease as a local file next to the data."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from sslstream.orchestration.cli import main
from sslstream.orchestration.retrain import job as R

from tests.orchestration.test_retrain_e2e import tiny


@pytest.mark.timeout(240)
def test_embedded_default_trains_once_then_waits_for_new_data(in_tmp_cwd, capsys) -> None:
    args = ["retrain", f"data.root={in_tmp_cwd / 'data'}", "data.generate_train_samples=128",
            "data.generate_test_samples=64", *tiny(in_tmp_cwd, 4)]
    assert main(args) == R.EXIT_OK
    out = capsys.readouterr().out
    assert "no champion yet" in out and "sslstream-encoder v1 (champion)" in out
    final = next(x for x in out.splitlines() if "sslstream-encoder v1 (champion)" in x)
    assert final.count("no champion yet") == 1, final  # the reason says it once (issue 16)
    client = MlflowClient(f"sqlite:///{in_tmp_cwd / 'mlflow.db'}")
    v1 = client.get_model_version("sslstream-encoder", "1")
    key = v1.tags["retrain.run_key"]
    assert (in_tmp_cwd / "out" / key).is_dir()  # checkpoints under the run key
    assert not list((in_tmp_cwd / "data" / "train").glob("*.lease"))  # released

    assert main(args) == R.EXIT_OK
    assert "nothing to do" in capsys.readouterr().out
    assert [int(v.version) for v in client.search_model_versions(
        "name = 'sslstream-encoder'")] == [1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cron_a_shard_dropped_beside_the_manifest_is_trained_on(in_tmp_cwd, capsys) -> None:
    """The cron scenario: retrain, nothing to do, a shard lands in the watched folder (which
    holds a manifest.json that does not list it), retrain again: it is taken in, said so
    with the fix, and trained on; after `shards index` nothing is new (same content)."""
    from sslstream.pipelines.shards import synthetic
    from sslstream.pipelines.shards.tools import main as shards_main
    from sslstream.pipelines.shards.tools import write_shards

    args = ["retrain", f"data.root={in_tmp_cwd / 'data'}", "data.generate_train_samples=96",
            "data.generate_test_samples=64", *tiny(in_tmp_cwd, 3)]
    assert main(args) == R.EXIT_OK
    assert "sslstream-encoder v1" in capsys.readouterr().out
    assert main(args) == R.EXIT_OK
    assert "nothing to do" in capsys.readouterr().out

    drop = in_tmp_cwd / "incoming"
    write_shards(((f"new{k}", img, lbl) for k, (_, img, lbl) in
                  enumerate(synthetic.samples(40, size=16, seed=9))), drop, prefix="late")
    train = in_tmp_cwd / "data" / "train"
    (train / "late-000000.tar").write_bytes((drop / "late-000000.tar").read_bytes())

    assert main(args) == R.EXIT_OK
    out = capsys.readouterr().out
    assert "1 shard(s) not in the manifest were taken in" in out
    assert f"sslstream shards index {train}" in out
    assert "1 new or changed shard(s) since champion v1" in out
    client = MlflowClient(f"sqlite:///{in_tmp_cwd / 'mlflow.db'}")
    v2 = client.get_model_version("sslstream-encoder", "2")
    assert v2.tags["retrain.new_shards"] == "1"

    assert main(args) == R.EXIT_OK  # still unlisted: said again, but nothing new
    out = capsys.readouterr().out
    assert "nothing to do" in out and "not in the manifest were taken in" in out
    assert shards_main(["index", str(train)]) == 0
    assert main(args) == R.EXIT_OK  # listed now, same bytes: same snapshot, no warning
    out = capsys.readouterr().out
    assert "nothing to do" in out and "taken in" not in out


@pytest.mark.parametrize(("overrides", "says"), [
    (["tracking.enabled=false"], "tracking.enabled=false"),
    # a source on a store without conditional writes: the lease beside it cannot be taken
    (["data=shards", "data.train=http://127.0.0.1:9/train-{000000..000001}.tar",
      "data.test=http://127.0.0.1:9/test-000000.tar"], "retrain.lock.url"),
    (["retrain.lock.url=http://127.0.0.1:9/x.lease"], "retrain.lock.url"),
])
def test_retrain_checks_its_settings_before_data_or_stores(overrides, says, in_tmp_cwd, capsys,
                                                           monkeypatch) -> None:
    """Exit 2 and nothing made: no synthetic data generated, no MLflow store, no lease."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["retrain", *overrides]) == R.EXIT_CONFIG
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
    assert list(in_tmp_cwd.iterdir()) == []


UNLABELLED = ("data.test=null", "data.bank=null", "eval.at_end=false", "eval.every_epochs=0")


@pytest.mark.timeout(240)
def test_unlabelled_data_registers_an_unevaluated_challenger_as_train_does(in_tmp_cwd, capsys):
    """docs/retrain.md, "Unlabelled data": trained and registered, never promoted, said so
    (decision registered-unevaluated); the same snapshot again trains nothing."""
    args = ["retrain", f"data.root={in_tmp_cwd / 'data'}", "data.generate_train_samples=96",
            "data.generate_test_samples=32", *UNLABELLED, *tiny(in_tmp_cwd, 3)]
    assert main(args) == R.EXIT_OK
    out = capsys.readouterr().out
    assert "sslstream-encoder v1 (challenger, not evaluated: never promoted)" in out, out
    client = MlflowClient(f"sqlite:///{in_tmp_cwd / 'mlflow.db'}")
    v1 = client.get_model_version("sslstream-encoder", "1")
    assert v1.tags["evaluated"] == "false" and v1.tags["promoted"] == "false"
    assert v1.tags["retrain.decision"] == "registered-unevaluated"
    assert "champion" not in client.get_registered_model("sslstream-encoder").aliases
    tags = client.get_registered_model("sslstream-encoder").tags
    assert tags["retrain.last_decision"] == "registered-unevaluated"

    assert main(args) == R.EXIT_OK  # same snapshot: its run key finds v1, nothing is trained
    assert "already registered v1" in capsys.readouterr().out
    assert len(client.search_model_versions("name = 'sslstream-encoder'")) == 1


@pytest.mark.parametrize("extra", [("data.test=null",),
                                   (*UNLABELLED, "tracking.registry.register_unevaluated=false")],
                         ids=["evaluating-without-a-test-split", "nothing-to-register"])
def test_retrain_without_an_outcome_is_a_config_error_before_the_source_is_read(
        in_tmp_cwd, capsys, extra):
    args = ["retrain", f"data.root={in_tmp_cwd / 'data'}", *extra, *tiny(in_tmp_cwd, 3)]
    assert main(args) == R.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "docs/retrain.md" in err, err
    assert not (in_tmp_cwd / "data").exists()  # nothing generated, listed or leased
