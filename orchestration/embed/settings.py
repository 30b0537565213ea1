"""What one `sslstream embed` run does: its own keys (conf/embed/default.yaml) and the
`data.*` keys it shares with training, read once into a typed, checked object.

Every check here runs before anything is read (a mistake is a ConfigError: exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from sslstream.orchestration.errors import ConfigError

DTYPES = ("float32", "float16")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")
BACKENDS = ("auto", "dali", "torchvision")


@dataclass(frozen=True)
class EmbedSettings:
    """Everything an embedding run needs from the config (see conf/embed/default.yaml)."""

    source: str | list[str]                  # shards to embed (embed.source, else data.train)
    from_train: bool                         # the source is data.train (the embedded default
                                             # generates it on first use)
    storage_options: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 2                     # reader lanes (parallel shard reads) per rank
    validate: str = "header"
    stream_options: dict[str, Any] = field(default_factory=dict)  # label_key, image_keys, max_pixels
    max_bad_fraction: float = 0.01
    batch_size: int = 256
    dtype: str = "float32"
    device: str = "auto"
    precision: str = "auto"
    loader_backend: str = "auto"
    loader_threads: int | str = "auto"
    num_threads: int | None = None
    prefetch: int = 2
    shards_per_part: int | None = None       # None: auto (the manifest's, else num_workers)
    progress_every_s: float = 15.0
    neighbours: int = 0
    queries: int = 8

    @classmethod
    def from_config(cls, cfg: DictConfig) -> EmbedSettings:
        from sslstream.pipelines.shards.stream import sample_options

        data = cfg.data
        raw = OmegaConf.to_container(cfg.get("embed") or OmegaConf.create({}), resolve=True)
        assert isinstance(raw, dict)
        source = raw.get("source")
        from_train = source in (None, "")
        if from_train:
            source = data.get("train")
        if not source:
            raise ConfigError("embed.source is not set and neither is data.train: name the "
                              "shards to embed (embed.source=<folder, pattern or manifest>)",
                              "embed.source")
        if not isinstance(source, str):
            source = [str(s) for s in OmegaConf.to_container(source, resolve=True)] \
                if not isinstance(source, list) else [str(s) for s in source]
        spp = raw.get("shards_per_part", "auto")
        s = cls(
            source=source,
            from_train=from_train,
            storage_options=dict(OmegaConf.to_container(data.get("storage_options") or
                                                        OmegaConf.create({}), resolve=True)),
            num_workers=int(data.get("num_workers", 2)),
            validate=str(data.get("validate", "header")),
            stream_options={k: v for k, v in sample_options(data).items() if k != "require_label"},
            max_bad_fraction=float(data.get("max_bad_fraction", 0.01)),
            batch_size=_int(raw, "batch_size", 256, 1),
            dtype=_one(raw, "dtype", "float32", DTYPES),
            device=_one(raw, "device", "auto", DEVICES),
            precision=_one(raw, "precision", "auto", PRECISIONS),
            loader_backend=_one(raw, "loader_backend", "auto", BACKENDS),
            loader_threads="auto" if str(raw.get("loader_threads", "auto")) == "auto"
            else _int(raw, "loader_threads", 2, 1),
            num_threads=None if raw.get("num_threads") is None else _int(raw, "num_threads", 1, 1),
            prefetch=_int(raw, "prefetch", 2, 1),
            shards_per_part=None if str(spp) == "auto" else _int(raw, "shards_per_part", 1, 1),
            progress_every_s=_num(raw, "progress_every_s", 15.0, 0.0),
            neighbours=_int(raw, "neighbours", 0, 0),
            queries=_int(raw, "queries", 8, 1),
        )
        if s.neighbours and s.neighbours > 50:
            raise ConfigError(f"embed.neighbours={s.neighbours}: a figure shows at most 50 "
                              "neighbours per query", "embed.neighbours")
        if s.queries > 64:
            raise ConfigError(f"embed.queries={s.queries}: a figure shows at most 64 queries",
                              "embed.queries")
        return s


def _int(raw: dict, key: str, default: int, lo: int) -> int:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"embed.{key}={v!r} is not allowed: expected an integer >= {lo}",
                          f"embed.{key}")
    return v


def _num(raw: dict, key: str, default: float, lo: float) -> float:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or v < lo:
        raise ConfigError(f"embed.{key}={v!r} is not allowed: expected a number >= {lo:g}",
                          f"embed.{key}")
    return float(v)


def _one(raw: dict, key: str, default: str, choices: tuple[str, ...]) -> str:
    v = str(raw.get(key, default))
    if v not in choices:
        import difflib

        near = difflib.get_close_matches(v, choices, n=1, cutoff=0.5)
        raise ConfigError(f"embed.{key}={v} is not allowed: expected {' | '.join(choices)}"
                          + (f"; did you mean {near[0]}?" if near else ""), f"embed.{key}")
    return v
