"""`sslstream embed`: every sample of a data set through an encoder, into Parquet files.

    sslstream embed --model models:/sslstream-encoder@champion --out s3://bucket/emb/ \\
        embed.source='s3://bucket/imgs-{000000..000999}.tar'

What happens, in order (a failure names its input and exits with a code of exits.py):

1. the config is read and checked (EmbedSettings): a mistake exits 2, nothing was read;
2. rank 0 proves ``--out`` writable (a probe object): unreachable or refused exits 4,
   before any model is loaded or sample read;
3. every rank loads the encoder (model.py); rank 0 lists the input's shards and counts,
   reads ``--out``'s manifest and decides: a fresh output, a resume (same model, input and
   dtype), or a refusal (anything else, naming both; ``--overwrite`` replaces it). The
   decision, or the error, is broadcast, so every rank exits the same way;
4. the shards are cut into parts (plan.py); each rank embeds the parts of its share that
   are not in ``--out`` yet, reading ahead in a thread (reader.py), and publishes each part
   whole (writer.py, store.py): every input sample lands in exactly one file, also after a
   SIGKILL and a rerun, at any rank count;
5. rank 0 writes the complete manifest (every part, its rows and what was skipped per
   reason) and, with ``--neighbours``, logs a nearest-neighbour figure to MLflow.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from omegaconf import DictConfig
from sslstream.orchestration.embed import exits as X
from sslstream.orchestration.embed.manifest import (
    NAME,
    InputInfo,
    ModelInfo,
    OutputConflict,
    OutputManifest,
)
from sslstream.orchestration.embed.model import LoadedEncoder, load_encoder
from sslstream.orchestration.embed.plan import (
    PART_RE,
    Part,
    plan_parts,
    rank_parts,
    source_fingerprint,
)
from sslstream.orchestration.embed.progress import Progress
from sslstream.orchestration.embed.settings import EmbedSettings
from sslstream.orchestration.embed.store import OutputStore
from sslstream.orchestration.errors import ConfigError, UserError
from sslstream.orchestration.runtime import distributed as D
from sslstream.orchestration.runtime.interrupt import Interrupted
from sslstream.pipelines.shards.masking import mask

log = logging.getLogger("sslstream.embed")
T = TypeVar("T")


@dataclass(frozen=True)
class EmbedRequest:
    model: str                 # --model: models:/... or a checkpoint path
    out: str                   # --out: a folder or prefix on any store
    overwrite: bool = False    # --overwrite: replace what --out holds


@dataclass(frozen=True)
class Plan:
    """What rank 0 decided, sent to every rank."""

    urls: list[str]
    counts: list[int]
    label_key: str
    manifest: OutputManifest
    complete: bool             # --out already holds every part: nothing to embed


@dataclass
class LoopStats:
    """This rank's embedding loop: what it wrote and where its time went."""

    parts: int = 0
    rows: int = 0
    seconds: float = 0.0       # the whole loop
    wait_s: float = 0.0        # waiting for the next decoded batch (reading, decoding)
    forward_s: float = 0.0     # in the encoder, embeddings back on the host
    write_s: float = 0.0       # collecting rows, Parquet encoding, publishing parts
    cpu_s: float = 0.0         # CPU time of the whole process (every thread) during the loop

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EmbedResult:
    out: str
    manifest: OutputManifest
    loop: LoopStats            # this rank's, this run's
    seconds: float             # the whole command (planning, model load, manifest included)
    figure_run: str | None = None


def run(cfg: DictConfig, request: EmbedRequest) -> int:
    """`embed` with its errors as one line and an exit code (exits.py)."""
    try:
        embed(cfg, request)
        return X.EXIT_OK
    except X.EmbedExit as e:
        log.error("embed: %s", e)
        return e.code
    except Interrupted as e:
        log.error("embed: %s; the parts written are kept: rerun the same command to resume", e)
        return X.EXIT_PREEMPTED
    except Exception as e:
        code = X.classify(e)
        if code is None:
            raise
        log.error("embed: %s", mask(str(e)))
        return code


