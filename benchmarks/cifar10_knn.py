"""CIFAR-10 quality and throughput: pretrain on the train shards, kNN on the test split.

    python benchmarks/cifar10_knn.py --method byol --epochs 200           # the H100 target run
    python benchmarks/cifar10_knn.py --method simclr --epochs 1 --max-steps 20 trainer.device=cpu

Runs `sslstream.orchestration.train.loop.train` exactly as `sslstream train data=cifar10 method=<m>
trainer.epochs=<E>` would (the method's CIFAR augmentation and optimiser recipe, ResNet-18 with
the CIFAR stem; any extra Hydra overrides are passed through), then prints one JSON line and a markdown row for BENCHMARKS.md: kNN and
linear-probe accuracy on the test split (bank: the train split), training images/s over all
ranks (periodic evaluations excluded) and the fraction of that time spent waiting for data.
Under torchrun it runs distributed like the trainer; rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="byol")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--max-steps", type=int, default=None, help="stop early (smoke runs)")
    ap.add_argument("--batch-size", type=int, default=256, help="per rank")
    ap.add_argument("--backbone", default="resnet18_cifar")
    ap.add_argument("--data", default=os.environ.get("SSLSTREAM_CIFAR10", str(REPO.parent / "shared/data/cifar10")),
                    help="folder with the CIFAR-10 shards and manifest.json")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="kNN every N epochs during training (data=cifar10 brings 10; 0: only at the end)")
    ap.add_argument("--output-dir", default="./outputs/bench")
    ap.add_argument("--track", action="store_true", help="log to MLflow and register (off by default)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    a = ap.parse_args(argv)

    from sslstream.orchestration.cli import compose_config
    from sslstream.orchestration.train.loop import train

    overrides = [
        "data=cifar10", f"data.root={a.data}", f"method={a.method}", f"backbone={a.backbone}",
        f"trainer.epochs={a.epochs}", f"trainer.batch_size={a.batch_size}",
        f"trainer.output_dir={a.output_dir}", "trainer.resume=false", f"eval.every_epochs={a.eval_every}",
        f"run_name=bench-{a.method}-{a.backbone}-e{a.epochs}-{int(time.time())}",
    ]
    if a.max_steps:
        overrides.append(f"trainer.max_steps={a.max_steps}")
    if not a.track:
        overrides.append("tracking.enabled=false")
    t0 = time.perf_counter()
    res = train(compose_config([*overrides, *a.overrides]))
    if os.environ.get("RANK", "0") != "0":
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    row = {
        "method": a.method,
        "backbone": a.backbone,
        "epochs_done": res.epoch,
        "steps": res.step,
        "global_batch": a.batch_size * world,
        "knn_acc": res.eval.knn_acc if res.eval else None,
        "probe_acc": res.eval.probe_acc if res.eval else None,
        "img_per_s": round(res.metrics["perf/run_img_per_s"], 1),
        "data_wait_frac": round(res.metrics["perf/run_data_wait_frac"], 4),
        "train_s": round(res.metrics["perf/run_train_s"], 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": machine(),
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
    }
    print(json.dumps(row))
    print(f"| {a.method} | {a.backbone} | {res.step} steps x {row['global_batch']} | "
          f"{row['knn_acc']:.4f} | {row['img_per_s']} | {row['data_wait_frac']:.3f} | {row['machine']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
