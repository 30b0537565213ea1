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

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from orchestration import checkpoint as ckpt
from orchestration import distributed as D
from orchestration.evaluate import EvalResult, evaluate
from orchestration.monitor import Monitor
from orchestration.runlog import REGISTERED_MARKER, RunLog
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
    promotion_reason: str | None = None
    method: Any = field(default=None, repr=False)  # the trained Method (unwrapped)


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
        num_classes=int(data.num_classes) if data.get("num_classes") else None,  # label check
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
    from models.optim import WarmupCosine, build_optimizer
    from orchestration.warmstart import backbone_weights, build_method_warm

    tr = cfg.trainer
    env = D.init_distributed(str(tr.get("device", "auto")), float(tr.get("dist_timeout_s", 1800)))
    if tr.get("num_threads"):
        torch.set_num_threads(int(tr.num_threads))
    if tr.get("deterministic", False):
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(int(cfg.seed))  # identical initial weights on every rank
    run_dir = Path(str(tr.output_dir)).expanduser() / str(cfg.run_name)
    prepare_data(cfg, env)

    latest = ckpt.latest_checkpoint(run_dir)
    warm = None
    if latest is None and tr.get("init_from"):  # a resumed run's checkpoint holds everything
        warm = backbone_weights(cfg, str(tr.init_from))
    method = build_method_warm(cfg, warm, D.process_group()).to(env.device)
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
    global_batch = int(tr.batch_size) * env.world_size
    # SyncBN conversion (CUDA DDP) happens here, before the optimizer collects parameters
    model = wrap_model(method, env.device, distributed=env.distributed, compile=bool(tr.get("compile", False)))
    optimizer = build_optimizer(method.parameter_groups(), cfg.optim, global_batch)
    warmup = int(round(_warmup_epochs(cfg) * steps_per_epoch))
    scheduler = WarmupCosine(optimizer, min(warmup, total_steps), total_steps)
    amp = autocast_dtype(str(tr.get("precision", "auto")), env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == torch.float16)

    s = _State()
    if latest is not None and not tr.get("resume", True):
        raise ValueError(
            f"trainer.resume=false but {run_dir} already holds checkpoints of run_name="
            f"{cfg.run_name}; choose a new run_name (or trainer.output_dir), or delete them"
        )
    if latest is not None:
        state = ckpt.load_checkpoint(latest)  # CPU; load_state_dict moves to the device
        if int(state["total_steps"]) != total_steps and env.is_main:
            log.warning("resuming %s: total steps change from %s to %s (epochs/max_steps/"
                        "batch size/world size changed)", latest, state["total_steps"], total_steps)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        s.step, s.epoch, s.epoch_step = int(state["step"]), int(state["epoch"]), int(state["epoch_step"])
        s.run_id = state.get("run_id")
        rngs = state["rng"]
        if int(state.get("world_size", 1)) == env.world_size:
            ckpt.set_rng_state(rngs[env.rank])
            if s.epoch_step:
                loader.load_state_dict(state["loader"])
        else:  # per-rank cursors and RNG streams do not map: restart the interrupted epoch
            ckpt.set_rng_state(rngs[0])
            if s.epoch_step and env.is_main:
                log.warning("world size changed (%s -> %s): epoch %d restarts from its first batch",
                            state.get("world_size"), env.world_size, s.epoch)
            s.epoch_step = 0
        s.saved_step = s.step
        if env.is_main:
            print(f"resuming {cfg.run_name} from {latest} (step {s.step}/{total_steps})", flush=True)

    done = _registered_marker(run_dir)
    if s.step >= total_steps and done is not None and int(done.get("step", -1)) == s.step:
        # finished and registered before: running the same command again changes nothing
        if env.is_main:
            print(f"{cfg.run_name} already finished at step {s.step} and was registered as "
                  f"{done['registered_uri']}; use a new run_name to train again", flush=True)
        loader.close()
        return TrainResult("completed", s.step, total_steps, s.epoch, run_dir, run_id=done.get("run_id"),
                           registered_uri=done["registered_uri"], promoted=bool(done.get("promoted")),
                           promotion_reason=done.get("reason"), method=method)

    runlog = RunLog(cfg, env, run_id=s.run_id)
    s.run_id = runlog.run_id

    def save() -> bool:
        """Checkpoint the current state (all ranks call it); never a non-finite one."""
        if s.saved_step == s.step:
            return True
        if not _all_finite(method, env):
            log.error("not checkpointing step %d: the weights are not finite "
                      "(the newest checkpoint on disk stays the last good state)", s.step)
            return False
        gathered = _gather_rng(ckpt.rng_state(), env)
        if env.is_main:
            state = {
                "model": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": gathered,
                "loader": ckpt.to_plain(loader.state_dict()),
                "step": s.step,
                "epoch": s.epoch,
                "epoch_step": s.epoch_step,
                "total_steps": total_steps,
                "run_id": s.run_id,
                "run_name": str(cfg.run_name),
                "world_size": env.world_size,
            }
            ckpt.save_checkpoint(state, run_dir, s.step, keep_last=int(tr.get("keep_last", 3)))
        D.barrier()
        s.saved_step = s.step
        return True

    stop = StopFlag()
    stop.install()
    monitor = Monitor(
        every=int(tr.get("log_every_steps", 10)),
        total_steps=total_steps,
        start_step=s.step,
        global_batch=global_batch,
        is_main=env.is_main,
        progress=str(tr.get("progress", "auto")),
        sink=runlog.log_metrics,
    )
    grad_clip = float(tr.grad_clip) if tr.get("grad_clip") else None
    every_ckpt = int(tr.get("checkpoint_every_steps", 0) or 0)
    every_eval = int(cfg.eval.get("every_epochs", 0) or 0)
    status = "completed"
    first_step, wait0, t_loop, t_eval = s.step, loader.data_wait_s, time.perf_counter(), 0.0
    try:
        monitor.reset_clock(loader.data_wait_s)
        while s.step < total_steps and status == "completed":
            if s.epoch_step == 0:
                loader.set_epoch(s.epoch)
            method.train()
            seen = 0
            for batch in loader:
                seen += 1
                out = train_step(
                    model, method, optimizer, scheduler, scaler, batch.view1, batch.view2,
                    step=s.step, total_steps=total_steps, amp_dtype=amp,
                    grad_clip=grad_clip, stop_requested=stop.requested,
                )
                s.step += 1
                s.epoch_step += 1
                if s.epoch_step == steps_per_epoch:  # an epoch-end state resumes at the next epoch
                    s.epoch, s.epoch_step = s.epoch + 1, 0
                monitor.update(
                    s.step, s.epoch, out.loss, out.metrics, scheduler.get_last_lr()[0],
                    loader.data_wait_s, dict(loader.counters),
                )
                if out.stop:
                    save()
                    status = "preempted"
                    break
                if every_ckpt and s.step % every_ckpt == 0 and not save():
                    raise NonFiniteLossError(
                        f"non-finite weights after step {s.step} (loss was finite); "
                        "check optim.lr / the method config; the last good checkpoint is kept"
                    )
                if s.step >= total_steps:
                    break
            if status != "completed" or s.step >= total_steps:
                break
            if s.epoch_step != 0 or seen == 0:  # the loader ended early: ranks would desync
                raise RuntimeError(
                    f"the loader yielded fewer than len(loader)={steps_per_epoch} batches in "
                    f"epoch {s.epoch}; every rank must take the same number of steps"
                )
            if every_eval and s.epoch % every_eval == 0:
                t_e = time.perf_counter()
                res = evaluate(cfg, method, env)
                t_eval += time.perf_counter() - t_e
                runlog.log_metrics(res.metrics(), s.step)
                if env.is_main:
                    print(f"epoch {s.epoch}: kNN accuracy {res.knn_acc:.4f}", flush=True)
        if not save():
            raise NonFiniteLossError(f"non-finite weights after the last step {s.step}; "
                                     "the last good checkpoint is kept")
    except NonFiniteLossError as e:
        save()  # the bad step was not applied: this is the last good state
        runlog.fail(str(e))
        raise
    except BaseException as e:
        runlog.fail(f"{type(e).__name__}: {e}")
        raise
    finally:
        monitor.close()
        stop.uninstall()
        loader.close()
    result = TrainResult(status, s.step, total_steps, s.epoch, run_dir, run_id=s.run_id, method=method)
    train_s = max(time.perf_counter() - t_loop - t_eval, 1e-9)
    result.metrics.update({  # this session's training throughput (periodic evaluations excluded)
        "perf/run_img_per_s": (s.step - first_step) * global_batch / train_s,
        "perf/run_data_wait_frac": min(1.0, (loader.data_wait_s - wait0) / train_s),
        "perf/run_train_s": train_s,
    })
    runlog.log_metrics(dict(result.metrics), s.step)
    if status == "preempted":
        if env.is_main:
            print(f"stopped by SIGTERM at step {s.step}/{total_steps}; checkpoint in {run_dir}; "
                  "run the same command again to resume", flush=True)
        runlog.pause()
        return result
    if cfg.eval.get("at_end", True):
        result.eval = evaluate(cfg, method, env)
        result.metrics.update(result.eval.metrics())
        runlog.log_metrics(result.eval.metrics(), s.step)
    feats = None
    if result.eval is not None and result.eval.test_features is not None:
        feats = (result.eval.test_features, result.eval.test_labels)
    runlog.finish(method, result, feats)
    return result


