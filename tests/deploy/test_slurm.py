"""deploy/slurm/train.sbatch, the script docs/cluster.md tells a user to submit: valid bash;
with Slurm's variables faked, its torchrun command line parses (torch's own parser) and the
training command it builds passes the config check (`--cfg`, exit 0); and end to end on one
"node" (srun and scontrol faked, the real launcher and trainer): SIGUSR1 to the batch shell
leaves a checkpoint, exits 138 and requeues the job, and the requeued job resumes and ends
without requeueing. Plus the launcher itself: torchrun's options, the workers' exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sslstream.orchestration.runtime import checkpoint as ckpt
from sslstream.orchestration.runtime.launch import HANDLED_SIGNALS, exit_code, with_signals

from tests.ddp import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "slurm" / "train.sbatch"

# srun that checks the agent's command line with torchrun's own parser, records it, and runs
# the training command it names in this one process (no rendezvous with absent nodes)
_PARSING_SRUN = """#!{python}
import json, os, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args.pop(0)  # srun's own options
assert args[:3] == ["python", "-m", "sslstream.orchestration.runtime.launch"], args
from torch.distributed.run import parse_args
from sslstream.orchestration.runtime.launch import with_signals
ns = parse_args(with_signals(args[3:]))
with open(os.environ["SRUN_LOG"], "w") as f:
    json.dump({{k: getattr(ns, k) for k in ("nnodes", "nproc_per_node", "rdzv_backend",
              "rdzv_endpoint", "rdzv_id", "max_restarts", "module", "training_script",
              "training_script_args", "signals_to_handle")}}, f)
os.execv(sys.executable, [sys.executable, "-m", ns.training_script, *ns.training_script_args])
"""

# srun on one node: runs its task (the agent) as itself, so a signal to srun reaches it
_EXEC_SRUN = """#!/bin/bash
while [[ "${1:-}" == --* ]]; do shift; done
exec "$@"
"""

_SCONTROL = """#!/bin/bash
case "$1" in
  show) printf '%s\\n' ${SCONTROL_HOSTS} ;;
  requeue) echo "requeue $2" >> "${SCONTROL_LOG}" ;;
  *) exit 1 ;;
