"""A training run stopped at W ranks and resumed at W' ranks (real gloo processes): every
sample of the interrupted epoch is trained on exactly once across the parts, the global
batch stays the run's, and a global batch the new ranks cannot share is refused (exit 2).

The trainer's batches are recorded by wrapping the loader's iteration in each rank: the
keys each rank trained on, step by step.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest
from sslstream.orchestration.errors import ConfigError
from sslstream.orchestration.runtime import checkpoint as ckpt
from sslstream.orchestration.train.lineage import resume_batch

from tests.ddp import run_ddp
from tests.orchestration.test_train import tiny

SIZES = [17, 5, 23, 9, 14, 4]  # 72 samples: 6 global batches of 12, uneven shards
BAD = {(2, 7): "bad_header"}    # skipped and replaced (a top-up or padding) on any W


def _overrides(tmp: Path, data: str, batch: int, steps: int, *extra: str) -> list[str]:
    out = tiny(tmp, "data=shards", f"data.train={data}", "data.image_size=16",
               "data.exact_epoch=true", "data.shuffle_buffer=8", "data.max_bad_fraction=0.2",
               "tracking.enabled=false", "eval.at_end=false", "trainer.checkpoint_every_steps=0",
               "trainer.loader_processes=0", *extra, steps=steps)
    return [o for o in out if not o.startswith("trainer.batch_size=")] + \
        [f"trainer.batch_size={batch}"]


def _part(rank: int, world_size: int, tmp: str, data: str, batch: int, steps: int,
          extra: tuple[str, ...] = ()) -> dict:
    """Train (resume) up to `steps` steps; the keys of every batch this rank trained on."""
    os.chdir(tmp)
    from sslstream.orchestration.cli import compose_config
    from sslstream.orchestration.train.loop import train
    from sslstream.pipelines.views.loader import TwoViewLoader

    seen: list[list[str]] = []
    plain_iter = TwoViewLoader.__iter__

    def recording(self):
        for batch in plain_iter(self):
            seen.append(list(batch.keys))
            yield batch

    TwoViewLoader.__iter__ = recording
    res = train(compose_config(_overrides(Path(tmp), data, batch, steps, *extra)))
    return {"step": res.step, "batches": seen}


def _keys(results: list[dict]) -> list[str]:
    return [k for r in results for b in r["batches"] for k in b]


def _check_once(shards, parts: list[list[dict]]) -> None:
    """Every readable sample of the epoch once; the one bad sample's place taken by one
    repeat (a top-up or padding): 72 trained positions, 71 distinct samples."""
    seen = collections.Counter(_keys([r for part in parts for r in part]))
    assert set(seen) == shards.good_keys, "every readable sample of the epoch is trained on"
    assert sum(seen.values()) == sum(SIZES)
    assert sorted(seen.values()).count(2) == len(BAD) and max(seen.values()) == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_epoch_over_2_then_2_then_3_then_1_ranks(tmp_path, shard_factory) -> None:
    """2 ranks x 6 (1 step) -> 2 ranks x 6 through reader processes (1 step: each rank's
    own cursor) -> 3 ranks x 4 (2 steps) -> 1 rank x 12 (the epoch's last 2 steps): one
    epoch of the same global batch on uneven shards with a bad sample, each sample once.
    One test for the four parts: each part's processes spend most of their time importing
    torch."""
    shards = shard_factory(SIZES, corrupt=BAD)
    tmp, root = str(tmp_path), str(shards.root)
    run = str(tmp_path / "out" / "byol-shards")
    first = run_ddp(_part, tmp, root, 6, 1, world_size=2, timeout=300)
    again = run_ddp(_part, tmp, root, 6, 2, ("trainer.loader_processes=1",), world_size=2,
                    timeout=300)
    assert [len(b) for r in first + again for b in r["batches"]] == [6] * 4
    # this config's batch 6 becomes 4 per rank: the run's global batch of 12
    second = run_ddp(_part, tmp, root, 6, 4, world_size=3, timeout=300)
    assert [len(b) for r in second for b in r["batches"]] == [4] * 6
    last = ckpt.latest_checkpoint(run)
    manifest = last.manifest()
    assert (last.step, manifest["world_size"], manifest["global_batch"]) == (4, 3, 12)
    third = run_ddp(_part, tmp, root, 6, 6, world_size=1, timeout=300)
    assert [len(b) for b in third[0]["batches"]] == [12, 12] and third[0]["step"] == 6
    _check_once(shards, [first, again, second, third])
    # the next epoch starts whole on the new number of ranks
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    assert (state["epoch"], state["epoch_step"]) == (1, 0)


def test_a_global_batch_the_new_ranks_cannot_share_is_refused() -> None:
    manifest = {"world_size": 2, "global_batch": 12}
    assert resume_batch("s3://b/run/step-1.pt", manifest, 6, 3) == 4
    assert resume_batch("s3://b/run/step-1.pt", manifest, 6, 12) == 1
    assert resume_batch("s3://b/run/step-1.pt", {}, 7, 5) == 7  # an older manifest: as set
    with pytest.raises(ConfigError) as e:
        resume_batch("s3://b/run/step-1.pt", manifest, 6, 5)
    msg = str(e.value)
    assert e.value.key == "trainer.batch_size"
    assert "written by 2 rank(s) with a global batch of 12; 5 rank(s) cannot share" in msg
    assert "on a number of ranks that divides 12 (e.g. 2, 3, 4, 6)" in msg
    assert "start a new run" in msg and "trainer.batch_size" in msg
    assert "trainer.accumulate_steps" in msg
    # with accumulation, the per-rank share must also split into equal micro-batches
    assert resume_batch("s3://b/run/step-1.pt", manifest, 6, 3, accumulate_steps=2) == 4
    with pytest.raises(ConfigError) as e:
        resume_batch("s3://b/run/step-1.pt", manifest, 6, 4, accumulate_steps=2)  # 3 per rank
    assert "in 2 micro-batches each" in str(e.value) and "(e.g. 1, 2, 3, 6)" in str(e.value)
