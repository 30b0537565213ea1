"""`sslstream retrain`: new shards -> train -> evaluate -> register -> promote if better.

Meant to be started by any scheduler (cron, a Kubernetes CronJob, Airflow), as often as
one likes; docs/retrain.md has the examples and the exit codes. One call:

1. snapshots the data source (`retrain.source`: shard prefix, manifest URL, brace pattern,
   on any fsspec store) and reads the champion of `tracking.registry.name`;
2. if the champion was trained on a snapshot that already holds every current shard
   (same names, same content), stops: exit 0, nothing done (recorded as tags on the
   registered model);
3. otherwise derives the run key from (snapshot, config hash), takes the lease for the
   model (orchestration/retrain/lease.py) and, holding it (heartbeat), either finds the version
   that run key already registered (a retry after a crash) or trains: `train(cfg)` with
   `run_name` = run key, so a rerun resumes the same checkpoints and MLflow run, on exactly
   the snapshot's shard URLs; train registers the encoder as challenger and promotes it to
   champion by the registry's rule (margin, collapse check). On unlabelled data (no
   evaluation split, `eval.at_end=false`) it registers an unevaluated challenger, as
   `sslstream train` does, which is never promoted (decision `registered-unevaluated`);
4. tags the run and the version with the decision and the snapshot, logs the shard listing
   as `retrain/snapshot.json`, prints the decision, releases the lease.

The exit code tells a scheduler what to do next (see EXIT_* and docs/retrain.md).

On one node the job is one process and trains under its own torchrun child
(`retrain.nproc_per_node`, orchestration/retrain/torchrun.py). Started by a launcher that spans
several nodes (WORLD_SIZE > LOCAL_WORLD_SIZE: one torchrun agent per node, docs/cluster.md),
every rank runs it: rank 0 alone snapshots, decides and holds the lease, every rank trains,
rank 0 registers and promotes once, and every rank exits with rank 0's code (`_across_nodes`).
"""

from __future__ import annotations

import _thread
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf, open_dict
from sslstream.orchestration.retrain.exits import (
    EXIT_CONFIG,
    EXIT_LEASE_LOST,
    EXIT_LOCK_HELD,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_REGISTRY,
    EXIT_SOURCE,
    EXIT_TRAIN_FAILED,
    RetrainExit,
)
from sslstream.orchestration.retrain.lease import Lease, LeaseHeld
from sslstream.orchestration.retrain.runkey import config_hash, run_key
from sslstream.orchestration.retrain.stores import LeaseStoreError, open_store
from sslstream.orchestration.schema.retrain import lease_url_ok
from sslstream.pipelines.shards.snapshot import Snapshot, source_base, take_snapshot

log = logging.getLogger("sslstream.retrain")


class TrainOutcome(Protocol):
    """What retrain reads of a training run: `train`'s TrainResult, or the outcome rank 0 of
    a torchrun training wrote (orchestration/retrain/torchrun.py: RunOutcome)."""

    status: str  # "completed" | "preempted" (stopped by a signal after a checkpoint)
    run_id: str | None
    stopped_by: str | None  # "SIGINT" / "SIGTERM" when preempted


TrainFn = Callable[[DictConfig], TrainOutcome]


