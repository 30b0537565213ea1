"""Tracker: params/metrics/artifacts against a real MLflow server, local sqlite default,
MLFLOW_TRACKING_URI precedence, resume of a run, and degradation when MLflow is down."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from sslstream.orchestration.errors import RegistrationError
from sslstream.orchestration.tracking import mlflow_env
from sslstream.orchestration.tracking.encoder_model import EncoderSpec
from sslstream.orchestration.tracking.tracker import Tracker, TrackingSettings, flatten_params

from tests.fixtures.mlflow_server import free_port

pytestmark = pytest.mark.timeout(120)

CONFIG = {
    "method": {"name": "byol", "tau": 0.99},
    "optim": {"lr": 0.3, "betas": [0.9, 0.99]},
    "data": {"train": "x" * 700, "storage_options": {}},
    "seed": 0,
    "note": None,
}


def _settings(**kw: object) -> TrackingSettings:
    base = {"experiment": f"exp-{uuid.uuid4().hex[:8]}", "system_metrics": False}
    base.update(kw)
    return TrackingSettings.from_config(base)


@pytest.fixture
def no_env_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first so that monkeypatch's undo removes whatever a test leaves behind
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def test_flatten_params_keys_values_and_truncation() -> None:
    flat = flatten_params(CONFIG, max_length=40)
    assert flat["method.name"] == "byol"
    assert flat["method.tau"] == "0.99"
    assert flat["optim.betas"] == "[0.9, 0.99]"
    assert flat["data.storage_options"] == "{}"
    assert flat["note"] == "None"
    cut = flat["data.train"]
    assert len(cut) == 40 and cut.endswith(f"...[+{700 - 40} chars]") and cut.startswith("xxx")
    odd = flatten_params({"a+b": {"k" * 300: 1}})
    (key,) = odd
    assert len(key) == 250 and key.startswith("a_b." + "k" * 10) and "+" not in key


def test_settings_reject_unknown_keys() -> None:
    with pytest.raises(ValueError, match="registry.*marginn"):
        TrackingSettings.from_config({"registry": {"marginn": 0.1}})
    with pytest.raises(ValueError, match="urii"):
        TrackingSettings.from_config({"urii": "x"})
    s = TrackingSettings.from_config({"http": {"max_retries": 1, "timeout_s": 3},
                                      "registry": {"margin": 0.02}})
    assert (s.http.max_retries, s.http.timeout_s, s.registry.margin) == (1, 3, 0.02)
    assert s.http.backoff_factor == 1  # a key left out takes the schema's default


def test_local_sqlite_default_and_env_uri_precedence(
    in_tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch, no_env_uri: None
) -> None:
    tracker = Tracker(_settings())
    assert tracker.uri == f"sqlite:///{in_tmp_cwd.resolve()}/mlflow.db"
    assert tracker.uri.startswith("sqlite:////")  # absolute path: four slashes
    run_id = tracker.start("local-run", CONFIG, tags={"method": "byol"})
    assert run_id is not None and tracker.enabled
    tracker.log_metrics({"train/loss": torch.tensor(1.5)}, step=3)
    tracker.log_config("seed: 0\n")
    tracker.end()
    assert (in_tmp_cwd / "mlflow.db").is_file()
    run = MlflowClient(tracker.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train/loss"] == 1.5
    assert run.data.params["optim.lr"] == "0.3" and run.data.tags["method"] == "byol"
    exp_name = tracker.settings.experiment
    assert (in_tmp_cwd / "mlruns" / exp_name).is_dir()  # artifacts next to the database
    assert list((in_tmp_cwd / "mlruns" / exp_name).rglob("config.yaml"))

    # MLFLOW_TRACKING_URI wins over tracking.uri (same db: its schema is already created)
    env_uri = tracker.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    from_env = Tracker(_settings(uri=f"sqlite:///{in_tmp_cwd / 'from-config.db'}"))
    assert from_env.uri == env_uri
    run_id2 = from_env.start("env-run", {"a": 1})
    from_env.end()
    assert not (in_tmp_cwd / "from-config.db").exists()
    assert MlflowClient(env_uri).get_run(run_id2).data.params == {"a": "1"}


@pytest.mark.mlflow_server
def test_run_on_server_params_metrics_artifacts_plots(
    mlflow_server: str, tmp_path: Path, no_env_uri: None
) -> None:
    tracker = Tracker(_settings(uri=mlflow_server, system_metrics=True,
                                system_metrics_interval_s=0.2))
    run_id = tracker.start("server-run", CONFIG, tags={"method": "byol"})
    assert run_id is not None
    time.sleep(1.0)  # a few sampling intervals of the system metrics monitor
    for step in range(5):
        tracker.log_metrics({"train/loss": 2.0 - 0.25 * step, "train/lr": 0.1}, step=step)
    tracker.log_metrics({"eval/knn_acc": 0.2}, step=2)
    tracker.log_metrics({"eval/knn_acc": 0.4}, step=4)
    tracker.log_config("method:\n  name: byol\n")
    extra = tmp_path / "notes.txt"
    extra.write_text("hello")
    tracker.log_artifact(str(extra), "misc")
    tracker.log_training_plots()
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    z = torch.randn(60, 16, generator=g) + 3.0 * torch.nn.functional.one_hot(labels, 16)
    tracker.log_embedding_projection(z, labels, step=4)
    tracker.end()

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method.tau"] == "0.99"
    assert len(run.data.params["data.train"]) == tracker.settings.max_param_length
    hist = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [
        (s, 2.0 - 0.25 * s) for s in range(5)]
    arts = {a.path for d in ("", "misc", "config", "plots")
            for a in client.list_artifacts(run_id, d or None)}
    assert {"misc/notes.txt", "config/config.yaml", "plots/loss.png",
            "plots/knn_accuracy.png", "plots/embeddings_pca_00000004.png"} <= arts
    local = client.download_artifacts(run_id, "plots/loss.png", str(tmp_path))
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import psutil  # noqa: F401  (a dependency: system metrics must be on)

    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert "sslstream.system_metrics" not in run.data.tags


@pytest.mark.mlflow_server
def test_resume_continues_the_same_run(mlflow_server: str, no_env_uri: None) -> None:
    settings = _settings(uri=mlflow_server)
    first = Tracker(settings)
    run_id = first.start("resumable", {"lr": 0.1, "epochs": 2})
    first.log_metrics({"train/loss": 1.0}, step=10)
    first.end("KILLED")  # what a pre-empted job does

    second = Tracker(settings)
    assert second.start("resumable", {"lr": 0.1, "epochs": 4, "resume": True},
                        run_id=run_id) == run_id
    assert second.resumed
    second.log_metrics({"train/loss": 0.5}, step=20)
    second.end()
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # params are immutable in MLflow: the first value stays, new keys are added
    assert run.data.params == {"lr": "0.1", "epochs": "2", "resume": "True"}
    steps = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == [(10, 1.0), (20, 0.5)]
    exp = client.get_experiment_by_name(settings.experiment)
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_dead_server_degrades_fast_with_one_warning(
    caplog: pytest.LogCaptureFixture, no_env_uri: None
) -> None:
    port = free_port()  # nothing listens there
    tracker = Tracker(_settings(uri=f"http://alice:s3cret@127.0.0.1:{port}",
                                reconnect_after_s=None))
    # how messages name it: the credentials left the URI for MLflow's auth variables
    dead = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sslstream.tracking"):
        assert tracker.start("dead", CONFIG) is None
        for step in range(50):
            tracker.log_metrics({"train/loss": 1.0}, step=step)
        tracker.log_config("a: 1\n")
        tracker.log_training_plots()
        tracker.end()
    assert time.monotonic() - t0 < 10
    assert not tracker.enabled
    (warning,) = _warnings(caplog, "unreachable")
    assert dead in warning.getMessage()
    assert not [r for r in caplog.records if "s3cret" in r.getMessage()]
    assert "training continues without tracking" in warning.getMessage()
    spec = EncoderSpec(backbone={"name": "resnet_mini"}, feature_dim=128, image_size=32,
                       mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(RegistrationError) as err:
        tracker.log_encoder(torch.nn.Linear(2, 2), spec)
    assert dead in str(err.value) and "s3cret" not in str(err.value)


@pytest.mark.mlflow_server
def test_outage_mid_run_drops_then_resumes(
    mlflow_server: str, caplog: pytest.LogCaptureFixture, no_env_uri: None
) -> None:
    tracker = Tracker(_settings(uri=mlflow_server, reconnect_after_s=0.0,
                                system_metrics=True, system_metrics_interval_s=0.2))
    run_id = tracker.start("flaky", {"a": 1})
    tracker.log_metrics({"m": 1.0}, step=1)
    tracker.flush()
    first_monitor = tracker._system.monitor
    first_monitor.finish()  # what an outage does to MLflow's monitor: its thread ends
    dead = f"http://127.0.0.1:{free_port()}"
    live_client = tracker._client
    # a real outage: point the tracker's client at a closed port
    tracker.uri, tracker._client = dead, MlflowClient(dead)
    with caplog.at_level(logging.WARNING, logger="sslstream.tracking"):
        t0 = time.monotonic()
        tracker.log_metrics({"m": 2.0}, step=2)
        tracker.log_metrics({"m": 3.0}, step=3)
        tracker.flush()  # metrics are sent by a background thread
        assert time.monotonic() - t0 < 15
        assert not tracker.enabled
        tracker.uri, tracker._client = mlflow_server, live_client  # server back
        tracker.log_metrics({"m": 4.0}, step=4)
        tracker.flush()
    assert tracker.enabled
    # system metrics resume with the run (a new monitor thread, steps continued)
    assert tracker._system.monitor is not None and tracker._system.monitor is not first_monitor
    assert tracker._system.monitor._process.is_alive()
    time.sleep(0.6)
    tracker.end()
    assert any(k.startswith("system/") for k in
               MlflowClient(mlflow_server).get_run(run_id).data.metrics)
    assert len(_warnings(caplog, "unreachable")) == 1
    assert len(_warnings(caplog, "reachable again")) == 1
    steps = sorted(m.step for m in MlflowClient(mlflow_server).get_metric_history(run_id, "m"))
    assert steps == [1, 4]  # nothing buffered during the outage


def test_inactive_tracker_is_a_no_op(in_tmp_cwd: Path, no_env_uri: None) -> None:
    tracker = Tracker(_settings(), active=False)  # e.g. rank 1 under DDP
    assert tracker.start("x", CONFIG) is None
    tracker.log_metrics({"a": 1.0}, step=0)
    tracker.end()
    assert not (in_tmp_cwd / "mlflow.db").exists()
    assert mlflow_env.probe("sqlite:///x.db", 1.0) is None


def test_pca_2d_matches_covariance_eigenvectors() -> None:
    from sslstream.orchestration.tracking.plots import pca_2d

    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 6)) * np.array([5.0, 2.0, 0.5, 0.3, 0.2, 0.1])
    rot, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    z = z @ rot.T + 3.0
    centred = z - z.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.cov(centred.T))  # ascending
    want = centred @ evecs[:, ::-1][:, :2]
    got = pca_2d(torch.from_numpy(z).float())
    for axis in range(2):  # equal up to the sign of each component
        sign = np.sign(got[:, axis] @ want[:, axis])
        np.testing.assert_allclose(sign * got[:, axis], want[:, axis], atol=1e-3)


def test_credentials_never_reach_params_or_the_config_artifact(
    in_tmp_cwd: Path, no_env_uri: None
) -> None:
    secret_cfg = {
        "data": {"train": str(in_tmp_cwd / "no-shards"), "storage_options": {
            "key": "AKIAEXAMPLEKEY", "secret": "s3cr3t-value",
            "client_kwargs": {"endpoint_url": "http://minio:9000"}}},
        "tracking": {"uri": "http://alice:pa55word@mlflow:5000"},
        "db": {"password": "hunter2"},
        "retrain": {"run_key_ignore": ["tracking", "data.root"]},
    }
    tracker = Tracker(_settings())
    run_id = tracker.start("secret-run", secret_cfg)
    tracker.log_config("data:\n  storage_options:\n    secret: s3cr3t-value\n"
                       "tracking:\n  uri: http://alice:pa55word@mlflow:5000\n")
    tracker.end()
    client = MlflowClient(tracker.uri)
    params = client.get_run(run_id).data.params
    text = " ".join(f"{k}={v}" for k, v in params.items())
    for secret in ("AKIAEXAMPLEKEY", "s3cr3t-value", "pa55word", "hunter2"):
        assert secret not in text
    assert params["data.storage_options.client_kwargs.endpoint_url"] == "http://minio:9000"
    assert params["tracking.uri"] == "http://***@mlflow:5000"
    assert params["retrain.run_key_ignore"] == '["tracking", "data.root"]'
    config = client.download_artifacts(run_id, "config/config.yaml", str(in_tmp_cwd))
    body = Path(config).read_text()
    assert "s3cr3t-value" not in body and "pa55word" not in body and "secret: '***'" in body


def test_plots_leave_the_users_matplotlib_backend_alone() -> None:
    """Figures are built without pyplot: importing the tracker's plots in a notebook or a
    GUI process must not switch its backend (the old module forced Agg at import)."""
    import subprocess
    import sys

    code = ("import matplotlib, sys; before = matplotlib.get_backend(); "
            "import orchestration.tracking.plots as p, numpy as np, io; "
            "p.plot_projection(np.zeros((4, 2)), [0, 1, 0, 1], title='t').savefig(io.BytesIO()); "
            "assert 'matplotlib.pyplot' not in sys.modules; "
            "assert matplotlib.rcParams['backend'] == before, matplotlib.rcParams['backend']")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**__import__("os").environ, "MPLBACKEND": "svg"})
    assert proc.returncode == 0, proc.stderr[-2000:]
