"""The step stall of checkpointing to an object store: steps/s of the same training run
with no checkpoints, checkpoints to a local folder, and checkpoints to S3 (moto), one
every 50 steps (issue 24: under 2 % fewer steps/s for S3 than for local).

    python benchmarks/checkpoint_stall.py                     # the embedded default, 320 steps
    python benchmarks/checkpoint_stall.py --steps 520 --repeat 3 --json
    python benchmarks/checkpoint_stall.py -- backbone=resnet18 data.image_size=64   # bigger state

Each run is a fresh `python` process running `train(cfg)` (orchestration/train/loop.py) on
the same config but `trainer.output_dir`; runs are interleaved (none, local, s3, none, ...)
so that a change in the machine's load hits every configuration alike. Steps/s is taken
between the starts of step 20 and of the last step (warm-up and the final upload excluded,
every periodic checkpoint inside), from the times the loop calls the step; the seconds
spent in the loop's `save()` (gathers, the CPU snapshot, the hand-over to the uploader: the
stall itself) are timed directly, including the final checkpoint, and so is the upload's
wall time in the background thread. On a shared machine steps/s moves by more than the
stall from run to run; the save() time over the time of `--every` steps is the stall's
share of steps/s without that noise. The moto server
runs in its own process (it does not share the trainer's GIL), as a remote store would.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
         "AWS_DEFAULT_REGION": "us-east-1"}
WARMUP = 20

_CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
import sslstream.orchestration.train.loop as loop
import sslstream.orchestration.runtime.uploader as uploader
from sslstream.orchestration.cli import compose_config
starts, saves, uploads = [], [0.0, 0], [0.0]
real_step, real_save = loop.train_step, loop._Checkpointer.save
real_close = uploader.CheckpointUploader.close
def close(self, *a, **k):
    try:
        return real_close(self, *a, **k)
    finally:
        uploads[0] += self.upload_s
uploader.CheckpointUploader.close = close
def step(*a, **k):
    starts.append(time.perf_counter())
    return real_step(*a, **k)
def save(self):
    t0 = time.perf_counter()
    fresh = self.s.saved_step != self.s.step
    try:
        return real_save(self)
    finally:
        if fresh:
            saves[0] += time.perf_counter() - t0
            saves[1] += 1
loop.train_step, loop._Checkpointer.save = step, save
res = loop.train(compose_config(json.loads(sys.argv[1])))
w = starts[%(warmup)d:]
rate = (len(w) - 1) / (w[-1] - w[0]) if len(w) > 1 else None
print("RESULT " + json.dumps({"steps": res.step, "steps_per_s": rate,
                             "save_s_on_step_path": saves[0], "saves": saves[1],
                             "upload_s_off_step_path": uploads[0]}))
"""


def _serve(conn) -> None:
    import logging

    os.environ.update(CREDS)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    conn.send(f"http://{host}:{port}")
    conn.recv()
    server.stop()


def one(overrides: list[str], env: dict[str, str], threads: int) -> dict:
    code = _CHILD % {"warmup": WARMUP}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(overrides), str(threads)],
                          cwd=env["BENCH_CWD"], env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=320)
    p.add_argument("--every", type=int, default=50, help="trainer.checkpoint_every_steps")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (trainer.num_threads)")
    p.add_argument("--configs", default="local,s3", help="of none, local, s3")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    a = p.parse_args(argv)

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child,), daemon=True)
    server.start()
    endpoint = conn.recv()
    import s3fs

    s3fs.S3FileSystem(key=CREDS["AWS_ACCESS_KEY_ID"], secret=CREDS["AWS_SECRET_ACCESS_KEY"],
                      client_kwargs={"endpoint_url": endpoint}).mkdir("bench")
    work = Path(tempfile.mkdtemp(prefix="ckpt-stall-"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MLFLOW_TRACKING_URI", "AWS_PROFILE")}
    env.update(CREDS, AWS_ENDPOINT_URL=endpoint, OMP_NUM_THREADS=str(a.threads),
               PYTHONPATH=str(ROOT), BENCH_CWD=str(work))
    base = [f"trainer.max_steps={a.steps}", "eval.at_end=false", "eval.every_epochs=0",
            "tracking.enabled=false", "trainer.progress=log", "trainer.log_every_steps=1000",
            f"trainer.num_threads={a.threads}", f"data.root={work / 'data'}", *a.overrides]
    outputs = {"none": (str(work / "none"), 0), "local": (str(work / "local"), a.every),
               "s3": ("s3://bench/runs", a.every)}
    configs = a.configs.split(",")
    one(base + ["trainer.max_steps=1", f"trainer.output_dir={work / 'gen'}"], env, a.threads)
    rows: dict[str, list[dict]] = {c: [] for c in configs}
    load = [os.getloadavg()[0]]
    for r in range(a.repeat):
        for c in configs:
            out, every = outputs[c]
            res = one(base + [f"trainer.output_dir={out}", f"run_name=r{r}",
                              f"trainer.checkpoint_every_steps={every}"], env, a.threads)
            rows[c].append(res)
            load.append(os.getloadavg()[0])
            if not a.json:
                print(f"{c:6s} run {r}: {res['steps_per_s']:.3f} steps/s, "
                      f"{res['saves']} checkpoint(s), {res['save_s_on_step_path']:.3f} s in "
                      f"save() on the step path, {res['upload_s_off_step_path']:.3f} s "
                      "uploading in the background", flush=True)
    conn.send("stop")
    server.join(10)
    med = {c: statistics.median(x["steps_per_s"] for x in rows[c]) for c in configs}
    summary = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.python_version()}",
        "load_avg_1min": [round(x, 2) for x in load],
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": "python benchmarks/checkpoint_stall.py " + " ".join(argv or sys.argv[1:]),
        "steps": a.steps, "every": a.every, "median_steps_per_s": med, "runs": rows,
    }
    # the step-path stall as a share of steps/s: save() time per checkpoint over the time of
    # `every` steps at the run's own rate (median over the runs)
    share = {c: statistics.median(x["save_s_on_step_path"] / max(x["saves"], 1)
                                  * x["steps_per_s"] / a.every for x in rows[c]
                                  if x["saves"] and x["steps_per_s"]) if any(
                                      x["saves"] for x in rows[c]) else 0.0 for c in configs}
    summary["step_path_share"] = share
    if "local" in med and "s3" in med:
        summary["s3_vs_local"] = med["s3"] / med["local"] - 1
    if "none" in med and "s3" in med:
        summary["s3_vs_none"] = med["s3"] / med["none"] - 1
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        for c in configs:
            print(f"{c:6s} median {med[c]:.3f} steps/s")
        for k in ("s3_vs_local", "s3_vs_none"):
            if k in summary:
                print(f"{k} (median steps/s): {summary[k] * 100:+.2f} %")
        for c in configs:
            print(f"{c:6s} save() on the step path: {share[c] * 100:.3f} % of the time of "
                  f"{a.every} steps")
        print(f"load average (1 min) during the runs: {summary['load_avg_1min']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