@dataclass(frozen=True)
class RetrainSettings:
    """`cfg.retrain` resolved for one model: the lease URL and the heartbeat filled in.

    The keys, their types, ranges and defaults are orchestration/schema/retrain.py's; this
    adds what follows from them (a lease beside the source unless retrain.lock.url names
    one, a heartbeat of ttl_s / 3 unless set) and refuses what only then shows: a source
    whose folder cannot hold a lease.
    """

    source: str | list[str]
    storage_options: dict
    init: str
    lock_url: str
    ttl_s: float
    heartbeat_s: float
    wait_s: float
    grace_s: float
    run_key_ignore: tuple[str, ...]
    enabled: bool
    nproc_per_node: int = 1
    torchrun_args: tuple[str, ...] = ()
    held_exit_code: int = EXIT_LOCK_HELD

    @classmethod
    def from_config(cls, cfg: DictConfig, model_name: str) -> RetrainSettings:
        r, lock = cfg.retrain, cfg.retrain.lock
        source = r.source if r.source is not None else cfg.data.train
        if not source:
            raise ValueError("retrain.source (or data.train) must name the shards to watch")
        source = source if isinstance(source, str) else [str(s) for s in source]
        so = dict(r.storage_options if r.storage_options is not None else cfg.data.storage_options)
        ttl = lock.ttl_s
        hb = lock.heartbeat_s if lock.heartbeat_s is not None else ttl / 3.0
        url = lock.url or f"{source_base(source).rstrip('/')}/_sslstream_retrain.{model_name}.lease"
        if not lease_url_ok(url):
            raise ValueError(
                f"the lease would be {url} (beside retrain.source), a store without atomic "
                "conditional writes: set retrain.lock.url to an s3://, gs:// or local path")
        return cls(source, so, r.init, str(url), ttl, hb, lock.wait_s, lock.grace_s,
                   tuple(r.run_key_ignore), r.enabled, r.nproc_per_node,
                   tuple(r.torchrun_args), lock.held_exit_code)


def _say(msg: str) -> None:
    print(f"sslstream retrain: {msg}", flush=True)


def _registry(cfg: DictConfig):
    """The MLflow side, or RetrainExit(EXIT_REGISTRY) if the server does not answer."""
    from sslstream.orchestration.retrain.champion import RetrainRegistry
    from sslstream.orchestration.tracking import mlflow_env
    from sslstream.orchestration.tracking.tracker import TrackingSettings

    ts = TrackingSettings.from_config(cfg.tracking)
    uri = mlflow_env.resolve_tracking_uri(ts.uri)
    if mlflow_env.is_http(uri):
        mlflow_env.apply_http_limits(ts.http.max_retries, ts.http.timeout_s,
                                     ts.http.backoff_factor)
    if (why := mlflow_env.probe(uri, ts.probe_timeout_s)) is not None:
        raise RetrainExit(EXIT_REGISTRY, f"MLflow at {uri} is unreachable: {why}")
    return RetrainRegistry(uri, ts.registry, ts.experiment)


def _check_evaluation(cfg: DictConfig) -> None:
    """Before the source is read: a run without evaluation (unlabelled data) registers an
    unevaluated challenger, unless tracking.registry.register_unevaluated=false, when
    retraining would have no outcome. (An evaluating run without its labelled splits is
    the config check's error, orchestration/schema.)"""
    ev = cfg.get("eval") or {}
    if bool(ev.get("at_end", True) or int(ev.get("every_epochs", 0) or 0)):
        return
    if not OmegaConf.select(cfg, "tracking.registry.register_unevaluated", default=True):
        raise RetrainExit(EXIT_CONFIG, (
            "without evaluation (eval.at_end=false eval.every_epochs=0) and with "
            "tracking.registry.register_unevaluated=false a run registers nothing: "
            "retraining would have no outcome; drop one of them (docs/retrain.md)"))


def _nothing_new(reg, snap: Snapshot) -> tuple[Any, str | None]:
    """(champion, why there is nothing to do) - the reason is None when training is due."""
    champ = reg.champion()
    if champ is None:
        return None, None
    if champ.tags.get("retrain.snapshot_id") == snap.id:
        return champ, f"champion v{champ.version} was trained on this snapshot ({snap.id[:12]})"
    known = reg.champion_fingerprints(champ)
    if known is not None and not snap.new_since(known):
        return champ, (f"no shard is new since champion v{champ.version}'s data "
                       f"({len(snap.shards)} shards, none added or changed)")
    return champ, None


