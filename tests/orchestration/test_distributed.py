"""Small helpers of orchestration/runtime/distributed.py that decide how a job behaves under
a launcher: is it spread over several nodes, and does a failed pre-flight check stop every
rank (the two-rank side of `fail_together` runs in test_checkpoint_store.py's runs and in
test_multinode.py)."""

from __future__ import annotations

import pytest
import torch
from sslstream.orchestration.runtime import distributed as D


@pytest.mark.parametrize("env,across", [
    ({}, False),                                                # plain python
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, False),      # torchrun on one node
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, True),      # two nodes of 8
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}, True),       # two nodes of 1
    ({"WORLD_SIZE": "2", "RANK": "0"}, False),                  # no LOCAL_WORLD_SIZE: one node
])
def test_launched_across_nodes_reads_the_launchers_variables(monkeypatch, env, across):
    for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert D.launched_across_nodes() is across


def test_fail_together_on_one_process_raises_its_own_error():
    env = D.DistEnv(0, 1, 0, torch.device("cpu"))
    D.fail_together(None, env)
    with pytest.raises(OSError, match="cannot write"):
        D.fail_together(OSError("cannot write"), env)


def _one_rank_fails(rank: int, world_size: int) -> str:
    from sslstream.orchestration.errors import UserError

    env = D.DistEnv(rank, world_size, rank, torch.device("cpu"))
    own = OSError("s3://b/runs/x: access denied") if rank == 1 else None
    try:
        D.fail_together(own, env)
    except (OSError, UserError) as e:
        return f"{type(e).__name__}: {e}"
    return "went on"


def test_fail_together_stops_every_rank_when_one_failed():
    from tests.ddp import run_ddp

    r0, r1 = run_ddp(_one_rank_fails, world_size=2)
    assert r0 == ("UserError: rank 0: stopping with rank 1, which failed: "
                  "s3://b/runs/x: access denied")
    assert r1 == "OSError: s3://b/runs/x: access denied"
