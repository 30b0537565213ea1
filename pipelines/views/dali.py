"""The views DALI graph: decode once, augment each view (two global crops, then a multi-crop
recipe's local crops, each its own branch from the one decoded image), normalise, hand to torch.

Randomness does not live in the graph. Every crop window, flip, jitter factor, blur sigma and
per-sample coin arrives through `fn.external_source` next to the encoded image, drawn on the
host by `sslstream.pipelines.views.recipes.sample_view_params` from a key (seed, epoch, rank, batch, view).
The graph is therefore a pure function of its inputs: a resumed loader reproduces the batches
of an uninterrupted one, CPU and GPU runs of one seed use the same parameters, and the
torchvision reference can be fed the very same parameters for parity tests. The per-sample
coins are BOOL inputs driving DALI conditionals (`enable_conditionals=True`), so a skipped
operation costs nothing for that sample.

`device_id=None` builds the same graph for the CPU (CI, laptops); an int builds it for that
GPU with `device='mixed'` decoding (nvJPEG, hardware decoder share `hw_decoder_load`).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sslstream.pipelines.views.recipes import (
    SOLARIZE_THRESHOLD,
    TwoViewRecipe,
    ViewParams,
    ViewRecipe,
)

try:  # DALI is a Linux-only dependency; callers check `DALI_AVAILABLE`.
    from nvidia.dali import fn, pipeline_def, types

    DALI_AVAILABLE = True
    DALI_IMPORT_ERROR: str | None = None
except Exception as e:  # pragma: no cover - exercised only where DALI is missing
    DALI_AVAILABLE = False
    DALI_IMPORT_ERROR = f"{type(e).__name__}: {e}"

# Per-view parameter inputs fed through external_source: name -> (dtype, ndim).
_PARAM_INPUTS = {
    "roi_start": ("FLOAT", 1),   # (y, x) in source pixels
    "roi_end": ("FLOAT", 1),
    "flip": ("INT32", 0),        # crop_mirror_normalize wants an int coin, not a BOOL one
    "jitter": ("BOOL", 0),
    "brightness": ("FLOAT", 0),
    "contrast": ("FLOAT", 0),
    "saturation": ("FLOAT", 0),
    "hue": ("FLOAT", 0),         # degrees (DALI's unit)
    "grayscale": ("BOOL", 0),
    "blur": ("BOOL", 0),
    "sigma": ("FLOAT", 0),
    "solarize": ("BOOL", 0),
}
_OUT_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "FLOAT"}


def param_feed(params: ViewParams) -> dict[str, np.ndarray]:
    """The external_source arrays of one view, in DALI's units and dtypes."""
    crop = params.crop.astype(np.float32)
    return {
        "roi_start": np.ascontiguousarray(crop[:, 0:2]),
        "roi_end": np.ascontiguousarray(crop[:, 0:2] + crop[:, 2:4]),
        "flip": params.flip.astype(np.int32),
        "jitter": params.jitter.astype(np.bool_),
        "brightness": params.brightness.astype(np.float32),
        "contrast": params.contrast.astype(np.float32),
        "saturation": params.saturation.astype(np.float32),
        "hue": (params.hue * 360.0).astype(np.float32),
        "grayscale": params.grayscale.astype(np.bool_),
        "blur": params.blur.astype(np.bool_),
        "sigma": params.sigma.astype(np.float32),
        "solarize": params.solarize.astype(np.bool_),
    }


def _solarize_table() -> tuple[list[int], list[int]]:
    keys = list(range(256))
    return keys, [k if k < SOLARIZE_THRESHOLD else 255 - k for k in keys]


def _augment_view(image, view: ViewRecipe, prefix: str, out_dtype, layout: str, gpu: bool):
    """One view, in the recipe's order: crop -> jitter -> gray -> blur -> solarize -> flip+norm."""
    p = {name: fn.external_source(name=prefix + name, dtype=getattr(types, dt), ndim=nd)
         for name, (dt, nd) in _PARAM_INPUTS.items()}
    x = fn.resize(image, roi_start=p["roi_start"], roi_end=p["roi_end"],
                  size=[view.size, view.size], interp_type=types.INTERP_LINEAR, antialias=True)
    if p["jitter"]:
        x = fn.color_twist(x, brightness=p["brightness"], contrast=p["contrast"],
                           saturation=p["saturation"], hue=p["hue"])
    if p["grayscale"]:
        x = fn.color_twist(x, saturation=0.0)  # Y = .299R + .587G + .114B, as torchvision
    if p["blur"]:
        x = fn.gaussian_blur(x, sigma=p["sigma"])
    if p["solarize"]:
        keys, values = _solarize_table()
        x = fn.lookup_table(x, keys=keys, values=values, dtype=types.UINT8)
    return fn.crop_mirror_normalize(
        x, mirror=p["flip"], dtype=out_dtype, output_layout=layout,
        mean=[255.0 * m for m in view.mean], std=[255.0 * s for s in view.std])


