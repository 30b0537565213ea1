"""Weighted kNN (InstDisc, Wu et al. 2018; lightly's benchmark), sharded over ranks, exact.

Each query's k nearest bank rows (cosine) vote for their class with weight exp(sim / t).
The bank stays split over the ranks: every rank scores every query against its own bank
shard, keeps its top k, and the k candidates per query per rank are merged. No rank ever
holds the whole bank, and the result is bitwise the single-process one, because:

* Features are quantised (`quantize`): each row L2-normalised and rounded to a grid,
  multiples of 2^-11 stored in fp16 ("float16", the evaluation default) or of 2^-24 in
  fp32 ("float32"); both grids fit the storage type exactly. Every step is a per-row,
  correctly rounded operation (max, divide, round, a sum of squares of integers that is
  exact in float64, sqrt), so a row's code does not depend on the batch, the thread count
  or the device.
* A dot product of two rows is then a sum of multiples of 2^-22 (2^-48) whose partial
  sums stay below 2 in magnitude (Cauchy-Schwarz): every partial sum is exact in float32
  (float64), the type the similarities are computed in, so any summation order (any BLAS
  blocking, any shard shape, any device) gives the same similarity.
* Ties are broken by the global bank index (lower first), explicitly: the rows equal to
  the k-th similarity are taken in index order, and candidate lists are merged by a
  stable sort on (similarity desc, index asc).
* The vote adds the weights in the merged candidates' order with elementwise IEEE
  operations only (exp is a fixed polynomial with squaring, not a library exp whose
  vectorised and scalar paths may differ in the last bit); argmax picks the lowest class
  on a tie.

Memory per rank (`knn_memory_bytes`): the bank shard M/W x D, the queries, and per query
chunk (q = eval.knn_query_chunk) and bank block (b = eval.knn_bank_chunk) the compute-type
copies and a q x b similarity block -- never q x M.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

# storage dtype -> (grid exponent, compute dtype): values n * 2^-g with |n| <= 2^g
DTYPES = {"float16": (11, torch.float16, torch.float32), "float32": (24, torch.float32, torch.float64)}
_NO_INDEX = float(2**53)  # index of "no candidate" (a rank with fewer than k rows)
_MAX_DIM = 1 << 20


def _dtype(name: str) -> tuple[int, torch.dtype, torch.dtype]:
    if name not in DTYPES:
        raise ValueError(f"eval.knn_dtype={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


@torch.no_grad()
def quantize(x: torch.Tensor, dtype: str = "float16", block: int = 8192) -> torch.Tensor:
    """Rows L2-normalised and rounded to the `dtype` grid (see the module doc).

    A zero row stays zero. Computed in float64 blocks of `block` rows (memory: block x D x 8
    bytes), on x's device.
    """
    grid, store, _ = _dtype(dtype)
    if x.ndim != 2:
        raise ValueError(f"quantize: expected (N, D) features, got {tuple(x.shape)}")
    d = x.shape[1]
    if d > _MAX_DIM:
        raise ValueError(f"kNN supports feature dims up to {_MAX_DIM}, got {d}")
    # integers below 2^pre: D of their squares sum exactly in float64
    pre = float(2 ** min(26, (53 - math.ceil(math.log2(max(d, 2)))) // 2))
    out = torch.empty(x.shape, dtype=store, device=x.device)
    for s in range(0, x.shape[0], block):
        v = x[s : s + block].double()
        v = v / v.abs().amax(1, keepdim=True).clamp_min(1e-300)  # in [-1, 1], rounded once
        v = torch.round(v * pre)
        norm = (v * v).sum(1, keepdim=True).sqrt().clamp_min(1.0)
        out[s : s + block] = torch.round(v / norm * 2.0**grid).div_(2.0**grid).to(store)
    return out


def knn_memory_bytes(bank_rows: int, queries: int, dim: int, world_size: int = 1, *,
                     k: int = 200, query_chunk: int = 1024, bank_chunk: int = 16384,
                     dtype: str = "float16") -> int:
    """Peak bytes one rank needs for `sharded_knn_predict` (besides model and loaders).

    With s = storage bytes (2 for float16, 4 for float32), c = compute bytes (4, 8):
    bank shard ceil(M/W) x (s D + 16: label, index) + queries N x s D
    + per chunk: (q + b) x D x c (compute copies) + q x b x c (similarities)
    + q x k x 24 x (W + 4) (candidate lists: value, index, label; running, block, merged,
    gathered) + q x k x 8 (votes, C <= k).
    """
    _, store, comp = _dtype(dtype)
    sb, cb = store.itemsize, comp.itemsize
    m = -(-bank_rows // world_size)
    b = min(bank_chunk, max(m, 1))
    q = min(query_chunk, max(queries, 1))
    return (m * (sb * dim + 16) + queries * sb * dim + (q + b) * dim * cb + q * b * cb
            + q * k * 24 * (world_size + 4) + q * k * 8)


def _select(vals: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """Columns (n, min(k, L)) of each row's k best by (value desc, index asc), in no order.

    One top-(k+1) pass: where the (k+1)-th value is below the k-th, the k best are
    determined whatever order top-k returns equal values in; only rows with more entries
    equal to the k-th value than fit (rare) are sorted by (value, index) on their own.
    `index` (n, L) or (1, L): the entries' global indices.
    """
    n, width = vals.shape
    kk = min(k, width)
    if kk == width:
        return torch.arange(width, device=vals.device).expand(n, width)
    top, pos = vals.topk(kk + 1, dim=1)
    surplus = top[:, kk] == top[:, kk - 1]
    pos = pos[:, :kk].contiguous()
    if bool(surplus.any()):
        rows = surplus.nonzero().flatten()
        ix = index.expand(n, width)[rows]
        o = ix.sort(dim=1, stable=True).indices
        best = vals[rows].gather(1, o).sort(dim=1, descending=True, stable=True).indices
        pos[rows] = o.gather(1, best[:, :kk])
    return pos


def _canonical(vals: torch.Tensor, index: torch.Tensor, labels: torch.Tensor):
    """Candidates ordered by (value desc, index asc): the vote's order of additions."""
    o = index.sort(dim=1, stable=True).indices
    vals, index, labels = vals.gather(1, o), index.gather(1, o), labels.gather(1, o)
    o = vals.sort(dim=1, descending=True, stable=True).indices
    return vals.gather(1, o), index.gather(1, o), labels.gather(1, o)


