"""Messages name what the user typed, and say what to do (issue 16, items 4, 5 and 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sslstream.orchestration.cli import main


def _shards_args(tmp_path, train, test="/nonexistent/test-000000.tar"):
    return ["train", "data=shards", f"data.train={train}", f"data.test={test}",
            "tracking.enabled=false", f"trainer.output_dir={tmp_path / 'out'}"]


def test_a_bad_data_train_is_reported_as_data_train_not_data_bank(tmp_path, capsys):
    assert main(_shards_args(tmp_path, "/nonexistent/train-{000000..000003}.tar")) == 1
    err = capsys.readouterr().err
    assert "data.train=/nonexistent/train-{000000..000003}.tar" in err
    assert "data.bank" not in err and "Traceback" not in err


def test_cifar10_without_its_files_names_data_root_and_the_variable(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setenv("SSLSTREAM_CIFAR10", str(tmp_path / "no-cifar"))
    assert main(["train", "data=cifar10", "tracking.enabled=false",
                 f"trainer.output_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert f"data.root={tmp_path / 'no-cifar'}" in err
    assert "SSLSTREAM_CIFAR10=<folder>" in err and "does not exist" in err


def test_a_folder_of_plain_images_suggests_shards_make(tmp_path, capsys):
    src = tmp_path / "jpegs"
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / cls / "0.jpg")
    assert main(_shards_args(tmp_path, src)) == 1
    err = capsys.readouterr().err
    assert "is a folder of images, not WebDataset shards" in err
    assert f"sslstream shards make {src} <out>" in err


def test_a_short_run_says_it_is_alive_at_the_first_step(capsys):
    from sslstream.orchestration.train.monitor import Monitor

    mon = Monitor(every=10, total_steps=25, start_step=0, global_batch=4, is_main=True,
                  progress="log")
    for step in range(1, 13):
        mon.update(step, 0, torch.tensor(1.0), {}, 0.1)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert lines[0].startswith("step 1/25: first step done in")
    assert lines[1].startswith("step 10/25 |") and len(lines) == 2  # said once


def test_shard_progress_shows_no_rate_over_a_fraction_of_a_second(capsys, monkeypatch):
    from sslstream.pipelines.shards import tools

    p = tools._Progress(12, "shards")
    p.line(1, "verify")
    assert "/s" not in capsys.readouterr().err
    p.t0 -= 4.0  # four seconds later
    p.line(10, "verify")
    err = capsys.readouterr().err
    assert "2.5 shards/s" in err and "~1s left" in err


def test_pca_legend_names_the_classes():
    from sslstream.orchestration.tracking.plots import is_curve, plot_projection

    fig = plot_projection(np.random.default_rng(0).normal(size=(6, 2)), [0, 1, 2, 0, 1, 2],
                          title="t", class_names=["disc", "square", "triangle"])
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["disc", "square", "triangle"]
    assert legend.get_title().get_text() == "class"
    assert not is_curve([600]) and not is_curve([5, 5]) and is_curve([100, 200])


@pytest.mark.timeout(120)
def test_a_single_knn_point_draws_no_curve(tmp_path):
    """Through the Tracker (sqlite): kNN evaluated only at the end is a number, not a plot."""
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf
    from sslstream.orchestration.tracking.tracker import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker.from_config(OmegaConf.create({"uri": uri, "system_metrics": False}))
    run_id = tracker.start("r", {})
    for s in (1, 2, 3):
        tracker.log_metrics({"train/loss": 1.0 / s}, step=s)
    tracker.log_metrics({"eval/knn_acc": 0.4}, step=3)
    tracker.log_training_plots()
    tracker.end()
    arts = {a.path for a in MlflowClient(uri).list_artifacts(run_id, "plots")}
    assert arts == {"plots/loss.png"}


def test_the_run_log_reads_class_names_from_the_test_manifest(tmp_path):
    from types import SimpleNamespace

    from sslstream.orchestration.cli import compose_config
    from sslstream.orchestration.train.runlog import RunLog
    from sslstream.pipelines.shards.synthetic import CLASSES, ensure_synthetic

    ensure_synthetic(tmp_path / "d", train_samples=20, test_samples=20, image_size=8, seed=0)
    log = RunLog.__new__(RunLog)
    log.cfg = compose_config([f"data.root={tmp_path / 'd'}"])
    log.tracker = SimpleNamespace(active=True)
    assert log._class_names() == list(CLASSES)
    log.cfg.data.test = str(tmp_path / "missing")
    assert log._class_names() is None  # a legend is never worth failing a run for


def test_feature_extraction_progress_has_an_eta(tmp_path, monkeypatch, caplog):
    """A long final evaluation says how long it has left (issue 16, item 5)."""
    import logging

    import sslstream.orchestration.evaluate.run as run_mod
    from sslstream.models.methods import build_method
    from sslstream.orchestration.cli import compose_config
    from sslstream.orchestration.runtime.distributed import DistEnv
    from sslstream.pipelines.shards.synthetic import ensure_synthetic

    ensure_synthetic(tmp_path / "d", train_samples=64, test_samples=32, image_size=8, seed=0)
    cfg = compose_config([f"data.root={tmp_path / 'd'}", "data.num_workers=1", "eval.batch_size=16",
                          "eval.probe=false", "eval.knn_k=5", "augment.view1.size=8",
                          "augment.view2.size=8", "backbone.widths=[8,8,8,8]",
                          "trainer.loader_backend=torchvision"])
    method = build_method(cfg.method, cfg.backbone)
    monkeypatch.setattr(run_mod, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="sslstream.eval"):
        run_mod.evaluate(cfg, method, DistEnv(0, 1, 0, torch.device("cpu")))
    lines = [r.getMessage() for r in caplog.records if "features 16/64 samples" in r.getMessage()]
    assert lines and "s left)" in lines[0], [r.getMessage() for r in caplog.records]
