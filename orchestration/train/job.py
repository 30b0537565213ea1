"""Building a training job: data on first use, loader, method, DDP, optimizer, schedules.

`build_job(cfg)` does everything `sslstream train` needs before the first step, in the
order the pieces depend on each other (process group -> data -> method -> loader ->
SyncBN/compile/DDP -> optimizer -> schedules); orchestration/train/loop.py runs the loop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, open_dict
from sslstream.orchestration.errors import ConfigError, UserError
from sslstream.orchestration.runtime import checkpoint as ckpt
from sslstream.orchestration.runtime import distributed as D
from sslstream.orchestration.runtime.resources import (
    Resources,
    local_ranks,
    plan_resources,
    usable_cpus,
)
from sslstream.orchestration.runtime.runstore import RunStore
from sslstream.orchestration.train.step import autocast_dtype, wrap_model

if TYPE_CHECKING:
    from sslstream.models.methods import Method
    from sslstream.models.optim import WarmupCosine
    from sslstream.pipelines.shards.stream import ShardStream
    from sslstream.pipelines.views.loader import TwoViewLoader

log = logging.getLogger("sslstream.train")


@dataclass
class Job:
    """Everything the loop works on, built once by `_build_job`."""

    cfg: DictConfig
    env: D.DistEnv
    store: RunStore  # the run's folder: ${trainer.output_dir}/${run_name}, on any store
    method: Method
    model: torch.nn.Module  # what the step calls: the method, or DDP around it
    loader: TwoViewLoader
    stream: ShardStream  # the loader's stream (its mix's per-source counts are logged)
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    resources: Resources | None = None
    resume_from: ckpt.Checkpoint | None = None  # rank 0's choice, the same on every rank

    @property
    def run_dir(self) -> str:
        """The run folder's URL (a local path or s3://, gs://...; credentials masked)."""
        return self.store.url

    @property
    def writes_checkpoints(self) -> bool:
        return checkpoint_writer(self.store, self.env)


def build_job(cfg: DictConfig) -> Job:
    """Process group, data, method (+ warm start), loader, DDP, optimizer, schedules."""
    from sslstream.models.optim import WarmupCosine, build_optimizer
    from sslstream.orchestration.train.warmstart import backbone_weights, build_method_warm

    tr = cfg.trainer
    env = D.init_distributed(tr.device, tr.dist_timeout_s)
    res = job_resources(cfg, env.device)
    torch.set_num_threads(res.torch_threads)
    with open_dict(cfg):  # the resolved sizes go to the run's params and config artifact
        cfg.trainer.resources = res.as_config()
    if tr.deterministic:
        apply_deterministic(env.device)
    elif env.device.type == "cuda":
        # fixed input sizes: let cuDNN pick the fastest conv algorithms once; TF32 for the
        # fp32 matmuls left outside bf16 autocast (losses, heads' norms)
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(int(cfg.seed))  # identical initial weights on every rank
    store = open_run_store(cfg, env)
    latest = resume_point(cfg, env, store)
    prepare_data(cfg, env)
    check_eval_splits(cfg)  # before training, not after it
    check_cache_limit(cfg)
    warm = None
    if latest is None and tr.init_from:  # a resumed run's checkpoint holds everything
        warm = backbone_weights(cfg, str(tr.init_from))
    method = build_method_warm(cfg, warm, D.process_group()).to(env.device)
    if _channels_last(cfg, env.device):
        method = method.to(memory_format=torch.channels_last)
    stream = build_stream(cfg, env)
    loader = build_loader(cfg, env, res, stream)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"data.train={cfg.data.train} gives no full batch of trainer.batch_size="
            f"{tr.batch_size} per rank ({env.world_size} rank(s)); lower the batch size"
        )
    total_steps = tr.max_steps if tr.max_steps is not None else tr.epochs * steps_per_epoch
    global_batch = tr.batch_size * env.world_size
    # SyncBN conversion (CUDA DDP) happens here, before the optimizer collects parameters
    model = wrap_model(method, env.device, distributed=env.distributed,
                       compile=tr.compile)
    optimizer = build_optimizer(method.parameter_groups(), cfg.optim, global_batch)
    warmup = int(round(_warmup_epochs(cfg) * steps_per_epoch))
    scheduler = WarmupCosine(optimizer, min(warmup, total_steps), total_steps,
                             weight_decay_end=cfg.optim.weight_decay_end)
    amp = autocast_dtype(tr.precision, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == torch.float16)
    return Job(cfg, env, store, method, model, loader, stream, optimizer, scheduler, scaler,
               amp, steps_per_epoch, total_steps, global_batch, res, latest)


