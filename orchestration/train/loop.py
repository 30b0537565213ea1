"""`sslstream train`: the main job, from shards to a registered encoder.

One function, `train(cfg)` (its job built by orchestration/train/job.py: `build_job`), runs
the same way under `python`, `sslstream train` and `torchrun` (any number of nodes):

  data (generate the embedded default on first use) -> ShardStream -> TwoViewLoader
  -> Method (+ SyncBN on CUDA when it wants it) -> DDP -> optimizer + warmup-cosine
  -> resume from the newest checkpoint of ${run_name} -> steps (orchestration/train/step.py)
     with monitors, periodic checkpoints (uploaded in the background to any store) and
     evaluations; SIGINT / SIGTERM / SIGUSR1 -> checkpoint, exit 128 + signal
  -> final checkpoint -> evaluation (kNN, linear probe) -> rank 0: log the encoder,
     register it, alias challenger, promote to champion by the tracking module's rule.

Every rank takes exactly `total_steps` steps (the loader gives the same number of batches
per epoch on every rank), so collectives never wait on a rank that ran out of data.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from sslstream.orchestration.errors import RegistrationError
from sslstream.orchestration.evaluate.run import evaluate
from sslstream.orchestration.runtime import checkpoint as ckpt
from sslstream.orchestration.runtime import distributed as D
from sslstream.orchestration.runtime.interrupt import Interrupted, interrupts
from sslstream.orchestration.runtime.runstore import RunStore
from sslstream.orchestration.train.elastic import continued_loader_state, restore_rng
from sslstream.orchestration.train.job import Job, build_job, describe
from sslstream.orchestration.train.monitor import Monitor
from sslstream.orchestration.train.report import end_of_run_lines, eval_data_overrides
from sslstream.orchestration.train.result import TrainResult
from sslstream.orchestration.train.runlog import REGISTERED_MARKER, RunLog
from sslstream.orchestration.train.step import NonFiniteLossError, check_every, train_step
from sslstream.pipelines.shards.masking import mask

if TYPE_CHECKING:
    from sslstream.pipelines.views.loader import TwoViewLoader

log = logging.getLogger("sslstream.train")


class EpochEnd(Enum):
    """How the steps of one epoch (`_epoch`) ended."""

    EPOCH_DONE = "epoch_done"  # the loader's epoch is over: the next epoch follows
    STOPPED = "stopped"  # a rank asked to stop (SIGINT / SIGTERM): checkpointed, preempted
    LAST_STEP = "last_step"  # total_steps reached: the run is complete


def train(cfg: DictConfig) -> TrainResult:
    """Run (or resume) the job described by `cfg`; see the module docstring.

    SIGINT / SIGTERM / SIGUSR1 (orchestration/runtime/interrupt.py): during the steps the run
    stops at the next step boundary after a checkpoint and returns status "preempted"; in any other
    phase `Interrupted` is raised after keeping what can be kept (a checkpoint when the state
    is that of a finished step), with the MLflow run marked KILLED. Rerunning resumes.
    """
    installed = interrupts.install()
    try:
        return _train(cfg)
    finally:
        if installed:
            interrupts.uninstall()


def _train(cfg: DictConfig) -> TrainResult:
    s = _State()
    try:
        job = build_job(cfg)
    except Interrupted as e:
        last = _newest(cfg)
        kept = (f"newest checkpoint {last}; run the same command again to resume" if last
                else "nothing to keep yet; run the same command again to start")
        raise e.with_detail(f"while loading; {kept}") from None
    try:
        latest = job.resume_from  # rank 0's choice, checked to exist on every rank
        if latest is not None:
            _resume(job, latest, s)
        # rank 0's marker: with node-local output_dirs only its node has it
        done = D.broadcast_object(_registered_marker(job.store))
        if s.step >= job.total_steps and done is not None and int(done.get("step", -1)) == s.step:
            return _already_done(job, s, done)
        if job.env.is_main:
            print(describe(job), flush=True)
        runlog = RunLog(cfg, job.env, run_id=s.run_id, store=job.store)
    except Interrupted as e:
        job.loader.close()
        raise e.with_detail(f"while loading; {_kept(job, s)}") from None
    except BaseException:
        job.loader.close()
        raise
    s.run_id = runlog.run_id
    ck = _Checkpointer(job, s)
    tr = cfg.trainer
    monitor = Monitor(
        every=tr.log_every_steps, total_steps=job.total_steps, start_step=s.step,
        global_batch=job.global_batch, is_main=job.env.is_main,
        progress=tr.progress, sink=runlog.log_metrics, device=job.env.device,
    )
    first_step, t_loop = s.step, time.perf_counter()
    try:
        status, t_eval = _loop(job, s, ck, monitor, runlog)
        D.sync_buffers(job.method)  # rank 0's BN statistics (the checkpoint's) on every rank
        if not ck.save():
            raise NonFiniteLossError(f"non-finite weights after the last step {s.step}; "
                                     "the last good checkpoint is kept")
        ck.wait(final=status == "completed")  # a stop by a signal waits for its checkpoint too
    except NonFiniteLossError as e:
        ck.save()  # refuses non-finite weights: the newest checkpoint stays the last good state
        ck.wait()
        runlog.fail(str(e))
        raise
    except Interrupted as e:
        if s.consistent:  # a periodic evaluation: the weights are those of a finished step
            ck.save()
        ck.wait()
        runlog.pause(e.message())
        raise e.with_detail(f"while {s.phase} at step {s.step}/{job.total_steps}; "
                            f"{_kept(job, s)}; MLflow run {s.run_id} marked KILLED") from None
    except BaseException as e:
        runlog.fail(f"{type(e).__name__}: {e}")
        raise
    finally:
        wait_s = monitor.finish()
        monitor.close()
        job.loader.close()
        ck.close()
    result = TrainResult(status, s.step, job.total_steps, s.epoch, job.run_dir, run_id=s.run_id,
                         method=job.method)
    train_s = max(time.perf_counter() - t_loop - t_eval, 1e-9)
    result.metrics.update({  # this session's training throughput (periodic evaluations excluded)
        "perf/run_img_per_s": (s.step - first_step) * job.global_batch / train_s,
        "perf/run_data_wait_frac": min(1.0, wait_s / train_s),
        "perf/run_train_s": train_s,
    })
    runlog.log_metrics(dict(result.metrics), s.step)
    if status == "preempted":
        result.stopped_by = _signal_name(interrupts.signum)
        if job.env.is_main:
            print(f"stopped by {result.stopped_by} at step {s.step}/{job.total_steps}; "
                  f"checkpoint in {job.run_dir}; MLflow run {s.run_id} marked KILLED; run the "
                  "same command again to resume", flush=True)
        runlog.pause(f"stopped by {result.stopped_by}")
        return result
    try:
        _final_eval_and_register(job, s, runlog, result)
    except Interrupted as e:
        runlog.pause(e.message())
        raise e.with_detail(f"while {s.phase} after the last step {s.step}; the final "
                            f"checkpoint is in {job.run_dir}; MLflow run {s.run_id} marked "
                            "KILLED; run the same command again to evaluate and register"
                            ) from None
    except BaseException as e:
        if not isinstance(e, RegistrationError):  # finish() marked the run FAILED already
            runlog.fail(f"{type(e).__name__}: {e}")
        raise
    return result


def _kept(job: Job, s: _State) -> str:
    last = ckpt.latest_checkpoint(job.store)
    if last is None:
        return "no checkpoint yet; run the same command again to start over"
    return f"newest checkpoint {last}; run the same command again to resume"


def _signal_name(signum: int | None) -> str:
    import signal

    return signal.Signals(signum).name if signum else "a signal"


def _newest(cfg: DictConfig) -> ckpt.Checkpoint | None:
    """The newest published checkpoint of the run `cfg` names (None when there is none or
    its folder cannot be read): what a stop while loading tells the user."""
    try:
        store = RunStore.for_run(cfg.trainer.output_dir, str(cfg.run_name),
                                 dict(cfg.trainer.storage_options))
        return ckpt.latest_checkpoint(store)
    except OSError:
        return None


def _resume(job: Job, latest: ckpt.Checkpoint, s: _State) -> None:
    """Load every state of `latest` (weights, optimizer, schedules, scaler, RNGs, cursor).
    build_job checked that it was written by this run and set the per-rank batch to keep
    its global batch. On another number of ranks every rank continues the interrupted
    epoch from all the old ranks' cursors (orchestration/train/elastic.py)."""
    env = job.env
    state = ckpt.load_checkpoint(latest)  # CPU; load_state_dict moves to the device
    if int(state["total_steps"]) != job.total_steps and env.is_main:
        log.warning("resuming %s: total steps change from %s to %s (epochs/max_steps/"
                    "number of ranks changed)", latest, state["total_steps"], job.total_steps)
    job.method.load_state_dict(state["model"])
    job.optimizer.load_state_dict(state["optimizer"])
    job.scheduler.load_state_dict(state["scheduler"])
    job.scaler.load_state_dict(state["scaler"])
    s.step, s.epoch, s.epoch_step = int(state["step"]), int(state["epoch"]), int(state["epoch_step"])
    s.run_id = state.get("run_id")
    loaders = state["loaders"]
    if len(loaders) == env.world_size:  # the same ranks: every rank's own cursor
        ckpt.set_rng_state(state["rng"][env.rank])
        if s.epoch_step:
            job.loader.load_state_dict(loaders[env.rank])
    else:
        restore_rng(state["rng"], env.rank, int(job.cfg.seed), s.step)
        if s.epoch_step >= job.steps_per_epoch:  # less than a global batch was left
            s.epoch, s.epoch_step = s.epoch + 1, 0
        elif s.epoch_step:
            job.loader.load_state_dict(
                continued_loader_state(loaders, s.epoch_step, job.loader.batch_size))
        if env.is_main:
            print(f"continuing epoch {s.epoch} of {job.cfg.run_name} on {env.world_size} "
                  f"rank(s) (written by {len(loaders)}), global batch {job.global_batch}",
                  flush=True)
    s.saved_step = s.step
    if env.is_main:
        print(f"resuming {job.cfg.run_name} from {latest} (step {s.step}/{job.total_steps})", flush=True)