def _merge(vals: torch.Tensor, index: torch.Tensor, labels: torch.Tensor, k: int):
    """The k best of candidate lists by (value desc, index asc), in no order."""
    p = _select(vals, index, k)
    return vals.gather(1, p), index.gather(1, p), labels.gather(1, p)


def _local_topk(q: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                k: int, bank_chunk: int, comp: torch.dtype):
    """(values, global indices, labels), each (n, k), of this shard's best rows per query,
    in no order; padded with (-inf, _NO_INDEX, 0) when the shard has fewer than k rows."""
    n = q.shape[0]
    best_v = torch.full((n, k), -math.inf, dtype=comp, device=q.device)
    best_i = torch.full((n, k), int(_NO_INDEX), dtype=torch.int64, device=q.device)
    best_y = torch.zeros((n, k), dtype=torch.int64, device=q.device)
    for s in range(0, bank.shape[0], bank_chunk):
        ix = index[s : s + bank_chunk]
        sims = q @ bank[s : s + bank_chunk].to(comp).T
        p = _select(sims, ix[None], k)
        v = sims.gather(1, p)
        del sims
        best_v, best_i, best_y = _merge(torch.cat([best_v, v], 1), torch.cat([best_i, ix[p]], 1),
                                        torch.cat([best_y, labels[s : s + bank_chunk][p]], 1), k)
    return best_v, best_i, best_y


def _exp_nonpositive(x: torch.Tensor, t: float) -> torch.Tensor:
    """exp(x) for x in [-4.5 / t, 0] from + and * only (bitwise the same on any device, at
    any position of any tensor): Taylor series of exp(x / 2^m) then m squarings."""
    m = max(0, math.ceil(math.log2(2.0 * 4.5 / t)))
    y = x / float(2**m)  # |y| <= 1/2
    p = torch.full_like(y, 1.0 / math.factorial(17))
    for i in range(16, -1, -1):
        p = p * y
        p = p + 1.0 / math.factorial(i)
    for _ in range(m):
        p = p * p
    return p


