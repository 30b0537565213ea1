"""SIGINT / SIGTERM end `sslstream shards verify`, `shards index`, `train`, `eval` and `retrain`
promptly, whatever they are blocked in -- real subprocesses, real signals.

Each command is pointed at a loopback server that stops sending in the middle of a reply
(tests/fixtures/stall.py): shards whose ranged GETs hang (the reader is then blocked inside
the tar reader's first header, in a thread pool for verify / index / the stream's counting
pass), or an MLflow API that hangs (retrain's registry lookup). The signal is sent once the
server has seen the stall, so the phase is known, not guessed. Before, verify and index
waited for every started (and queued) shard at a Ctrl-C: with a hung read, forever.

EXIT_WITHIN_S is a liveness bound, not a speed one: what must not happen is waiting for the
stalled read (the server holds it for minutes); a process that imported torch needs a few
seconds to finalize on a loaded 2-core box.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.fixtures.shards import write_shard_set
from tests.fixtures.stall import StallServer
from tests.orchestration.test_train import cli_env, tiny

EXIT_WITHIN_S = 20.0
STARTUP_S = 240.0  # importing torch + MLflow under load, then reaching the stall


def _serve_shards(server: StallServer, root: Path, n: int) -> str:
    """`n` labelled shards served (every ranged read stalls); their brace pattern URL."""
    ss = write_shard_set(root, [6] * n, manifest=False)
    for u in ss.urls:
        name = Path(u).name
        server.files[name] = Path(u).read_bytes()
        server.stall.add(name)
    return f"{server.url}/shard-{{000000..{n - 1:06d}}}.tar"


def _tiny_on_shards(tmp: Path, *extra: str) -> list[str]:
    """tiny()'s overrides for `data=shards` (which has no synthetic generator keys)."""
    return [o for o in tiny(tmp, "data=shards", *extra)
            if not o.startswith(("data.root=", "data.generate"))]


def _signal_when_stalled(args: list[str], server: StallServer, sig: int, cwd: Path,
                         env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run `sslstream ARGS`, send `sig` once the server saw the stall; (rc, output, seconds
    from the signal to the exit)."""
    log = cwd / "output.txt"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sslstream.orchestration.cli", *args],
                                cwd=cwd, env=env or cli_env(), stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            if not server.stalled.wait(STARTUP_S):
                pytest.fail(f"never reached the stall; output:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)  # blocked in the read, not just entering it
            t0 = time.monotonic()
            proc.send_signal(sig)
            try:
                proc.wait(EXIT_WITHIN_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {EXIT_WITHIN_S:.0f} s after {signal.Signals(sig).name}; "
                            f"output:\n{log.read_text()[-3000:]}")
            return proc.returncode, log.read_text(), time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.timeout(300)
def test_verify_stops_at_sigint_with_shard_reads_hung_in_its_pool(stall_server, tmp_path):
    url = _serve_shards(stall_server, tmp_path / "data", 30)
    rc, out, _ = _signal_when_stalled(["shards", "verify", url, "--workers", "4"], stall_server,
                                      signal.SIGINT, tmp_path)
    assert rc == 130, out
    assert "stopped by SIGINT" in out and "Traceback" not in out, out
    assert "/30 shards" not in out, out  # no shard was reported as checked after the signal


@pytest.mark.timeout(300)
def test_index_stops_at_sigterm_with_shard_reads_hung_in_its_pool(stall_server, tmp_path):
    url = _serve_shards(stall_server, tmp_path / "data", 30)
    rc, out, _ = _signal_when_stalled(["shards", "index", url, "--label-key", "cls",  # no
                                       "--output", str(tmp_path / "manifest.json")],  # detection
                                      stall_server, signal.SIGTERM, tmp_path)  # read first
    assert rc == 143, out
    assert "stopped by SIGTERM" in out and "Traceback" not in out, out
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_train_stops_at_sigterm_inside_the_tar_reader(stall_server, tmp_path):
    """The stream's counting pass (no manifest) hangs in the tar reader of a pool thread."""
    url = _serve_shards(stall_server, tmp_path / "data", 3)
    args = ["train", *_tiny_on_shards(tmp_path, f"data.train={url}", "data.test=null",
                           "data.bank=null", "eval.at_end=false", "eval.every_epochs=0",
                           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")]
    rc, out, _ = _signal_when_stalled(args, stall_server, signal.SIGTERM, tmp_path)
    assert rc == 143, out
    assert "stopped by SIGTERM: while loading" in out and "Traceback" not in out, out


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_eval_stops_at_sigint_while_reading_its_split(stall_server, tmp_path):
    from sslstream.models.methods import build_method
    from sslstream.orchestration.schema import compose_checked

    url = _serve_shards(stall_server, tmp_path / "data", 2)
    overrides = _tiny_on_shards(tmp_path, f"data.train={url}", f"data.test={url}",
                     "data.num_classes=10", "eval.probe=false",
                     f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    cfg = compose_checked(overrides)
    ckpt = tmp_path / "step-00000001.pt"
    torch.save({"model": build_method(cfg.method, cfg.backbone).state_dict()}, ckpt)
    rc, out, _ = _signal_when_stalled(["eval", "--checkpoint", str(ckpt), *overrides],
                                      stall_server, signal.SIGINT, tmp_path)
    assert rc == 130, out
    assert "stopped by SIGINT" in out and "Traceback" not in out, out


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_retrain_stops_at_sigterm_while_the_registry_hangs(stall_server, tmp_path):
    """Snapshot taken, MLflow's /health answers, its API then hangs: exit 8 (preempted)."""
    stall_server.files["health"] = b"OK"
    stall_server.hang = ("api/",)
    args = ["retrain", f"data.root={tmp_path / 'data'}", "data.generate_train_samples=32",
            "data.generate_test_samples=32", *tiny(tmp_path)]
    env = cli_env(MLFLOW_TRACKING_URI=stall_server.url, MLFLOW_HTTP_REQUEST_TIMEOUT="300")
    rc, out, _ = _signal_when_stalled(args, stall_server, signal.SIGTERM, tmp_path, env)
    assert rc == 8, out
    assert "stopped by SIGTERM" in out and "Traceback" not in out, out


def test_the_server_stalls_reads_only():
    """The fixture itself: a plain GET is served whole, a ranged one stops after `cut`."""
    import urllib.request

    s = StallServer(cut=10)
    try:
        s.files["x.tar"] = bytes(range(100))
        s.stall.add("x.tar")
        with urllib.request.urlopen(f"{s.url}/x.tar", timeout=5) as r:
            assert r.read() == bytes(range(100))
        req = urllib.request.Request(f"{s.url}/x.tar", headers={"Range": "bytes=0-99"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.read(10) == bytes(range(10)) and s.stalled.wait(5)
    finally:
        s.close()
