"""Evaluation of a frozen encoder: weighted kNN and a linear probe on labelled shards.

kNN follows InstDisc (Wu et al. 2018) as lightly's benchmark module does: cosine similarity
of L2-normalised features against a memory bank (the labelled train split, `data.bank`),
the k=200 nearest neighbours vote with weight exp(sim / t), t=0.1. The linear probe follows
the papers' protocol at small scale: backbone in eval() mode, features computed once,
a linear head initialised N(0, 0.01), SGD + cross-entropy for a few epochs.

Under DDP each rank embeds its own part of the split (the eval loader yields every sample
exactly once over all ranks) and the features are gathered, so every rank holds the same
bank and computes the same numbers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import nn

from orchestration.evaluate.features import PROGRESS_EVERY_S, extract_features
from orchestration.evaluate.knn import knn_accuracy
from orchestration.evaluate.probe import linear_probe
from orchestration.runtime.distributed import DistEnv, loader_threads

log = logging.getLogger("sslstream.eval")


@dataclass
class EvalResult:
    knn_acc: float
    probe_acc: float | None
    embedding_std: float
    effective_rank: float
    bank_size: int
    test_size: int
    seconds: float
    # the test split's features and labels (for the PCA plot); not metrics
    test_features: torch.Tensor | None = field(default=None, repr=False)
    test_labels: torch.Tensor | None = field(default=None, repr=False)

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
    from models.collapse import effective_rank, embedding_std
    from pipelines.views.eval_loader import build_eval_loader

    data, ev = cfg.data, cfg.eval
    for key in ("bank", "test"):
        if not data.get(key):
            raise ValueError(f"evaluation needs labelled shards: data.{key} is not set")
    t0 = time.perf_counter()

    from pipelines.views.recipes import TwoViewRecipe

    # Eval inputs are normalised and sized like the training views, so the encoder sees
    # the statistics it was trained on.
    if inputs is None:
        recipe = TwoViewRecipe.from_config(cfg.augment)
        inputs = (recipe.size, tuple(recipe.view1.mean), tuple(recipe.view1.std))
    size, mean, std = inputs

    def features(split: str, urls: str) -> tuple[torch.Tensor, torch.Tensor]:
        loader = build_eval_loader(
            urls,
            image_size=int(size),
            batch_size=int(ev.batch_size),
            device=env.device,
            storage_options=dict(data.get("storage_options") or {}),
            rank=env.rank,
            world_size=env.world_size,
            num_workers=int(data.get("num_workers", 2)),
            backend=str(cfg.trainer.get("loader_backend", "auto")),
            mean=tuple(mean),
            std=tuple(std),
            num_threads=loader_threads(cfg.trainer.get("loader_threads", "auto")),
        )
        t_split, last = time.perf_counter(), [time.perf_counter()]
        stream = getattr(loader, "stream", None)
        per_rank = len(range(0, len(stream), env.world_size)) if stream is not None else None

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
            out = extract_features(method.embed, loader, env.device, progress=progress)
        finally:
            loader.close()
        if env.is_main:
            log.info("eval: %s features of %d samples in %.1fs", split, out[0].shape[0],
                     time.perf_counter() - t_split)
        return out

    was_training = method.training
    method.eval()
    try:
        bank_x, bank_y = features("bank", data.bank)
        test_x, test_y = features("test", data.test)
    finally:
        method.train(was_training)
    num_classes = data.get("num_classes") or None
    knn = knn_accuracy(bank_x, bank_y, test_x, test_y, num_classes, k=int(ev.knn_k), t=float(ev.knn_t))
    probe = None
    if ev.get("probe", True):
        probe = linear_probe(
            bank_x,
            bank_y,
            test_x,
            test_y,
            num_classes,
            epochs=int(ev.probe_epochs),
            lr=float(ev.probe_lr),
            batch_size=int(ev.probe_batch_size),
            seed=int(cfg.get("seed", 0)),
        )
    return EvalResult(
        knn_acc=knn,
        probe_acc=probe,
        embedding_std=float(embedding_std(test_x)),
        effective_rank=float(effective_rank(test_x)),
        bank_size=int(bank_x.shape[0]),
        test_size=int(test_x.shape[0]),
        seconds=time.perf_counter() - t0,
        test_features=test_x,
        test_labels=test_y,
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
    from orchestration.runtime.checkpoint import load_checkpoint
    from orchestration.runtime.distributed import init_distributed

    env = init_distributed(str(cfg.trainer.get("device", "auto")))
    inputs = None
    if checkpoint is not None:
        from models.methods import build_method

        module: nn.Module = build_method(cfg.method, cfg.backbone)
        state = load_checkpoint(checkpoint)
        try:
            module.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(
                f"checkpoint {checkpoint} does not fit method={cfg.method.name} "
                f"backbone={cfg.backbone.name}: pass the overrides it was trained with ({e})"
            ) from e
    elif model_uri is not None:
        from orchestration.tracking.encoder_model import build_encoder
        from orchestration.tracking.mlflow_env import resolve_tracking_uri
        from orchestration.tracking.registry import load_encoder_state_dict

        uri = resolve_tracking_uri(cfg.tracking.get("uri"))
        weights, spec = load_encoder_state_dict(uri, model_uri)
        backbone = build_encoder(spec)
        backbone.load_state_dict(weights)
        module = _Encoder(backbone)
        inputs = (spec.image_size, tuple(spec.mean), tuple(spec.std))
    else:
        raise ValueError("evaluate_saved needs a checkpoint path or a model URI")
    result = evaluate(cfg, module.to(env.device), env, inputs=inputs)
    return result if env.is_main else None
