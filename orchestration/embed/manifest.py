"""``_manifest.json`` of an embedding output: what produced the files, and which they are.

Written by rank 0 before the first embedding (``status: running``: it claims the folder for
one model and one input) and again at the end (``status: complete``, with every part file,
its rows and its input shards, and the bad-sample counts per reason). A rerun reads it to
decide: the same model, input and dtype resume; anything else is refused, naming both,
unless ``--overwrite``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from sslstream.orchestration.errors import UserError

FORMAT = "sslstream-embeddings"
VERSION = 1
NAME = "_manifest.json"  # "_": Parquet readers (pyarrow, pandas, Spark) skip it in the folder


class OutputConflict(UserError):
    """``--out`` holds embeddings this run must not mix with (another model, input or
    dtype), or files that are not sslstream embeddings."""


@dataclass(frozen=True)
class ModelInfo:
    source: str            # --model as given
    version: str           # models:/<name>/<version>, models:/m-<id>, or a checkpoint path
    identity: str          # digest of spec + weights (embed/model.py)
    backbone: str
    feature_dim: int
    image_size: int


@dataclass(frozen=True)
class InputInfo:
    source: str            # the source as given (credentials masked)
    shards: int
    samples: int           # as listed (manifest counts or one counting read)
    fingerprint: str       # sha256 of the shard URLs and counts (plan.source_fingerprint)
    shards_per_part: int


@dataclass
class OutputManifest:
    model: ModelInfo
    input: InputInfo
    dtype: str
    status: str = "running"                       # running | complete
    parts: list[dict[str, Any]] = field(default_factory=list)   # file, rows, shards
    rows: int = 0
    bad: dict[str, int] = field(default_factory=dict)           # reason -> samples skipped
    world_size: int = 1
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, shown: str) -> OutputManifest:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}")
            if int(raw.get("version", 0)) > VERSION:
                raise ValueError(f"version {raw['version']} is newer than this code's {VERSION}")
            return cls(model=ModelInfo(**raw["model"]), input=InputInfo(**raw["input"]),
                       dtype=raw["dtype"], status=raw.get("status", "running"),
                       parts=list(raw.get("parts", [])), rows=int(raw.get("rows", 0)),
                       bad=dict(raw.get("bad", {})), world_size=int(raw.get("world_size", 1)))
        except (ValueError, KeyError, TypeError) as e:
            raise OutputConflict(f"--out {shown} holds a {NAME} that is not an sslstream "
                                 f"embedding manifest ({e}): choose another --out, or pass "
                                 "--overwrite to replace what is there") from None

    def conflict(self, other: OutputManifest) -> str | None:
        """Why an output made as ``self`` describes cannot be continued by ``other``."""
        if self.model.identity != other.model.identity:
            return (f"embeddings of model {self.model.version} (identity "
                    f"{self.model.identity}), not of {other.model.version} (identity "
                    f"{other.model.identity})")
        if self.input.fingerprint != other.input.fingerprint:
            return (f"embeddings of another input ({self.input.source}: {self.input.shards} "
                    f"shards, {self.input.samples} samples; now {other.input.source}: "
                    f"{other.input.shards} shards, {other.input.samples} samples)")
        if self.dtype != other.dtype:
            return f"{self.dtype} embeddings (this run asks for embed.dtype={other.dtype})"
        if self.input.shards_per_part != other.input.shards_per_part:
            return (f"parts of {self.input.shards_per_part} shards (this run asks for "
                    f"embed.shards_per_part={other.input.shards_per_part})")
        return None