@dataclass
class _State:
    """The loop's counters (mutable, shared with the save() closure)."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    run_id: str | None = None
    saved_step: int = -1




def _registered_marker(run_dir: Path) -> dict[str, Any] | None:
    """What `runlog.finish` recorded after registering this run's final checkpoint."""
    path = run_dir / REGISTERED_MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _all_finite(method: torch.nn.Module, env: D.DistEnv) -> bool:
    """Whether every floating tensor of the method's state is finite, on every rank."""
    flags = [torch.isfinite(t).all() for t in method.state_dict().values() if t.is_floating_point()]
    ok = bool(torch.stack(flags).all().item()) if flags else True
    return D.all_reduce_max(0.0 if ok else 1.0, env.device) == 0.0


def _gather_rng(rng: dict[str, Any], env: D.DistEnv) -> list[dict[str, Any]]:
    """Every rank's RNG state (rank order), so each rank resumes its own stream."""
    if not env.distributed:
        return [rng]
    out: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(out, rng)
    return out


def run_from_config(cfg: DictConfig) -> int:
    """CLI entry: train, print the outcome on rank 0, leave the process group."""
    t0 = time.perf_counter()
    result = train(cfg)
    if os.environ.get("RANK", "0") == "0" and result.status == "completed":
        if result.eval is not None:
            print(f"kNN accuracy: {result.eval.knn_acc:.4f}", flush=True)
            if result.eval.probe_acc is not None:
                print(f"linear probe accuracy: {result.eval.probe_acc:.4f}", flush=True)
        if result.registered_uri:
            role = "champion" if result.promoted else f"challenger: {result.promotion_reason}"
            print(f"registered model: {result.registered_uri} ({role})", flush=True)
        print(f"done in {time.perf_counter() - t0:.0f}s: {result.step} steps, run {result.run_id}", flush=True)
    D.cleanup()  # every rank, also after SIGTERM: the others wait in its barrier
    return 0
