"""What the tar reader's header bounds cost: pipelines/shards/tario.py against its version at
a git commit (default 5a08db0, before the bounds) and against Python's tarfile, on one
shard held in memory (parsing only: no storage, no image checks).

Repetitions are interleaved (old, new, tarfile, old, ...) and timed in CPU time of this
process, so other load on a shared machine moves all three alike; the ratios are the
result, the absolute rates are this machine's.

    OMP_NUM_THREADS=1 python -m benchmarks.tar_reader \\
        --shard ../shared/data/cifar10/test-000000.tar.gz --baseline 5a08db0 --reps 21
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def module_at(commit: str) -> ModuleType:
    """pipelines/shards/tario.py as it was at `commit`, imported under a private name."""
    src = subprocess.run(["git", "show", f"{commit}:pipelines/shards/tario.py"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"tario_{commit}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"tario_{commit}", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def tarfile_samples(data: bytes) -> int:
    """The same grouping with tarfile (the peer)."""
    n, key = 0, None
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf:
            if m.isfile():
                tf.extractfile(m).read()  # type: ignore[union-attr]
                k = m.name.split(".", 1)[0]
                n, key = n + (k != key), k
    return n


def rate(fn: Callable[[bytes], int], data: bytes) -> float:
    t = time.process_time()
    n = fn(data)
    return n / (time.process_time() - t)


def main() -> None:
    from sslstream.pipelines.shards import tario

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shard", default=str(ROOT.parent / "shared/data/cifar10/test-000000.tar.gz"))
    p.add_argument("--baseline", default="5a08db0")
    p.add_argument("--reps", type=int, default=21)
    a = p.parse_args()
    old = module_at(a.baseline)
    stored = Path(a.shard).read_bytes()
    forms = {"tar": gzip.decompress(stored) if stored[:2] == b"\x1f\x8b" else stored}
    if stored[:2] == b"\x1f\x8b":
        forms["tar.gz"] = stored

    def reader(mod: ModuleType) -> Callable[[bytes], int]:
        return lambda d: sum(1 for _ in mod.iter_tar_samples(io.BufferedReader(io.BytesIO(d))))

    for form, data in forms.items():
        rates: dict[str, list[float]] = {"baseline": [], "now": [], "tarfile": []}
        for _ in range(a.reps):
            rates["baseline"].append(rate(reader(old), data))
            rates["now"].append(rate(reader(tario), data))
            rates["tarfile"].append(rate(tarfile_samples, data))
        med = {k: statistics.median(v) for k, v in rates.items()}
        ratio = [n / o for n, o in zip(rates["now"], rates["baseline"], strict=True)]
        q = statistics.quantiles(ratio, n=4)
        print(f"{form}: baseline {a.baseline} {med['baseline']:,.0f} samples/s, now "
              f"{med['now']:,.0f}, tarfile {med['tarfile']:,.0f}; now/baseline median "
              f"{statistics.median(ratio):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f}), "
              f"now/tarfile {med['now'] / med['tarfile']:.2f}")


if __name__ == "__main__":
    main()
