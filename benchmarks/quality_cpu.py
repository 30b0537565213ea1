"""Do the methods learn on real images? Ours vs lightly on identical terms, on a CPU.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/quality_cpu.py \
        --methods byol,simclr --impl ours,peer --steps 150 --out outputs/quality.json

For each method: pretrain `resnet_mini` on the CIFAR-10 train shards for `--steps` steps at
`--batch-size`, then weighted kNN (k=200, t=0.1, cosine) of the backbone's features with
the full train split as bank (50,000) and the full test split as queries (10,000), through
`sslstream.orchestration.evaluate.run.evaluate` (the trainer's own evaluation). Plus the untrained
network (same seed, same evaluation).

- ours: `sslstream.orchestration.train.loop.train` exactly as `sslstream train data=cifar10
  backbone=resnet_mini method=<m>` composes it (the method's CIFAR augmentation, heads,
  optimiser recipe), with the step budget, batch and thread count below; warmup 10% of the
  budget (the recipes' 10 warmup epochs are longer than the whole budget).
- peer: the method as lightly's CIFAR-10 benchmark builds it (benchmarks/lightly_peer.py:
  its losses, heads, transforms, optimiser, schedule; MoCo v3, which it lacks, from lightly's
  modules with that benchmark's MoCo v2 recipe), around a backbone built from the
  same config and seed, so it starts from the very same weights as ours; trained on images
  decoded from the same shards (a seeded permutation; ours streams them through its
  shuffle buffer). Evaluated with lightly's normalisation (ImageNet mean/std).

Each finished row is appended to `--out` (JSON list) at once, so partial results survive.
Speed (img/s) is comparable only within one run on the same machine and load.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/quality_cpu.py` from the repo root
    sys.path.insert(0, str(REPO))
from sslstream.models.methods import METHODS  # noqa: E402 (after the path set-up above)


def load_split(root: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and labels of every `<prefix>-*.tar.gz` shard in root."""
    from PIL import Image

    imgs, labels = [], []
    for shard in sorted(Path(root).glob(f"{prefix}-*.tar*")):
        pending: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.rpartition(".")
                f = tf.extractfile(m)
                assert f is not None
                pending.setdefault(key, {})[ext] = f.read()
        for key in sorted(pending):
            s = pending[key]
            img = s.get("jpg") or s.get("png") or s.get("jpeg")
            if img is None or "cls" not in s:
                continue
            imgs.append(np.asarray(Image.open(io.BytesIO(img)).convert("RGB")))
            labels.append(int(s["cls"].decode().strip()))
    return np.stack(imgs), np.asarray(labels)


def base_overrides(a: argparse.Namespace, method: str) -> list[str]:
    return [
        "data=cifar10", f"data.root={a.data}", f"method={method}", f"backbone={a.backbone}",
        f"trainer.batch_size={a.batch_size}", "trainer.epochs=1", f"trainer.max_steps={a.steps}",
        "trainer.device=cpu", f"trainer.num_threads={a.threads}", "trainer.loader_threads=1",
        f"trainer.output_dir={a.work}", "trainer.resume=false", "trainer.progress=log",
        f"trainer.checkpoint_every_steps={10 * a.steps}", "trainer.log_every_steps=25",
        "tracking.enabled=false", "eval.at_end=false", "eval.every_epochs=0", "eval.probe=false",
        f"trainer.channels_last={str(a.channels_last).lower()}", f"seed={a.seed}",
    ]


def compose(a: argparse.Namespace, method: str, extra: list[str]):
    from sslstream.orchestration.cli import compose_config

    steps_per_epoch = 50_000 // a.batch_size
    warm = f"trainer.warmup_epochs={0.1 * a.steps / steps_per_epoch:.6f}"
    return compose_config([*base_overrides(a, method), warm, *extra])


def score(cfg, model: torch.nn.Module, inputs=None) -> dict[str, float]:
    """kNN of `model.embed` with the trainer's evaluation (full bank, full test split)."""
    from sslstream.orchestration.evaluate.run import evaluate
    from sslstream.orchestration.runtime.distributed import init_distributed

    env = init_distributed("cpu")
    res = evaluate(cfg, model, env, inputs=inputs)
    return {"knn": round(res.knn_acc, 4), "bank": res.bank_size, "test": res.test_size,
            "eval_s": round(res.seconds, 1)}