def _already_done(job: Job, s: _State, done: dict[str, Any]) -> TrainResult:
    """Finished and registered before: running the same command again changes nothing."""
    if job.env.is_main:
        print(f"{job.cfg.run_name} already finished at step {s.step} and was registered as "
              f"{done['registered_uri']}; use a new run_name to train again", flush=True)
    job.loader.close()
    return TrainResult("completed", s.step, job.total_steps, s.epoch, job.run_dir,
                       run_id=done.get("run_id"), registered_uri=done["registered_uri"],
                       promoted=bool(done.get("promoted")), promotion_reason=done.get("reason"),
                       method=job.method, tracking_uri=done.get("tracking_uri"))


class _Checkpointer:
    """Takes the job's full state at a step (every rank calls; the ranks that write the run
    folder hand a snapshot to the background uploader, orchestration/runtime/uploader.py)."""

    def __init__(self, job: Job, s: _State) -> None:
        from sslstream.orchestration.runtime.uploader import CheckpointUploader
        from sslstream.orchestration.train.lineage import checkpoint_meta

        self.job, self.s = job, s
        self.meta = checkpoint_meta(job.cfg, job.env.world_size, job.global_batch)
        self.uploader = (CheckpointUploader(job.store, job.cfg.trainer.keep_last)
                         if job.writes_checkpoints else None)

    def save(self) -> bool:
        """Checkpoint the current state; never a non-finite one (False then)."""
        job, s = self.job, self.s
        if s.saved_step == s.step:
            return True
        if not _all_finite(job.method, job.env):
            log.error("not checkpointing step %d: the weights are not finite "
                      "(the newest published checkpoint stays the last good state)", s.step)
            return False
        gathered = _gather_rng(ckpt.rng_state(), job.env)
        loaders = _gather_objects(ckpt.to_plain(job.loader.state_dict()), job.env)
        # Every writing rank first takes rank 0's buffers (BN statistics; DDP broadcasts
        # them at the next forward anyway): the checkpoints are identical whoever wrote them.
        if job.env.distributed:
            D.sync_buffers(job.method)
        if self.uploader is not None:
            state = {
                "model": job.method.state_dict(),
                "optimizer": job.optimizer.state_dict(),
                "scheduler": job.scheduler.state_dict(),
                "scaler": job.scaler.state_dict(),
                "rng": gathered,
                "loaders": loaders,  # per rank: each rank's stream cursor is its own
                "step": s.step,
                "epoch": s.epoch,
                "epoch_step": s.epoch_step,
                "total_steps": job.total_steps,
                "run_id": s.run_id,
                "run_name": str(job.cfg.run_name),
                "world_size": job.env.world_size,
                "global_batch": job.global_batch,
            }
            self.uploader.submit(s.step, state, {**self.meta, "run_id": s.run_id})
        D.barrier()
        s.saved_step = s.step
        return True

    def wait(self, final: bool = False) -> bool:
        """Wait for the uploads; whether the newest checkpoint is published. `final` (every
        rank calls it): the run's last checkpoint must be published, else StorageError on
        every rank (the newest published one is named: rerun to resume from it)."""
        ok = self.uploader.flush() if self.uploader is not None else True
        if not final:
            return ok
        if D.all_reduce_max(0.0 if ok else 1.0, self.job.env.device) > 0:
            from sslstream.pipelines.shards.storage import StorageError

            why = (self.uploader.failed.get(self.s.step, "see the log") if self.uploader
                   else "on another rank")
            raise StorageError(
                f"the final checkpoint (step {self.s.step}) could not be written to "
                f"{self.job.run_dir} ({why}); {_kept(self.job, self.s)}", self.job.run_dir)
        return True

    def close(self) -> None:
        if self.uploader is not None:
            self.uploader.close()