def checkpoint_writer(store: RunStore, env: D.DistEnv) -> bool:
    """Whether this rank writes the run folder: rank 0 for a shared store; with a local
    output_dir every node's local rank 0 (node-local folders each hold the run; on a shared
    file system they write the same bytes)."""
    return env.local_rank == 0 if store.local else env.is_main


def open_run_store(cfg: DictConfig, env: D.DistEnv) -> RunStore:
    """The run folder, checked to take writes before anything else is done: an unreachable
    or refused store fails here on every rank, naming the URL (credentials masked). Then
    what a killed writer left there (unpublished objects) is removed: after every rank's
    check, so that no node removes another's check object on a shared file system."""
    from sslstream.pipelines.shards.storage import StorageError

    tr = cfg.trainer
    store = RunStore.for_run(tr.output_dir, str(cfg.run_name), dict(tr.storage_options))
    writer = checkpoint_writer(store, env)
    error: BaseException | None = None
    if writer:
        try:
            store.check_writable()
        except StorageError as e:
            error = StorageError(
                f"trainer.output_dir={store.url.rsplit('/', 1)[0]}: cannot write checkpoints "
                f"to {store.url}: {e} (check the URL, the store's credentials and "
                "trainer.storage_options)", store.url)
    D.fail_together(error, env)
    if writer:
        try:
            stale, size = ckpt.remove_unpublished(store)
        except StorageError as e:  # litter is not worth stopping for
            log.warning("could not remove unpublished checkpoint files in %s: %s", store.url, e)
        else:
            if stale:
                log.info("removed %d unpublished checkpoint file(s) (%.1f MB) of an "
                         "interrupted checkpoint write in %s", stale, size / 1e6, store.url)
    return store


def resume_point(cfg: DictConfig, env: D.DistEnv, store: RunStore) -> ckpt.Checkpoint | None:
    """The checkpoint every rank resumes from (rank 0's newest), checked to come from this
    run's config (orchestration/train/lineage.py); None: a new run. A resume keeps the
    checkpoint's global batch: `trainer.batch_size` is set to its share on this number of
    ranks (a ConfigError when they cannot share it equally)."""
    from sslstream.orchestration.train.lineage import check_resumable

    tr = cfg.trainer
    if not tr.resume:
        if ckpt.latest_checkpoint(store) is not None:
            raise UserError(
                f"trainer.resume=false but {store.url} already holds checkpoints of run_name="
                f"{cfg.run_name}; choose a new run_name (or trainer.output_dir), or delete them")
        return None
    latest = D.agree_on_checkpoint(store, env)
    if latest is not None:
        batch = check_resumable(latest, cfg, env.world_size)
        if batch != tr.batch_size:  # the checkpoint's global batch on this number of ranks
            if env.is_main:
                log.warning("resuming %s on %d rank(s): trainer.batch_size=%d becomes %d per "
                            "rank, keeping the run's global batch of %d", latest.url,
                            env.world_size, tr.batch_size, batch, batch * env.world_size)
            with open_dict(cfg):
                cfg.trainer.batch_size = batch
    return latest


def job_resources(cfg: DictConfig, device: torch.device, cpus: int | None = None) -> Resources:
    """This rank's threads and processes (orchestration/runtime/resources.py) from the
    config's explicit values and the CPUs the process may use."""
    tr = cfg.trainer
    return plan_resources(
        cpus=usable_cpus() if cpus is None else cpus, local_ranks=local_ranks(),
        gpu=device.type == "cuda", torch_threads=tr.num_threads,
        loader_threads=tr.loader_threads, reader_processes=tr.loader_processes,
        image_side=cfg.data.image_size, nvjpeg_padding_mib=tr.nvjpeg_padding_mib)


