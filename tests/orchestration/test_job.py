"""Loader settings the trainer derives from its config (orchestration/train/job.py)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from sslstream.orchestration.errors import ConfigError
from sslstream.orchestration.runtime import distributed as D
from sslstream.orchestration.schema import compose_checked
from sslstream.orchestration.train.job import _loader_dtype


def _cfg(**trainer):
    return OmegaConf.create({"trainer": {"precision": "auto", **trainer}})


def test_loader_dtype_follows_autocast_on_cuda_only():
    assert _loader_dtype(_cfg(loader_dtype="auto"), torch.device("cuda", 0)) == torch.bfloat16
    assert _loader_dtype(_cfg(loader_dtype="auto", precision="fp32"),
                         torch.device("cuda", 0)) == torch.float32
    assert _loader_dtype(_cfg(loader_dtype="auto"), torch.device("cpu")) == torch.float32
    assert _loader_dtype(_cfg(loader_dtype="fp16"), torch.device("cpu")) == torch.float16
    with pytest.raises(ConfigError, match="trainer.loader_dtype=int8 is not allowed"):
        compose_checked(["trainer.loader_dtype=int8"])  # refused before any job is built


def test_loader_threads_share_the_node(monkeypatch):
    """`auto` sizes from the CPUs the process may use (affinity, cgroup quota), shared by
    the node's ranks and capped per GPU -- never from os.cpu_count()."""
    monkeypatch.setattr("os.cpu_count", lambda: 192)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr("sslstream.orchestration.runtime.resources.cgroup_cpu_limit", lambda: None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert D.loader_threads("auto", gpu=True) == 8  # capped per GPU
    assert D.loader_threads(None, gpu=False) == 7   # 16 - 2 readers, half to torch
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert D.loader_threads("auto", gpu=True) == 1
    assert D.loader_threads(5) == D.loader_threads("5") == 5
