"""`sslstream train method=dino|mocov3|swav` and `backbone=vit_tiny|vit_small|vit_base` on the
embedded default data set: trained, evaluated and registered from the CLI like the seven
ResNet methods (tests/orchestration/test_train.py), at a few steps on 16 px images.

ViT-Base (86 M parameters, a 340 MB encoder to log) is checked through ``--cfg`` and one
in-process training step instead of a whole run; ViT-Tiny and ViT-Small run the whole way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from sslstream.models.methods import build_method
from sslstream.orchestration.cli import compose_config, main

from tests.orchestration.test_train import sqlite_uri


def _small(tmp: Path, backbone: str | None, *extra: str) -> list[str]:
    """A seconds-long run on the embedded default (16 px, small heads, 4 steps); the
    recipe's resnet_mini made narrower, or ``backbone`` (a preset)."""
    return [
        f"data.root={tmp / 'data'}", "data.generate_train_samples=64",
        "data.generate_test_samples=20", "data.image_size=16", "data.num_workers=1",
        "augment.view1.size=16", "augment.view2.size=16", "recipe=cifar",
        f"backbone={backbone}" if backbone else "backbone.widths=[8,16,16,32]",
        "method.proj_hidden_dim=32", "method.proj_output_dim=16",
        "trainer.batch_size=16", "trainer.max_steps=4", "trainer.num_threads=1",
        "trainer.progress=log", "trainer.checkpoint_every_steps=0",
        f"trainer.output_dir={tmp / 'out'}", "eval.batch_size=64", "eval.knn_k=5",
        "eval.probe_epochs=2", "tracking.system_metrics=false", "tracking.plots=false", *extra,
    ]


RUNS = [  # (method, backbone preset or None, more overrides): registered as versions 1, 2, ...
    ("dino", None, ["method.out_dim=64"]),
    ("mocov3", None, ["method.pred_hidden_dim=32"]),
    ("swav", None, ["method.n_prototypes=20"]),
    ("dino", "vit_tiny", ["method.out_dim=64", "trainer.max_steps=2"]),
    ("mocov3", "vit_small", ["method.pred_hidden_dim=32", "trainer.max_steps=2"]),
]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_new_methods_and_vits_train_evaluate_and_register_from_the_cli(in_tmp_cwd, capsys):
    client = MlflowClient(tracking_uri=sqlite_uri(in_tmp_cwd))
    for version, (method, backbone, extra) in enumerate(RUNS, start=1):
        run_name = f"{method}-{backbone or 'resnet_mini'}"
        argv = ["train", *_small(in_tmp_cwd, backbone, f"method={method}",
                                 f"run_name={run_name}", *extra)]
        assert main(argv) == 0, run_name
        out = capsys.readouterr().out
        assert "kNN accuracy: " in out, out[-3000:]
        assert f"registered model: models:/sslstream-encoder/{version} " in out, out[-3000:]
        mv = client.get_model_version("sslstream-encoder", str(version))
        run = client.get_run(mv.run_id)
        assert (run.data.params["method.name"], mv.tags["method"]) == (method, method)
        assert run.data.params["backbone.name"] == (backbone or "resnet_mini")


@pytest.mark.parametrize("method", ["dino", "mocov3"])
def test_vit_base_composes_and_takes_a_training_step(method, in_tmp_cwd, capsys):
    overrides = [f"method={method}", "backbone=vit_base"]
    assert main(["train", "--cfg", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "name: vit_base" in printed and "patch_size: 16" in printed
    cfg = compose_config(overrides)
    assert (cfg.backbone.name, cfg.augment.view1.size) == ("vit_base", 32)  # the CIFAR recipe
    torch.manual_seed(0)
    small = {"proj_hidden_dim": 32, "proj_output_dim": 16,
             **({"out_dim": 64} if method == "dino" else {"pred_hidden_dim": 32})}
    model = build_method({**cfg.method, **small}, cfg.backbone).train()
    assert model.feature_dim == 768
    views = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    loss, _ = model(views)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