def apply_deterministic(device: torch.device) -> None:
    """`trainer.deterministic=true`: deterministic kernels where torch has them.

    `warn_only=True`: some CUDA ops (index_add backward, ...) have no deterministic kernel
    and would otherwise raise mid-run. cuBLAS needs a fixed workspace for reproducible
    matmuls (CUBLAS_WORKSPACE_CONFIG, read when the cuBLAS handle is created: set before
    the first matmul, kept when the user set it). cuDNN benchmark mode picks algorithms by
    timing, so it is off."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def describe(job: Job) -> str:
    """One line saying what will run, printed at the start: what a user checks first when a
    run is slow or a setting did not take (the GPU defaults are decided here, not in conf/)."""
    cfg, tr, env = job.cfg, job.cfg.trainer, job.env
    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    parts = [f"{dtype_name[job.amp]} autocast" if job.amp is not None else "fp32"]
    if _channels_last(cfg, env.device):
        parts.append("channels_last")
    if tr.compile:
        parts.append("compiled backbones")
    backend = job.loader.backend_name
    res = job.resources or job_resources(cfg, env.device)
    k = tr.accumulate_steps
    micro = f" ({k} accumulated micro-batches of {tr.batch_size // k})" if k > 1 else ""
    return (f"training {cfg.method.name} ({cfg.backbone.name}) on {env.device}: "
            f"{env.world_size} rank(s) x batch {tr.batch_size}{micro} = {job.global_batch}, "
            f"{job.total_steps} steps ({job.steps_per_epoch}/epoch), {', '.join(parts)}; "
            f"views from {backend} ({dtype_name[_loader_dtype(cfg, env.device)]}, "
            f"{res.loader_threads} threads); {res.describe()}")


def prepare_data(cfg: DictConfig, env: D.DistEnv) -> None:
    """Generate the embedded synthetic data set on first use (local rank 0; others wait)."""
    data = cfg.data
    if not data.generate:
        return
    from sslstream.pipelines.shards.synthetic import ensure_synthetic, is_complete

    if env.local_rank == 0 and not is_complete(data.root):
        log.info("generating the synthetic data set under %s (first use)", data.root)
        ensure_synthetic(
            data.root,
            train_samples=data.generate_train_samples,
            test_samples=data.generate_test_samples,
            image_size=data.image_size,
            seed=data.generate_seed,
        )
    D.barrier()


def _channels_last(cfg: DictConfig, device: torch.device) -> bool:
    v = cfg.trainer.channels_last
    return device.type == "cuda" if v == "auto" else bool(v)


def build_stream(cfg: DictConfig, env: D.DistEnv) -> ShardStream:
    """This rank's stream of `data.train` (a weighted mix of sources or plain shards)."""
    from sslstream.pipelines.shards.cache import cache_options
    from sslstream.pipelines.shards.stream import ShardStream, sample_options

    data = cfg.data
    return ShardStream(
        data.train,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=data.num_workers,
        seed=cfg.seed,
        shuffle=True,
        shuffle_buffer=data.shuffle_buffer,
        exact_epoch=data.exact_epoch,
        storage_options=dict(data.storage_options),
        max_bad_fraction=data.max_bad_fraction,
        validate=data.validate,
        num_classes=data.num_classes,  # label check
        **sample_options(data),
        **cache_options(data),
    )