def _loop(job: Job, s: _State, ck: _Checkpointer, monitor: Monitor, runlog: RunLog
          ) -> tuple[str, float]:
    """Steps until total_steps or a stop: ("completed" | "preempted", seconds evaluating)."""
    cfg, tr, loader = job.cfg, job.cfg.trainer, job.loader
    grad_clip = tr.grad_clip
    every_ckpt = tr.checkpoint_every_steps
    every_eval = cfg.eval.every_epochs
    check = check_every(tr.check_every_steps, job.env.device, tr.log_every_steps)
    t_eval = 0.0
    monitor.reset_clock()
    while s.step < job.total_steps:
        if s.epoch_step == 0:
            loader.set_epoch(s.epoch)
            _log_sources(job, s, runlog)
        job.method.set_epoch(s.epoch)  # also on resume: epoch schedules read in the forward
        job.method.train()
        s.phase, s.consistent = "training", False
        with interrupts.deferred():  # a signal stops the run at the next step boundary
            end = _epoch(job, s, ck, monitor, loader, grad_clip, every_ckpt, check)
        if end is EpochEnd.STOPPED:
            return "preempted", t_eval
        if end is EpochEnd.LAST_STEP:
            return "completed", t_eval
        if every_eval and s.epoch % every_eval == 0:
            s.phase, s.consistent = "evaluating", True
            if interrupts.signum is not None:  # asked during the last steps (a CUDA check gap)
                raise Interrupted(interrupts.signum)
            t_e = time.perf_counter()
            D.sync_buffers(job.method)  # every rank evaluates the checkpointed (rank 0) state
            res = evaluate(cfg, job.method, job.env)
            dt = time.perf_counter() - t_e
            t_eval += dt
            monitor.exclude(dt)
            runlog.log_metrics(res.metrics(), s.step)
            if job.env.is_main:
                print(f"epoch {s.epoch}: kNN accuracy {res.knn_acc:.4f}", flush=True)
            s.consistent = False
    return "completed", t_eval