@dataclass(frozen=True)
class GraphSpec:
    """Everything that shapes the compiled graph (a new spec means a new pipeline)."""

    recipe: TwoViewRecipe
    batch_size: int
    device_id: int | None = None
    num_threads: int = 2
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    hw_decoder_load: float = 0.65
    jpeg_fancy_upsampling: bool = True
    # nvJPEG buffer padding (device and pinned host, bytes, per thread): sized from the
    # data's images by orchestration/runtime/resources.py (DALI's ImageNet examples use
    # 211 MB + 140 MB, i.e. ~350 MB per thread whatever the image size).
    nvjpeg_padding: int = 16 << 20
    # Batches in flight inside DALI (prefetch_queue_depth). 1: one synchronous batch at a
    # time; >= 2: the pipelined executor decodes batch k+1 while batch k's outputs are used
    # (parameters stay paired with their images: external_source is FIFO).
    depth: int = 1


def build_two_view_pipeline(spec: GraphSpec):
    """Compile the views graph; feed it with `feed_views` and `pipe.run()`."""
    pipe = define_two_view_pipeline(spec)
    pipe.build()
    return pipe


def outputs_stream(device_id: int | None) -> tuple:
    """`pipe.run(*outputs_stream(id))`: on a GPU, bind the outputs to torch's current stream
    of that device. Without a stream DALI synchronises the host with every batch (its
    `Pipeline.run` docs); with one, that stream waits on DALI's work instead, and DALI's
    buffers are released in that stream's order, after the copy `to_torch` enqueues there."""
    if device_id is None:
        return ()
    return (torch.cuda.current_stream(torch.device("cuda", device_id)),)


def define_two_view_pipeline(spec: GraphSpec):
    """The views Pipeline object (one output per view of the recipe), not yet built
    (building a GPU one needs CUDA)."""
    if not DALI_AVAILABLE:
        raise RuntimeError(f"nvidia-dali is not importable here ({DALI_IMPORT_ERROR})")
    gpu = spec.device_id is not None
    out_dtype = getattr(types, _OUT_DTYPES[spec.dtype])
    layout = "HWC" if spec.channels_last else "CHW"

    @pipeline_def(enable_conditionals=True)
    def graph():
        encoded = fn.external_source(name="images", dtype=types.UINT8, ndim=1)
        if gpu:
            # Padding sized from the data (GraphSpec.nvjpeg_padding: a larger image costs a
            # one-off reallocation); fancy upsampling = the CPU decoder's chroma upsampling,
            # so GPU pixels match what the CPU-mode tests check.
            image = fn.decoders.image(encoded, device="mixed", output_type=types.RGB,
                                      hw_decoder_load=spec.hw_decoder_load,
                                      device_memory_padding=spec.nvjpeg_padding,
                                      host_memory_padding=spec.nvjpeg_padding,
                                      jpeg_fancy_upsampling=spec.jpeg_fancy_upsampling)
        else:
            image = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        return tuple(_augment_view(image, v, f"v{i + 1}_", out_dtype, layout, gpu)
                     for i, v in enumerate(spec.recipe.views))

    # depth 1: synchronous dynamic executor: `feed_input` + `run()` handle exactly one batch
    # in the calling thread (the loader's device thread). depth >= 2: pipelined + async:
    # `depth` batches are fed before the first `schedule_run` (DALI prefetches that many),
    # then one per batch; `outputs()` returns them in feeding order (external_source is a
    # FIFO), so batch k always meets the parameters fed with it. Dynamic = outputs are owned
    # buffers (see `to_torch`) and `outputs(cuda_stream=...)` is allowed.
    piped = spec.depth > 1
    pipe = graph(batch_size=spec.batch_size, num_threads=spec.num_threads,
                 device_id=spec.device_id, seed=0, prefetch_queue_depth=max(1, spec.depth),
                 exec_pipelined=piped, exec_async=piped, exec_dynamic=True)
    return pipe


