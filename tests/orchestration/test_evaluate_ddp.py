"""evaluate() over 1, 2 and 3 gloo ranks: the same kNN predictions and accuracy bitwise,
the same balanced bank subset, the probe trained once over the sharded bank."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from sslstream.orchestration.evaluate.bank import select_balanced
from sslstream.orchestration.evaluate.probe import linear_probe, linear_probe_sharded
from sslstream.orchestration.runtime.distributed import DistEnv
from sslstream.orchestration.schema import compose_config
from torch import nn

from tests.ddp import run_ddp
from tests.fixtures.shards import write_shard_set

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class _Pool(nn.Module):
    """A fixed, per-sample encoder (4x4 average pooling): features independent of batching."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 4).flatten(1)


def _cfg(bank: list[str], test: list[str], **ev) -> OmegaConf:
    """The composed config (every key) with the splits and a small evaluation."""
    cfg = compose_config(["seed=3", "data=shards", "data.num_workers=1",
                          "eval.batch_size=4", "eval.probe_epochs=4", "eval.knn_k=7",
                          "eval.knn_query_chunk=5", "eval.knn_bank_chunk=6",
                          "trainer.loader_backend=torchvision", "trainer.loader_threads=1",
                          *(f"eval.{k}={str(v).lower() if isinstance(v, bool) else v}"
                            for k, v in ev.items())])
    cfg.data.bank, cfg.data.test = bank, test
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))


def _evaluate(rank: int, world: int, cfgs) -> list[dict]:
    from sslstream.orchestration.evaluate.run import evaluate

    out = []
    for cfg in cfgs:  # one spawn per world size: a spawn costs seconds
        res = evaluate(cfg, _Pool(), DistEnv(rank, world, rank, torch.device("cpu")),
                       inputs=(16, MEAN, STD))
        out.append({"knn": res.knn_acc, "pred": res.knn_predictions, "probe": res.probe_acc,
                    "bank": res.bank_size, "test": res.test_size, "metrics": res.metrics(),
                    "labels": res.test_labels})
    return out


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> tuple[list[str], list[str]]:
    root = tmp_path_factory.mktemp("evalsplits")
    bank = write_shard_set(root / "bank", [13, 9, 11], num_classes=3, prefix="bank")
    test = write_shard_set(root / "test", [7, 10], num_classes=3, prefix="test")
    return bank.urls, test.urls  # 33 and 17 samples: neither divides by 2 or 3


@pytest.mark.timeout(300)
def test_two_and_three_ranks_give_the_one_rank_evaluation(splits):
    bank, test = splits
    cfgs = [_cfg(bank, test), _cfg(bank, test, bank_max_per_class=4, probe=False)]
    ones = run_ddp(_evaluate, cfgs, world_size=1)[0]
    for one, size in zip(ones, (33, 12), strict=True):
        assert one["test"] == 17 and one["bank"] == size
        assert 0.0 <= one["knn"] <= 1.0 and one["pred"].shape == (17,)
        assert {"eval/time_read", "eval/time_extract", "eval/time_score"} <= set(one["metrics"])
    assert ones[0]["probe"] is not None and "eval/time_probe" in ones[0]["metrics"]
    assert not torch.equal(ones[0]["pred"], ones[1]["pred"])  # the subset is another bank
    for world in (2, 3):
        for rank_results in run_ddp(_evaluate, cfgs, world_size=world):
            for r, one in zip(rank_results, ones, strict=True):
                assert torch.equal(r["pred"], one["pred"]), world
                assert r["knn"] == one["knn"] and r["bank"] == one["bank"]
                assert torch.equal(r["labels"], one["labels"])
            # the probe: one SGD run over the sharded bank (sums in another order)
            assert abs(rank_results[0]["probe"] - ones[0]["probe"]) <= 1 / 17 + 1e-12


def _probe(rank: int, world: int, x, y, xt, yt) -> float:
    mine = torch.arange(x.shape[0])[rank::world]  # interleaved rows, global index kept
    return linear_probe_sharded(x[mine], y[mine], mine * 5 + 2, xt, yt, 4, epochs=6, lr=0.1,
                                batch_size=32, seed=1)


@pytest.mark.timeout(120)
def test_sharded_probe_is_the_single_process_probe():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 4, generator=g)
    x = torch.randn(203, 12, generator=g) * 3 + 1
    y = ((x - 1) @ w).argmax(1)
    xt = torch.randn(80, 12, generator=g) * 3 + 1
    yt = ((xt - 1) @ w).argmax(1)
    single = linear_probe(x, y, xt, yt, 4, epochs=6, lr=0.1, batch_size=32, seed=1)
    alone = linear_probe_sharded(x, y, torch.arange(203), xt, yt, 4, epochs=6, lr=0.1,
                                 batch_size=32, seed=1)
    assert single > 0.8 and alone == pytest.approx(single)
    got = run_ddp(_probe, x, y, xt, yt, world_size=3)
    assert got == pytest.approx([single] * 3)


def test_balanced_subset_is_exact_and_independent_of_row_order():
    y = torch.tensor([0] * 50 + [1] * 5 + [2] * 20)
    i = torch.arange(75) * 3 + 1
    assert torch.bincount(y[select_balanced(y, i, max_per_class=10)]).tolist() == [10, 5, 10]
    keep = select_balanced(y, i, samples=30)
    assert torch.bincount(y[keep]).tolist() == [13, 5, 12] and int(keep.sum()) == 30
    assert int(select_balanced(y, i, samples=31, max_per_class=12).sum()) == 29  # all there is
    p = torch.randperm(75, generator=torch.Generator().manual_seed(0))
    again = select_balanced(y[p], i[p], samples=30)
    assert set(i[p][again].tolist()) == set(i[keep].tolist())
    other_seed = select_balanced(y, i, samples=30, seed=1)
    assert set(i[other_seed].tolist()) != set(i[keep].tolist())
