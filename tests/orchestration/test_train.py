"""`sslstream train` end to end (CPU): the CLI in a subprocess with a local sqlite MLflow
store, a NaN run that registers nothing, a collapsed run that is not promoted.

Sizes are tiny (16 px, resnet_mini with narrow widths, a few steps) so the file stays
within the test budget on a 2-core machine; the embedded default's real sizes are timed in
BENCHMARKS.md instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from sslstream.orchestration.cli import main
from sslstream.orchestration.runtime import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]


def tiny(tmp: Path, *extra: str, steps: int = 6) -> list[str]:
    """Overrides for a seconds-long CPU run under `tmp` (data, checkpoints)."""
    return [
        f"data.root={tmp / 'data'}",
        "data.generate_train_samples=160",
        "data.generate_test_samples=60",
        "data.image_size=16",
        "data.num_workers=1",
        "augment.view1.size=16",
        "augment.view2.size=16",
        "recipe=cifar",  # resnet_mini at 16 px on every data (shards default to imagenet)
        "backbone.widths=[8,16,16,32]",
        "method.proj_hidden_dim=64",
        "method.pred_hidden_dim=64",
        "method.proj_output_dim=32",
        "trainer.batch_size=16",
        f"trainer.max_steps={steps}",
        "trainer.num_threads=1",
        "trainer.loader_threads=auto",  # the default path (derived from the cores)
        "trainer.progress=log",
        "trainer.log_every_steps=2",
        "trainer.checkpoint_every_steps=4",
        f"trainer.output_dir={tmp / 'out'}",
        "eval.batch_size=64",
        "eval.knn_k=20",
        "eval.probe_epochs=5",
        "tracking.system_metrics=false",
        "tracking.plots=false",
        *extra,
    ]


def sqlite_uri(cwd: Path) -> str:
    return f"sqlite:///{cwd.resolve() / 'mlflow.db'}"


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", **extra)
    return env


@pytest.mark.timeout(240)
def test_default_run_end_to_end_from_the_cli(tmp_path, capsys):
    """`sslstream train` in a fresh cwd: data generated, trained, evaluated, registered."""
    proc = subprocess.run(
        [sys.executable, "-m", "sslstream.orchestration.cli", "train", *tiny(tmp_path, "eval.every_epochs=1", steps=20)],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=220,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "kNN accuracy: " in proc.stdout
    assert "registered model: models:/sslstream-encoder/1 (champion)" in proc.stdout
    assert "step 20/20" in proc.stdout and "img_per_s" in proc.stdout
    assert "epoch 1: kNN accuracy" in proc.stdout  # the periodic evaluation (every epoch)
    # the local sqlite store in the cwd holds the run, its metrics and the champion
    client = MlflowClient(tracking_uri=sqlite_uri(tmp_path))
    mv = client.get_model_version_by_alias("sslstream-encoder", "champion")
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED"
    knn = run.data.metrics["eval/knn_acc"]
    assert f"kNN accuracy: {knn:.4f}" in proc.stdout
    assert {"train/loss", "train/lr", "train/tau", "train/embedding_std", "train/effective_rank",
            "train/grad_norm", "perf/img_per_s", "perf/data_wait_frac"} <= set(run.data.metrics)
    assert run.data.metrics["eval/bank_size"] == 160 and run.data.metrics["eval/test_size"] == 60
    assert run.data.metrics["eval/seconds"] > 0
    assert any(k.startswith("data/") for k in run.data.metrics)  # the loader's counters
    assert run.data.params["method.name"] == "byol"
    knn_history = client.get_metric_history(run.info.run_id, "eval/knn_acc")
    assert sorted(m.step for m in knn_history) == [10, 20]
    # the data set was generated in data.root, the final checkpoint is in output_dir/run_name
    assert (tmp_path / "data" / "train" / "manifest.json").is_file()
    last = ckpt.latest_checkpoint(tmp_path / "out" / "byol-synthetic")
    assert last is not None and last.name == "step-00000020.pt"
    state = ckpt.load_checkpoint(last)
    assert state["step"] == 20 and state["run_id"] == mv.run_id
    # every state a resume needs (checked bit for bit in test_train_resume.py)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "loaders", "epoch", "epoch_step",
            "total_steps", "world_size", "global_batch"} <= set(state)
    assert {"torch", "python", "numpy"} <= set(state["rng"][0]) and state["loaders"][0]
    assert any(k.startswith("momentum.target.") for k in state["model"])  # the EMA target

    # the same command again: finished and registered, so nothing is trained or registered
    os.chdir(tmp_path)
    try:
        assert main(["train", *tiny(tmp_path, "eval.every_epochs=1", steps=20)]) == 0
    finally:
        os.chdir(REPO)
    assert "already finished at step 20 and was registered as models:/sslstream-encoder/1" in capsys.readouterr().out
    assert len(client.search_model_versions("name='sslstream-encoder'")) == 1

    # warm start a new run from the registered champion (lr 0: the weights stay the warm ones)
    os.environ["MLFLOW_TRACKING_URI"] = sqlite_uri(tmp_path)
    os.chdir(tmp_path)
    try:
        assert main(["train", *tiny(tmp_path, "run_name=warm", "trainer.init_from=models:/sslstream-encoder@champion",
                                    "optim.lr=0", "eval.at_end=false", steps=1)]) == 0
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.chdir(REPO)
    warm = ckpt.load_checkpoint(tmp_path / "out" / "warm" / "step-00000001.pt")["model"]
    for k, v in state["model"].items():
        if k.startswith("backbone.") and "running" not in k and "num_batches" not in k:
            assert torch.equal(warm[k], v), k

    # `sslstream eval` on that checkpoint and on the registered champion: the same kNN
    os.environ["MLFLOW_TRACKING_URI"] = sqlite_uri(tmp_path)
    os.chdir(tmp_path)
    try:
        for args in (["--checkpoint", str(last)], ["--model", "models:/sslstream-encoder@champion"]):
            assert main(["eval", *args, *tiny(tmp_path)]) == 0
            assert f"kNN accuracy: {knn:.4f}" in capsys.readouterr().out
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.chdir(REPO)


@pytest.mark.timeout(120)
def test_exploding_lr_stops_and_registers_nothing(in_tmp_cwd, capsys):
    """An absurd SGD lr blows the weights up: exit 1, nothing registered, the MLflow run
    FAILED, and no checkpoint on disk holds a non-finite tensor."""
    rc = main(["train", *tiny(in_tmp_cwd, "optim=sgd", "optim.lr=1e30", "trainer.grad_clip=null",
                              "trainer.checkpoint_every_steps=1", steps=12)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "non-finite" in err and "Nothing was registered" in err
    client = MlflowClient(tracking_uri=sqlite_uri(in_tmp_cwd))
    assert client.search_registered_models() == []
    runs = client.search_runs([client.get_experiment_by_name("sslstream").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    for p in ckpt.list_checkpoints(in_tmp_cwd / "out" / "byol-synthetic"):
        state = ckpt.load_checkpoint(p)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.timeout(120)
def test_nan_loss_keeps_the_last_good_state(in_tmp_cwd, capsys, monkeypatch):
    """A NaN loss at step 6 (injected into the method): the bad step is never applied, the
    state after 6 good steps is checkpointed, the run fails with the step number."""
    from sslstream.models.methods.byol import BYOL

    real = BYOL.training_step
    calls = {"n": 0}

    def nan_at_step_6(self, views):
        loss, metrics = real(self, views)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 7 else loss), metrics

    monkeypatch.setattr(BYOL, "training_step", nan_at_step_6)
    rc = main(["train", *tiny(in_tmp_cwd, "tracking.enabled=false", steps=12)])
    assert rc == 1
    assert "non-finite loss at step 6" in capsys.readouterr().err
    run_dir = in_tmp_cwd / "out" / "byol-synthetic"
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-00000004.pt", "step-00000006.pt"]
    state = ckpt.load_checkpoint(run_dir / "step-00000006.pt")
    assert state["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.timeout(120)
def test_nan_between_sparse_checks_is_caught_and_never_checkpointed(in_tmp_cwd, capsys, monkeypatch):
    """The CUDA setting (check every N steps, here 4): a NaN at step 6 is applied unseen,
    caught at the check of step 7, and the poisoned weights are never written."""
    from sslstream.models.methods.byol import BYOL

    real = BYOL.training_step
    calls = {"n": 0}

    def nan_from_step_6(self, views):
        loss, metrics = real(self, views)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 7 else loss), metrics

    monkeypatch.setattr(BYOL, "training_step", nan_from_step_6)
    rc = main(["train", *tiny(in_tmp_cwd, "tracking.enabled=false", "trainer.check_every_steps=4", steps=12)])
    assert rc == 1
    assert "non-finite loss at step 7" in capsys.readouterr().err
    run_dir = in_tmp_cwd / "out" / "byol-synthetic"
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-00000004.pt"]


@pytest.mark.timeout(180)
def test_collapsed_run_is_registered_but_never_promoted(in_tmp_cwd, capsys):
    """A healthy run becomes champion; an over-regularised SimSiam without stop-gradient
    (weight decay 5 drives every feature to a constant) is registered as challenger, never
    champion, with the collapse as the reason (checked before any accuracy comparison)."""
    assert main(["train", *tiny(in_tmp_cwd, steps=4)]) == 0
    capsys.readouterr()
    rc = main(["train", *tiny(in_tmp_cwd, "method=simsiam", "method.stop_gradient=false",
                              "method.proj_hidden_dim=64", "method.proj_output_dim=32",
                              "method.pred_hidden_dim=16", "optim=sgd", "optim.lr=0.5",
                              "optim.weight_decay=5", "trainer.warmup_epochs=0", steps=30)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "registered model: models:/sslstream-encoder/2 (challenger: collapsed" in out
    client = MlflowClient(tracking_uri=sqlite_uri(in_tmp_cwd))
    assert str(client.get_model_version_by_alias("sslstream-encoder", "champion").version) == "1"
    v2 = client.get_model_version_by_alias("sslstream-encoder", "challenger")
    assert str(v2.version) == "2" and v2.tags["promoted"] == "false"
    assert v2.tags["promotion_reason"].startswith("collapsed")


def test_cfg_prints_the_resolved_config(capsys, in_tmp_cwd):
    assert main(["train", "--cfg", "trainer.epochs=7", "method=simclr"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 7" in out and "name: simclr" in out
    assert "run_name: simclr-synthetic" in out  # interpolations resolved
    assert "${" not in out


@pytest.mark.timeout(120)
def test_registration_failure_keeps_the_checkpoint_and_fails(in_tmp_cwd, capsys, monkeypatch):
    """MLflow unreachable (nothing listens on the port): training goes on untracked, then
    registration fails: exit 1, a clear message, the final checkpoint on disk."""
    from tests.ddp import free_port

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc = main(["train", *tiny(in_tmp_cwd, f"tracking.uri=http://127.0.0.1:{free_port()}",
                              "tracking.probe_timeout_s=2", steps=4)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "FAILED to register the encoder" in err and "unreachable" in err
    assert "final checkpoint is kept" in err
    last = ckpt.latest_checkpoint(in_tmp_cwd / "out" / "byol-synthetic")
    assert last is not None and ckpt.load_checkpoint(last)["step"] == 4


@pytest.mark.timeout(60)
def test_resume_false_refuses_to_mix_with_existing_checkpoints(in_tmp_cwd, capsys):
    args = tiny(in_tmp_cwd, "tracking.enabled=false", "eval.at_end=false", steps=2)
    assert main(["train", *args]) == 0
    assert main(["train", *args, "trainer.resume=false"]) == 1
    assert re.search("trainer.resume=false but .* already holds checkpoints", capsys.readouterr().err)
    # resuming a finished run is a no-op that ends at the same step
    assert main(["train", *args]) == 0
    assert [p.name for p in ckpt.list_checkpoints(in_tmp_cwd / "out" / "byol-synthetic")] == ["step-00000002.pt"]


@pytest.mark.timeout(60)
def test_warm_start_from_a_checkpoint_copies_backbone_and_target(in_tmp_cwd, capsys):
    base = tiny(in_tmp_cwd, "tracking.enabled=false", "eval.at_end=false", steps=3)
    assert main(["train", *base]) == 0
    src = ckpt.load_checkpoint(in_tmp_cwd / "out" / "byol-synthetic" / "step-00000003.pt")["model"]
    assert main(["train", *base, "run_name=warm", "optim.lr=0", "trainer.max_steps=1",
                 f"trainer.init_from={in_tmp_cwd / 'out' / 'byol-synthetic' / 'step-00000003.pt'}"]) == 0
    got = ckpt.load_checkpoint(in_tmp_cwd / "out" / "warm" / "step-00000001.pt")["model"]
    weights = [k for k in src if k.startswith("backbone.") and k.endswith(("weight", "bias"))]
    assert weights
    for k in weights:
        assert torch.equal(got[k], src[k]), k
        # BYOL's momentum target (momentum.target.0 = the backbone) starts from the warm weights
        assert torch.equal(got["momentum.target.0." + k[len("backbone."):]], src[k]), k
    assert main(["train", *base, "run_name=warm2", "trainer.init_from=/no/such/file.pt"]) == 1
    err = capsys.readouterr().err
    assert "trainer.init_from=/no/such" in err and "Traceback" not in err


@pytest.mark.timeout(300)
def test_gpu_default_paths_bf16_channels_last_and_compile_run_on_cpu(tmp_path):
    """What a CUDA run turns on by default -- bf16 autocast, channels_last weights and
    batches, bf16 batches from the loader -- plus torch.compile of the backbones, run here
    on the CPU (the CUDA kernels differ, the trainer's logic does not): 4 compiled steps,
    evaluation, a checkpoint whose keys are the uncompiled ones, then a resume of it
    without compile to step 6."""
    common = ["tracking.enabled=false", "trainer.precision=bf16", "trainer.channels_last=true",
              "trainer.loader_dtype=bf16"]
    runs = []
    for steps, extra in ((4, ["trainer.compile=true"]), (6, [])):
        proc = subprocess.run(
            [sys.executable, "-m", "sslstream.orchestration.cli", "train",
             *tiny(tmp_path, *common, *extra, steps=steps)],
            cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=280)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        assert f"step {steps}/{steps}" in proc.stdout and "kNN accuracy: " in proc.stdout
        assert not re.search(r"loss (nan|inf)", proc.stdout)
        runs.append(proc.stdout)
    assert ("bf16 autocast, channels_last, compiled backbones; views from dali (bf16"
            in runs[0]), runs[0][:2000]
    assert "6 steps" in runs[1] and "bf16 autocast, channels_last; views from dali (bf16" in runs[1]
    assert "resuming byol-synthetic from" in runs[1] and "(step 4/6)" in runs[1]
    run_dir = tmp_path / "out" / "byol-synthetic"
    first = ckpt.load_checkpoint(run_dir / "step-00000004.pt")["model"]
    assert not [k for k in first if "_orig_mod" in k]  # compile kept the keys
    last = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert last["step"] == 6
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.timeout(120)
def test_evaluation_reports_progress_while_extracting_features(in_tmp_cwd, caplog, monkeypatch):
    """Embedding a large bank takes minutes: rank 0 logs the count so far (every
    PROGRESS_EVERY_S, here every batch) and each split's total and time."""
    import logging

    from sslstream.orchestration.evaluate import run as ev

    monkeypatch.setattr(ev, "PROGRESS_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="sslstream.eval")
    assert main(["train", *tiny(in_tmp_cwd, "tracking.enabled=false", "eval.probe=false",
                                steps=2)]) == 0
    lines = [r.getMessage() for r in caplog.records
             if r.name == "sslstream.eval" and " features " in r.getMessage()]
    assert [ln.split(" samples")[0] for ln in lines if "features of" not in ln] == [
        "eval: bank features 64/160", "eval: bank features 128/160", "eval: bank features 160/160",
        "eval: test features 60/60"]
    assert [ln.split(" in ")[0] for ln in lines if "features of" in ln] == [
        "eval: bank features of 160 samples", "eval: test features of 60 samples"]
