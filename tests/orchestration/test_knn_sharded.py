"""Sharded kNN: the bank split over 2 and 3 gloo ranks gives bitwise the 1-rank result;
ties go to the lower bank index; memory stays within the documented bound."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from sslstream.orchestration.evaluate.knn import (
    knn_predict,
    quantize,
    sharded_knn_predict,
)

from tests.ddp import run_ddp


def _data(seed: int, bank: int = 61, queries: int = 29, dim: int = 16, classes: int = 5):
    """Clustered features with exact duplicates of different labels (ties)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    by = torch.randint(0, classes, (bank,), generator=g)
    bx = centers[by] + 1.5 * torch.randn(bank, dim, generator=g)
    bx[10], bx[40], bx[55] = bx[3], bx[3], bx[3]  # four equal rows, labels made to differ
    by[3], by[10], by[40], by[55] = 0, 1, 2, 3
    qy = torch.randint(0, classes, (queries,), generator=g)
    qx = centers[qy] + 1.5 * torch.randn(queries, dim, generator=g)
    qx[0] = bx[3] * 2.0  # its nearest neighbours are the tied rows
    return bx, by, qx, qy


def test_quantize_is_per_row_and_on_the_grid():
    x = torch.randn(300, 24, dtype=torch.float64) * torch.logspace(-3, 3, 300, dtype=torch.float64)[:, None]
    x[7] = 0.0
    for dtype, grid in (("float16", 2**11), ("float32", 2**24)):
        q = quantize(x.float(), dtype)
        alone = torch.cat([quantize(x[i : i + 1].float(), dtype) for i in range(x.shape[0])])
        assert torch.equal(q, alone)  # a row's code does not depend on its batch
        assert torch.equal(quantize(x.float(), dtype, block=7), q)
        v = q.double() * grid
        assert torch.equal(v, v.round()) and v.abs().max() <= grid
        assert torch.equal(q[7], torch.zeros(24, dtype=q.dtype))
        norms = q.double().norm(dim=1)
        norms[7] = 1.0
        assert (norms - 1).abs().max() < math.sqrt(24) / grid
        ref = torch.nn.functional.normalize(x.float().double(), dim=1)
        assert (q.double() - ref).abs().max() <= 1.0 / grid  # half a step + pre-rounding


def test_ties_go_to_the_lower_bank_index():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([2, 0, 1, 1])
    q = torch.tensor([[1.0, 0.1]])
    assert knn_predict(q, bank, labels, 3, k=1).item() == 2  # rows 0, 2, 3 tie: row 0
    for k in (1, 2, 3):  # and whatever the bank block size
        assert [knn_predict(q, bank, labels, 3, k=k, bank_chunk=b).item() for b in (1, 2, 4)] == \
            [knn_predict(q, bank, labels, 3, k=k).item()] * 3
    # k=2: rows 0 and 2 (not 3) vote: classes 2 and 1 tie -> the lower class
    assert knn_predict(q, bank, labels, 3, k=2).item() == 1
    # the bank's row order does not matter once the indices are given
    perm = torch.tensor([3, 1, 0, 2])
    qz, bz = quantize(q), quantize(bank)
    got = sharded_knn_predict(qz, bz[perm], labels[perm], perm, 3, k=1, distributed=False)
    assert got.item() == 2


def _sharded(rank: int, world: int, bx, by, qx, classes: int, cases):
    torch.manual_seed(0)
    owner = torch.randperm(bx.shape[0], generator=torch.Generator().manual_seed(world)) % world
    mine = (owner == rank).nonzero().flatten()  # an interleaved, uneven split
    out = {}
    for dtype, k, t, qc, bc in cases:
        qz, bz = quantize(qx, dtype), quantize(bx[mine], dtype)
        out[(dtype, k, t, qc, bc)] = sharded_knn_predict(qz, bz, by[mine], mine, classes, k, t,
                                                         query_chunk=qc, bank_chunk=bc)
    out["rows"] = int(mine.numel())
    return out


CASES = [("float16", 200, 0.1, 8, 16), ("float16", 5, 0.07, 7, 1000), ("float16", 1, 0.5, 29, 4),
         ("float32", 20, 0.1, 5, 9), ("float16", 4, 0.01, 3, 5)]


