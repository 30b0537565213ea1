"""The training loop's keys (``trainer.*``) and the evaluation's (``eval.*``).

Every key once, with its type, range and default; orchestration/train/ and
orchestration/evaluate/ read them as ``cfg.trainer.<key>`` / ``cfg.eval.<key>``. A data
preset may change a default for its data (conf/data/cifar10.yaml: batch 256, 200 epochs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from sslstream.conf.typed import Ge, Gt, Interval, MinLen, Typed

__all__ = ["DTYPES", "PRECISIONS", "EvalConfig", "TrainerConfig"]

Count = Annotated[int, Ge(1)]
Auto = Literal["auto"]
PRECISIONS = ("auto", "bf16", "bfloat16", "fp16", "float16", "16", "fp32", "float32", "32")
DTYPES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


@dataclass(frozen=True, kw_only=True)
class TrainerConfig(Typed):
    """``trainer.*``: sizes are the embedded default's (a few minutes on a 2-core CPU)."""

    config_key: ClassVar[str] = "trainer"
    # checkpoints: <output_dir>/<run_name>/step-*.pt (+ .json manifests); a local folder or any
    # fsspec URL (s3://bucket/runs, gs://bucket/runs)
    output_dir: Annotated[str, MinLen(1)] = "./outputs"
    # fsspec options for an object-store output_dir (endpoint, profile, ...); the endpoint
    # also from AWS_ENDPOINT_URL, credentials from the store's usual chain
    storage_options: dict[str, Any] = field(default_factory=dict)
    epochs: Count = 15                   # the embedded default: 600 steps of batch 64 over 2,560 images
    max_steps: Count | None = None       # stop after this many optimizer steps (null: epochs x steps/epoch)
    batch_size: Count = 64               # per rank and optimizer step; global batch = batch_size x world size
    # micro-batches per optimizer step: each rank forwards/backwards batch_size /
    # accumulate_steps samples at a time (must divide batch_size); the optimizer, the lr
    # scaling and the schedules still see the global batch (docs/training.md)
    accumulate_steps: Count = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    precision: Literal[PRECISIONS] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool | Auto = "auto"  # auto: on CUDA
    compile: bool = False                # torch.compile the backbones in place (CUDA runs)
    # max global grad norm (e.g. 3.0); null: off, as in every reference recipe (clipping
    # rescales SGD steps of MoCo/SimSiam and shifts LARS's balance)
    grad_clip: Annotated[float, Gt(0)] | None = None
    warmup_epochs: Annotated[float, Ge(0)] = 1  # linear warmup of the lr, then cosine to 0 (optim.warmup_epochs wins when set)
    loader_backend: Literal["auto", "dali", "torchvision"] = "auto"  # auto: DALI when available
    # Threads and processes per rank, sized together from the CPUs this process may use
    # (orchestration/runtime/resources.py); the resolved values are trainer.resources in the params.
    loader_threads: Count | Auto = "auto"        # DALI / torchvision threads (auto: GPU <= 8, CPU half the rest)
    loader_processes: Annotated[int, Ge(0)] | Auto = "auto"  # reader processes (auto: 1 per 8 CPUs, <= 4; 0: threads)
    nvjpeg_padding_mib: Count | Auto = "auto"    # DALI mixed decoder padding (auto: room for a 2x image)
    loader_dtype: Literal[DTYPES] = "auto"       # auto: the autocast dtype on CUDA, fp32 on CPU
    hw_decoder_load: Annotated[float, Interval(ge=0, le=1)] = 0.65  # share of JPEG decoding on the hardware decoder
    prefetch: Count = 2                  # batches queued between the loader's threads and the step
    dali_pipeline_depth: Count = 2       # batches in flight inside DALI (1: synchronous)
    num_threads: Count | Auto | None = "auto"  # torch intra-op threads (auto: 1 on GPU, half the rest on CPU)
    # 0: only at the end (and on SIGINT / SIGTERM / SIGUSR1); uploaded off the step path
    checkpoint_every_steps: Annotated[int, Ge(0)] = 50
    keep_last: Count = 3                 # checkpoints kept per run
    init_from: Annotated[str, MinLen(1)] | None = None  # warm start a NEW run: models:/name@champion or a step-*.pt
    resume: bool = True                  # continue from the newest checkpoint of run_name
    log_every_steps: Count = 10          # monitors (loss, lr, tau, collapse, img/s, data wait)
    check_every_steps: Count | Auto = "auto"  # NaN / stop-signal agreement: auto = every step on CPU, log_every_steps on CUDA
    progress: Literal["auto", "bar", "log"] = "auto"  # auto: tqdm on a terminal
    deterministic: bool = False          # deterministic kernels (warn_only) + CUBLAS_WORKSPACE_CONFIG on CUDA
    dist_timeout_s: Annotated[float, Gt(0)] = 1800  # collective timeout of the process group


@dataclass(frozen=True, kw_only=True)
class EvalConfig(Typed):
    """``eval.*``: the frozen encoder on labelled shards (data.bank: the kNN bank / probe
    train set; data.test: the queries / probe test set). docs/training.md "Evaluation"."""

    config_key: ClassVar[str] = "eval"
    every_epochs: Annotated[int, Ge(0)] = 0  # also evaluate every N epochs (0: only at the end)
    at_end: bool = True
    batch_size: Count = 256              # per rank, feature extraction
    knn_k: Count = 200                   # InstDisc / lightly benchmark: k=200, t=0.1, cosine
    knn_t: Annotated[float, Gt(0)] = 0.1
    probe: bool = True                   # linear probe on frozen, precomputed features
    probe_epochs: Count = 30
    probe_lr: Annotated[float, Gt(0)] = 0.1
    probe_batch_size: Count = 256
    knn_dtype: Literal["float16", "float32"] = "float16"  # bank/query storage (float32: 2x memory)
    knn_query_chunk: Count = 1024        # queries scored at once
    knn_bank_chunk: Count = 16384        # bank rows per similarity block
    bank_samples: Annotated[int, Ge(0)] = 0  # 0: the whole data.bank; else this many, class-balanced
    bank_max_per_class: Annotated[int, Ge(0)] = 0  # 0: no cap
