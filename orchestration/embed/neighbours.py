"""`sslstream embed --neighbours K --queries Q`: what the encoder learned, as a picture.

Q query samples, drawn uniformly (seeded by ``seed``) from the embedded set, each with its
K nearest neighbours in it by cosine similarity (the query itself excluded), found by one
pass over the output's part files with a running top-K (memory: one part at a time). The
images are read back from the source shards through the data plane, and drawn as a grid:
one row per query, the query in the first column, a gap, then its neighbours, nearest
first; every tile is a `TILE` x `TILE` px thumbnail, `GAP` px apart (`grid_size` gives the
figure's size). The figure (``neighbours.png``) and the keys and similarities
(``neighbours.json``) are logged to an MLflow run in ``tracking.experiment`` and also
written to ``--out`` as ``_neighbours.png`` / ``_neighbours.json``.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from sslstream.orchestration.embed.manifest import OutputManifest
from sslstream.orchestration.embed.parquet import embeddings_of, read_part
from sslstream.orchestration.embed.settings import EmbedSettings
from sslstream.orchestration.embed.store import OutputStore

log = logging.getLogger("sslstream.embed")

TILE = 64      # px per thumbnail
GAP = 4        # px between tiles
SPLIT = 12     # px between the query column and its neighbours
ARTIFACT_DIR = "neighbours"


@dataclass(frozen=True)
class Row:
    key: str
    shard: str
    similarity: float = 1.0


def grid_size(queries: int, neighbours: int) -> tuple[int, int]:
    """(width, height) in px of a figure of ``queries`` rows and ``neighbours`` neighbours."""
    width = (neighbours + 1) * TILE + max(0, neighbours - 1) * GAP + SPLIT
    height = queries * TILE + (queries - 1) * GAP
    return width, height


def _parts(store: OutputStore, manifest: OutputManifest):
    for part in manifest.parts:
        data = store.read_bytes(part["file"])
        if data is None:
            raise FileNotFoundError(store.url_of(part["file"]))
        yield read_part(data)


def nearest(store: OutputStore, manifest: OutputManifest, queries: int, k: int,
            seed: int) -> list[tuple[Row, list[Row]]]:
    """Q random rows and their K nearest rows (cosine), nearest first; see the module doc."""
    total = int(manifest.rows)
    if total < 2:
        return []
    q = min(queries, total)
    k = min(k, total - 1)
    picked = np.sort(np.random.default_rng(seed).choice(total, size=q, replace=False))
    qv, qrows, start = [], [], 0
    for table in _parts(store, manifest):
        n = table.num_rows
        mine = picked[(picked >= start) & (picked < start + n)] - start
        if len(mine):
            emb = embeddings_of(table).astype(np.float64)
            keys, shards = table.column("key").to_pylist(), table.column("shard").to_pylist()
            qv.append(emb[mine])
            qrows += [(start + int(i), Row(keys[i], shards[i])) for i in mine]
        start += n
    queries_x = _unit(np.concatenate(qv))
    best_s = np.full((q, k), -np.inf)
    best_at: list[list[Row | None]] = [[None] * k for _ in range(q)]
    start = 0
    for table in _parts(store, manifest):
        n = table.num_rows
        if n == 0:
            continue
        sims = queries_x @ _unit(embeddings_of(table).astype(np.float64)).T   # (q, n)
        for j, (row_id, _) in enumerate(qrows):
            if start <= row_id < start + n:
                sims[j, row_id - start] = -np.inf                              # not itself
        keys, shards = table.column("key").to_pylist(), table.column("shard").to_pylist()
        for j in range(q):
            merged = np.concatenate([best_s[j], sims[j]])
            order = np.argsort(-merged, kind="stable")[:k]
            rows = [best_at[j][i] if i < k else Row(keys[i - k], shards[i - k], float(merged[i]))
                    for i in order]
            best_s[j], best_at[j] = merged[order], rows
        start += n
    return [(qrows[j][1], [r for r in best_at[j] if r is not None]) for j in range(q)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _images(settings: EmbedSettings, wanted: set[tuple[str, str]], label_key: str) -> dict:
    """(shard, key) -> encoded image, read through the data plane (one pass per shard)."""
    from sslstream.pipelines.shards.stream import ShardStream

    shards = sorted({s for s, _ in wanted})
    stream = ShardStream(shards, shuffle=False, partition=True, num_workers=settings.num_workers,
                         storage_options=settings.storage_options, validate=settings.validate,
                         max_bad_fraction=1.0, **{**settings.stream_options, "label_key": label_key})
    return {(s.shard, s.key): s.image for s in stream if (s.shard, s.key) in wanted}


def draw(found: list[tuple[Row, list[Row]]], images: dict, k: int) -> Image.Image:
    width, height = grid_size(len(found), k)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    for r, (query, near) in enumerate(found):
        y = r * (TILE + GAP)
        for c, row in enumerate([query, *near]):
            x = 0 if c == 0 else TILE + SPLIT + (c - 1) * (TILE + GAP)
            data = images.get((row.shard, row.key))
            if data is None:
                continue
            with Image.open(io.BytesIO(data)) as im:
                canvas.paste(im.convert("RGB").resize((TILE, TILE), Image.Resampling.BILINEAR),
                             (x, y))
    return canvas


def log_neighbours(cfg: DictConfig, settings: EmbedSettings, store: OutputStore,
                   manifest: OutputManifest, label_key: str) -> str | None:
    """Find, draw, write to --out and log to MLflow; returns the MLflow run id (None when
    tracking is off or unreachable: the files in --out remain)."""
    from sslstream.orchestration.tracking.tracker import Tracker

    k, q = settings.neighbours, settings.queries
    found = nearest(store, manifest, q, k, int(cfg.get("seed", 0)))
    if not found:
        log.warning("embed: --neighbours: fewer than 2 rows in %s, no figure", store.shown)
        return None
    wanted = {(r.shard, r.key) for query, near in found for r in (query, *near)}
    figure = draw(found, _images(settings, wanted, label_key), len(found[0][1]))
    doc = {"model": manifest.model.version, "out": store.shown, "neighbours": k,
           "queries": [{"key": qr.key, "shard": qr.shard,
                        "neighbours": [{"key": r.key, "shard": r.shard,
                                        "similarity": round(r.similarity, 6)} for r in near]}
                       for qr, near in found]}
    with tempfile.TemporaryDirectory(prefix="sslstream-neighbours-") as tmp:
        png, js = Path(tmp) / "neighbours.png", Path(tmp) / "neighbours.json"
        figure.save(png)
        js.write_text(json.dumps(doc, indent=1))
        store.write_bytes("_neighbours.png", png.read_bytes())
        store.write_bytes("_neighbours.json", js.read_bytes())
        if not cfg.tracking.get("enabled", True):
            return None
        tracker = Tracker.from_config(cfg.tracking)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        run_id = tracker.start(f"embed-neighbours-{manifest.model.identity[:8]}",
                               resolved if isinstance(resolved, dict) else None,
                               tags={"sslstream.embed.model": manifest.model.version,
                                     "sslstream.embed.out": store.shown})
        tracker.log_artifact(str(png), ARTIFACT_DIR)
        tracker.log_artifact(str(js), ARTIFACT_DIR)
        tracker.end()
    if run_id:
        log.info("embed: %d queries x %d neighbours logged to MLflow run %s (%s/neighbours.png)",
                 len(found), k, run_id, ARTIFACT_DIR)
    return run_id
