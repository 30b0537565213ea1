"""Atomic, weights-only checkpoints for resumable training.

A checkpoint is one `step-<NNNNNNNN>.pt` file in the run's directory. It is written to a
temporary file in the same directory, flushed and fsynced, then `os.replace`d into place,
so a process killed mid-write (preemption, SIGKILL) leaves either the old set of
checkpoints or the new one, never a torn file. The newest K are kept.

Everything stored is a tensor or a plain python type (dict/list/tuple/int/float/str/bool/
None), so every load uses `torch.load(..., weights_only=True)`: a checkpoint from an
untrusted place cannot run code. RNG states are converted to that form here.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sslstream.orchestration.errors import UserError

CHECKPOINT_RE = re.compile(r"^step-(\d{8,})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first (by step number, not mtime)."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, step: int, keep_last: int = 3) -> Path:
    """Write `state` atomically as step-<step>.pt and prune all but the newest `keep_last`."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / checkpoint_name(step)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(d)
    if keep_last > 0:
        for old in list_checkpoints(d)[:-keep_last]:
            old.unlink(missing_ok=True)
    return final


TEMP_RE = re.compile(r"^\.tmp-.*\.pt$")


def remove_stale_temp(run_dir: str | Path) -> tuple[int, int]:
    """Delete the `.tmp-*.pt` files a killed writer left (SIGKILL mid-save skips the
    cleanup in save_checkpoint); returns (files, bytes). Called once when a run starts,
    on rank 0, before its first save: one run writes a run directory at a time (a second
    `sslstream train` of the same run_name resumes it; the retraining job holds a lease),
    so no temp file there belongs to a live writer."""
    d = Path(run_dir)
    if not d.is_dir():
        return 0, 0
    n = size = 0
    for p in d.iterdir():
        if TEMP_RE.match(p.name) and p.is_file():
            try:
                size += p.stat().st_size
                p.unlink()
                n += 1
            except FileNotFoundError:
                continue
    return n, size


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that is not there or not loadable; the message names it."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True (no pickled code); CheckpointError names the file (one
    line from the CLI: a mistyped --checkpoint is the user's input, not a bug)."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file): pass a "
                              "step-*.pt file that training wrote under "
                              "trainer.output_dir/<run_name>/")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {why} (not a checkpoint of "
                              "sslstream train, or damaged)") from exc


def _fsync_dir(d: Path) -> None:
    """Make the rename durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- RNG states as tensors / plain types --------------------------------------------------


def rng_state() -> dict[str, Any]:
    """torch (CPU and this process's CUDA device), numpy and python RNG states, weights_only-safe.

    Only the current CUDA device's generator: each rank drives one GPU (LOCAL_RANK), and the
    checkpoint keeps one entry per rank, so a resume on a node with another GPU count still
    restores every rank's stream.
    """
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device (set from LOCAL_RANK)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state()` (the CUDA state goes to the current device)."""
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].cpu().numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["gauss"],
        )
    )
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda.cpu())


def to_plain(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays and tuples into weights_only-safe types.

    Loader/stream cursors are documented as plain python, but a numpy int slipping in would
    make the checkpoint unloadable with weights_only=True; convert defensively at save time.
    """
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, int) else k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