class _Embed(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).flatten(1)


def fresh_backbone(cfg) -> torch.nn.Module:
    """The backbone ours starts from: build_job seeds, then builds the method's backbone
    first (`sslstream.models.methods.build_method`)."""
    from sslstream.models.backbones import build_backbone

    torch.manual_seed(int(cfg.seed))
    return build_backbone(cfg.backbone)


def run_untrained(a: argparse.Namespace) -> dict:
    cfg = compose(a, "byol", [])
    return {"impl": "untrained", "method": "-", **score(cfg, _Embed(fresh_backbone(cfg)).eval())}


def data_bn_statistics(model: torch.nn.Module, cfg, batches: int = 31, batch_size: int = 128) -> None:
    """Recompute `model`'s BatchNorm running statistics on the training split (no weight
    changes): the untrained network with data statistics instead of the default (0, 1). A
    run that learns nothing (lr=0) still gains these statistics, so this is the baseline a
    learned gain is measured against (tests/test_quality_guard.py uses it)."""
    from sslstream.pipelines.views.eval_loader import build_eval_loader

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    v = cfg.augment.view1
    loader = build_eval_loader(str(cfg.data.train), image_size=int(v.size), batch_size=batch_size,
                               device="cpu", mean=tuple(v.mean), std=tuple(v.std), num_workers=1,
                               backend=str(cfg.trainer.loader_backend))
    was = model.training
    model.train()
    try:
        with torch.no_grad():
            for i, (x, _) in enumerate(loader):
                model(x)
                if i + 1 >= batches:
                    break
    finally:
        loader.close()
        model.train(was)
    for bn in bns:
        bn.momentum = 0.1


def run_untrained_data_bn(a: argparse.Namespace) -> dict:
    cfg = compose(a, "byol", [])
    backbone = fresh_backbone(cfg)
    data_bn_statistics(backbone, cfg)
    return {"impl": "untrained_data_bn", "method": "-", **score(cfg, _Embed(backbone).eval())}


def run_ours(a: argparse.Namespace, method: str, extra: list[str]) -> dict:
    from sslstream.orchestration.train.loop import train

    run = f"q-{method}-{int(time.time())}"
    cfg = compose(a, method, [f"run_name={run}", *extra])
    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    return {"impl": "ours", "method": method, "steps": res.step,
            "img_per_s": round(res.metrics.get("perf/run_img_per_s", 0.0), 1),
            "train_s": round(res.metrics.get("perf/run_train_s", wall), 1),
            "extra": " ".join(extra), **score(cfg, res.method)}


