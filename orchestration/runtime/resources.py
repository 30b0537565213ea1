"""How many threads and processes this rank may use, sized together from the CPUs it may use.

Why: `os.cpu_count()` is the host's count, not this process's. In a 1-GPU pod on a 192-core
host it said 192 and the loader started 191 DALI threads; on the 2-core development machine
torch's intra-op OpenMP pool (2 threads), DALI's pool, the stream's reader threads and the
loader's host/device threads all ran at once, and beside one other CPU job the default
`sslstream train` took 50 minutes instead of 2 (OpenMP threads spin-wait when there are more
runnable threads than cores). So the budget is the CPUs this process may *really* use:

  usable = min(len(os.sched_getaffinity(0)), ceil(cgroup CPU quota))     (never cpu_count)

split between the ranks of this node (LOCAL_WORLD_SIZE), and inside a rank between:
  reader processes (ShardStream reading + host batch preparation, pipelines/views/workers.py),
  DALI's (or torchvision's) threads, and torch's intra-op threads.
Explicit settings win; `auto` fills in the rest. Everything is a pure function of its
inputs (paths and counts can be injected), so the policy is tested on the CPU with fake
affinity and cgroup files (tests/orchestration/test_resources.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

MAX_DALI_THREADS_PER_GPU = 8   # nvJPEG's host stage and the CPU ops stop scaling past this
MAX_READER_PROCESSES = 4       # one reader process feeds ~40k CIFAR samples/s (BENCHMARKS.md)
MIB = 1 << 20


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup",
                     proc_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 2.5), or None when unlimited.

    cgroup v2: `cpu.max` ("<quota> <period>" or "max <period>") of the process's cgroup
    and every ancestor (the tightest wins). cgroup v1: `cpu.cfs_quota_us` /
    `cpu.cfs_period_us` of the `cpu` controller (-1 = unlimited).
    """
    root = Path(root)
    lines = (_read(Path(proc_cgroup)) or "").splitlines()
    limits: list[float] = []
    v2 = next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), None)
    if v2 is not None or (root / "cpu.max").exists():
        rel = Path((v2 or "/").lstrip("/"))
        for d in [rel, *rel.parents]:
            text = _read(root / d / "cpu.max")
            if text:
                quota, _, period = text.partition(" ")
                if quota != "max" and period:
                    limits.append(int(quota) / int(period))
    v1 = next((ln.split(":", 2)[2] for ln in lines
               if ":" in ln and "cpu" in ln.split(":", 2)[1].split(",")), None)
    for ctrl in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = root / ctrl
        if not base.is_dir():
            continue
        rel = Path((v1 or "/").lstrip("/"))
        for d in dict.fromkeys([rel, Path(".")]):
            q, p = _read(base / d / "cpu.cfs_quota_us"), _read(base / d / "cpu.cfs_period_us")
            if q and p and int(q) > 0 and int(p) > 0:
                limits.append(int(q) / int(p))
        break
    return min(limits) if limits else None


def usable_cpus(affinity: set[int] | None = None, cgroup_limit: float | None | str = "read"
                ) -> int:
    """CPUs this process may run on: the affinity mask, cut to the cgroup quota (rounded up)."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # not Linux
            affinity = set(range(os.cpu_count() or 1))
    n = max(1, len(affinity))
    limit = cgroup_cpu_limit() if cgroup_limit == "read" else cgroup_limit
    if isinstance(limit, (int, float)) and limit > 0:
        n = min(n, max(1, math.ceil(limit - 1e-9)))
    return n


@dataclass(frozen=True)
class Resources:
    """One rank's share: what `build_job` applies and the start line shows."""

    cpus: int                 # usable CPUs of this rank (node's usable / local ranks)
    torch_threads: int        # torch.set_num_threads (intra-op)
    loader_threads: int       # DALI / torchvision threads
    reader_processes: int     # loader worker processes (0: reading in the trainer process)
    nvjpeg_padding: int       # bytes, DALI mixed decoder's device and host padding

    def as_config(self) -> dict[str, int]:
        return asdict(self)

    def describe(self) -> str:
        pad = f", nvJPEG padding {self.nvjpeg_padding // MIB} MiB" if self.nvjpeg_padding else ""
        return (f"{self.cpus} CPU(s)/rank: {self.reader_processes} reader process(es), "
                f"{self.loader_threads} loader thread(s), {self.torch_threads} torch thread(s)"
                f"{pad}")


def _explicit(value) -> int | None:
    if value is None or str(value) == "auto":
        return None
    return int(value)


def nvjpeg_padding(image_side: int | None, setting=None) -> int:
    """Bytes nvJPEG pads its per-thread buffers by: room for a decoded image of twice the
    data's side (4 * side^2 * 3 bytes), at least 4 MiB -- not DALI's ImageNet example values
    (211 MB device + 140 MB pinned host per thread). A larger image only costs a one-off
    reallocation. `setting` in MiB wins."""
    if (mib := _explicit(setting)) is not None:
        return mib * MIB
    side = int(image_side or 224)
    need = 4 * side * side * 3
    return max(4 * MIB, -(-need // MIB) * MIB)


def plan_resources(*, cpus: int, local_ranks: int = 1, gpu: bool = False,
                   torch_threads=None, loader_threads=None, reader_processes=None,
                   image_side: int | None = None, nvjpeg_padding_mib=None) -> Resources:
    """Split `cpus` (this node's usable CPUs) between `local_ranks` ranks and, per rank,
    between reader processes, loader threads and torch threads so that their sum does not
    exceed the rank's share (one of each at least). Explicit values (ints) win.

    GPU ranks: torch needs one thread (kernels run on the device); the rest goes to the
    reader processes (1 per 8 CPUs, <= 4) and DALI (<= 8 per GPU).
    CPU ranks: the step itself is the main CPU consumer: torch gets half of what is left
    after the readers, the augmentation backend the other half.
    """
    share = max(1, cpus // max(1, local_ranks))
    readers = _explicit(reader_processes)
    if readers is None:
        readers = 0 if share < 2 else min(MAX_READER_PROCESSES, max(1, share // 8))
    left = max(1, share - readers)
    tt, lt = _explicit(torch_threads), _explicit(loader_threads)
    if gpu:
        tt = tt if tt is not None else 1
        lt = lt if lt is not None else max(1, min(MAX_DALI_THREADS_PER_GPU, left - 1))
    else:
        if tt is None:
            tt = max(1, (left if lt is None else left - lt) // (2 if lt is None else 1))
        lt = lt if lt is not None else max(1, left - tt)
    return Resources(cpus=share, torch_threads=max(1, tt), loader_threads=max(1, lt),
                     reader_processes=max(0, readers),
                     nvjpeg_padding=nvjpeg_padding(image_side, nvjpeg_padding_mib) if gpu else 0)


def local_ranks() -> int:
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