def _epoch(job: Job, s: _State, ck: _Checkpointer, monitor: Monitor, loader: TwoViewLoader,
           grad_clip: float | None, every_ckpt: int, check: int) -> EpochEnd:
    """The steps of one epoch, until the loader's epoch, a stop or the last step ends them.
    A loader that ends its epoch early raises: the ranks would take different step counts."""
    seen = 0
    monitor.clock.fetching()
    for batch in loader:
        monitor.clock.ready()
        seen += 1
        out = train_step(
            job.model, job.method, job.optimizer, job.scheduler, job.scaler,
            batch.views, epoch=s.epoch, step=s.step, total_steps=job.total_steps,
            amp_dtype=job.amp, grad_clip=grad_clip, stop_requested=interrupts.requested,
            check=(s.step + 1) % check == 0 or s.step + 1 == job.total_steps,
            accumulate_steps=job.cfg.trainer.accumulate_steps,
        )
        s.step += 1
        s.epoch_step += 1
        if s.epoch_step == job.steps_per_epoch:  # an epoch-end state resumes at the next epoch
            s.epoch, s.epoch_step = s.epoch + 1, 0
        monitor.update(s.step, s.epoch, out.loss, out.metrics, job.scheduler.get_last_lr()[0],
                       lambda: loader.counters, out.grad_norm)
        if out.stop:
            ck.save()
            return EpochEnd.STOPPED
        if every_ckpt and s.step % every_ckpt == 0 and not ck.save():
            raise NonFiniteLossError(
                f"non-finite weights after step {s.step} (no non-finite loss seen at the "
                "checks); check optim.lr / the method config; the last good checkpoint is kept"
            )
        if s.step >= job.total_steps:
            return EpochEnd.LAST_STEP
        monitor.clock.fetching()
    if s.epoch_step != 0 or seen == 0:
        raise RuntimeError(
            f"the loader yielded fewer than len(loader)={job.steps_per_epoch} batches in "
            f"epoch {s.epoch}; every rank must take the same number of steps"
        )
    return EpochEnd.EPOCH_DONE


