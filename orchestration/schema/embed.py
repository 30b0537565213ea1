"""`sslstream embed`'s own keys (``embed.*``): what it reads, how it runs the encoder, what
it writes. The data plane's keys (``data.storage_options``, ``num_workers``, ``validate``,
``label_key``, ``image_keys``, ``max_pixels``, ``max_member_bytes``, ``max_bad_fraction``)
are shared with training (orchestration/schema/data.py); docs/embed.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from sslstream.conf.typed import Ge, Interval, MinLen, Typed

__all__ = ["EmbedConfig"]

Count = Annotated[int, Ge(1)]
Auto = Literal["auto"]
NonEmpty = Annotated[str, MinLen(1)]


@dataclass(frozen=True, kw_only=True)
class EmbedConfig(Typed):
    """``embed.*`` (``sslstream embed --model URI --out URL [key=value ...]``)."""

    config_key: ClassVar[str] = "embed"
    # shards to embed: a folder / prefix, manifest URL (URL#split), brace pattern or list, on
    # any store; null: data.train
    source: NonEmpty | Annotated[list[NonEmpty], MinLen(1)] | None = None
    batch_size: Count = 256              # images per forward pass, per rank
    dtype: Literal["float32", "float16"] = "float32"  # how the embeddings are stored
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when there is one
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on a GPU, fp32 on CPU
    loader_backend: Literal["auto", "dali", "torchvision"] = "auto"  # auto: DALI where it imports
    loader_threads: Count | Auto = "auto"  # decode threads per rank (auto: as trainer.loader_threads)
    num_threads: Count | None = None     # torch intra-op threads on CPU (null: torch's default)
    prefetch: Count = 2                  # decoded batches read ahead of the encoder (in a thread)
    # input shards per output file: the unit of resume and of exactly-once (auto:
    # data.num_workers, or the value the output's manifest already records)
    shards_per_part: Count | Auto = "auto"
    progress_every_s: Annotated[float, Ge(0)] = 15  # a progress line (rate, ETA) at most this often, rank 0
    # > 0: log a figure of `queries` images and their nearest neighbours in the embedded set
    # to MLflow (--neighbours, --queries)
    neighbours: Annotated[int, Interval(ge=0, le=50)] = 0
    queries: Annotated[int, Interval(ge=1, le=64)] = 8