def build_loader(cfg: DictConfig, env: D.DistEnv, res: Resources | None = None,
                 stream: ShardStream | None = None) -> TwoViewLoader:
    from sslstream.pipelines.views.loader import TwoViewLoader
    from sslstream.pipelines.views.recipes import TwoViewRecipe

    tr = cfg.trainer
    res = res or job_resources(cfg, env.device)
    stream = stream if stream is not None else build_stream(cfg, env)
    return TwoViewLoader(
        stream,
        TwoViewRecipe.from_config(cfg.augment),
        batch_size=tr.batch_size,
        device=env.device,
        backend=tr.loader_backend,
        seed=cfg.seed,
        num_threads=res.loader_threads,
        dtype=_loader_dtype(cfg, env.device),
        channels_last=_channels_last(cfg, env.device),
        prefetch=tr.prefetch,
        hw_decoder_load=tr.hw_decoder_load,
        workers=res.reader_processes,
        nvjpeg_padding=res.nvjpeg_padding or None,
        pipeline_depth=tr.dali_pipeline_depth,
    )


def _loader_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype:
    """`auto`: views in the autocast dtype on CUDA (bf16 halves the hand-off and the first
    conv reads them as is), float32 elsewhere."""
    v = cfg.trainer.loader_dtype
    if v == "auto":
        amp = autocast_dtype(cfg.trainer.precision, device)
        return amp if (device.type == "cuda" and amp is not None) else torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    return names[v]  # the schema allows only these (orchestration/schema/trainer.py)


def _warmup_epochs(cfg: DictConfig) -> float:
    """optim.warmup_epochs (a recipe's: the paper's), else trainer.warmup_epochs."""
    opt = cfg.optim.warmup_epochs
    return opt if opt is not None else cfg.trainer.warmup_epochs


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def check_eval_splits(cfg: DictConfig) -> None:
    """Fail before training when a split is unset or absent, naming the key the user typed.

    The evaluation runs periodically and at the end: a typo in `data.test` must not cost a
    whole training run. Checks data.train, then the evaluation's labelled splits (data.bank,
    data.test; data.bank is skipped when it is data.train, its default, so a bad data.train
    is reported as data.train). For each: that the spec is set and that its first and last
    shard (or its folder / manifest) exist; errors reaching the store (credentials, network)
    are left to the stream, which reports them with retries. A folder of plain images is
    not shards: the message says how to make them.
    """
    keys = evaluated_splits(cfg)
    evaluating = len(keys) > 1
    bank_is_train = cfg.data.bank == cfg.data.train
    import braceexpand
    from sslstream.pipelines.shards.labels import require_labels
    from sslstream.pipelines.shards.masking import mask
    from sslstream.pipelines.shards.storage import ShardNotFound, get_fs

    opts = dict(cfg.data.storage_options)
    for key in keys:
        spec = cfg.data[key]
        if not spec:
            raise ConfigError(
                f"evaluation needs a labelled split: data.{key} is not set (set "
                f"data.{key}=<shards>, or eval.at_end=false eval.every_epochs=0 to train "
                "without evaluation: the encoder is registered unevaluated, never promoted; "
                "docs/data.md, docs/retrain.md)", f"data.{key}"
            )
        groups = sources_of(spec, f"data.{key}")  # one per source of a weighted mix
        for name, specs in groups:
            shown = specs[0] if len(specs) == 1 else specs
            urls = [u for sp in specs for u in braceexpand.braceexpand(sp.split("#", 1)[0])]
            for url in dict.fromkeys((urls[0], urls[-1])):  # first shard first
                try:
                    fs, path = get_fs(url, opts)
                    found = fs.exists(path)
                    images = found and fs.isdir(path) and _holds_only_images(fs, path)
                except Exception:  # the stream reports store errors (with retries) itself
                    continue
                if images:
                    raise UserError(
                        f"{name}={mask(shown)}: {mask(url)} is a folder of images, not "
                        f"WebDataset shards; make shards from it with `sslstream shards make "
                        f"{mask(url)} <out>` and set {name}=<out> (docs/data.md)")
                if not found:
                    raise ShardNotFound(f"{name}={mask(shown)}: {mask(url)} does not exist"
                                        f"{_root_hint(cfg, url)}", mask(url))
        specs = [sp for _, group in groups for sp in group]
        if key != "train" or (evaluating and bank_is_train):  # unlabelled training is fine
            name = f"data.{key}" if key != "train" else "data.bank"  # the bank defaults to train
            require_labels(name, specs[0] if len(specs) == 1 else specs,
                           cfg.data.label_key, storage_options=opts,
                           max_member_bytes=cfg.data.max_member_bytes)


