"""What one `sslstream embed` run does: its own keys (orchestration/schema/embed.py) and the
`data.*` keys it shares with training, read once into one object.

The schema checks every key before anything is read (a mistake is a ConfigError: exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from sslstream.orchestration.errors import ConfigError


@dataclass(frozen=True)
class EmbedSettings:
    """Everything an embedding run needs from the config (orchestration/schema/embed.py)."""

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
        """From the checked config (orchestration/schema/embed.py holds the keys' ranges)."""
        from sslstream.pipelines.shards.mix import flat_urls
        from sslstream.pipelines.shards.stream import sample_options

        data, emb = cfg.data, cfg.embed
        from_train = emb.source is None
        source = data.train if from_train else emb.source
        if not source:
            raise ConfigError("embed.source is not set and neither is data.train: name the "
                              "shards to embed (embed.source=<folder, pattern or manifest>)",
                              "embed.source")
        source = flat_urls(source)  # a weighted mix of data.train: every shard once
        return cls(
            source=source,
            from_train=from_train,
            storage_options=dict(OmegaConf.to_container(data.storage_options, resolve=True)),
            num_workers=data.num_workers,
            validate=data.validate,
            stream_options={k: v for k, v in sample_options(data).items() if k != "require_label"},
            max_bad_fraction=data.max_bad_fraction,
            batch_size=emb.batch_size,
            dtype=emb.dtype,
            device=emb.device,
            precision=emb.precision,
            loader_backend=emb.loader_backend,
            loader_threads=emb.loader_threads,
            num_threads=emb.num_threads,
            prefetch=emb.prefetch,
            shards_per_part=None if emb.shards_per_part == "auto" else emb.shards_per_part,
            progress_every_s=float(emb.progress_every_s),
            neighbours=emb.neighbours,
            queries=emb.queries,
        )
