"""SIGINT / SIGTERM in every phase of `sslstream train` (orchestration/runtime/interrupt.py):
a resumable state, exit 128 + signal, the MLflow run KILLED (never FAILED or RUNNING), and
the same command resumes. The signal is sent to this process from inside the phase (a real
signal through the real handler, deterministic timing)."""

from __future__ import annotations

import os
import shlex
import signal
from pathlib import Path

import pytest
from sslstream.orchestration.cli import main
from sslstream.orchestration.runtime import checkpoint as ckpt
from sslstream.orchestration.runtime.interrupt import Interrupted, Interrupts
from sslstream.orchestration.train.runlog import REGISTERED_MARKER

from tests.orchestration.test_train import tiny


def _kill(sig: int) -> None:
    os.kill(os.getpid(), sig)


def test_a_repeated_sigusr1_is_a_notice_never_an_insistence():
    """Under torchrun a worker may get Slurm's SIGUSR1 twice (directly and forwarded by its
    agent): the second must not abort the checkpoint the first one asked for."""
    it = Interrupts()
    assert it.install()
    try:
        with it.deferred():
            _kill(signal.SIGUSR1)
            _kill(signal.SIGUSR1)
            assert it.requested and it.signum == signal.SIGUSR1
        with pytest.raises(Interrupted) as ei:  # outside the steps: stops at once, once
            it.reset()
            _kill(signal.SIGUSR1)
        _kill(signal.SIGUSR1)  # arrives while the first is being handled: ignored
        assert ei.value.exit_code == 138
        with it.deferred(), pytest.raises(Interrupted):
            _kill(signal.SIGTERM)  # a real second signal still insists
    finally:
        it.uninstall()


def test_deferred_signal_only_sets_the_flag_and_a_second_one_raises():
    it = Interrupts()
    assert it.install()
    try:
        with it.deferred():
            _kill(signal.SIGTERM)
            assert it.requested and it.signum == signal.SIGTERM
            with pytest.raises(Interrupted) as ei:
                _kill(signal.SIGINT)
        assert ei.value.exit_code == 130  # the signal that stopped it
        it.reset()
        with pytest.raises(Interrupted) as ei:
            _kill(signal.SIGINT)
        assert ei.value.exit_code == 130 and isinstance(ei.value, KeyboardInterrupt)
    finally:
        it.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not it._handle


def _status(uri: str, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id).info.status


MIXED = {"loading": signal.SIGINT, "training": signal.SIGINT, "evaluating": signal.SIGTERM,
         "final": signal.SIGTERM, "registering": signal.SIGINT}
