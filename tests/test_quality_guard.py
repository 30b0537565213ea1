"""CI guard: BYOL, SimCLR and VICReg must learn on real images.

A change that stops a method from learning (a detached loss, a wrong sign, a dead optimiser,
a broken augmentation) leaves every unit test of its parts green; this one trains each
method briefly on real CIFAR-10 images and requires a kNN accuracy above the untrained
network's by a margin no untrained network reaches.

Budget: one shard (5,000 images), 39 steps of batch 128 (one epoch), `resnet_mini`, the
method's CIFAR recipe with a 10% warmup; kNN (k=200, t=0.1) with another train shard as bank
(5,000) and one test shard (5,000) as queries. MARGIN comes from BENCHMARKS.md ("Do the
methods learn"): see the comment at its definition. Skipped (with the reason) when the
shards are absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(os.environ.get("SSLSTREAM_CIFAR10", Path(__file__).resolve().parents[1].parent / "shared/data/cifar10"))
SHARDS = [ROOT / "train-000000.tar.gz", ROOT / "train-000001.tar.gz", ROOT / "test-000000.tar.gz"]

# Measured with this exact budget (BENCHMARKS.md, "Do the methods learn"; 2-core CPU):
# untrained 0.2738 (BN statistics from the shard; 0.2592 with the default statistics),
# BYOL 0.2944 (+0.0206), SimCLR 0.2864 (+0.0126); with optim.lr=0 (nothing learned) BYOL
# 0.2736 (-0.0002), SimCLR 0.2740 (+0.0002). Each margin is about half its method's gain:
# above what a network that learned nothing reaches, below what learning reaches.
# FRAGILE: at this budget the learned gain is of the order of run-to-run numerical noise:
# the same SimCLR run with 2 torch threads instead of 1 reached 0.2776 (+0.0038). Hence
# trainer.num_threads=1 (bit-reproducible on one machine); a numerically different but
# healthy change can still trip it; a longer budget (a GPU job) is the robust guard.
# VICReg guards its CIFAR recipe's LARS (eta 1e-3, no clipping): 0.3090 (+0.036 over the
# untrained 0.2732 measured with the current code); with solo-learn's eta 0.02 + clip_lr it
# collapses to 0.2272 and fails (BENCHMARKS.md, "Two epochs": why VICReg and Barlow Twins
# now learn).
MARGIN = {"byol": 0.010, "simclr": 0.006, "vicreg": 0.015}
BATCH = 128
# e.g. SSLSTREAM_GUARD_EXTRA="optim.lr=0" shows the guard failing for a method that does not learn
EXTRA = os.environ.get("SSLSTREAM_GUARD_EXTRA", "").split()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all(p.exists() for p in SHARDS),
                       reason=f"CIFAR-10 shards not found under {ROOT} (set SSLSTREAM_CIFAR10)"),
]


def _cfg(method: str, *extra: str, tmp: Path):
    from sslstream.orchestration.cli import compose_config

    train, bank, test = (str(p) for p in SHARDS)
    return compose_config([
        "data=cifar10", f"data.train={train}", f"data.bank={bank}", f"data.test={test}",
        f"method={method}", "backbone=resnet_mini", f"trainer.batch_size={BATCH}", "trainer.epochs=1",
        "trainer.warmup_epochs=0.1", "trainer.device=cpu", "trainer.num_threads=1",
        f"trainer.output_dir={tmp}",
        "trainer.resume=false", f"run_name=guard-{method}", "trainer.progress=log",
        "trainer.checkpoint_every_steps=1000", "tracking.enabled=false", "eval.probe=false",
        "eval.every_epochs=0", "seed=0", *extra,
    ])


def _trained_knn(method: str, *extra: str, tmp: Path) -> float:
    from sslstream.orchestration.train.loop import train

    res = train(_cfg(method, *extra, tmp=tmp))
    assert res.eval is not None and res.eval.bank_size == 5000 and res.eval.test_size == 5000
    return res.eval.knn_acc


def untrained_knn_of(cfg) -> float:
    """kNN of the initial weights (the seed the trained runs start from), with the backbone's
    BatchNorm statistics computed on the training shard: data statistics, not learned
    weights. Without this the baseline is too low: a run with optim.lr=0 (nothing learned)
    gains ~0.015 over the default statistics (BENCHMARKS.md)."""
    from sslstream.models.methods import build_method
    from sslstream.orchestration.evaluate.run import evaluate
    from sslstream.orchestration.runtime.distributed import init_distributed

    from benchmarks.quality_cpu import data_bn_statistics

    torch.manual_seed(int(cfg.seed))
    method = build_method(cfg.method, cfg.backbone)
    data_bn_statistics(method.backbone, cfg, batches=31, batch_size=BATCH)
    return evaluate(cfg, method, init_distributed("cpu")).knn_acc


@pytest.fixture(scope="module")
def untrained_knn(tmp_path_factory: pytest.TempPathFactory) -> float:
    return untrained_knn_of(_cfg("byol", tmp=tmp_path_factory.mktemp("untrained")))


@pytest.mark.parametrize("method", ["byol", "simclr", "vicreg"])
def test_method_beats_the_untrained_network(method: str, untrained_knn: float, tmp_path: Path) -> None:
    knn = _trained_knn(method, *EXTRA, tmp=tmp_path)
    assert knn >= untrained_knn + MARGIN[method], (
        f"{method} kNN {knn:.4f} after one epoch of 5,000 CIFAR-10 images (batch {BATCH}) is not "
        f">= the untrained network's {untrained_knn:.4f} + {MARGIN[method]}: it stopped learning")
