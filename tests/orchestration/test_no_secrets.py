"""No credential from the tracking URI, the data URLs or the storage options is ever printed,
logged or sent to MLflow (pipelines/shards/masking.py: `mask`).

Whole `sslstream train` runs in subprocesses against a real `mlflow server` -- one that
succeeds, one that fails mid-training, a password holding an unencoded `@` -- with secrets
planted in the tracking URI, the shard URLs and `data.storage_options`: their complete stdout
and stderr (MLflow's own "View run ... at:" line included), every file they wrote, the
run's params, tags and artifacts must be free of them; and the `--cfg` print, the failing
`shards verify` / `index` commands and the config errors too.
"""

from __future__ import annotations

import json
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
AT_PASSWORD = "pw-Yr55@AT-TAIL-SECRET"  # an unencoded '@': MLflow used to split the URI there
DATA_PASSWORD = "data-Pq3-SECRET"
HEADER_TOKEN = "tok-Hh7-SECRET"
PLANTED = (PASSWORD, STORE_SECRET, STORE_KEY, f"{USER}:", "Yr55", "AT-TAIL-SECRET",
           DATA_PASSWORD, HEADER_TOKEN)


def _no_secret(text: str, where: str) -> None:
    for s in PLANTED:
        assert s not in text, f"{s!r} in {where}: ...{text[max(0, text.find(s) - 200):text.find(s) + 80]}"


def _no_secret_in_files(root: Path, skip: tuple[Path, ...] = ()) -> int:
    """Every file under `root` (logs, checkpoints, configs, MLflow's local stores); the
    number of files read."""
    n = 0
    for p in root.rglob("*"):
        if p.is_file() and not any(p.is_relative_to(s) for s in skip):
            _no_secret(p.read_bytes().decode("latin-1"), f"file {p}")
            n += 1
    return n


