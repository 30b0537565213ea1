"""DINO, SwAV and MoCo v3 resume bit-exactly through the trainer: N steps in one run equal
N/2 steps, the checkpoint, and N/2 more steps in a new process state (CPU, one thread).

Each run crosses epochs so that every piece of state matters after the resume: DINO's center
and teacher (and the teacher temperature warm-up and the last layer frozen in epoch 0), SwAV's
feature queues (filled from epoch 1, full and in the Sinkhorn when the run resumes) and its
prototypes (frozen in epoch 0), MoCo v3's key encoder and its momentum step. The checkpoint
falls mid-epoch (step 6 of 4-step epochs), so the loader cursor and the RNG matter too.
tests/orchestration/test_train_resume.py does the same for BYOL through SIGTERM / SIGKILL.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from sslstream.orchestration.cli import compose_config
from sslstream.orchestration.runtime import checkpoint as ckpt
from sslstream.orchestration.train.loop import train

pytestmark = pytest.mark.timeout(240)

STEPS, HALF = 12, 6  # 64 samples / batch 16: 4 steps per epoch, 3 epochs

HEADS = ["method.proj_hidden_dim=32", "method.proj_output_dim=16"]
LOCAL = ["augment.local.count=2", "augment.local.size=8"]
CASES = {
    "dino": ["method=dino", *HEADS, "method.out_dim=64", "method.teacher_temp=0.07",
             "method.warmup_teacher_temp_epochs=2", *LOCAL],
    "swav": ["method=swav", *HEADS, "method.n_prototypes=20", "method.queue_size=32",
             "method.queue_start_epoch=1", "method.freeze_prototypes_epochs=1", *LOCAL],
    "mocov3": ["method=mocov3", *HEADS, "method.pred_hidden_dim=32"],
}
# state that must have moved by the checkpoint (else the comparison would prove little)
MOVED = {"dino": ["center.center", "momentum.step"],
         "swav": ["queues.0.keys", "queues.1.filled"],
         "mocov3": ["momentum.step"]}


def _overrides(tmp: Path, out: str, method: list[str]) -> list[str]:
    return [
        f"data.root={tmp / 'data'}", "data.generate_train_samples=64",
        "data.generate_test_samples=20", "data.image_size=16", "data.num_workers=1",
        "recipe=cifar", "augment.view1.size=16", "augment.view2.size=16",
        "backbone.widths=[8,16,16,32]", *method,
        "trainer.batch_size=16", f"trainer.max_steps={STEPS}", "trainer.num_threads=1",
        "trainer.progress=log", f"trainer.checkpoint_every_steps={HALF}", "trainer.keep_last=5",
        f"trainer.output_dir={tmp / out}", "tracking.enabled=false", "eval.at_end=false",
        "eval.every_epochs=0",
    ]


@pytest.mark.parametrize("name", sorted(CASES))
def test_half_run_checkpoint_and_resume_equal_the_whole_run_bitwise(name, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    cfg = compose_config(_overrides(tmp_path, "ref", CASES[name]))
    ref = train(cfg)
    assert ref.step == STEPS and ref.status == "completed"
    ref_dir = tmp_path / "ref" / str(cfg.run_name)
    half = ref_dir / f"step-{HALF:08d}.pt"
    expected = ckpt.load_checkpoint(ref_dir / f"step-{STEPS:08d}.pt")

    saved = ckpt.load_checkpoint(half)
    assert (saved["step"], saved["epoch"], saved["epoch_step"]) == (HALF, 1, 2)  # mid-epoch
    fresh = compose_config(_overrides(tmp_path, "fresh", CASES[name]))
    from sslstream.models.methods import build_method

    torch.manual_seed(0)
    initial = build_method(fresh.method, fresh.backbone).state_dict()
    for key in MOVED[name]:
        assert not torch.equal(saved["model"][key], initial[key]), key

    run_dir = tmp_path / "run" / str(cfg.run_name)
    run_dir.mkdir(parents=True)
    for name_ in (half.name, ckpt.manifest_name(HALF)):  # a run that stopped after HALF steps
        shutil.copy(ref_dir / name_, run_dir / name_)       # (a checkpoint counts once published)
    capsys.readouterr()
    res = train(compose_config(_overrides(tmp_path, "run", CASES[name])))
    assert f"(step {HALF}/{STEPS})" in capsys.readouterr().out  # it resumed
    assert res.step == STEPS
    got = ckpt.load_checkpoint(run_dir / f"step-{STEPS:08d}.pt")
    assert got["model"].keys() == expected["model"].keys()
    for k, v in expected["model"].items():
        assert torch.equal(got["model"][k], v), f"{name}: model.{k} differs after resume"
    for a, b in zip(got["optimizer"]["state"].values(), expected["optimizer"]["state"].values(),
                    strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: optimizer state {k} differs after resume"
    assert got["scheduler"] == expected["scheduler"]