def embed(cfg: DictConfig, request: EmbedRequest) -> EmbedResult:
    """Embed the source into ``request.out`` (see the module docstring)."""
    settings = EmbedSettings.from_config(cfg)  # ConfigError: exit 2, nothing read
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("embed.device=cuda, but this process sees no CUDA device "
                          "(torch.cuda.is_available() is False): use embed.device=auto or cpu",
                          "embed.device")
    t0 = time.perf_counter()
    env = D.init_distributed(settings.device)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    store = OutputStore(request.out, settings.storage_options)
    _on_rank0(env, store.probe)
    encoder = load_encoder(cfg, request.model)
    _prepare_data(cfg, settings, env)
    plan = _on_rank0(env, lambda: _plan(settings, request, encoder, store, env.world_size))
    manifest = plan.manifest
    parts = plan_parts(plan.counts, manifest.input.shards_per_part)
    present = {p.name for p in parts} if plan.complete else set(store.names())
    todo = [p for p in rank_parts(parts, env.rank, env.world_size) if p.name not in present]
    if env.is_main:
        left = sum(1 for p in parts if p.name not in present)
        log.info("embed: %s (%s) -> %s: %d samples in %d shards, %d parts (%d to embed, "
                 "%d already there), %d rank(s)", encoder.version, encoder.spec.backbone.get("name"),
                 store.shown, manifest.input.samples, len(plan.urls), len(parts), left,
                 len(parts) - left, env.world_size)
    loop = _embed_parts(todo, plan, settings, encoder, store, env, manifest)
    D.barrier()
    if env.is_main and not plan.complete:
        manifest = _complete(store, manifest, parts, env.world_size)
        log.info("embed: %d rows in %d parts at %s (bad samples: %s) in %.1fs", manifest.rows,
                 len(manifest.parts), store.shown,
                 ", ".join(f"{k} {v}" for k, v in sorted(manifest.bad.items())) or "none",
                 time.perf_counter() - t0)
    figure_run = None
    if env.is_main and settings.neighbours:
        from sslstream.orchestration.embed.neighbours import log_neighbours

        figure_run = log_neighbours(cfg, settings, store, manifest, plan.label_key)
    D.cleanup()
    return EmbedResult(request.out, manifest, loop, time.perf_counter() - t0, figure_run)


