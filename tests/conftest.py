"""Shared test configuration.

Everything here keeps tests hermetic: only 127.0.0.1 traffic, temporary working
directories for anything that writes (MLflow drops ./mlruns into the cwd), and small
thread counts so the suite runs on a 2-core CI machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest_plugins = [
    "tests.fixtures.shards",
    "tests.fixtures.s3",
    "tests.fixtures.gcs",
    "tests.fixtures.mlflow_server",
    "tests.fixtures.stall",
]

REPO_ROOT = Path(__file__).resolve().parents[1]

# A dead tracking server must fail fast in tests (the default retry budget is ~250 s).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The CIFAR-10 shards of the workplace (env SSLSTREAM_CIFAR10), or skip."""
    path = Path(os.environ.get("SSLSTREAM_CIFAR10", REPO_ROOT.parent / "shared/data/cifar10"))
    if not (path / "manifest.json").is_file():
        pytest.skip(f"CIFAR-10 shards not found at {path} (set SSLSTREAM_CIFAR10)")
    return path


@pytest.fixture
def in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside a fresh temporary working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
