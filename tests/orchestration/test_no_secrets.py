"""No credential from the tracking URI or the storage options is ever printed or logged.

A whole `sslstream train` run in a subprocess against a real `mlflow server` with
`user:password@` in the tracking URI and secrets in `data.storage_options`: its complete
stdout and stderr (MLflow's own "View run ... at:" line included), the run's params, tags
and every artifact must be free of them, and the `--cfg` print too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from sslstream.orchestration.tracking import mlflow_env

from tests.orchestration.test_train import cli_env, tiny

PASSWORD = "pw-Zq81x-SECRET"
USER = "alice-user"
STORE_SECRET = "stor-Kk02-SECRET"
STORE_KEY = "AKIA-KEY-00SECRET"


def _no_secret(text: str, where: str) -> None:
    for s in (PASSWORD, STORE_SECRET, STORE_KEY, f"{USER}:"):
        assert s not in text, f"{s!r} in {where}: ...{text[max(0, text.find(s) - 200):text.find(s) + 80]}"


def test_uri_credentials_move_to_mlflow_auth_variables(monkeypatch):
    for name in (mlflow_env.ENV_USER, mlflow_env.ENV_PASSWORD):  # undo removes what we set
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setenv(mlflow_env.ENV_URI, "https://bob:p%40ss@mlflow.example:5000/x")
    assert mlflow_env.resolve_tracking_uri(None) == "https://mlflow.example:5000/x"
    assert os.environ[mlflow_env.ENV_URI] == "https://mlflow.example:5000/x"
    assert (os.environ[mlflow_env.ENV_USER], os.environ[mlflow_env.ENV_PASSWORD]) == ("bob", "p@ss")
    monkeypatch.delenv(mlflow_env.ENV_URI)
    assert mlflow_env.resolve_tracking_uri("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


@pytest.mark.mlflow_server
@pytest.mark.timeout(240)
def test_a_whole_run_prints_and_logs_no_credential(mlflow_server, tmp_path):
    host = mlflow_server.split("://", 1)[1]
    uri = f"http://{USER}:{PASSWORD}@{host}"
    args = tiny(tmp_path, f"tracking.uri={uri}", "tracking.experiment=secrets-test",
                "tracking.registry.name=secrets-encoder",
                f"+data.storage_options.key={STORE_KEY}",
                f"+data.storage_options.secret={STORE_SECRET}", steps=4)
    env = cli_env(MLFLOW_HTTP_REQUEST_TIMEOUT="20")
    proc = subprocess.run([sys.executable, "-m", "sslstream.orchestration.cli", "train", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=220)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "View run" in proc.stdout and host in proc.stdout  # MLflow's own line is there...
    _no_secret(out, "the run's stdout/stderr")  # ...without the credential
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("secrets-test")
    (run,) = client.search_runs([exp.experiment_id])
    _no_secret(repr(run.data.params), "params")
    _no_secret(repr(run.data.tags), "tags")
    assert run.data.params.get("data.storage_options.secret") == "***"
    dest = tmp_path / "artifacts"
    for a in client.list_artifacts(run.info.run_id):
        local = client.download_artifacts(run.info.run_id, a.path, str(dest))
        for p in [Path(local)] if Path(local).is_file() else Path(local).rglob("*"):
            if p.is_file():
                _no_secret(p.read_bytes().decode("utf-8", "replace"), f"artifact {p.name}")
    for mv in client.search_model_versions("name='secrets-encoder'"):
        _no_secret(repr(mv.tags) + str(mv.source), "model version")

    shown = subprocess.run([sys.executable, "-m", "sslstream.orchestration.cli", "train", "--cfg", *args],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "storage_options" in shown.stdout
    _no_secret(shown.stdout + shown.stderr, "--cfg")