@pytest.mark.parametrize(("text", "shown"), [
    ("s3://AKIA1:SECRET/x@bucket/k.tar", "s3://***@bucket/k.tar"),
    ("http://u:p@ss@host:5000/x", "http://***@host:5000/x"),
    ("http://u:pa/ss@host/x", "http://***@host/x"),
    ("https://b.s3.amazonaws.com/k.tar?X-Amz-Credential=AK%2F1&X-Amz-Signature=ff&x=1",
     "https://b.s3.amazonaws.com/k.tar?X-Amz-Credential=***&X-Amz-Signature=***&x=1"),
    ("gs://b/o?token=abc&alt=media", "gs://b/o?token=***&alt=media"),
    ("sig=abc&se=2030", "sig=***&se=2030"),
    ("Authorization: Bearer abc.def", "Authorization: ***"),
    ("override data.storage_options={key: AK, secret: S, anon: true}",
     "override data.storage_options={key: ***, secret: ***, anon: true}"),
    ("s3://bucket/a@b.tar label_key=json:label", "s3://bucket/a@b.tar label_key=json:label"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_mask_hides_credentials_and_keeps_the_rest(text, shown):
    from sslstream.pipelines.shards.masking import mask

    assert mask(text) == shown


def test_mask_of_configs_and_storage_options():
    from sslstream.pipelines.shards.masking import mask

    cfg = {"data": {"train": "s3://K:S@b/x", "label_key": "cls", "storage_options": {
        "key": "AK", "secret": "S", "anon": True,
        "client_kwargs": {"headers": {"Authorization": "Bearer T"}, "endpoint_url": "http://h"}}},
        "tracking": {"password": 5, "uri": "http://u:p@h"}}
    assert mask(cfg) == {"data": {"train": "s3://***@b/x", "label_key": "cls", "storage_options": {
        "key": "***", "secret": "***", "anon": True,
        "client_kwargs": {"headers": {"Authorization": "***"}, "endpoint_url": "http://h"}}},
        "tracking": {"password": "***", "uri": "http://***@h"}}
    assert mask({"key": "AK", "session_token": "T"}, options=True) == {"key": "***",
                                                                       "session_token": "***"}


def test_every_log_record_is_masked(caplog):
    import logging

    from sslstream.pipelines.shards.masking import install_log_masking

    install_log_masking()
    log = logging.getLogger("some.library")
    with caplog.at_level(logging.INFO):
        log.info("GET %s failed", f"https://{USER}:{PASSWORD}@host/x")
        try:
            raise OSError(f"s3://{STORE_KEY}:{STORE_SECRET}@b/k.tar")
        except OSError:
            log.exception("read failed")
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "https://***@host/x" in text and "s3://***@b/k.tar" in text
    _no_secret(text + caplog.text, "log records")


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


def test_a_password_with_an_unencoded_at_is_sent_whole(monkeypatch):
    """`user:pw@rest@host`: the user info ends at the authority's last '@' (as in
    urllib.parse); before, MLflow got `rest@host` as the host and printed it."""
    for name in (mlflow_env.ENV_USER, mlflow_env.ENV_PASSWORD):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setenv(mlflow_env.ENV_URI, f"http://{USER}:{AT_PASSWORD}@mlflow.example:5000/x")
    assert mlflow_env.resolve_tracking_uri(None) == "http://mlflow.example:5000/x"
    assert os.environ[mlflow_env.ENV_PASSWORD] == AT_PASSWORD


@pytest.mark.parametrize("password", ["pa/ss-Yr55-SECRET", "pa?ss-Yr55-SECRET", "pa#Yr55-SECRET"])
def test_a_uri_whose_host_cannot_be_found_is_refused_masked_before_any_request(
        monkeypatch, tmp_path, capsys, password):
    from sslstream.orchestration.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(mlflow_env.ENV_URI, f"http://{USER}:{password}@127.0.0.1:9/")
    rc = main(["train", *tiny(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "unencoded '/', '?' or '#'" in err and "%2F" in err and "http://***@127.0.0.1:9/" in err
    _no_secret(err, "the refusal")
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_config_errors_and_failing_shard_commands_print_no_credential(tmp_path, capsys,
                                                                      monkeypatch):
    """A secret in a URL with no scheme to mark it when a library quotes it (s3fs takes
    `KEY:SECRET@bucket` for a bucket name; botocore's error repeats it), in a garbled
    override, in --storage-options."""
    from sslstream.orchestration.cli import main

    monkeypatch.chdir(tmp_path)
    for k, v in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                 ("AWS_ENDPOINT_URL", "http://127.0.0.1:9")):
        monkeypatch.setenv(k, v)
    url = f"s3://{STORE_KEY}:{STORE_SECRET}@bucket/prefix"
    assert main(["shards", "verify", url]) == 2
    assert main(["shards", "index", url]) == 2
    assert main(["shards", "verify", str(tmp_path), "--storage-options",
                 json.dumps({"key": STORE_KEY, "secret": STORE_SECRET})]) == 2
    assert main(["train", f"data.storage_options={{key: {STORE_KEY}, secret: {STORE_SECRET}"]) == 2
    assert main(["train", f"data.storage_options=[{STORE_SECRET}]"]) == 2
    assert main(["train", f"data.storage_options={STORE_SECRET}"]) == 2
    assert main(["train", "data=shards", f"data.train={url}", "data.test=null", "data.bank=null",
                 "eval.at_end=false", "eval.every_epochs=0"]) == 1
    cap = capsys.readouterr()
    assert "s3://***@bucket/prefix" in cap.err, cap.err
    _no_secret(cap.out + cap.err, "the commands' output")


@pytest.mark.mlflow_server
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failing_run_prints_writes_and_sends_no_credential(mlflow_server, stall_server,
                                                             tmp_path):
    """A run that starts, logs its params, then stops on corrupt data (BadDataError):
    secrets in the tracking URI (a password with an unencoded '@'), in the shard URLs'
    user info and in a token header of data.storage_options. Everything it
    printed, every file it wrote and everything the server holds is free of them."""
    from tests.fixtures.shards import write_shard_set

    # the tail of the last shard is corrupt: a few steps (and checkpoints) come first
    ss = write_shard_set(tmp_path / "served", [40, 40, 40], manifest=False,
                         corrupt={(2, i): "bad_header" for i in range(30, 40)})
    for u in ss.urls:
        stall_server.files[Path(u).name] = Path(u).read_bytes()
    data_url = (f"http://bob:{DATA_PASSWORD}@{stall_server.url.split('://')[1]}"
                "/shard-{000000..000002}.tar")
    host = mlflow_server.split("://", 1)[1]
    work = tmp_path / "work"
    work.mkdir()
    args = [o for o in tiny(work, "data=shards", f"data.train={data_url}", "data.test=null",
                            "data.bank=null", "eval.at_end=false", "eval.every_epochs=0",
                            "data.max_bad_fraction=0.05", "data.num_classes=10",
                            "data.shuffle_buffer=1", "trainer.batch_size=8",
                            "trainer.checkpoint_every_steps=1",
                            "tracking.experiment=secrets-failing",
                            f"data.storage_options={{client_kwargs: {{headers: {{X-Auth-Token: "
                            f"{HEADER_TOKEN}}}}}}}", steps=40)
            if not o.startswith(("data.root=", "data.generate"))]
    env = cli_env(MLFLOW_TRACKING_URI=f"http://{USER}:{AT_PASSWORD}@{host}",
                  MLFLOW_HTTP_REQUEST_TIMEOUT="20")
    proc = subprocess.run([sys.executable, "-m", "sslstream.orchestration.cli", "train", *args],
                          cwd=work, env=env, capture_output=True, text=True, timeout=280)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "corrupt or missing" in proc.stderr, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "View run" in proc.stdout and host in proc.stdout, out[-3000:]
    _no_secret(out, "the run's stdout/stderr")
    assert list(work.rglob("step-*.pt"))  # it trained a few steps first
    assert _no_secret_in_files(work) > 0  # checkpoints (the stream's cursor), run markers
    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("secrets-failing").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.params["data.train"].startswith("http://***@127.0.0.1")
    _no_secret(repr(run.data.params) + repr(run.data.tags), "params and tags")
    dest = tmp_path / "artifacts"
    for a in client.list_artifacts(run.info.run_id):
        local = Path(client.download_artifacts(run.info.run_id, a.path, str(dest)))
        for p in [local] if local.is_file() else local.rglob("*"):
            if p.is_file():
                _no_secret(p.read_bytes().decode("utf-8", "replace"), f"artifact {p.name}")
