"""A part's rows as a Parquet file: key, source shard, index, label, embedding.

Columns: ``key`` (string, the sample's key in its shard), ``shard`` (string, the shard's
URL), ``index`` (int64, the sample's position in its shard), ``label`` (int64, null when the
shard has no label), ``embedding`` (fixed-size list of float32 or float16, the encoder's
feature width). Rows are in (shard, index) order. The file's key-value metadata
``sslstream`` holds the model version and identity and the dtype, so a part file found on
its own still says what made it.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = ("key", "shard", "index", "label", "embedding")
NUMPY = {"float32": np.float32, "float16": np.float16}


def part_bytes(keys: list[str], shards: list[str], index: np.ndarray, labels: np.ndarray,
               embeddings: np.ndarray, dtype: str, meta: dict[str, Any]) -> bytes:
    """The rows as Parquet (zstd) bytes; ``embeddings`` is (n, D)."""
    n, dim = embeddings.shape
    if not len(keys) == len(shards) == len(index) == len(labels) == n:
        raise ValueError("part columns differ in length")
    flat = np.ascontiguousarray(embeddings.astype(NUMPY[dtype], copy=False)).reshape(-1)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(flat), int(dim))
    labels = np.asarray(labels, dtype=np.int64)
    table = pa.table({
        "key": pa.array(keys, pa.string()),
        "shard": pa.array(shards, pa.string()),
        "index": pa.array(np.asarray(index, dtype=np.int64)),
        "label": pa.array(labels, pa.int64(), mask=labels < 0),
        "embedding": emb,
    }).replace_schema_metadata({"sslstream": json.dumps(meta, sort_keys=True)})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_part(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def embeddings_of(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as an (n, D) numpy array (its stored dtype)."""
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