def _on_rank0(env: D.DistEnv, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, its result (or its error, as an exit code and message) on every
    rank: the other ranks never wait for a rank that already gave up."""
    if not env.distributed:
        return fn()
    outcome: tuple[str, Any]
    if env.is_main:
        try:
            outcome = ("ok", fn())
        except Exception as e:
            code = X.classify(e)
            D.broadcast_object(("error", (X.EXIT_FAILED if code is None else code,
                                          f"rank 0: {type(e).__name__}: {mask(str(e))}")))
            raise
    else:
        outcome = ("", None)
    kind, value = D.broadcast_object(outcome)  # type: ignore[misc]
    if kind == "error":
        raise X.EmbedExit(*value)
    return value


def _prepare_data(cfg: DictConfig, settings: EmbedSettings, env: D.DistEnv) -> None:
    """The embedded default's synthetic data set, generated on first use (as training does)
    when the source is its data.train."""
    data = cfg.data
    if not (settings.from_train and data.get("generate", False)):
        return
    from sslstream.pipelines.shards.synthetic import ensure_synthetic, is_complete

    if env.local_rank == 0 and not is_complete(data.root):
        log.info("generating the synthetic data set under %s (first use)", data.root)
        ensure_synthetic(data.root, train_samples=int(data.generate_train_samples),
                         test_samples=int(data.generate_test_samples),
                         image_size=int(data.image_size), seed=int(data.get("generate_seed", 0)))
    D.barrier()


def _shown_source(source: str | list[str]) -> str:
    return mask(source if isinstance(source, str) else ", ".join(source))


def _plan(settings: EmbedSettings, request: EmbedRequest, encoder: LoadedEncoder,
          store: OutputStore, world_size: int) -> Plan:
    """Rank 0: the input's shards, and what ``--out`` holds (fresh, resume or refuse)."""
    from sslstream.pipelines.shards.stream import ShardStream

    stream = ShardStream(settings.source, shuffle=False, partition=True,
                         num_workers=settings.num_workers,
                         storage_options=settings.storage_options, validate=settings.validate,
                         **settings.stream_options)
    urls, counts, label_key = stream.shard_urls, stream.shard_counts, stream.label_key
    names = store.names()
    text = store.read_bytes(NAME) if NAME in names else None
    old = OutputManifest.from_json(text.decode(), store.shown) if text is not None else None
    spp = settings.shards_per_part or (old.input.shards_per_part if old else None) or \
        max(1, settings.num_workers)
    spec = encoder.spec
    new = OutputManifest(
        model=ModelInfo(source=request.model, version=encoder.version, identity=encoder.identity,
                        backbone=str(spec.backbone.get("name")), feature_dim=spec.feature_dim,
                        image_size=spec.image_size),
        input=InputInfo(source=_shown_source(settings.source), shards=len(urls),
                        samples=int(sum(counts)), fingerprint=source_fingerprint(urls, counts),
                        shards_per_part=spp),
        dtype=settings.dtype, world_size=world_size)
    ours = [n for n in names if PART_RE.match(n)]
    if request.overwrite and (old is not None or ours):
        log.warning("embed: --overwrite: removing %d part files and the manifest from %s",
                    len(ours), store.shown)
        store.remove([*ours, NAME] if old is not None else ours)
        old, ours = None, []
    if old is None and ours:
        raise OutputConflict(f"--out {store.shown} holds {len(ours)} part files but no {NAME}: "
                             "they were not written by sslstream embed (or the manifest was "
                             "removed); choose another --out, or pass --overwrite to replace them")
    if old is not None:
        why = old.conflict(new)
        if why:
            raise OutputConflict(f"--out {store.shown} already holds {why}; choose another "
                                 "--out, or pass --overwrite to replace them")
        parts = plan_parts(counts, spp)
        if old.status == "complete" and all(p.name in ours for p in parts):
            log.info("embed: %s already holds every part of this input, embedded by %s: "
                     "nothing to do", store.shown, old.model.version)
            return Plan(urls, counts, label_key, old, True)
        log.info("embed: resuming %s (%d of %d parts there)", store.shown,
                 sum(p.name in ours for p in parts), len(parts))
    store.remove_stale_temp()
    store.write_bytes(NAME, new.to_json().encode())
    return Plan(urls, counts, label_key, new, False)


def _embed_parts(todo: list[Part], plan: Plan, settings: EmbedSettings, encoder: LoadedEncoder,
                 store: OutputStore, env: D.DistEnv, manifest: OutputManifest) -> LoopStats:
    """Embed this rank's ``todo`` parts and write them."""
    from sslstream.orchestration.embed.reader import PartStream, Prefetch
    from sslstream.orchestration.embed.writer import PartWriter
    from sslstream.pipelines.views.eval_loader import EvalLoader

    planned = sum(p.samples for p in todo)
    progress = Progress(planned, every_s=settings.progress_every_s, enabled=env.is_main)
    if not todo:
        return LoopStats()
    stream = PartStream(todo, plan.urls, settings, plan.label_key)
    finished: dict[int, dict[str, int]] = {}

    def bad_of(number: int) -> dict[str, int]:
        if number not in finished:
            finished.update({r.number: r.bad for r in stream.finished()})
        return finished.get(number, {})

    meta = {"model": manifest.model.version, "identity": manifest.model.identity,
            "dtype": settings.dtype}
    writer = PartWriter(todo, plan.urls, plan.counts, store, dtype=settings.dtype,
                        feature_dim=encoder.spec.feature_dim, meta=meta, bad_of=bad_of)
    loader = EvalLoader(stream, image_size=encoder.spec.image_size,
                        batch_size=settings.batch_size, device=env.device,
                        backend=settings.loader_backend,
                        num_threads=D.loader_threads(settings.loader_threads,
                                                     env.device.type == "cuda"),
                        mean=encoder.spec.mean, std=encoder.spec.std, validate="auto",
                        with_index=True)
    forward = _forward(encoder.backbone.to(env.device), env.device, settings.precision)
    prefetch = Prefetch(loader.batches(), settings.prefetch)
    limit = settings.max_bad_fraction * planned
    bad: Counter[str] = Counter()
    stats = LoopStats()
    cpu0, t0 = time.process_time(), time.perf_counter()
    t = t0
    batches = iter(prefetch)
    try:
        while (batch := next(batches, None)) is not None:
            t1 = time.perf_counter()
            emb = forward(batch.x) if len(batch.keys) else \
                np.zeros((0, encoder.spec.feature_dim), np.float32)
            t2 = time.perf_counter()
            done = writer.add(batch.keys, batch.shards, batch.index.cpu().numpy(),
                              batch.labels.cpu().numpy(), emb, batch.dropped)
            stats.rows += len(batch.keys)
            progress.update(len(batch.keys) + len(batch.dropped))
            _check_bad(done, bad, limit, planned, plan.urls, settings)
            t3 = time.perf_counter()
            stats.wait_s, stats.forward_s, stats.write_s = (
                stats.wait_s + t1 - t, stats.forward_s + t2 - t1, stats.write_s + t3 - t2)
            t = t3
        _check_bad(writer.finish(), bad, limit, planned, plan.urls, settings)
        stats.write_s += time.perf_counter() - t
    finally:
        prefetch.close()
        loader.close()
    progress.finish()
    stats.seconds, stats.cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    stats.parts = len(writer.written)
    if env.is_main:
        log.info("embed: rank 0 loop %.1fs (CPU %.1fs): waiting for data %.1fs, encoder %.1fs, "
                 "writing %.1fs", stats.seconds, stats.cpu_s, stats.wait_s, stats.forward_s,
                 stats.write_s)
    return stats


def _check_bad(done: list, bad: Counter[str], limit: float, planned: int, urls: list[str],
               settings: EmbedSettings) -> None:
    from sslstream.pipelines.shards.stream import BadDataError

    for w in done:
        bad.update(w.bad)
        total = sum(bad.values())
        if total > limit:
            shard = urls[w.part.shards[0]]
            why = ", ".join(f"{k} {v}" for k, v in sorted(bad.items()))
            raise BadDataError(
                f"{total} of this rank's {planned} samples are corrupt or missing ({why}), "
                f"more than data.max_bad_fraction={settings.max_bad_fraction}; limit passed in "
                f"{w.part.name} (shards from {shard}). The parts written so far are kept; "
                "`sslstream shards verify` names the cause per shard", shard)


def _forward(backbone: torch.nn.Module, device: torch.device, precision: str
             ) -> Callable[[torch.Tensor], np.ndarray]:
    """x (B, 3, S, S) -> float32 embeddings (B, D) on the host: bf16 autocast and
    channels_last on a GPU (precision auto / bf16), fp32 on CPU unless bf16 is asked for."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(x: torch.Tensor) -> np.ndarray:
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            f = backbone(x)
        return f.float().flatten(1).cpu().numpy()

    return run


def _complete(store: OutputStore, manifest: OutputManifest, parts: list[Part],
              world_size: int) -> OutputManifest:
    """Rank 0, after every rank finished: the manifest of the whole output, from the part
    files' own metadata (so parts of an earlier, killed run count too)."""
    import json

    import pyarrow.parquet as pq

    listed, bad, rows = [], Counter(), 0
    for p in parts:
        try:
            with store.fs.open(f"{store.root}/{p.name}", "rb") as f:
                md = pq.read_metadata(f)
        except FileNotFoundError:
            raise UserError(f"{store.url_of(p.name)} is missing after every rank finished: "
                            "another job may be writing to the same --out") from None
        meta = json.loads((md.metadata or {}).get(b"sslstream", b"{}"))
        if meta.get("identity") != manifest.model.identity:
            raise OutputConflict(f"{store.url_of(p.name)} was written by {meta.get('model')}, "
                                 f"not {manifest.model.version}: another job writes to --out "
                                 f"{store.shown}")
        listed.append({"file": p.name, "rows": md.num_rows, "shards": meta.get("shards", []),
                       "bad": meta.get("bad", {})})
        bad.update(meta.get("bad", {}))
        rows += md.num_rows
    done = OutputManifest(model=manifest.model, input=manifest.input, dtype=manifest.dtype,
                          status="complete", parts=listed, rows=rows, bad=dict(bad),
                          world_size=world_size)
    store.write_bytes(NAME, done.to_json().encode())
    return done


__all__ = ["EmbedRequest", "EmbedResult", "embed", "run"]