def feed_views(pipe, images: list[np.ndarray], params: Sequence[ViewParams]) -> None:
    """Feed one batch: its encoded images and every view's parameters (globals first)."""
    pipe.feed_input("images", images)
    for i, vp in enumerate(params):
        for name, arr in param_feed(vp).items():
            pipe.feed_input(f"v{i + 1}_{name}", arr)


def to_torch(tl, channels_last: bool, dtype: torch.dtype) -> torch.Tensor:
    """A DALI TensorList (dense batch) -> torch tensor that DALI can never overwrite.

    CPU (exec_dynamic): zero-copy through DLPack. The dynamic executor gives every output its
    own reference-counted buffer (`Pipeline.release_outputs`: "the buffers are not
    invalidated"; DALI's own torch iterator skips its copy for the same reason), so the torch
    tensor keeps it alive and the next `run()` writes elsewhere.

    GPU: one device-to-device copy into torch's caching allocator, on the *current* torch
    stream, which the caller has bound DALI's outputs to (`run(cuda_stream=...)`). Why not
    zero-copy: freeing a DALI buffer is stream-ordered on the stream its outputs are bound to,
    not on the trainer's stream, so a zero-copy view dropped by the trainer right after it
    enqueued its step could be recycled for the next batch while that step still reads it.
    torch-owned memory has `record_stream`, which the loader uses to hand the batch to the
    trainer's stream safely. The copy costs ~0.3 ms per 256 x 2 x 224 px fp32 batch on an
    H100 (<1 % of a step), and bf16 output needs this pass anyway (DALI has no bf16 type).

    HWC output becomes NCHW with channels_last strides by a permute (a view); `.to` /
    `.clone` keep those strides.
    """
    t = torch.from_dlpack(tl.as_tensor())
    if channels_last:
        t = t.permute(0, 3, 1, 2)
    if t.is_cuda:
        return t.to(dtype) if dtype != t.dtype else t.clone()
    return t.to(dtype) if dtype != t.dtype else t


class DaliTwoView:
    """Views backend (two global crops + any local crops) around one compiled graph;
    `reset()` recompiles after a failure.

    depth 1: `run()` one batch at a time. depth >= 2: `submit()` batches ahead and
    `collect()` them in order (the loader's device thread keeps `depth` in flight)."""

    name = "dali"

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec
        self.depth = max(1, spec.depth)
        self._pipe = build_two_view_pipeline(spec)
        self._pending = PendingOutputs()
        self._scheduled: collections.deque[bool] = collections.deque()  # True: a real batch
        self._started = False
        self._last: tuple | None = None

    def run(self, images: list[bytes], params: Sequence[ViewParams]) -> tuple[torch.Tensor, ...]:
        """One batch: one tensor per view of the recipe (globals first). On a GPU the
        caller sets the torch device and stream (the loader's side stream): DALI's outputs
        are bound to that stream (no host sync, see `outputs_stream`) and copied on it (see
        `to_torch`)."""
        if self.depth > 1:  # nothing else in flight (the loader drains or resets first)
            self.submit(images, params)
            return self.collect()
        feed_views(self._pipe, [np.frombuffer(b, dtype=np.uint8) for b in images], params)
        outs = self._pipe.run(*outputs_stream(self.spec.device_id))
        return self._views(outs)

    def _views(self, outs: tuple) -> tuple[torch.Tensor, ...]:
        views = tuple(to_torch(o, self.spec.channels_last, self.spec.dtype) for o in outs)
        self._pending.hold(outs, views[0].is_cuda)
        return views

    # -- pipelined (depth >= 2): submit batch k+1 before collecting batch k
    def submit(self, images: list, params: Sequence[ViewParams]) -> None:
        arrays = [np.frombuffer(b, dtype=np.uint8) for b in images]
        feed_views(self._pipe, arrays, params)
        self._last = (arrays, params)
        self._scheduled.append(True)
        if self._started:
            self._pipe.schedule_run()
        elif len(self._scheduled) >= self.depth:  # DALI's first run prefetches `depth` batches
            self._pipe.schedule_run()
            self._started = True

    def collect(self) -> tuple[torch.Tensor, ...]:
        """The views of the oldest submitted batch (FIFO)."""
        if not self._started:  # fewer than `depth` batches so far: pad with copies, dropped
            assert self._last is not None, "collect() before submit()"
            while len(self._scheduled) < self.depth:
                feed_views(self._pipe, *self._last)
                self._scheduled.append(False)
            self._pipe.schedule_run()
            self._started = True
        while True:
            real = self._scheduled.popleft()
            outs = self._pipe.outputs(*outputs_stream(self.spec.device_id))
            if real:
                return self._views(outs)

    def reset(self) -> None:
        self.close()
        self._pipe = build_two_view_pipeline(self.spec)
        self._scheduled.clear()
        self._started, self._last = False, None

    def close(self) -> None:
        self._pending.drain()
        pipe, self._pipe = self._pipe, None
        del pipe  # DALI's worker threads go with the last reference