def _run_key(cfg: DictConfig, st: RetrainSettings, model: str, snap: Snapshot) -> str:
    """Run key from (snapshot, config hash); init=champion is part of the hash (a warm start
    is another run than a scratch one; scratch keys are unchanged). The champion's VERSION is
    not: a retry after a crash that already promoted the new version must find that run,
    not start a second one warm-started from it."""
    ignore = list(st.run_key_ignore) + ["data.train", "run_name"]
    if cfg.data.bank == cfg.data.train:
        ignore.append("data.bank")
    chash = config_hash(cfg, ignore)
    if st.init == "champion":
        chash = hashlib.sha256(f"{chash}|init=champion".encode()).hexdigest()
    return run_key(model, snap.id, chash)


def _train_config(cfg: DictConfig, key: str, snap: Snapshot, warm_from: str | None
                  ) -> DictConfig:
    """The job's config with run_name = run key and data = exactly the snapshot's shards."""
    tcfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(tcfg):
        bank_is_train = tcfg.data.bank == tcfg.data.train
        tcfg.run_name = key
        tcfg.data.train = snap.urls
        if bank_is_train:
            tcfg.data.bank = snap.urls
        tcfg.data.generate = False
        # the trainer's warm start (orchestration/train/warmstart.py): backbone weights of this
        # exact version (not the alias, which may move), only for a new run; a resumed run's
        # checkpoint already holds everything
        if warm_from is not None:
            tcfg.trainer.init_from = warm_from
    return tcfg


def _run_training(train_fn: TrainFn, tcfg: DictConfig, lease: Lease,
                  heartbeat_s: float) -> TrainOutcome:
    """train_fn under the lease's heartbeat; a lost lease interrupts the training.

    SIGINT / SIGTERM (orchestration/runtime/interrupt.py) stop the training with a resumable
    state in any phase: EXIT_PREEMPTED. A configuration error found by the trainer (e.g. an
    unset data.test) is EXIT_CONFIG, not a training failure a scheduler would retry.
    """
    from sslstream.orchestration.errors import ConfigError, RegistrationError
    from sslstream.orchestration.runtime.interrupt import Interrupted

    lost_reason: list[str] = []
    training = threading.Event()

    def on_lost(reason: str) -> None:
        lost_reason.append(reason)
        if training.is_set() and threading.current_thread() is not threading.main_thread():
            _thread.interrupt_main()  # KeyboardInterrupt in train_fn, between two steps

    training.set()
    lease.start_heartbeat(on_lost, heartbeat_s)
    try:
        result = train_fn(tcfg)
    except KeyboardInterrupt as e:
        if lost_reason:
            raise RetrainExit(EXIT_LEASE_LOST, f"{lost_reason[0]}; training stopped (another "
                              "holder may be running it); rerun to resume") from None
        if isinstance(e, Interrupted):
            raise RetrainExit(EXIT_PREEMPTED, f"run {tcfg.run_name} {e}") from None
        raise
    except RetrainExit:
        raise
    except ConfigError as e:
        raise RetrainExit(EXIT_CONFIG, f"config error: {e}") from e
    except RegistrationError as e:
        raise RetrainExit(EXIT_REGISTRY, f"training finished but registration failed: {e}; "
                          "rerun to retry (the final checkpoint is kept)") from e
    except Exception as e:
        log.exception("training of %s failed", tcfg.run_name)
        raise RetrainExit(EXIT_TRAIN_FAILED, f"training failed: {type(e).__name__}: {e}") from e
    finally:
        training.clear()  # a loss during the bookkeeping after training interrupts nothing
    if lost_reason and result.status == "preempted":
        # the lease's interrupt reached the trainer as a signal: it checkpointed and stopped
        raise RetrainExit(EXIT_LEASE_LOST, f"{lost_reason[0]}; training stopped after a "
                          "checkpoint (another holder may be running it); rerun to resume")
    return result


def _generate_embedded_data(cfg: DictConfig) -> None:
    """The embedded default (data.generate=true) works in a fresh directory, as with train."""
    if not cfg.data.generate:
        return
    import torch
    from sslstream.orchestration.runtime.distributed import DistEnv
    from sslstream.orchestration.train.job import prepare_data

    prepare_data(cfg, DistEnv(0, 1, 0, torch.device("cpu")))


