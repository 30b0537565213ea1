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
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from orchestration.distributed import DistEnv, all_reduce_max, gather_rows, loader_threads

log = logging.getLogger("sslstream.eval")
PROGRESS_EVERY_S = 15.0  # feature extraction over a large bank takes minutes: say so


@torch.no_grad()
def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted labels of `query` (N, D) by weighted kNN over `bank` (M, D), cosine."""
    q = F.normalize(query.float(), dim=1)
    b = F.normalize(bank.float(), dim=1)
    k = min(k, b.shape[0])
    preds = []
    for s in range(0, q.shape[0], chunk):
        sim = q[s : s + chunk] @ b.T  # (n, M)
        w, idx = sim.topk(k, dim=1)
        lab = bank_labels[idx]  # (n, k)
        scores = torch.zeros(sim.shape[0], num_classes, device=q.device)
        scores.scatter_add_(1, lab, (w / t).exp())
        preds.append(scores.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int | None = None,
    k: int = 200,
    t: float = 0.1,
) -> float:
    """Top-1 accuracy of weighted kNN (k, temperature t) of `query` against `bank`."""
    if bank.shape[0] == 0 or query.shape[0] == 0:
        raise ValueError("kNN needs a non-empty bank and query set (check data.bank / data.test)")
    if num_classes is None:
        num_classes = int(max(bank_labels.max(), query_labels.max()).item()) + 1
    pred = knn_predict(query, bank, bank_labels.long(), num_classes, k=k, t=t)
    return float((pred.cpu() == query_labels.cpu()).float().mean().item())


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int | None = None,
    *,
    epochs: int = 20,
    lr: float = 0.1,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    standardize: bool = True,
    seed: int = 0,
) -> float:
    """Top-1 test accuracy of a linear classifier trained on frozen features.

    Features are standardised with the train statistics (BatchNorm-without-affine in
    MoCo v3's and MAE's probes) so one learning rate works across backbones whose feature
    scales differ by orders of magnitude. The head starts at N(0, 0.01), bias 0; SGD with
    momentum and a cosine learning rate over the epochs. Deterministic for a seed.
    """
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max()).item()) + 1
    x = train_x.float()
    xt = test_x.float()
    if standardize:
        mu, sd = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
        x, xt = (x - mu) / sd, (xt - mu) / sd
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = x.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    y = train_y.long().to(x.device)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        for s in range(0, n, batch_size):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        pred = head(xt).argmax(1)
    return float((pred.cpu() == test_y.long().cpu()).float().mean().item())


@torch.no_grad()
def extract_features(
    embed: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    gather: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample the loader yields, gathered over ranks.
    `progress(samples so far)` is called after every batch (this rank's count)."""
    feats, labels = [], []
    seen = 0
    for x, y in batches:
        if device.type == "cuda":
            # channels_last like the trained model (a layout mismatch costs a conversion per conv)
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                f = embed(x)
        else:
            f = embed(x.to(device))
        feats.append(f.float().flatten(1))
        labels.append(y.to(device).long())
        seen += int(y.shape[0])
        if progress is not None:
            progress(seen)
    lab = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if not gather:
        return (torch.cat(feats) if feats else torch.zeros(0, 0, device=device)), lab
    # A rank may have seen no sample at all (tiny split, many ranks): agree on the width.
    dim = int(all_reduce_max(float(feats[0].shape[1]) if feats else 0.0, device))
    f = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    return gather_rows(f), gather_rows(lab)


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
    from pipelines.loader import build_eval_loader

    data, ev = cfg.data, cfg.eval
    for key in ("bank", "test"):
        if not data.get(key):
            raise ValueError(f"evaluation needs labelled shards: data.{key} is not set")
    t0 = time.perf_counter()

    from pipelines.recipes import TwoViewRecipe

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
                log.info("eval: %s features %d%s samples on rank 0 (%.0f/s)", split, n, of,
                         n / (now - t_split))

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
    from orchestration.checkpoint import load_checkpoint
    from orchestration.distributed import init_distributed

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
        from orchestration.encoder_model import build_encoder
        from orchestration.mlflow_env import resolve_tracking_uri
        from orchestration.registry import load_encoder_state_dict

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
