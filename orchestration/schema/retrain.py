"""Scheduled retraining's keys (``retrain.*``; docs/retrain.md).

``sslstream retrain`` is safe to start from any scheduler, as often as one likes: it trains
only when the source holds shards the champion was not trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

from sslstream.conf.typed import Check, Ge, Gt, MinLen, Typed
from sslstream.orchestration.schema.data import Sources

__all__ = ["LEASE_SCHEMES", "LockConfig", "RetrainConfig", "lease_url_ok"]

NonEmpty = Annotated[str, MinLen(1)]
# leases need atomic conditional writes: S3 and GCS objects, or a local file (link + flock)
LEASE_SCHEMES = ("s3://", "gs://", "gcs://", "file://")


def lease_url_ok(url: str) -> bool:
    return url.startswith(LEASE_SCHEMES) or "://" not in url


LeaseUrl = Annotated[str, Check(lease_url_ok, "s3://, gs:// or a local path (leases need "
                                              "atomic conditional writes)")]


@dataclass(frozen=True, kw_only=True)
class LockConfig(Typed):
    """``retrain.lock.*``: the lease that keeps two retraining jobs of a model apart."""

    config_key: ClassVar[str] = "retrain.lock"
    url: LeaseUrl | None = None          # null: <source folder>/_sslstream_retrain.<model>.lease
    ttl_s: Annotated[float, Gt(0)] = 300  # a holder that stops renewing loses the lease after this long
    heartbeat_s: Annotated[float, Gt(0)] | None = None  # renewal period (null: ttl_s / 3)
    wait_s: Annotated[float, Ge(0)] = 0  # wait this long for a busy lease before exiting 3
    grace_s: Annotated[float, Ge(0)] = 10  # extra seconds past expiry before a takeover (clock skew)
    held_exit_code: Literal[0, 3] = 3    # 0 for schedulers that cannot tell "skip" from "fail"


RUN_KEY_IGNORE = [
    "tracking", "retrain", "embed", "trainer.output_dir", "trainer.progress", "trainer.log_every_steps",
    "trainer.loader_threads", "trainer.prefetch", "trainer.num_threads",
    "trainer.loader_processes", "trainer.nvjpeg_padding_mib", "trainer.dali_pipeline_depth",
    "trainer.resources", "trainer.dist_timeout_s", "data.root", "data.storage_options",
    "data.num_workers", "data.generate", "data.generate_train_samples",
    "data.generate_test_samples", "data.cache_dir", "data.cache_limit",
]


@dataclass(frozen=True, kw_only=True)
class RetrainConfig(Typed):
    """``retrain.*`` (orchestration/retrain/job.py)."""

    config_key: ClassVar[str] = "retrain"
    enabled: bool = True                 # false: exit 0 at once (pause without touching the scheduler)
    # the shards to watch: folder / prefix, manifest URL or brace pattern, on any fsspec store
    # (a weighted mix of data.train: every source's shards; a change in any one is new data)
    source: Sources | None = "${data.train}"
    storage_options: dict | None = None  # fsspec options for source and lease (null: data.storage_options)
    init: Literal["scratch", "champion"] = "scratch"  # champion: warm start from the champion's encoder
    nproc_per_node: Annotated[int, Ge(1)] = 1  # >1: train under torchrun (child of this process, one node)
    torchrun_args: list[str] = field(default_factory=list)  # e.g. ["--master-port=29511"]
    lock: LockConfig = field(default_factory=LockConfig)
    # config keys that do not change the trained model, left out of the run key's config hash
    # (data.train and run_name are always left out: the snapshot stands for the data)
    run_key_ignore: list[str] = field(default_factory=lambda: list(RUN_KEY_IGNORE))
    schedule: str | None = None          # informational only (e.g. "0 3 * * *"): the scheduler decides
