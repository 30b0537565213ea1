"""`sslstream retrain` with the embedded default, in a fresh directory: synthetic data
generated on first use, local sqlite MLflow, the lease as a local file next to the data."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from orchestration.cli import main
from orchestration.retrain import job as R
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
