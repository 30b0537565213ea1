"""`sslstream train`: the main job, from shards to a registered encoder.

One function, `train(cfg)`, runs the same way under `python`, `sslstream train` and
`torchrun` (any number of nodes):

  data (generate the embedded default on first use) -> ShardStream -> TwoViewLoader
  -> Method (+ SyncBN on CUDA when it wants it) -> DDP -> optimizer + warmup-cosine
  -> resume from the newest checkpoint of ${run_name} -> steps (orchestration/step.py)
     with monitors, periodic checkpoints and evaluations, SIGTERM -> checkpoint, exit 0
  -> final checkpoint -> evaluation (kNN, linear probe) -> rank 0: log the encoder,
     register it, alias challenger, promote to champion by the tracking module's rule.

Every rank takes exactly `total_steps` steps (the loader gives the same number of batches
per epoch on every rank), so collectives never wait on a rank that ran out of data.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from orchestration import checkpoint as ckpt
from orchestration import distributed as D
from orchestration.evaluate import EvalResult, evaluate
from orchestration.monitor import Monitor
from orchestration.runlog import RunLog
from orchestration.step import NonFiniteLossError, StopFlag, autocast_dtype, train_step, wrap_model

log = logging.getLogger("sslstream.train")


@dataclass
class TrainResult:
    status: str  # "completed" | "preempted"
    step: int
    total_steps: int
    epoch: int
    run_dir: Path
    run_id: str | None = None
    eval: EvalResult | None = None
    model_uri: str | None = None
    registered_uri: str | None = None
    promoted: bool | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def prepare_data(cfg: DictConfig, env: D.DistEnv) -> None:
    """Generate the embedded synthetic data set on first use (local rank 0; others wait)."""
    data = cfg.data
    if not data.get("generate", False):
        return
    from pipelines.synthetic import ensure_synthetic, is_complete

    if env.local_rank == 0 and not is_complete(data.root):
        log.info("generating the synthetic data set under %s (first use)", data.root)
        ensure_synthetic(
            data.root,
            train_samples=int(data.generate_train_samples),
            test_samples=int(data.generate_test_samples),
            image_size=int(data.image_size),
            seed=int(data.get("generate_seed", 0)),
        )
    D.barrier()


def _channels_last(cfg: DictConfig, device: torch.device) -> bool:
    v = cfg.trainer.get("channels_last", "auto")
    return device.type == "cuda" if str(v) == "auto" else bool(v)


def build_loader(cfg: DictConfig, env: D.DistEnv) -> Any:
    from pipelines.loader import TwoViewLoader
    from pipelines.recipes import TwoViewRecipe
    from pipelines.stream import ShardStream

    data, tr = cfg.data, cfg.trainer
    stream = ShardStream(
        data.train,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=int(data.get("num_workers", 2)),
        seed=int(cfg.seed),
        shuffle=True,
        shuffle_buffer=int(data.get("shuffle_buffer", 1000)),
        exact_epoch=bool(data.get("exact_epoch", False)),
        storage_options=dict(data.get("storage_options") or {}),
        max_bad_fraction=float(data.get("max_bad_fraction", 0.01)),
    )
    return TwoViewLoader(
        stream,
        TwoViewRecipe.from_config(cfg.augment),
        batch_size=int(tr.batch_size),
        device=env.device,
        backend=str(tr.get("loader_backend", "auto")),
        seed=int(cfg.seed),
        num_threads=int(tr.get("loader_threads", 2)),
        channels_last=_channels_last(cfg, env.device),
        prefetch=int(tr.get("prefetch", 2)),
    )


def _warmup_epochs(cfg: DictConfig) -> float:
    opt = cfg.optim.get("warmup_epochs", None)
    return float(opt if opt is not None else cfg.trainer.get("warmup_epochs", 0))


def train(cfg: DictConfig) -> TrainResult:
    """Run (or resume) the job described by `cfg`; see the module docstring."""
    from models.methods import build_method
    from models.optim import WarmupCosine, build_optimizer

    tr = cfg.trainer
    env = D.init_distributed(str(tr.get("device", "auto")), float(tr.get("dist_timeout_s", 1800)))
    if tr.get("num_threads"):
        torch.set_num_threads(int(tr.num_threads))
    if tr.get("deterministic", False):
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(int(cfg.seed))  # identical initial weights on every rank
    run_dir = Path(str(tr.output_dir)).expanduser() / str(cfg.run_name)
    prepare_data(cfg, env)

    method = build_method(cfg.method, cfg.backbone, process_group=D.process_group()).to(env.device)
    if _channels_last(cfg, env.device):
        method = method.to(memory_format=torch.channels_last)
    loader = build_loader(cfg, env)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ValueError(
            f"data.train={cfg.data.train} gives no full batch of trainer.batch_size="
            f"{tr.batch_size} per rank ({env.world_size} rank(s)); lower the batch size"
        )
    total_steps = int(tr.max_steps) if tr.get("max_steps") else int(tr.epochs) * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    global_batch = int(tr.batch_size) * env.world_size
    optimizer = build_optimizer(method.parameter_groups(), cfg.optim, global_batch)
    warmup = int(round(_warmup_epochs(cfg) * steps_per_epoch))
    scheduler = WarmupCosine(optimizer, min(warmup, total_steps), total_steps)
    amp = autocast_dtype(str(tr.get("precision", "auto")), env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == torch.float16)
    model = wrap_model(method, env.device, distributed=env.distributed, compile=bool(tr.get("compile", False)))

    step, epoch, epoch_step, run_id = 0, 0, 0, None
    latest = ckpt.latest_checkpoint(run_dir) if tr.get("resume", True) else None
    if latest is not None:
        state = ckpt.load_checkpoint(latest, map_location=env.device)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, epoch_step = int(state["step"]), int(state["epoch"]), int(state["epoch_step"])
        run_id = state.get("run_id")
        if epoch_step:
            loader.load_state_dict(state["loader"])
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
        if env.is_main:
            print(f"resuming {cfg.run_name} from {latest} (step {step}/{total_steps})", flush=True)

    runlog = RunLog(cfg, env, run_id=run_id)
    stop = StopFlag()
    stop.install()
    monitor = Monitor(
        every=int(tr.get("log_every_steps", 10)),
        total_steps=total_steps,
        start_step=step,
        global_batch=global_batch,
        is_main=env.is_main,
        progress=str(tr.get("progress", "auto")),
        sink=runlog.log_metrics,
    )
    grad_clip = float(tr.grad_clip) if tr.get("grad_clip") else None
    every_ckpt = int(tr.get("checkpoint_every_steps", 0) or 0)
    every_eval = int(cfg.eval.get("every_epochs", 0) or 0)
    saved_step = step if latest is not None else -1

    def save() -> None:
        nonlocal saved_step
        if saved_step == step:
            return
        rng = ckpt.rng_state()
        gathered = _gather_rng(rng, env)
        if env.is_main:
            state = {
                "model": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": gathered,
                "loader": ckpt.to_plain(loader.state_dict()),
                "step": step,
                "epoch": epoch,
                "epoch_step": epoch_step,
                "total_steps": total_steps,
                "run_id": runlog.run_id,
                "run_name": str(cfg.run_name),
                "world_size": env.world_size,
            }
            ckpt.save_checkpoint(state, run_dir, step, keep_last=int(tr.get("keep_last", 3)))
        D.barrier()
        saved_step = step

    status = "completed"
    try:
        monitor.reset_clock(loader.data_wait_s)
        while step < total_steps and status == "completed":
            if epoch_step == 0:
                loader.set_epoch(epoch)
            method.train()
            for batch in loader:
                out = train_step(
                    model, method, optimizer, scheduler, scaler, batch.view1, batch.view2,
                    step=step, total_steps=total_steps, amp_dtype=amp,
                    grad_clip=grad_clip, stop_requested=stop.requested,
                )
                step += 1
                epoch_step += 1
                end_of_epoch = epoch_step >= steps_per_epoch
                if end_of_epoch:
                    epoch, epoch_step = epoch + 1, 0
                monitor.update(
                    step, epoch, out.loss, out.metrics, scheduler.get_last_lr()[0],
                    loader.data_wait_s, dict(loader.counters),
                )
                if out.stop:
                    save()
                    status = "preempted"
                    break
                if every_ckpt and step % every_ckpt == 0:
                    save()
                if end_of_epoch or step >= total_steps:
                    break
            else:  # the loader ended early: a loader/stream bug that would desync ranks
                raise RuntimeError(
                    f"the loader yielded fewer than len(loader)={steps_per_epoch} batches in "
                    f"epoch {epoch}; every rank must take the same number of steps"
                )
            if status == "completed" and every_eval and epoch_step == 0 and epoch % every_eval == 0 and step < total_steps:
                res = evaluate(cfg, method, env)
                runlog.log_metrics(res.metrics(), step)
                if env.is_main:
                    print(f"epoch {epoch}: kNN acc {res.knn_acc:.4f}", flush=True)
    except NonFiniteLossError:
        save()  # the weights were not touched by the bad step: this is the last good state
        runlog.fail("non-finite loss")
        raise
    finally:
        monitor.close()
        stop.uninstall()
    save()
    result = TrainResult(status, step, total_steps, epoch, run_dir, run_id=runlog.run_id)
    if status == "preempted":
        if env.is_main:
            print(f"stopped by SIGTERM at step {step}/{total_steps}; checkpoint in {run_dir}; "
                  "run the same command again to resume", flush=True)
        runlog.pause()
        return result
    if cfg.eval.get("at_end", True):
        result.eval = evaluate(cfg, method, env)
        result.metrics.update(result.eval.metrics())
        runlog.log_metrics(result.eval.metrics(), step)
    runlog.finish(method, result)
    return result


def _gather_rng(rng: dict[str, Any], env: D.DistEnv) -> list[dict[str, Any]]:
    """Every rank's RNG state (rank order), so each rank resumes its own stream."""
    if not env.distributed:
        return [rng]
    out: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(out, rng)
    return out


def run_from_config(cfg: DictConfig) -> int:
    """CLI entry: train, print the outcome, map failures to exit codes."""
    t0 = time.perf_counter()
    result = train(cfg)
    if os.environ.get("RANK", "0") == "0":
        if result.status == "preempted":
            return 0
        if result.eval is not None:
            print(f"kNN accuracy: {result.eval.knn_acc:.4f}", flush=True)
            if result.eval.probe_acc is not None:
                print(f"linear probe accuracy: {result.eval.probe_acc:.4f}", flush=True)
        if result.registered_uri:
            print(f"registered model: {result.registered_uri}"
                  + (" (champion)" if result.promoted else " (challenger)"), flush=True)
        print(f"done in {time.perf_counter() - t0:.0f}s: {result.step} steps, run {result.run_id}", flush=True)
    D.cleanup()
    return 0


def config_to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
