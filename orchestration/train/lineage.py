"""Which run wrote a checkpoint, and whether this run may resume it.

Every checkpoint's manifest (orchestration/runtime/checkpoint.py) records the run that wrote
it: its run name, the number of ranks and the global batch, and the config values its
state depends on (`method.*`, `backbone.*`, `optim.name`: they decide the state's tensors
and the optimizer's slots). A run resumes only a checkpoint whose record matches its own;
otherwise it stops before building anything, naming each difference, instead of failing
inside `load_state_dict` or, worse, silently continuing someone else's run.

The stream cursor of every rank is in the checkpoint itself (`loaders`, one per rank), with
the world size and global batch it was written at. A resume keeps the global batch: on
another number of ranks the per-rank batch is the global batch divided by the new number
of ranks (orchestration/train/elastic.py continues the epoch from every old rank's cursor),
and a global batch that the new number of ranks does not divide is refused with the
choices named.
"""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig, OmegaConf
from sslstream.orchestration.errors import ConfigError, UserError
from sslstream.orchestration.runtime.checkpoint import Checkpoint

__all__ = ["checkpoint_meta", "check_resumable", "identity", "resume_batch"]

ALWAYS = ("run_name", "method.name", "backbone.name", "optim.name")


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The run's identity as flat `key: value` pairs (JSON values)."""
    out: dict[str, Any] = {"run_name": str(cfg.run_name)}
    for room in ("method", "backbone"):
        out.update(_flatten(OmegaConf.to_container(cfg[room], resolve=True), room))
    out["optim.name"] = str(cfg.optim.get("name"))
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def checkpoint_meta(cfg: DictConfig, world_size: int, global_batch: int) -> dict[str, Any]:
    """What the trainer writes into each checkpoint's manifest about itself."""
    return {"run_name": str(cfg.run_name), "world_size": int(world_size),
            "global_batch": int(global_batch), "identity": identity(cfg)}


def check_resumable(ckpt: Checkpoint, cfg: DictConfig, world_size: int) -> int:
    """Raise UserError naming what differs between `ckpt`'s writer and this run; return the
    per-rank batch this run resumes with on `world_size` ranks (`resume_batch`).

    Keys in `ALWAYS` are compared always; other keys only when both sides have them, so a
    key that a newer sslstream added does not orphan an older run's checkpoints.
    """
    manifest = ckpt.manifest()
    found = dict(manifest.get("identity") or {})
    mine = identity(cfg)
    keys = sorted(k for k in set(found) | set(mine)
                  if k in ALWAYS or (k in found and k in mine))
    diffs = [f"{k}={_show(found.get(k, _UNSET))} (this run: {_show(mine.get(k, _UNSET))})"
             for k in keys if found.get(k, _UNSET) != mine.get(k, _UNSET)]
    if diffs:
        more = f" and {len(diffs) - 5} more" if len(diffs) > 5 else ""
        raise UserError(
            f"checkpoint {ckpt.url} was written by another run or config: "
            f"{'; '.join(diffs[:5])}{more}. Resume it with the config it was written with, "
            "or start a new run (another run_name or trainer.output_dir)")
    return resume_batch(ckpt.url, manifest, int(cfg.trainer.batch_size), world_size,
                        int(cfg.trainer.accumulate_steps))


def resume_batch(url: str, manifest: dict[str, Any], batch_size: int, world_size: int,
                 accumulate_steps: int = 1) -> int:
    """The per-rank batch of a resume on `world_size` ranks: the checkpoint's global batch
    divided among them (`batch_size`, this config's, when the manifest has none). A global
    batch that `world_size` ranks of `accumulate_steps` equal micro-batches cannot share is a
    ConfigError listing the choices."""
    w, g = manifest.get("world_size"), manifest.get("global_batch")
    if w is None or g is None:  # written before manifests carried them: the same ranks
        return batch_size
    w, g, k = int(w), int(g), accumulate_steps
    if g % world_size == 0 and (g // world_size) % k == 0:
        return g // world_size
    fits = [n for n in range(1, g + 1) if g % (n * k) == 0]
    near = sorted(fits, key=lambda n: (abs(n - world_size), n))[:4]
    rank_choice = (f"on a number of ranks that divides {g}" if k == 1 else
                   f"on a number of ranks n with {g} / n divisible by trainer.accumulate_steps={k}")
    raise ConfigError(
        f"checkpoint {url} was written by {w} rank(s) with a global batch of {g}; "
        f"{world_size} rank(s) cannot share it equally"
        + (f" in {k} micro-batches each" if k > 1 else "")
        + f". Resume it {rank_choice} (e.g. {', '.join(map(str, sorted(near)))}), or with "
        "another trainer.accumulate_steps that divides the per-rank share, or start a new run "
        "(another run_name or trainer.output_dir) with the trainer.batch_size you want per rank",
        "trainer.batch_size")


def _flatten(obj: Any, prefix: str) -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: obj}


_UNSET = object()


def _show(v: Any) -> str:
    return "<unset>" if v is _UNSET else v if isinstance(v, str) else json.dumps(v)