def _vote(vals: torch.Tensor, labels: torch.Tensor, num_classes: int, t: float) -> torch.Tensor:
    """Predicted class per row of the merged, best-first candidates."""
    valid = torch.isfinite(vals)
    sims = torch.where(valid, vals, 0.0).double()
    w = _exp_nonpositive((sims - sims[:, :1]) / t, t)  # exp((s - s_max) / t): no overflow
    w = torch.where(valid, w, 0.0)
    scores = torch.zeros(vals.shape[0], num_classes, dtype=torch.float64, device=vals.device)
    for j in range(vals.shape[1]):  # a fixed order of additions
        scores.scatter_add_(1, labels[:, j : j + 1], w[:, j : j + 1])
    return scores.argmax(dim=1)


@torch.no_grad()
def sharded_knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    bank_index: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    *,
    query_chunk: int = 1024,
    bank_chunk: int = 16384,
    distributed: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Predicted labels of all of `query` against the bank held in shards over the ranks.

    `query` (N, D): the same quantised queries on every rank. `bank` (M_r, D): this rank's
    quantised shard, `bank_labels` / `bank_index` (M_r,) its labels and global indices
    (unique over ranks; ties go to the lower index). Every rank returns the same (N,)
    predictions. `distributed=False` (or no process group): this process holds the bank.
    `progress(queries done, queries)` is called after every query chunk.
    """
    if query.dtype != bank.dtype or query.dtype not in (torch.float16, torch.float32):
        raise TypeError("sharded_knn_predict takes quantize()d features of one dtype")
    if t <= 0:
        raise ValueError(f"kNN temperature must be > 0, got {t}")
    comp = torch.float32 if query.dtype == torch.float16 else torch.float64
    dev = query.device
    group = distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    total = torch.tensor([bank.shape[0]], dtype=torch.int64, device=dev)
    if group:
        dist.all_reduce(total)
    k = min(int(k), int(total.item()))
    if k == 0:
        raise ValueError("kNN needs a non-empty bank")
    labels, index = bank_labels.to(dev).long(), bank_index.to(dev).long()
    if index.numel() > 1 and bool((index[1:] <= index[:-1]).any()):  # rows in index order
        order = index.argsort()
        bank, labels, index = bank[order], labels[order], index[order]
    preds = []
    for s in range(0, query.shape[0], query_chunk):
        q = query[s : s + query_chunk].to(comp)
        v, i, y = _local_topk(q, bank, labels, index, k, bank_chunk, comp)
        if group:
            mine = torch.stack([v.double(), i.double(), y.double()])  # all exact in float64
            every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(every, mine)
            v, i, y = _merge(torch.cat([e[0] for e in every], 1),
                             torch.cat([e[1] for e in every], 1).long(),
                             torch.cat([e[2] for e in every], 1).long(), k)
        v, i, y = _canonical(v, i, y)
        preds.append(_vote(v, y, num_classes, t))
        if progress is not None:
            progress(min(s + query_chunk, query.shape[0]), query.shape[0])
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=dev)


@torch.no_grad()
def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
    bank_chunk: int = 16384,
    dtype: str = "float32",
) -> torch.Tensor:
    """Predicted labels of `query` (N, D) by weighted kNN over `bank` (M, D), cosine: the
    sharded algorithm on one process (ties to the lower bank row). `dtype` "float32"
    (default here) keeps similarities to ~1e-7; evaluation stores banks as "float16"."""
    index = torch.arange(bank.shape[0], device=bank.device)
    return sharded_knn_predict(quantize(query, dtype), quantize(bank, dtype), bank_labels, index,
                               num_classes, k, t, query_chunk=chunk, bank_chunk=bank_chunk,
                               distributed=False)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int | None = None,
    k: int = 200,
    t: float = 0.1,
) -> float:
    """Top-1 accuracy of weighted kNN (k, temperature t) of `query` against `bank`."""
    if bank.shape[0] == 0 or query.shape[0] == 0:
        raise ValueError("kNN needs a non-empty bank and query set (check data.bank / data.test)")
    if num_classes is None:
        num_classes = int(max(bank_labels.max(), query_labels.max()).item()) + 1
    pred = knn_predict(query, bank, bank_labels.long(), num_classes, k=k, t=t)
    return accuracy(pred, query_labels)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """correct / total as one correctly rounded division (the same for any rank count)."""
    n = int(labels.numel())
    return int((pred.cpu() == labels.cpu().long()).sum().item()) / n if n else float("nan")
