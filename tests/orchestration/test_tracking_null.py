"""NullTracker: the no-op tracker of ranks > 0 and untracked runs, which never imports MLflow.

Held to the real Tracker's public interface (so the trainer cannot call a method that only
one of them has), and checked end to end: an untracked `sslstream train` in a fresh process
trains, evaluates and writes its checkpoint without `mlflow` ever entering `sys.modules`.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sslstream.orchestration.errors import RegistrationError
from sslstream.orchestration.tracking.null import NullTracker
from sslstream.orchestration.tracking.tracker import Tracker

from tests.orchestration.test_train import REPO, tiny


def _public(cls: type) -> dict[str, object]:
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_")}


def test_null_tracker_has_every_public_member_of_tracker_with_the_same_parameters():
    real, null = _public(Tracker), _public(NullTracker)
    missing = sorted(set(real) - set(null) - {"from_config", "settings"})
    assert not missing, f"NullTracker lacks {missing}"
    for name, member in real.items():
        if not callable(member) or isinstance(member, property) or name == "from_config":
            continue
        want = [p for p in inspect.signature(member).parameters.values() if p.name != "self"]
        got = [p for p in inspect.signature(null[name]).parameters.values() if p.name != "self"]
        assert [(p.name, p.kind, p.default) for p in got] == \
            [(p.name, p.kind, p.default) for p in want], name
    # an inactive real Tracker answers the same state
    inactive = Tracker({"enabled": False})
    for attr in ("active", "enabled", "resumed", "run_id"):
        assert getattr(NullTracker(), attr) == getattr(inactive, attr), attr


def test_null_tracker_refuses_to_log_or_register_a_model():
    t = NullTracker()
    assert t.start("run", {"a": 1}) is None
    t.log_metrics({"x": 1.0}, step=1)
    t.end("FAILED")
    with pytest.raises(RegistrationError, match="tracking is disabled"):
        t.log_encoder(object(), object())
    with pytest.raises(RegistrationError, match="tracking is disabled"):
        t.register_encoder("models:/m-1", {"knn": 0.5}, feature_dim=8)


_PROBE = """
import json, sys
from sslstream.orchestration.cli import main
rc = main(["train", *sys.argv[1:]])
print("PROBE " + json.dumps({"rc": rc, "mlflow": sorted(m for m in sys.modules
                              if m == "mlflow" or m.startswith("mlflow."))[:5]}))
"""


@pytest.mark.timeout(300)
def test_untracked_training_never_imports_mlflow(tmp_path: Path):
    args = tiny(tmp_path, "tracking.enabled=false", steps=4)
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=280, env={**__import__("os").environ,
                                                       "PYTHONPATH": str(REPO)})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    probe = json.loads(line[-1].removeprefix("PROBE "))
    assert probe["rc"] == 0, proc.stderr[-4000:]
    assert probe["mlflow"] == [], f"an untracked run imported {probe['mlflow']}"
    assert "knn" in (proc.stdout + proc.stderr).lower()
    assert list((tmp_path / "out").rglob("*.pt")), "no checkpoint written"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
