"""Loader settings the trainer derives from its config (orchestration/job.py)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from orchestration import distributed as D
from orchestration.job import _loader_dtype, _loader_threads


def _cfg(**trainer):
    return OmegaConf.create({"trainer": {"precision": "auto", **trainer}})


def _env(monkeypatch, local_world: int):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    return D.DistEnv.__new__(D.DistEnv)  # fields unused by _loader_threads


def test_loader_dtype_follows_autocast_on_cuda_only():
    assert _loader_dtype(_cfg(loader_dtype="auto"), torch.device("cuda", 0)) == torch.bfloat16
    assert _loader_dtype(_cfg(loader_dtype="auto", precision="fp32"),
                         torch.device("cuda", 0)) == torch.float32
    assert _loader_dtype(_cfg(loader_dtype="auto"), torch.device("cpu")) == torch.float32
    assert _loader_dtype(_cfg(loader_dtype="fp16"), torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="trainer.loader_dtype='int8'"):
        _loader_dtype(_cfg(loader_dtype="int8"), torch.device("cpu"))


def test_loader_threads_share_the_node(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert _loader_threads(_cfg(loader_threads="auto"), _env(monkeypatch, 1)) == 15
    assert _loader_threads(_cfg(loader_threads="auto"), _env(monkeypatch, 8)) == 2
    assert _loader_threads(_cfg(loader_threads=5), _env(monkeypatch, 1)) == 5
