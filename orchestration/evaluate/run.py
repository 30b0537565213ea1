"""Evaluation of a frozen encoder: weighted kNN and a linear probe on labelled shards.

kNN follows InstDisc (Wu et al. 2018) as lightly's benchmark module does: cosine similarity
of L2-normalised features against a memory bank (the labelled train split, `data.bank`),
the k=200 nearest neighbours vote with weight exp(sim / t), t=0.1. The linear probe follows
the papers' protocol at small scale: backbone in eval() mode, features computed once,
a linear head initialised N(0, 0.01), SGD + cross-entropy for a few epochs.

Under DDP the work is split, not repeated (docs/training.md, "Evaluation at scale"):
each rank reads and embeds only its share of each split (the eval loader's partition);
the bank's features stay on the rank that made them (optionally cut to a class-balanced
budget, bank.py), and the sharded kNN scores every query against every shard and merges
the candidates, bitwise the 1-rank result (knn.py); the linear probe trains once over the
sharded bank (probe.linear_probe_sharded). Only the test split's features are gathered
(queries, probe test set, collapse metrics, the PCA plot). Every rank returns the same
result.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from sslstream.orchestration.errors import ConfigError, UserError
from sslstream.orchestration.evaluate.bank import select_local
from sslstream.orchestration.evaluate.features import (
    PROGRESS_EVERY_S,
    Features,
    extract_local,
    gather_features,
)
from sslstream.orchestration.evaluate.knn import accuracy, quantize, sharded_knn_predict
from sslstream.orchestration.evaluate.probe import linear_probe_sharded
from sslstream.orchestration.runtime.distributed import (
    DistEnv,
    all_reduce_max,
    all_reduce_sum,
    loader_threads,
)
from torch import nn

log = logging.getLogger("sslstream.eval")

PHASES = ("read", "extract", "select", "score", "probe")


@dataclass
class EvalResult:
    knn_acc: float
    probe_acc: float | None
    embedding_std: float
    effective_rank: float
    bank_size: int
    test_size: int
    seconds: float
    # seconds per phase (read, extract, select, score, probe), the slowest rank's
    phases: dict[str, float] = field(default_factory=dict)
    # the test split's features, labels and kNN predictions, in split order; not metrics
    test_features: torch.Tensor | None = field(default=None, repr=False)
    test_labels: torch.Tensor | None = field(default=None, repr=False)
    knn_predictions: torch.Tensor | None = field(default=None, repr=False)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {
            f"{prefix}knn_acc": self.knn_acc,
            f"{prefix}embedding_std": self.embedding_std,
            f"{prefix}effective_rank": self.effective_rank,
            # what the numbers rest on: a split that lost shards shows here, and the cost
            f"{prefix}bank_size": float(self.bank_size),
            f"{prefix}test_size": float(self.test_size),
            f"{prefix}seconds": float(self.seconds),
        }
        out.update({f"{prefix}time_{k}": float(v) for k, v in self.phases.items()})
        if self.probe_acc is not None:
            out[f"{prefix}probe_acc"] = self.probe_acc
        return out


def evaluate(
    cfg: DictConfig,
    method: nn.Module,
    env: DistEnv,
    *,
    inputs: tuple[int, tuple[float, ...], tuple[float, ...]] | None = None,
) -> EvalResult:
    """kNN (and the linear probe when `eval.probe`) of `method.embed` on cfg.data.bank/test.

    `method` is the unwrapped Method (not the DDP wrapper). Its train/eval mode is restored
    afterwards. Every rank returns the same result. `inputs` = (image size, mean, std)
    replaces the augment recipe's (a registered encoder carries its own).
    """
    from sslstream.models.collapse import effective_rank, embedding_std
    from sslstream.pipelines.shards.cache import cache_options
    from sslstream.pipelines.shards.stream import sample_options
    from sslstream.pipelines.views.eval_loader import build_eval_loader

    data, ev = cfg.data, cfg.eval
    for key in ("bank", "test"):
        if not data[key]:
            raise ConfigError(f"evaluation needs labelled shards: data.{key} is not set", f"data.{key}")
    t0 = time.perf_counter()

    from sslstream.pipelines.views.recipes import TwoViewRecipe

    # Eval inputs are normalised and sized like the training views, so the encoder sees
    # the statistics it was trained on.
    if inputs is None:
        recipe = TwoViewRecipe.from_config(cfg.augment)
        inputs = (recipe.size, tuple(recipe.view1.mean), tuple(recipe.view1.std))
    size, mean, std = inputs
    phases = dict.fromkeys(PHASES, 0.0)

    def features(split: str, urls: str, max_samples: int = 0) -> Features:
        loader = build_eval_loader(
            urls,
            image_size=int(size),
            batch_size=ev.batch_size,
            device=env.device,
            storage_options=dict(data.storage_options),
            rank=env.rank,
            world_size=env.world_size,
            num_workers=data.num_workers,
            backend=cfg.trainer.loader_backend,
            mean=tuple(mean),
            std=tuple(std),
            num_threads=loader_threads(cfg.trainer.loader_threads),
            stream_options={**sample_options(data, labelled=True), **cache_options(data)},
            max_samples=int(max_samples),
            with_index=True,
            max_bad_fraction=data.max_bad_fraction,
        )
        t_split, last = time.perf_counter(), [time.perf_counter()]
        per_rank = loader.num_samples  # this rank's share (corrupt samples are skipped)

        def progress(n: int) -> None:  # rank 0 speaks for all: ranks run in step
            now = time.perf_counter()
            if env.is_main and now - last[0] >= PROGRESS_EVERY_S:
                last[0] = now
                of = f"/{per_rank}" if per_rank else ""
                rate = n / (now - t_split)
                left = f", ~{(per_rank - n) / rate:.0f}s left" if per_rank and rate > 0 else ""
                log.info("eval: %s features %d%s samples on rank 0 (%.0f/s%s)", split, n, of,
                         rate, left)

        try:
            out = extract_local(method.embed, loader, env.device, progress=progress)
        finally:
            loader.close()
        phases["read"] += all_reduce_max(out.read_s, env.device)
        phases["extract"] += all_reduce_max(out.embed_s, env.device)
        total = int(all_reduce_sum(float(out.x.shape[0]), env.device))
        if env.is_main:
            log.info("eval: %s features of %d samples in %.1fs", split, total,
                     time.perf_counter() - t_split)
        return out

    was_training = method.training
    method.eval()
    try:
        bank = features("bank", data.bank, ev.bank_samples).sorted()
        test = gather_features(features("test", data.test))
    finally:
        method.train(was_training)

    t = time.perf_counter()
    lowest = -all_reduce_max(-float(bank.y.min()) if bank.y.numel() else 0.0, env.device)
    if lowest < 0 or (test.y.numel() and int(test.y.min()) < 0):
        raise UserError("evaluation needs labelled shards: data.bank / data.test have "
                         "samples without a label")
    keep = select_local(bank.y, bank.index, max_per_class=ev.bank_max_per_class,
                        samples=ev.bank_samples, seed=cfg.seed)
    if not bool(keep.all()):
        bank = Features(bank.x[keep], bank.y[keep], bank.index[keep], bank.read_s, bank.embed_s)
    bank_size = int(all_reduce_sum(float(bank.x.shape[0]), env.device))
    if bank_size == 0 or test.x.shape[0] == 0:
        raise UserError("kNN needs a non-empty bank and query set (check data.bank / data.test)")
    num_classes = data.num_classes
    if num_classes is None:
        top = float(bank.y.max()) if bank.y.numel() else 0.0
        num_classes = int(max(all_reduce_max(top, env.device), float(test.y.max()))) + 1
    phases["select"] = all_reduce_max(time.perf_counter() - t, env.device)

    t, last = time.perf_counter(), [time.perf_counter()]

    def scored(done: int, of: int) -> None:
        now = time.perf_counter()
        if env.is_main and (now - last[0] >= PROGRESS_EVERY_S or done == of):
            last[0] = now
            log.info("eval: kNN scored %d/%d queries against %d bank rows (%.1fs)",
                           done, of, bank_size, now - t)

    dtype = ev.knn_dtype
    preds = sharded_knn_predict(
        quantize(test.x, dtype), quantize(bank.x, dtype), bank.y, bank.index, int(num_classes),
        ev.knn_k, ev.knn_t, query_chunk=ev.knn_query_chunk, bank_chunk=ev.knn_bank_chunk,
        progress=scored)
    knn = accuracy(preds, test.y)
    phases["score"] = all_reduce_max(time.perf_counter() - t, env.device)
    probe = None
    if ev.probe:
        t = time.perf_counter()
        probe = linear_probe_sharded(
            bank.x, bank.y, bank.index, test.x, test.y, int(num_classes),
            epochs=ev.probe_epochs, lr=ev.probe_lr, batch_size=ev.probe_batch_size,
            seed=cfg.seed)
        phases["probe"] = all_reduce_max(time.perf_counter() - t, env.device)
    seconds = time.perf_counter() - t0
    if env.is_main:
        log.info("eval: %.1fs: %s (slowest rank); bank %d, test %d, world %d", seconds,
                       ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()), bank_size,
                       test.x.shape[0], env.world_size)
    return EvalResult(
        knn_acc=knn,
        probe_acc=probe,
        embedding_std=float(embedding_std(test.x)),
        effective_rank=float(effective_rank(test.x)),
        bank_size=bank_size,
        test_size=int(test.x.shape[0]),
        seconds=seconds,
        phases=phases,
        test_features=test.x,
        test_labels=test.y,
        knn_predictions=preds,
    )


class _Encoder(nn.Module):
    """A bare backbone behind the `embed` interface `evaluate` uses."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def evaluate_saved(cfg: DictConfig, *, checkpoint: str | None = None, model_uri: str | None = None) -> EvalResult | None:
    """`sslstream eval`: evaluate a training checkpoint or a logged/registered encoder.

    A checkpoint is rebuilt with cfg.method / cfg.backbone (pass the overrides it was
    trained with); a model URI (`models:/name@champion`, `models:/name/3`, `models:/m-...`)
    is rebuilt from its own spec. Returns the result on rank 0, None elsewhere.
    """
    from sslstream.orchestration.runtime.checkpoint import load_checkpoint
    from sslstream.orchestration.runtime.distributed import init_distributed

    env = init_distributed(cfg.trainer.device)
    inputs = None
    if checkpoint is not None:
        from sslstream.models.methods import build_method

        module: nn.Module = build_method(cfg.method, cfg.backbone)
        state = load_checkpoint(checkpoint, storage_options=dict(
            cfg.trainer.get("storage_options") or {}))  # a path or any store's URL
        try:
            module.load_state_dict(state["model"])
        except RuntimeError as e:
            raise UserError(
                f"checkpoint {checkpoint} does not fit method={cfg.method.name} "
                f"backbone={cfg.backbone.name}: pass the overrides it was trained with ({e})"
            ) from e
    elif model_uri is not None:
        from sslstream.models.backbones import build_backbone
        from sslstream.orchestration.tracking.mlflow_env import resolve_tracking_uri
        from sslstream.orchestration.tracking.registry import load_encoder_state_dict

        uri = resolve_tracking_uri(cfg.tracking.uri)
        weights, spec = load_encoder_state_dict(uri, model_uri)
        backbone = build_backbone(spec.backbone)
        backbone.load_state_dict(weights)
        module = _Encoder(backbone)
        inputs = (spec.image_size, tuple(spec.mean), tuple(spec.std))
    else:
        raise ValueError("evaluate_saved needs a checkpoint path or a model URI")
    result = evaluate(cfg, module.to(env.device), env, inputs=inputs)
    return result if env.is_main else None