USR1 = dict.fromkeys(MIXED, signal.SIGUSR1)  # Slurm's notice before the time limit


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sigs", [MIXED, USR1], ids=["sigint-sigterm", "sigusr1"])
def test_signals_in_each_phase_keep_the_work_and_mark_the_run_killed(tmp_path, monkeypatch,
                                                                    capsys, sigs):
    """One run, stopped in every phase in turn, each rerun resuming where the last stopped:
    loading -> training (at step 2: checkpoint at the next boundary) -> periodic evaluation
    (checkpoint of the finished epoch) -> final evaluation -> registration -> completes and
    registers. Exit 128 + signal each time (138 for SIGUSR1, docs/cluster.md)."""
    import sslstream.orchestration.tracking.tracker as tracker_mod
    import sslstream.orchestration.train.job as job_mod
    import sslstream.orchestration.train.loop as loop_mod

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["train", *tiny(tmp_path, f"tracking.uri={uri}", "trainer.checkpoint_every_steps=100",
                           "eval.probe=false", "eval.every_epochs=1", steps=12)]  # 10 steps/epoch
    run_dir = tmp_path / "out" / "byol-synthetic"
    armed: dict[str, int] = {}

    def arm(phase: str, sig: int) -> None:
        armed.clear()
        armed[phase] = sig

    def fire(phase: str) -> None:
        if phase in armed:
            _kill(armed.pop(phase))

    def name(phase: str) -> str:
        return signal.Signals(sigs[phase]).name

    real_loader, real_step = job_mod.build_loader, loop_mod.train_step
    real_eval, real_register = loop_mod.evaluate, tracker_mod.Tracker.register_encoder
    monkeypatch.setattr(job_mod, "build_loader",
                        lambda *a, **k: (fire("loading"), real_loader(*a, **k))[1])
    monkeypatch.setattr(loop_mod, "train_step", lambda *a, **k: (
        fire("training") if k["step"] == 2 else None, real_step(*a, **k))[1])
    monkeypatch.setattr(loop_mod, "evaluate", lambda *a, **k: (fire("evaluating"),
                                                               real_eval(*a, **k))[1])
    monkeypatch.setattr(tracker_mod.Tracker, "register_encoder", lambda self, *a, **k: (
        fire("registering"), real_register(self, *a, **k))[1])

    # 1) loading: nothing to keep yet, no MLflow run was started
    arm("loading", sigs["loading"])
    assert main(argv) == 128 + sigs["loading"]
    err = capsys.readouterr().err
    assert f"stopped by {name('loading')}: while loading" in err and "Traceback" not in err
    assert ckpt.latest_checkpoint(run_dir) is None

    # 2) training: the steps stop at the next boundary, after a checkpoint
    arm("training", sigs["training"])
    assert main(argv) == 128 + sigs["training"]
    out = capsys.readouterr().out
    assert f"stopped by {name('training')} at step 4/12" in out
    assert "run the same command again" in out
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert state["step"] == 4
    run_id = state["run_id"]
    assert _status(uri, run_id) == "KILLED"

    # 3) the periodic evaluation at the end of epoch 0: that step is checkpointed
    arm("evaluating", sigs["evaluating"])
    assert main(argv) == 128 + sigs["evaluating"]
    captured = capsys.readouterr()
    assert "resuming byol-synthetic from" in captured.out and "(step 4/12)" in captured.out
    assert f"stopped by {name('evaluating')}: while evaluating at step 10/12" in captured.err
    assert ckpt.latest_checkpoint(run_dir).name == "step-00000010.pt"
    assert _status(uri, run_id) == "KILLED"

    # 4) final evaluation: the final checkpoint is kept, the run is KILLED
    arm("evaluating", sigs["final"])
    assert main(argv) == 128 + sigs["final"]
    captured = capsys.readouterr()
    assert "(step 10/12)" in captured.out
    assert (f"stopped by {name('final')}: while evaluating after the last step 12"
            in captured.err)
    assert ckpt.latest_checkpoint(run_dir).name == "step-00000012.pt"
    assert _status(uri, run_id) == "KILLED"
    assert not (run_dir / REGISTERED_MARKER).exists()

    # 5) registration
    arm("registering", sigs["registering"])
    assert main(argv) == 128 + sigs["registering"]
    assert "while registering" in capsys.readouterr().err
    assert _status(uri, run_id) == "KILLED"
    assert not (run_dir / REGISTERED_MARKER).exists()

    # 6) the same command finishes the same run
    armed.clear()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "registered model: models:/sslstream-encoder/1" in out
    assert _status(uri, run_id) == "FINISHED"
    assert (run_dir / REGISTERED_MARKER).is_file()
    if sigs is USR1:
        return

    # 7) the printed load command works from another folder (and creates nothing there)
    line = next(x for x in out.splitlines() if "load it from any folder:" in x)
    env, _, rest = line.split("load it from any folder: ")[1].partition(" sslstream eval --model ")
    assert env == f"MLFLOW_TRACKING_URI={uri}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env.partition("=")[2])
    keep = ("eval.", "trainer.num_threads")  # the data: the printed command names it
    assert main(["eval", "--model", *shlex.split(rest), *[o for o in argv if o.startswith(keep)]]) == 0
    captured = capsys.readouterr()
    assert "kNN accuracy:" in captured.out
    assert "Downloading artifacts" not in captured.err  # no per-file bar (issue 16, item 5)
    assert list(elsewhere.iterdir()) == []


def _retrain_cfg(tmp: Path):
    from sslstream.orchestration.cli import compose_config

    return compose_config(tiny(tmp, "tracking.enabled=false"))


def test_retrain_maps_a_signal_in_training_to_exit_preempted(monkeypatch):
    """`sslstream retrain`: Interrupted from the trainer (any phase) is EXIT_PREEMPTED (8),
    a lease lost while the trainer checkpointed is EXIT_LEASE_LOST (7)."""
    from omegaconf import OmegaConf
    from sslstream.orchestration.retrain.exits import EXIT_LEASE_LOST, EXIT_PREEMPTED, RetrainExit
    from sslstream.orchestration.retrain.job import _run_training

    class FakeLease:
        def __init__(self, lose: bool) -> None:
            self.lose = lose

        def start_heartbeat(self, on_lost, period):
            if self.lose:
                on_lost("lease expired")

    tcfg = OmegaConf.create({"run_name": "k"})

    def interrupted(cfg):
        raise Interrupted(signal.SIGTERM, "while evaluating")

    with pytest.raises(RetrainExit) as ei:
        _run_training(interrupted, tcfg, FakeLease(False), 1.0)
    assert ei.value.code == EXIT_PREEMPTED and "SIGTERM" in str(ei.value)

    class Preempted:
        status = "preempted"

    with pytest.raises(RetrainExit) as ei:
        _run_training(lambda cfg: Preempted(), tcfg, FakeLease(True), 1.0)
    assert ei.value.code == EXIT_LEASE_LOST


def test_retrain_stopped_outside_training_exits_preempted(monkeypatch, capsys):
    from sslstream.orchestration.retrain import job as R

    def stopped(cfg, **kw):
        raise Interrupted(signal.SIGINT, "while taking the snapshot")

    monkeypatch.setattr(R, "_retrain", stopped)
    assert R.retrain(None) == R.EXIT_PREEMPTED
    assert "stopped by SIGINT: while taking the snapshot" in capsys.readouterr().err
