"""Metrics never wait on MLflow: a server that answers after 5 s does not slow the steps."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
from mlflow.tracking import MlflowClient
from sslstream.orchestration.schema.tracking import HttpSettings
from sslstream.orchestration.tracking.sender import BackgroundSender
from sslstream.orchestration.tracking.tracker import Tracker, TrackingSettings


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    delay_s = 5.0
    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        time.sleep(self.delay_s)
        self.seen.append(json.loads(body or b"{}").get("run_id", ""))
        out = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST  # /health and anything else: slow too  # noqa: N815

    def log_message(self, *a) -> None:
        pass


@pytest.fixture
def slow_server():
    _SlowHandler.seen = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.timeout(60)
def test_steps_run_at_full_rate_beside_a_server_answering_after_5_s(slow_server, monkeypatch):
    """A run already open against a server whose every answer takes 5 s: 40 steps of 10 ms
    with metrics every step take ~0.4 s (not 40 x 5 s); the queue (size 4) fills, the rest is
    dropped and counted; `end` gives up on the queue after metrics_flush_s."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = TrackingSettings(uri=slow_server, system_metrics=False, metrics_queue=4,
                                metrics_flush_s=1.0, http=HttpSettings(timeout_s=30, max_retries=0))
    tracker = Tracker(settings)
    # as if start() had succeeded earlier (the server was fast then)
    tracker._start_args = ("slow", {}, {}, None)
    tracker.run_id, tracker._client = "r" * 32, MlflowClient(slow_server)
    steps = []
    t0 = time.monotonic()
    for step in range(40):
        s0 = time.monotonic()
        time.sleep(0.01)  # the "step"
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
        steps.append(time.monotonic() - s0)
    loop_s = time.monotonic() - t0
    assert loop_s < 2.0, loop_s                      # 40 synchronous calls: >= 200 s
    assert max(steps) < 0.5, max(steps)              # no step waited on the server
    assert tracker.dropped_metrics >= 40 - 4 - 1 - 1  # queue of 4 + one in flight
    t1 = time.monotonic()
    tracker.end()
    # bounded: flush 1 s + the call in flight (5 s) + set_terminated (5 s)
    assert time.monotonic() - t1 < 20
    assert tracker.dropped_metrics >= 40 - 1 - 1


def test_sender_keeps_order_and_flushes():
    got = []
    s = BackgroundSender(lambda x: (time.sleep(0.001), got.append(x)), maxsize=100)
    for i in range(50):
        assert s.put(i)
    assert s.flush(5.0) and got == list(range(50)) and s.dropped == 0
    s.close()
    blocker = threading.Event()
    s2 = BackgroundSender(lambda x: blocker.wait(5), maxsize=2)
    results = [s2.put(i) for i in range(10)]
    assert results[:2] == [True, True] and results.count(False) >= 6 and s2.dropped >= 6
    blocker.set()
    s2.close(2.0)
