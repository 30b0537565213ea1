"""Resource sizing (orchestration/runtime/resources.py) with fake affinity masks and cgroup
files: the budget is what the process may use, never os.cpu_count()."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from sslstream.orchestration.runtime import resources as R
from sslstream.orchestration.train.job import apply_deterministic, job_resources


def _cgroup(tmp_path, proc: str, files: dict[str, str]):
    root = tmp_path / "cg"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    pc = tmp_path / "proc_cgroup"
    pc.write_text(proc)
    return root, pc


def test_cgroup_v2_quota_of_the_process_and_its_ancestors(tmp_path):
    root, pc = _cgroup(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "cpu.max": "max 100000\n",
        "kubepods/cpu.max": "800000 100000\n",          # 8 CPUs for all pods
        "kubepods/pod1/ctr/cpu.max": "250000 100000\n",  # 2.5 CPUs for this container
    })
    assert R.cgroup_cpu_limit(root, pc) == pytest.approx(2.5)
    root2, pc2 = _cgroup(tmp_path / "b", "0::/\n", {"cpu.max": "max 100000\n"})
    assert R.cgroup_cpu_limit(root2, pc2) is None


def test_cgroup_v1_cfs_quota(tmp_path):
    root, pc = _cgroup(tmp_path, "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    })
    assert R.cgroup_cpu_limit(root, pc) == pytest.approx(3.0)
    root2, pc2 = _cgroup(tmp_path / "b", "2:cpu,cpuacct:/\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert R.cgroup_cpu_limit(root2, pc2) is None


def test_usable_cpus_is_the_tighter_of_affinity_and_quota(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 192)  # must not matter
    assert R.usable_cpus(set(range(192)), 2.5) == 3   # quota rounded up
    assert R.usable_cpus({0, 5}, 16.0) == 2            # taskset / cpuset
    assert R.usable_cpus(set(range(12)), None) == 12
    assert R.usable_cpus(set(), None) == 1


def test_plan_never_oversubscribes_and_caps_per_gpu():
    # a 1-GPU pod on a big host limited to 16 CPUs: DALI threads capped, not 191
    gpu = R.plan_resources(cpus=16, gpu=True, image_side=224)
    assert gpu.loader_threads == R.MAX_DALI_THREADS_PER_GPU and gpu.torch_threads == 1
    assert gpu.reader_processes == 2
    assert gpu.reader_processes + gpu.loader_threads + gpu.torch_threads <= 16
    many = R.plan_resources(cpus=192, gpu=True)
    assert many.loader_threads == R.MAX_DALI_THREADS_PER_GPU
    assert many.reader_processes == R.MAX_READER_PROCESSES
    # 8 GPUs share 16 CPUs: 2 per rank
    per = R.plan_resources(cpus=16, local_ranks=8, gpu=True)
    assert (per.cpus, per.reader_processes, per.loader_threads, per.torch_threads) == (2, 1, 1, 1)
    # the 2-core CPU machine: one of each, torch single-threaded (no OpenMP team to spin)
    cpu2 = R.plan_resources(cpus=2, gpu=False)
    assert (cpu2.reader_processes, cpu2.loader_threads, cpu2.torch_threads) == (1, 1, 1)
    one = R.plan_resources(cpus=1, gpu=False)
    assert (one.reader_processes, one.loader_threads, one.torch_threads) == (0, 1, 1)
    for cpus in range(1, 65):
        for lr in (1, 2, 4, 8):
            r = R.plan_resources(cpus=cpus, local_ranks=lr, gpu=False)
            assert r.torch_threads + r.loader_threads + r.reader_processes <= max(2, r.cpus + 1)
            assert r.torch_threads + r.loader_threads + r.reader_processes >= min(r.cpus, 2)
    # explicit values win
    ex = R.plan_resources(cpus=2, torch_threads=3, loader_threads="5", reader_processes=0)
    assert (ex.torch_threads, ex.loader_threads, ex.reader_processes) == (3, 5, 0)


def test_nvjpeg_padding_follows_the_image_size():
    assert R.nvjpeg_padding(32) == 4 * R.MIB          # floor
    assert R.nvjpeg_padding(224) == 4 * R.MIB         # 4 * 224^2 * 3 = 0.6 MB
    assert R.nvjpeg_padding(1024) == 12 * R.MIB       # 4 * 1024^2 * 3 = 12 MiB
    assert R.nvjpeg_padding(224, 64) == 64 * R.MIB    # explicit MiB
    assert R.plan_resources(cpus=8, gpu=True, image_side=32).nvjpeg_padding == 4 * R.MIB
    assert R.plan_resources(cpus=8, gpu=False).nvjpeg_padding == 0  # no nvJPEG on CPU
    assert R.nvjpeg_padding(224) < 211_025_920 // 50   # vs DALI's ImageNet example value


def test_job_resources_from_config(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = OmegaConf.create({"trainer": {"num_threads": None, "loader_threads": "auto",
                                        "loader_processes": "auto",
                                        "nvjpeg_padding_mib": "auto"},
                            "data": {"image_size": 32}})
    r = job_resources(cfg, torch.device("cuda", 0), cpus=32)
    assert (r.cpus, r.reader_processes, r.loader_threads, r.torch_threads) == (16, 2, 8, 1)
    assert "16 CPU(s)/rank" in r.describe() and "nvJPEG padding 4 MiB" in r.describe()
    cfg.trainer.loader_processes = 0
    assert job_resources(cfg, torch.device("cpu"), cpus=32).reader_processes == 0


def test_deterministic_settings(monkeypatch):
    """CPU test of the CUDA branch: warn_only deterministic mode, cuBLAS workspace set
    (kept when the user set it), cuDNN benchmark off."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        torch.backends.cudnn.benchmark = True
        apply_deterministic(torch.device("cuda", 0))
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        apply_deterministic(torch.device("cuda", 0))
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2:]