def run_peer(a: argparse.Namespace, method: str, train_x: np.ndarray) -> dict:
    from PIL import Image
    from sslstream.models.backbones import feature_dim_of

    from benchmarks.lightly_peer import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        PeerModel,
        peer_optimizer,
        peer_transform,
    )

    torch.set_num_threads(a.threads)
    cfg = compose(a, "byol", [])
    backbone = fresh_backbone(cfg)
    model = PeerModel(method, backbone, feature_dim_of(backbone), total_steps=a.steps,
                      steps_per_epoch=max(1, len(train_x) // a.batch_size)).train()
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt, sched = peer_optimizer(model, a.batch_size, a.steps)
    tf = peer_transform(method)
    order = np.random.default_rng(a.seed).permutation(len(train_x))
    t0, loss = time.perf_counter(), torch.tensor(float("nan"))
    for k in range(a.steps):
        idx = order[(k * a.batch_size) % len(order):][: a.batch_size]
        per_image = [tf(Image.fromarray(train_x[i])) for i in idx]
        views = [torch.stack([v[j] for v in per_image]).contiguous(memory_format=fmt)
                 for j in range(len(per_image[0]))]
        loss = model.loss(views, step=k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (k + 1) % 25 == 0:
            print(f"peer {method} step {k + 1}/{a.steps} loss {loss.item():.4f}", flush=True)
    train_s = time.perf_counter() - t0
    return {"impl": "peer", "method": method, "steps": a.steps,
            "img_per_s": round(a.steps * a.batch_size / train_s, 1), "train_s": round(train_s, 1),
            "loss": round(float(loss.item()), 4),
            **score(cfg, model.eval(), inputs=(32, IMAGENET_MEAN, IMAGENET_STD))}


def append(path: Path, row: dict) -> None:
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append(row)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(path)


def table(rows: list[dict]) -> str:
    """Markdown rows (method | ours | peer | untrained | img/s ours | img/s peer | gap) of a
    results file: the last row of each (impl, method, extra) wins."""
    last: dict[tuple, dict] = {}
    for r in rows:
        last[(r["impl"], r["method"], r.get("extra", ""))] = r
    base = next((r["knn"] for (i, _, _), r in last.items() if i == "untrained"), None)
    bn = next((r["knn"] for (i, _, _), r in last.items() if i == "untrained_data_bn"), None)
    out = ["| method | ours kNN | peer kNN (lightly) | untrained (default BN / data BN) "
           "| ours - untrained (default / data BN) | ours img/s | peer img/s |",
           "|---|---|---|---|---|---|---|"]
    methods = [m for m in METHODS if any(k[1] == m for k in last)]
    for m in methods:
        for (impl, meth, extra), r in last.items():
            if impl != "ours" or meth != m:
                continue
            peer = last.get(("peer", m, ""), {})
            name = f"{m} ({extra})" if extra else m
            gain = " / ".join(f"{r['knn'] - b:+.4f}" for b in (base, bn) if b is not None) or "-"
            pk = peer.get("knn")
            out.append(f"| {name} | {r['knn']:.4f} | {pk if pk is not None else peer.get('note', 'not run')} | "
                       f"{base} / {bn} | {gain} | {r.get('img_per_s')} | {peer.get('img_per_s', '-')} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--impl", default="ours,peer", help="ours,peer (untrained runs once unless --no-untrained)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--backbone", default="resnet_mini",
                    help="conf/backbone preset for every column and the untrained rows (e.g. vit_tiny_cifar)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both columns)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=os.environ.get("SSLSTREAM_CIFAR10", str(REPO.parent / "shared/data/cifar10")))
    ap.add_argument("--work", default="./outputs/quality_cpu", help="checkpoints of our runs")
    ap.add_argument("--out", default="./outputs/quality_cpu.json")
    ap.add_argument("--no-untrained", action="store_true")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="NHWC weights and inputs in both columns (1.3x on this CPU for resnet_mini)")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of --out")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for OUR runs (e.g. trainer.grad_clip=3.0)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.table:
        print(table(json.loads(out.read_text())))
        return 0
    torch.set_num_threads(a.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "threads": a.threads, "backbone": a.backbone, "batch": a.batch_size, "budget_steps": a.steps,
            "channels_last": a.channels_last,
            "command": " ".join(["python", *sys.argv])}
    impls = a.impl.split(",")
    train_x = None
    if not a.no_untrained:
        untrained = run_untrained(a)
        append(out, {**untrained, **meta, "load": os.getloadavg()[0]})
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               for m in fresh_backbone(compose(a, "byol", [])).modules()):
            append(out, {**run_untrained_data_bn(a), **meta, "load": os.getloadavg()[0]})
        else:  # no BatchNorm (a ViT): data statistics change nothing
            append(out, {**untrained, "impl": "untrained_data_bn", **meta,
                         "note": "no BatchNorm: the untrained row"})
    for method in a.methods.split(","):
        for impl in impls:
            if impl == "peer" and method == "contrastive":
                append(out, {"impl": "peer", "method": method, "knn": None,
                             "note": "lightly has no margin-contrastive method"})
                continue
            load0 = os.getloadavg()[0]
            if impl == "ours":
                row = run_ours(a, method, list(a.overrides))
            else:
                if train_x is None:
                    train_x, _ = load_split(a.data, "train")
                row = run_peer(a, method, train_x)
            row.update(meta, load=round((load0 + os.getloadavg()[0]) / 2, 2))
            print(json.dumps(row), flush=True)
            append(out, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