def _record_failure(reg: Any, e: RetrainExit, key: str, snap: Snapshot,
                    decision: str | None = None) -> None:
    """Best effort: the failed (or skipped) attempt as registered-model tags (the trainer has
    already marked its MLflow run FAILED); a tracking outage must not hide the exit code."""
    try:
        reg.record_check(decision or f"failed-exit-{e.code}", f"run {key}: {e}", snap)
    except Exception as err:  # the original failure is what the scheduler must see
        log.warning("could not record the failure in MLflow: %s", err)


def retrain(cfg: DictConfig, *, train_fn: TrainFn | None = None, registry: Any = None) -> int:
    """Run one retraining check; returns the exit code (see module docstring). Under a
    launcher that spans several nodes every rank calls this (see `_across_nodes`)."""
    from sslstream.orchestration.runtime.distributed import launched_across_nodes

    if launched_across_nodes():
        return _across_nodes(cfg, train_fn=train_fn, registry=registry)
    return _retrain_here(cfg, train_fn=train_fn, registry=registry)


def _retrain_here(cfg: DictConfig, *, train_fn: TrainFn | None, registry: Any) -> int:
    """The decision flow in this process (rank 0's part under a multi-node launcher)."""
    from sslstream.orchestration.runtime.interrupt import Interrupted

    try:
        _say(_retrain(cfg, train_fn=train_fn, registry=registry))
        return EXIT_OK
    except Interrupted as e:  # outside the training (snapshot, lease, bookkeeping)
        print(f"sslstream retrain: {e}; the lease is released; rerun to resume "
              f"(exit {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except RetrainExit as e:
        print(f"sslstream retrain: {'FAILED: ' if e.code else ''}{e} (exit {e.code})",
              file=sys.stderr if e.code else sys.stdout, flush=True)
        return e.code


run = retrain  # `sslstream.orchestration.retrain.job.run(cfg) -> int`, the name the CLI brief used


def _retrain(cfg: DictConfig, *, train_fn: TrainFn | None, registry: Any) -> str:
    from sslstream.orchestration.runtime.distributed import launched_across_nodes

    model = cfg.tracking.registry.name
    try:
        st = RetrainSettings.from_config(cfg, model)
    except (ValueError, TypeError) as e:
        raise RetrainExit(EXIT_CONFIG, str(e)) from e
    if not st.enabled:
        return "retrain.enabled=false: nothing to do"
    if not cfg.tracking.enabled:  # before any data is generated or any store is touched
        raise RetrainExit(EXIT_CONFIG, "tracking.enabled=false: retraining needs the model "
                          "registry to know the champion")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not launched_across_nodes():
        raise RetrainExit(EXIT_CONFIG, "sslstream retrain runs as one process on one node and "
                          "launches torchrun itself: use retrain.nproc_per_node=N instead of "
                          "torchrun (across nodes: one agent per node, docs/cluster.md)")
    _check_evaluation(cfg)
    try:
        _generate_embedded_data(cfg)
        snap = take_snapshot(st.source, st.storage_options)
    except (OSError, ValueError, KeyError) as e:
        raise RetrainExit(EXIT_SOURCE, f"data source {st.source} unusable: {e}") from e
    _say(f"source {snap.source}: {len(snap.shards)} shards, snapshot {snap.id[:12]}")
    if snap.note():
        _say(snap.note())
    try:
        reg = registry if registry is not None else _registry(cfg)
    except ValueError as e:  # unknown tracking.* keys and the like
        raise RetrainExit(EXIT_CONFIG, str(e)) from e
    try:
        champ, why = _nothing_new(reg, snap)
        if why is not None:
            reg.record_check("nothing-new", why, snap)
            return f"nothing to do: {why}"
    except RetrainExit:
        raise
    except Exception as e:
        raise RetrainExit(EXIT_REGISTRY, f"reading champion of {model!r}: {e}") from e

    key = _run_key(cfg, st, model, snap)
    try:
        lease = Lease(open_store(st.lock_url, st.storage_options), key, ttl_s=st.ttl_s,
                      grace_s=st.grace_s)
        lease.acquire(wait_s=st.wait_s)
    except LeaseHeld as e:
        _record_failure(reg, RetrainExit(EXIT_LOCK_HELD, f"skipped: {e}"), key, snap,
                        decision="lock-held")
        if st.held_exit_code == EXIT_OK:  # retrain.lock.held_exit_code=0: a skip, not a failure
            return f"skipped: {e}"
        raise RetrainExit(EXIT_LOCK_HELD, str(e)) from e
    except ValueError as e:
        raise RetrainExit(EXIT_CONFIG, str(e)) from e
    except (LeaseStoreError, OSError) as e:
        raise RetrainExit(EXIT_SOURCE, f"lease {st.lock_url} unusable: {e}") from e
    if lease.took_over_from:
        _say(f"took over the expired lease of {lease.took_over_from}")
    try:
        return _under_lease(cfg, st, reg, snap, key, lease, train_fn)
    finally:
        lease.release()


def _under_lease(cfg: DictConfig, st: RetrainSettings, reg: Any, snap: Snapshot, key: str,
                 lease: Lease, train_fn: TrainFn | None) -> str:
    try:
        # Re-check under the lease: a holder we waited for may have done the work.
        champ, why = _nothing_new(reg, snap)
        if why is not None:
            reg.record_check("nothing-new", why, snap)
            return f"nothing to do: {why}"
        existing = reg.find_version(key)
    except Exception as e:
        raise RetrainExit(EXIT_REGISTRY, f"reading registry of {reg.name!r}: {e}") from e
    new = snap.new_since(reg.champion_fingerprints(champ) or {}) if champ else list(snap.shards)
    tags: dict[str, Any] = {"run_key": key, "snapshot_id": snap.id, "source": snap.source,
                            "shards": len(snap.shards), "new_shards": len(new), "init": st.init}
    if champ is None:
        reason = f"no champion yet: training on {len(snap.shards)} shards"
    elif "retrain.snapshot_id" not in champ.tags:
        reason = (f"champion v{champ.version} has no recorded data snapshot: training on all "
                  f"{len(snap.shards)} shards")
    else:
        reason = f"{len(new)} new or changed shard(s) since champion v{champ.version}"
    if existing is not None:
        _say(f"run {key} already registered v{existing}; finishing its bookkeeping")
        run_id = reg.version_info(existing)[0]
    else:
        _say(f"{reason}; training run {key}")
        warm = champ.uri if (st.init == "champion" and champ is not None) else None
        tcfg = _train_config(cfg, key, snap, warm)
        try:
            if train_fn is None and st.nproc_per_node > 1:
                from sslstream.orchestration.retrain.torchrun import run_torchrun

                result = run_torchrun(tcfg, lease, st.heartbeat_s, st.nproc_per_node,
                                      st.torchrun_args)
            else:
                if train_fn is None:
                    from sslstream.orchestration.train.loop import train as train_fn
                result = _run_training(train_fn, tcfg, lease, st.heartbeat_s)
            if result.status == "preempted":
                by = result.stopped_by or "a signal"
                raise RetrainExit(EXIT_PREEMPTED, f"run {key} stopped by {by} after a "
                                  "checkpoint; rerun to resume")
        except RetrainExit as e:
            _record_failure(reg, e, key, snap)
            raise
        run_id = result.run_id
        try:
            existing = reg.find_version(key)
        except Exception as e:
            raise RetrainExit(EXIT_REGISTRY, f"reading registry of {reg.name!r}: {e}") from e
        if existing is None:
            raise RetrainExit(EXIT_REGISTRY, f"run {key} trained but registered no version of "
                              f"{reg.name!r} (tracking disabled or unreachable during training?)")
    try:
        promoted = reg.is_champion(existing)
        vtags = reg.version_info(existing)[1]
        evaluated = vtags.get("evaluated", "true") != "false"
        decision = ("promoted" if promoted else "registered-not-promoted" if evaluated
                    else "registered-unevaluated")
        why = vtags.get("promotion_reason", "")
        if champ is None and why.startswith("no champion yet"):  # said once, in `reason`
            why = why.partition("; ")[2]
        tags.update(decision=decision, reason=f"{reason}; {why}".strip("; "))
        reg.record(existing, run_id, tags, snap)
        reg.record_check(decision, tags["reason"], snap)
    except Exception as e:
        raise RetrainExit(EXIT_REGISTRY, f"tagging v{existing} of {reg.name!r}: {e}") from e
    verdict = ("champion" if promoted else "challenger only" if evaluated
               else "challenger, not evaluated: never promoted")
    return f"{reg.name} v{existing} ({verdict}): {tags['reason']}"


# --- across nodes ---------------------------------------------------------------------------


def _across_nodes(cfg: DictConfig, *, train_fn: TrainFn | None, registry: Any) -> int:
    """`sslstream retrain` as a multi-node job: every rank of the launcher runs this.

    Rank 0 alone takes the snapshot, reads the registry and takes the lease (with its
    heartbeat), exactly as the one-node job does; when it decides to train it sends the
    training config to the other ranks, and every rank trains it (`train(cfg)`: one DDP job,
    which registers and promotes once, on rank 0). Rank 0 then does the bookkeeping and sends
    its exit code, which every rank exits with. A lost lease stops the training of every rank
    at the next step boundary (the stop is agreed across ranks, as for a signal).

    When rank 0 leaves the training by an exception (another rank may be inside a collective)
    nothing more is sent: its process ends and the launcher stops the others.
    """
    from sslstream.orchestration.runtime import distributed as D

    if train_fn is None:
        from sslstream.orchestration.train.loop import train as train_fn
    env = D.init_distributed(cfg.trainer.device, cfg.trainer.dist_timeout_s)
    if not env.is_main:
        return _follow(train_fn)
    leader = _Leader(train_fn)
    code = _retrain_here(cfg, train_fn=leader, registry=registry)
    if not leader.unsettled:
        D.broadcast_object(("done", code))
        D.cleanup()
    return code


class _Leader:
    """Rank 0's train_fn across nodes: sends the config to the other ranks, then trains it.
    `unsettled`: the training ended by an exception the other ranks may not share."""

    def __init__(self, train_fn: TrainFn) -> None:
        self.train_fn, self.unsettled = train_fn, False

    def __call__(self, tcfg: DictConfig) -> Any:
        from sslstream.orchestration.errors import RegistrationError
        from sslstream.orchestration.runtime.distributed import broadcast_object

        broadcast_object(("train", OmegaConf.to_container(tcfg, resolve=True)))
        self.unsettled = True
        try:
            result = self.train_fn(tcfg)
        except RegistrationError:  # raised after every rank finished training
            self.unsettled = False
            raise
        self.unsettled = False
        return result


def _follow(train_fn: TrainFn) -> int:
    """A rank other than 0: train what rank 0 sends, exit with the code rank 0 sends."""
    from sslstream.orchestration.errors import ConfigError
    from sslstream.orchestration.runtime import distributed as D
    from sslstream.orchestration.runtime.interrupt import Interrupted

    try:
        msg = D.broadcast_object(None)
        if msg[0] == "train":
            try:
                train_fn(OmegaConf.create(msg[1]))
            except ConfigError:
                return EXIT_CONFIG
            except Exception as e:
                log.error("training failed on this rank: %s: %s", type(e).__name__, e)
                return EXIT_TRAIN_FAILED
            msg = D.broadcast_object(None)
    except Interrupted:
        return EXIT_PREEMPTED
    D.cleanup()
    return int(msg[1])