@pytest.mark.timeout(180)
def test_two_and_three_ranks_equal_one_rank():
    """61 bank rows (divisible by neither 2 nor 3), exact duplicates with different labels:
    every rank's predictions equal the 1-rank ones bitwise, for several k, t, chunks."""
    bx, by, qx, qy = _data(1)
    classes = 5
    one = {c: knn_predict(qx, bx, by, classes, k=c[1], t=c[2], chunk=c[3], bank_chunk=c[4],
                          dtype=c[0]) for c in CASES}
    assert one[CASES[0]][0].item() in (0, 1, 2, 3)
    for world in (2, 3):
        results = run_ddp(_sharded, bx, by, qx, classes, CASES, world_size=world)
        assert sum(r["rows"] for r in results) == 61 and min(r["rows"] for r in results) > 0
        for rank, r in enumerate(results):
            for c in CASES:
                assert torch.equal(r[c], one[c]), (world, rank, c)
    # ...and the numbers are kNN's: against an independent float64 weighted vote (k=5)
    bn = torch.nn.functional.normalize(bx.double(), dim=1)
    qn = torch.nn.functional.normalize(qx.double(), dim=1)
    sims = qn @ bn.T
    top = sims.topk(5, dim=1)
    votes = torch.zeros(qx.shape[0], classes, dtype=torch.float64)
    votes.scatter_add_(1, by[top.indices], (top.values / 0.07).exp())
    agree = (votes.argmax(1) == one[CASES[1]]).float().mean()
    assert agree >= 0.9  # fp16 grid vs float64: near-ties may differ, most must not


_MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from sslstream.orchestration.evaluate.knn import knn_memory_bytes, quantize, sharded_knn_predict
    torch.set_num_threads(1)
    M, N, D, Q, B, K = 200_000, 256, 512, 128, 8192, 200
    g = torch.Generator().manual_seed(0)
    bank = torch.empty(M, D, dtype=torch.float16)
    for s in range(0, M, 8192):  # built in blocks: no full-size temporary
        bank[s:s + 8192] = quantize(torch.randn(min(8192, M - s), D, generator=g), block=1024)
    labels = torch.randint(0, 100, (M,), generator=g)
    index = torch.arange(M)
    query = quantize(torch.randn(N, D, generator=g))
    sharded_knn_predict(query[:8], bank[:9000], labels[:9000], index[:9000], 100, K,
                        query_chunk=Q, bank_chunk=B, distributed=False)  # warm-up
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    base = rss("VmRSS:")
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (Linux >= 4.0)
        reset = True
    except OSError:
        reset = False
    pred = sharded_knn_predict(query, bank, labels, index, 100, K, query_chunk=Q,
                               bank_chunk=B, distributed=False)
    peak = rss("VmHWM:")
    bound = knn_memory_bytes(M, N, D, 1, k=K, query_chunk=Q, bank_chunk=B)
    fixed = M * (2 * D + 16) + N * 2 * D  # already resident before the call
    old_block = Q * M * 4  # what the old code's similarity block alone took
    print(json.dumps({"base": base, "peak": peak, "reset": reset, "bound": bound,
                      "fixed": fixed, "old_block": old_block, "n": int(pred.numel())}))
""")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_memory_stays_within_the_bound_for_a_bank_larger_than_a_chunk():
    """200k x 512 fp16 bank on CPU, 256 queries in chunks of 128: the peak resident memory
    the call adds stays under the documented per-chunk bound, far below a q x M block."""
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], capture_output=True, text=True,
                          timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1",
                                            "MKL_NUM_THREADS": "1",
                                            # big blocks mmapped, returned to the OS when
                                            # freed: RSS then measures live memory, not
                                            # glibc's cached free heap
                                            "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if not r["reset"]:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    assert r["n"] == 256
    added = r["peak"] - r["base"]
    per_chunk = r["bound"] - r["fixed"]
    assert added <= 1.2 * per_chunk + 4 * 2**20, r  # + allocator slack
    assert added < r["old_block"] / 3, r