class PendingOutputs:
    """Keeps DALI's GPU outputs alive until the copies `to_torch` enqueued from them ran.

    Belt and braces: binding the outputs to the copying stream should already order their
    release after the copy; holding a reference until an event recorded after the copy has
    completed makes that independent of how DALI orders the release. Polled (no host wait)
    on every `hold`; `drain` waits, on close."""

    def __init__(self) -> None:
        self._held: collections.deque = collections.deque()

    def hold(self, outputs: tuple, gpu: bool) -> None:
        if not gpu:
            return  # CPU copies/views are complete when to_torch returns
        done = torch.cuda.Event()
        done.record()  # on the current stream, after the copies
        self._held.append((done, outputs))
        while self._held and self._held[0][0].query():
            self._held.popleft()

    def drain(self) -> None:
        while self._held:
            self._held.popleft()[0].synchronize()


def build_eval_pipeline(size: int, resize: int, mean, std, batch_size: int,
                        device_id: int | None, num_threads: int = 2):
    """Deterministic single view: shorter side to `resize`, centre crop `size`, normalise."""
    pipe = define_eval_pipeline(size, resize, mean, std, batch_size, device_id, num_threads)
    pipe.build()
    return pipe


def define_eval_pipeline(size: int, resize: int, mean, std, batch_size: int,
                         device_id: int | None, num_threads: int = 2):
    """The eval Pipeline object, not yet built (building a GPU one needs CUDA)."""
    if not DALI_AVAILABLE:
        raise RuntimeError(f"nvidia-dali is not importable here ({DALI_IMPORT_ERROR})")

    @pipeline_def
    def graph():
        encoded = fn.external_source(name="images", dtype=types.UINT8, ndim=1)
        image = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed",
                                  output_type=types.RGB)
        image = fn.resize(image, resize_shorter=resize, interp_type=types.INTERP_LINEAR,
                          antialias=True)
        return fn.crop_mirror_normalize(image, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5,
                                        dtype=types.FLOAT, output_layout="CHW",
                                        mean=[255.0 * m for m in mean],
                                        std=[255.0 * s for s in std])

    return graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
                 prefetch_queue_depth=1, exec_pipelined=False, exec_async=False,
                 exec_dynamic=True)


class DaliEval:
    name = "dali"

    def __init__(self, size: int, resize: int, mean, std, batch_size: int,
                 device_id: int | None, num_threads: int = 2) -> None:
        self._args = (size, resize, mean, std, batch_size, device_id, num_threads)
        self._pipe = build_eval_pipeline(*self._args)
        self._pending = PendingOutputs()

    def reset(self) -> None:
        self._pending.drain()
        self._pipe = None
        self._pipe = build_eval_pipeline(*self._args)

    def run(self, images: list[bytes]) -> torch.Tensor:
        """One batch; on a GPU bound to and copied on torch's current stream (`to_torch`)."""
        self._pipe.feed_input("images", [np.frombuffer(b, dtype=np.uint8) for b in images])
        (out,) = self._pipe.run(*outputs_stream(self._args[5]))
        x = to_torch(out, False, torch.float32)
        self._pending.hold((out,), x.is_cuda)
        return x

    def close(self) -> None:
        self._pending.drain()
        self._pipe = None
