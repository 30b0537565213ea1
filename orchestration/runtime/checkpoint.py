"""Checkpoints in any store, published atomically: a reader never sees a partial one.

A checkpoint of step N is two objects in the run's folder (orchestration/runtime/runstore.py:
a local path, s3://, gs://, any fsspec URL):

    step-<NNNNNNNN>.pt     the state, written whole (local: temp file + rename; object
                           stores: one PUT)
    step-<NNNNNNNN>.json   its manifest: size, sha256, and what the run that wrote it was
                           (run name, world size, global batch, the config that must match)

The manifest is written only after the state object is complete, so it is what publishes a
checkpoint: `list_checkpoints` returns published ones only, and `load_checkpoint` checks
the state's size and sha256 against its manifest. A writer killed mid-upload (SIGKILL,
preemption) leaves at most an unpublished state object, which `remove_unpublished` deletes
when the next run starts. Keep-last-K unpublishes (manifest first) and deletes the oldest.

Everything stored is a tensor or a plain python type (dict/list/tuple/int/float/str/bool/
None), so every load uses `torch.load(..., weights_only=True)`: a checkpoint from an
untrusted place cannot run code. RNG states are converted to that form here.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sslstream.orchestration.errors import UserError
from sslstream.orchestration.runtime.runstore import TEMP_PREFIX, RunStore, is_local_url
from sslstream.pipelines.shards.masking import mask
from sslstream.pipelines.shards.storage import RetryPolicy, StorageError, get_fs, with_retries

CHECKPOINT_RE = re.compile(r"^step-(\d{8,})\.pt$")
MANIFEST_RE = re.compile(r"^step-(\d{8,})\.json$")
FORMAT = "sslstream-checkpoint/1"

RunDir = str | Path | RunStore


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def manifest_name(step: int) -> str:
    return f"step-{step:08d}.json"


def open_store(run_dir: RunDir, storage_options: dict | None = None) -> RunStore:
    """The run folder as a RunStore (a path or URL is opened with `storage_options`)."""
    return run_dir if isinstance(run_dir, RunStore) else RunStore(run_dir, storage_options)


@dataclass(frozen=True)
class Checkpoint:
    """A published checkpoint: step N of the run folder `store`."""

    store: RunStore
    step: int

    @property
    def name(self) -> str:
        return checkpoint_name(self.step)

    @property
    def url(self) -> str:
        """Where it is (credentials masked): what messages name."""
        return self.store.url_of(self.name)

    def manifest(self) -> dict[str, Any]:
        """The manifest that published it (size, sha256, the writing run's identity)."""
        raw = self.store.read_bytes(manifest_name(self.step))
        try:
            found = json.loads(raw)
        except ValueError as e:
            raise StorageError(f"checkpoint manifest {self.store.url_of(manifest_name(self.step))}"
                               f" is not JSON: {e}", self.url) from None
        if not isinstance(found, dict) or found.get("format") != FORMAT:
            raise StorageError(f"{self.store.url_of(manifest_name(self.step))} is not an "
                               f"sslstream checkpoint manifest ({FORMAT})", self.url)
        return found

    def __str__(self) -> str:
        return self.url


def list_checkpoints(run_dir: RunDir, storage_options: dict | None = None) -> list[Checkpoint]:
    """The run's published checkpoints, oldest first (by step number, not by time)."""
    store = open_store(run_dir, storage_options)
    names = set(store.names())
    steps = sorted(int(m.group(1)) for n in names if (m := MANIFEST_RE.match(n))
                   and checkpoint_name(int(m.group(1))) in names)
    return [Checkpoint(store, s) for s in steps]


def latest_checkpoint(run_dir: RunDir, storage_options: dict | None = None) -> Checkpoint | None:
    ckpts = list_checkpoints(run_dir, storage_options)
    return ckpts[-1] if ckpts else None


def serialize(state: dict[str, Any]) -> bytes:
    """The bytes of `state` as `torch.save` writes them."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def publish(store: RunStore, step: int, data: bytes, meta: dict[str, Any] | None = None
            ) -> Checkpoint:
    """Write the state object, then its manifest (which makes it visible to readers)."""
    store.write_bytes(checkpoint_name(step), data)
    manifest = {
        "format": FORMAT, "step": int(step), "object": checkpoint_name(step),
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        "written_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **(meta or {}),
    }
    store.write_bytes(manifest_name(step), json.dumps(manifest, indent=1).encode())
    return Checkpoint(store, int(step))


def prune(store: RunStore, keep_last: int) -> list[Checkpoint]:
    """Delete all but the newest `keep_last` published checkpoints (each manifest before its
    state object, so no reader finds a manifest without its state); returns them."""
    if keep_last <= 0:
        return []
    old = list_checkpoints(store)[:-keep_last]
    for c in old:
        store.delete(manifest_name(c.step))
        store.delete(c.name)
    return old


def save_checkpoint(state: dict[str, Any], run_dir: RunDir, step: int, keep_last: int = 3,
                    meta: dict[str, Any] | None = None, storage_options: dict | None = None
                    ) -> Checkpoint:
    """Serialize, publish and prune in the calling thread (the trainer uses
    orchestration/runtime/uploader.py to do this off the step path)."""
    store = open_store(run_dir, storage_options)
    ckpt = publish(store, step, serialize(state), meta)
    prune(store, keep_last)
    return ckpt


def remove_unpublished(run_dir: RunDir, storage_options: dict | None = None) -> tuple[int, int]:
    """Delete what a killed writer left: temporary files and state objects no manifest
    published; returns (objects, bytes). Called when a run starts, by the ranks that write,
    before their first save: one run writes a run folder at a time (a second `sslstream
    train` of the same run_name resumes it; the retraining job holds a lease), so nothing
    unpublished there belongs to a live writer."""
    store = open_store(run_dir, storage_options)
    names = set(store.names())
    litter = [n for n in names if n.startswith(TEMP_PREFIX) or (
        (m := CHECKPOINT_RE.match(n)) and manifest_name(int(m.group(1))) not in names)]
    n = size = 0
    for name in sorted(litter):
        try:
            size += store.size(name)
        except StorageError:
            continue  # gone meanwhile
        store.delete(name)
        n += 1
    return n, size


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is not there or not loadable; the message names it."""


def load_checkpoint(source: Checkpoint | str | Path, map_location: str | torch.device = "cpu",
                    storage_options: dict | None = None) -> dict[str, Any]:
    """Load with weights_only=True (no pickled code); CheckpointError names the checkpoint
    (one line from the CLI: a mistyped --checkpoint is the user's input, not a bug).

    A published `Checkpoint` is checked against its manifest (size, sha256) first; a path or
    URL (`trainer.init_from`, `sslstream eval --checkpoint`) is loaded as it is.
    """
    if isinstance(source, Checkpoint):
        data = _verified_bytes(source)
        where: str = source.url
    elif isinstance(source, Path) or is_local_url(str(source)):
        where = str(source)
        path = Path(str(source).removeprefix("file://")).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint {where} does not exist (or is not a file): pass "
                                  "a step-*.pt file that training wrote under "
                                  "trainer.output_dir/<run_name>/")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file name
            raise _unloadable(where, exc) from exc
    else:
        where = mask(str(source))
        fs, path = get_fs(str(source), storage_options)
        data = with_retries(lambda: fs.cat_file(path), where, what="reading",
                            policy=RetryPolicy())
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the checkpoint's name
        raise _unloadable(where, exc) from exc


def _unloadable(where: str, exc: BaseException) -> CheckpointError:
    why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return CheckpointError(f"cannot load checkpoint {where}: {why} (not a checkpoint of "
                           "sslstream train, or damaged)")


def _verified_bytes(ckpt: Checkpoint) -> bytes:
    manifest = ckpt.manifest()
    data = ckpt.store.read_bytes(ckpt.name)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != int(manifest.get("bytes", -1)) or digest != manifest.get("sha256"):
        raise StorageError(
            f"checkpoint {ckpt.url} does not match its manifest ({len(data)} bytes, sha256 "
            f"{digest[:12]}; published: {manifest.get('bytes')} bytes, sha256 "
            f"{str(manifest.get('sha256'))[:12]}); delete {manifest_name(ckpt.step)} to resume "
            "from the checkpoint before it", ckpt.url)
    return data


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