esac
"""


def _bin(tmp: Path, srun: str) -> Path:
    d = tmp / "bin"
    d.mkdir(exist_ok=True)
    for name, text in (("srun", srun), ("scontrol", _SCONTROL)):
        (d / name).write_text(text)
        (d / name).chmod(0o755)
    return d


def _env(tmp: Path, bindir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SSLSTREAM_")) and k not in (
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "MLFLOW_TRACKING_URI")}
    env.update(PATH=f"{bindir}:{Path(sys.executable).parent}:{env.get('PATH', '')}",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", SCONTROL_LOG=str(tmp / "scontrol.log"),
               SRUN_LOG=str(tmp / "srun.json"), **extra)
    return env


def test_the_sbatch_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    head = SCRIPT.read_text()
    assert "#SBATCH --signal=B:USR1@90" in head and "#SBATCH --requeue" in head


@pytest.mark.timeout(400)
def test_its_torchrun_command_parses_and_its_config_passes_the_check(tmp_path):
    bindir = _bin(tmp_path, _PARSING_SRUN.format(python=sys.executable))
    env = _env(tmp_path, bindir, SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-[07-08]",
               SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8", SCONTROL_HOSTS="gpu-07 gpu-08")
    proc = subprocess.run(["bash", str(SCRIPT), "--cfg"], cwd=tmp_path, env=env,  # a bound, not
                          capture_output=True, text=True, timeout=300)    # a timing (loaded CI)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ns = json.loads((tmp_path / "srun.json").read_text())
    assert ns["nnodes"] == "2" and ns["nproc_per_node"] == "8"
    assert (ns["rdzv_backend"], ns["rdzv_endpoint"], ns["rdzv_id"]) == ("c10d", "gpu-07:29500",
                                                                         "4242")
    assert ns["module"] and ns["training_script"] == "sslstream"
    assert ns["training_script_args"][0] == "train" and "SIGUSR1" in ns["signals_to_handle"]
    assert "run_name: slurm-4242" in proc.stdout  # a requeued job resumes this run
    assert "output_dir: s3://my-bucket/sslstream/runs" in proc.stdout
    assert "train: s3://my-bucket/imagenet/train-{000000..001023}.tar" in proc.stdout
    assert not (tmp_path / "scontrol.log").exists()


@pytest.mark.timeout(700)
def test_the_launcher_keeps_torchruns_options_and_the_workers_exit_code(tmp_path):
    assert with_signals(["--nnodes=2", "-m", "sslstream"])[0] == \
        f"--signals-to-handle={HANDLED_SIGNALS}"
    assert with_signals(["--signals_to_handle=SIGTERM", "x.py"]) == ["--signals_to_handle=SIGTERM",
                                                                     "x.py"]
    assert exit_code(2) == 2 and exit_code(-signal.SIGKILL) == 137
    worker = tmp_path / "w.py"
    worker.write_text("import sys; sys.exit(int(sys.argv[1]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for code in (0, 2):
        proc = subprocess.run(
            [sys.executable, "-m", "sslstream.orchestration.runtime.launch", "--standalone",
             "--nproc-per-node=1", str(worker), str(code)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == code, proc.stderr[-2000:]  # torchrun alone exits 1


def _train_args(tmp: Path, steps: int) -> list[str]:
    return ["recipe=cifar", "data.image_size=16", "data.num_workers=1", "augment.view1.size=16",
            "augment.view2.size=16", "backbone.widths=[8,16,16,32]", "method.proj_hidden_dim=64",
            "method.pred_hidden_dim=64", "method.proj_output_dim=32", "trainer.batch_size=16",
            f"trainer.max_steps={steps}", "trainer.num_threads=1", "trainer.device=cpu",
            "trainer.progress=log", "trainer.log_every_steps=2",
            "trainer.checkpoint_every_steps=2", "trainer.loader_processes=0",
            "eval.at_end=false", "tracking.enabled=false"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigusr1_checkpoints_exits_138_requeues_and_the_requeued_job_resumes(tmp_path):
    from sslstream.pipelines.shards.synthetic import ensure_synthetic

    data = ensure_synthetic(tmp_path / "synthetic", train_samples=160, test_samples=32,
                            image_size=16, samples_per_shard=32)
    bindir = _bin(tmp_path, _EXEC_SRUN)
    steps = 200  # far more than the time before the signal: the run must stop on it
    env = _env(tmp_path, bindir, SLURM_JOB_ID="77", SLURM_JOB_NODELIST="localhost",
               SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="1", SCONTROL_HOSTS="localhost",
               SSLSTREAM_OUTPUT_DIR=str(tmp_path / "out"),
               SSLSTREAM_TRAIN_SHARDS=str(data / "train"), SSLSTREAM_TEST_SHARDS=str(data / "test"),
               SSLSTREAM_RDZV_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo")
    run_dir = tmp_path / "out" / "slurm-77"
    log = open(tmp_path / "job.out", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["bash", str(SCRIPT), *_train_args(tmp_path, steps)], cwd=tmp_path,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and ckpt.latest_checkpoint(run_dir) is None:
        assert proc.poll() is None, (tmp_path / "job.out").read_text()[-4000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@90 does
    rc = proc.wait(timeout=120)
    log.close()
    out = (tmp_path / "job.out").read_text()
    assert rc == 138, out[-4000:]
    assert "time limit near" in out and "stopped by SIGUSR1" in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]
    stopped = ckpt.latest_checkpoint(run_dir).step
    assert 0 < stopped < steps

    # the requeued job: same job id, same run; resumes and finishes without requeueing
    steps_args = [a if not a.startswith("trainer.max_steps=") else f"trainer.max_steps={stopped + 4}"
                  for a in _train_args(tmp_path, steps)]
    proc = subprocess.run(["bash", str(SCRIPT), *steps_args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"resuming slurm-77 from {run_dir}/step-{stopped:08d}.pt" in out
    assert ckpt.latest_checkpoint(run_dir).step == stopped + 4
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]


def test_docs_cluster_shows_the_script_it_ships():
    """docs/cluster.md quotes the script's key lines; keep them in step."""
    doc = (REPO / "docs" / "cluster.md").read_text()
    assert "deploy/slurm/train.sbatch" in doc
    for line in ("#SBATCH --signal=B:USR1@90", "python -m sslstream.orchestration.runtime.launch",
                 "scontrol requeue"):
        assert line in doc and line in SCRIPT.read_text()