def _log_sources(job: Job, s: _State, runlog: RunLog) -> None:
    """A weighted mix's samples per source this epoch: to the log and to MLflow as
    `data/source/<i>/samples` (rank 0; the counts are the same on every rank)."""
    mix = job.stream.mix
    if mix is None or not job.env.is_main:
        return
    counts = job.stream.source_counts(s.epoch)
    total = max(1, sum(counts))
    log.info("epoch %d takes %s", s.epoch, "; ".join(
        f"source {i} ({mask(src.label)}): {n} samples ({n / total:.1%})"
        for i, (src, n) in enumerate(zip(mix.sources, counts, strict=True))))
    runlog.log_metrics({f"data/source/{i}/samples": float(n) for i, n in enumerate(counts)},
                       s.step)


def _final_eval_and_register(job: Job, s: _State, runlog: RunLog, result: TrainResult) -> None:
    """Evaluate the final encoder, then (rank 0) log, register and maybe promote it."""
    s.phase = "evaluating"
    if interrupts.signum is not None:  # asked between the last step and here
        raise Interrupted(interrupts.signum)
    if job.cfg.eval.at_end:
        result.eval = evaluate(job.cfg, job.method, job.env)
        result.metrics.update(result.eval.metrics())
        runlog.log_metrics(result.eval.metrics(), s.step)
    feats = None
    if result.eval is not None and result.eval.test_features is not None:
        feats = (result.eval.test_features, result.eval.test_labels)
    s.phase = "registering"
    runlog.finish(job.method, result, feats)


@dataclass
class _State:
    """The loop's counters (mutable, shared with the save() closure)."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    run_id: str | None = None
    saved_step: int = -1
    phase: str = "loading"  # loading | training | evaluating | registering (for messages)
    consistent: bool = False  # the weights are those of a finished step (safe to checkpoint)


def _registered_marker(store: RunStore) -> dict[str, Any] | None:
    """What `runlog.finish` recorded after registering this run's final checkpoint."""
    try:
        return json.loads(store.read_bytes(REGISTERED_MARKER))
    except (OSError, ValueError):
        return None


def _all_finite(method: torch.nn.Module, env: D.DistEnv) -> bool:
    """Whether every floating tensor of the method's state is finite, on every rank."""
    flags = [torch.isfinite(t).all() for t in method.state_dict().values() if t.is_floating_point()]
    ok = bool(torch.stack(flags).all().item()) if flags else True
    return D.all_reduce_max(0.0 if ok else 1.0, env.device) == 0.0


def _gather_objects(obj: Any, env: D.DistEnv) -> list[Any]:
    """Every rank's `obj` (rank order) on every rank."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _gather_rng(rng: dict[str, Any], env: D.DistEnv) -> list[dict[str, Any]]:
    """Every rank's RNG state (rank order), so each rank resumes its own stream."""
    if not env.distributed:
        return [rng]
    out: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(out, rng)
    return out


def run_from_config(cfg: DictConfig) -> int:
    """CLI entry: train, print the outcome on rank 0, leave the process group.

    Returns 0, or 128 + the signal number when a signal stopped the steps after a checkpoint
    (130 SIGINT, 143 SIGTERM, 138 SIGUSR1: rerun to resume); `Interrupted` from the other phases reaches
    the CLI, which exits with the same codes.
    """
    t0 = time.perf_counter()
    try:
        result = train(cfg)
    finally:
        D.cleanup()  # every rank, also after a signal: the others wait in its barrier
    if result.status == "preempted":
        return 128 + int(signal.Signals.__members__.get(result.stopped_by or "", signal.SIGTERM))
    if os.environ.get("RANK", "0") == "0" and result.status == "completed":
        for line in end_of_run_lines(result, time.perf_counter() - t0,
                                     eval_data_overrides(cfg.data)):
            print(line, flush=True)
    return 0