def sources_of(spec: Any, key: str) -> list[tuple[str, list[str]]]:
    """(the key a user would name, its shard specs) for each source of a split: one for a
    plain spec, one per source of a weighted mix (`data.train[i]`)."""
    from sslstream.pipelines.shards.mix import flat_urls
    from sslstream.pipelines.shards.storage import plain

    value = plain(spec)
    if isinstance(value, str):
        return [(key, [value])]
    if not any(isinstance(v, dict) for v in value):
        return [(key, [str(v) for v in value])]
    out = []
    for i, v in enumerate(value):
        urls = flat_urls([v])
        out.append((f"{key}[{i}]", [urls] if isinstance(urls, str) else urls))
    return out


def evaluated_splits(cfg: DictConfig) -> list[str]:
    """The data keys a run reads: train, and the evaluation's bank and test when it
    evaluates (bank only when it is not train itself)."""
    ev = cfg.eval
    if not (ev.at_end or ev.every_epochs > 0):
        return ["train"]
    return ["train", "test"] if cfg.data.bank == cfg.data.train else ["train", "bank", "test"]


def check_cache_limit(cfg: DictConfig) -> None:
    """`data.cache_limit` smaller than an object-store shard the run reads is a config error
    (such a shard would never be cached): found from the manifests' sizes, before any shard
    is read. Shards without a listed size are not checked (the cache streams those that do
    not fit)."""
    from sslstream.pipelines.shards.cache import is_remote, too_big_for
    from sslstream.pipelines.shards.manifest import resolve_shards

    data = cfg.data
    limit = data.cache_limit
    if not data.cache_dir or limit is None:
        return
    opts = dict(data.storage_options)
    for key in evaluated_splits(cfg):
        specs = [sp for _, group in sources_of(data[key] or "", f"data.{key}") for sp in group]
        if not any(is_remote(s) for s in specs if s):
            continue
        refs, _ = resolve_shards(specs, opts)
        if big := too_big_for(int(limit), [(r.url, r.bytes) for r in refs]):
            url, n = big
            raise ConfigError(
                f"data.cache_limit={limit} bytes is smaller than the shard {url} of data.{key} "
                f"({n} bytes): set data.cache_limit to at least {n}, or data.cache_dir=null "
                "to read without a cache", "data.cache_limit")


def _holds_only_images(fs: Any, path: str) -> bool:
    """A folder with image files (or class sub-folders of them) and no shards/manifest."""
    names = [str(p).rstrip("/").rsplit("/", 1)[-1].lower() for p in fs.ls(path, detail=False)]
    if any(n.endswith((".tar", ".tar.gz", ".tgz", ".json")) for n in names):
        return False
    if any(n.endswith(IMAGE_SUFFIXES) for n in names):
        return True
    for sub in fs.ls(path, detail=False)[:3]:  # class sub-folders
        if fs.isdir(sub) and any(str(p).lower().endswith(IMAGE_SUFFIXES)
                                 for p in fs.ls(sub, detail=False)[:50]):
            return True
    return False


def _root_hint(cfg: DictConfig, url: str) -> str:
    """`data=cifar10` without its files: name data.root and the variable that sets it."""
    root = cfg.data.root
    if not root or not str(url).startswith(str(root).rstrip("/")):
        return ""
    var = _root_env_var(cfg.data.name)
    how = f"set {var}=<folder> or data.root=<folder>" if var else "set data.root=<folder>"
    return f" (data.root={root}: {how} to where the {cfg.data.name} shards are)"


def _root_env_var(data_name: str) -> str | None:
    """The variable conf/data/<name>.yaml reads data.root from (`${oc.env:VAR,...}`)."""
    import re
    from importlib import resources

    try:
        text = (resources.files("sslstream.conf") / "data" / f"{data_name}.yaml").read_text()
    except (OSError, ValueError):
        return None
    m = re.search(r"^\s*root:\s*\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)", text, re.M)
    return m.group(1) if m else None
