"""The CUDA encode kernels (csrc/cuda/encode_forward.cu, encode_sm90.cu): both fused kernels on a GPU,
and, without one, models of their selection logic.

* CPU, always (well under a second each): a lane-level Python model of the Hopper kernel's epilogue
  (the wgmma accumulator map, the tau gate, the ballot compaction into per-row staging buffers that
  stops and rescans when a buffer fills, the quad-level insertion with its append fill, the two
  consumers' alternating tiles and their final merge and sorted write; several latent chunks and
  merge_topk_kernel's merge of their partial lists) agrees with "sort by (NaN
  first, value desc, index asc), take k" on random rows, ties, all-equal rows, NaN, increasing
  rows (every score survives the gate) and partial tiles, with the kernel's staging size and a tiny
  one (so correctness visibly does not depend on it). A model of the Hopper kernel's pipeline (TMA
  ring, mbarrier parities, ping-pong named barriers) under random interleavings never hangs, never
  overwrites a stage still being read and never reads a stale one. A model of the fallback's packed
  int64 keys checks that their integer order is the kernels' order. These model the logic, not the
  CUDA code.
* GPU (skipped here): each fused kernel, forced with ``BINSPARSE_CUDA_ENCODE=sm80|sm90``, against the
  reference on random shapes, ties, all-equal rows, NaN scores, k = 1, k = M, one and several latent
  chunks (one chunk of many tiles with the direct sorted write, as in training), partial tiles; the sm_90 kernel only on compute capability 9.0 (elsewhere forcing it must
  raise).
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SM90_SOURCE = os.path.join(ROOT, "csrc", "cuda", "encode_sm90.cu")


def kernel_constant(name: str) -> int:
    text = open(SM90_SOURCE).read()
    return int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))


K_STAGED = kernel_constant("kStaged")
BISECTIONS = kernel_constant("kBisections")
TILE_COLS = 256
VALUES = 128  # accumulators per consumer thread: 64 x 256 / 128


# ---------------------------------------------------------------------------------------------
# The order and the list operations of csrc/cuda/topk.cuh
# ---------------------------------------------------------------------------------------------


def beats(av, ai, bv, bi) -> bool:
    an, bn = av != av, bv != bv
    if an or bn:
        return an and (not bn or ai < bi)
    return av > bv or (av == bv and ai < bi)


def expected_topk(values, cols, k):
    """Sort by (NaN first, value descending, index ascending), take k."""
    order = sorted(range(len(values)), key=lambda j: (not math.isnan(values[j]),
                                                      -values[j] if not math.isnan(values[j]) else 0.0, cols[j]))
    return [(values[j], cols[j]) for j in order[:k]]


def group_worst(lv, li, k, group):
    """group_worst<kGroup>: each member scans slots member, member + group, ...; then a butterfly."""
    lanes = []
    for member in range(group):
        v, i, s = math.inf, -1, -1
        for slot in range(member, k, group):
            if s < 0 or beats(v, i, lv[slot], li[slot]):
                v, i, s = lv[slot], li[slot], slot
        lanes.append((v, i, s))
    off = group // 2
    while off > 0:
        new = []
        for m, (v, i, s) in enumerate(lanes):
            ov, oi, os_ = lanes[m ^ off]
            if os_ >= 0 and (s < 0 or beats(v, i, ov, oi) or (ov == v and oi == i and os_ < s)):
                v, i, s = ov, oi, os_
            new.append((v, i, s))
        lanes = new
        off //= 2
    assert len(set((x[2]) for x in lanes)) == 1, "the group must agree on the worst slot"
    return lanes[0]


class QuadTopk:
    """quad_offer's state and its insertion (append while not full, else replace the worst)."""

    def __init__(self, k):
        self.k, self.count, self.worst = k, 0, (-math.inf, 0x7FFFFFFF, 0)
        self.lv, self.li = [-math.inf] * k, [0x7FFFFFFF] * k

    def offer(self, cv, ci):
        k = self.k
        if self.count < k:
            self.lv[self.count], self.li[self.count] = cv, ci
            self.count += 1
            if self.count == k:
                self.worst = group_worst(self.lv, self.li, k, 4)
        elif beats(cv, ci, self.worst[0], self.worst[1]):
            ws = self.worst[2]
            self.lv[ws], self.li[ws] = cv, ci
            self.worst = group_worst(self.lv, self.li, k, 4)

    def tau(self, valid):
        return math.inf if not valid else (-math.inf if self.count < self.k else self.worst[0])


def warp_offer(lv, li, k, worst, cands):
    """warp_offer over up to 32 lanes' candidates (None: no candidate), in lane order."""
    wv, wi, _ = worst
    pending = [c for c in cands if c is not None and beats(c[0], c[1], wv, wi)]
    for v, i in pending:
        if beats(v, i, worst[0], worst[1]):
            lv[worst[2]], li[worst[2]] = v, i
            worst = group_worst(lv, li, k, 32)
    return worst


def write_sorted(lv, li, k):
    out = [None] * k
    for s in range(k):
        rank = sum(beats(lv[o], li[o], lv[s], li[s]) or (lv[o] == lv[s] and li[o] == li[s] and o < s)
                   for o in range(k))
        assert out[rank] is None, "two entries with one rank"
        out[rank] = (lv[s], li[s])
    return out


# ---------------------------------------------------------------------------------------------
# The Hopper epilogue, one quad (the 4 lanes of a row pair) at a time: quads never share rows, and
# the warp-wide votes only decide how many idle iterations the other quads run.
# ---------------------------------------------------------------------------------------------


def frag_col(lane, i):
    return 8 * (i // 4) + 2 * (lane % 4) + i % 2


def row_values(i0):
    """Value indices of row h = i0 // 2 in a thread: e + 2h + 4n."""
    return [i for i in range(VALUES) if (i // 2) % 2 == i0 // 2]


def tile_kth_lower_bound(z, h, k, steps):
    """Bisection in float32 between the row's least and greatest score, keeping >= k scores !(z < lo)."""
    vals = [z[p][i] for p in range(4) for i in row_values(2 * h)]
    numbers = [v for v in vals if not math.isnan(v)]
    lo = np.float32(min(numbers)) if numbers else np.float32(np.inf)
    hi = np.float32(max(numbers)) if numbers else np.float32(-np.inf)
    finite = bool(np.isfinite(lo) and np.isfinite(hi))
    for _ in range(steps):
        with np.errstate(over="ignore", invalid="ignore"):
            mid = np.float32(lo + np.float32(hi - lo) * np.float32(0.5))
        count = sum(not (v < mid) for v in vals)
        if finite and lo < mid < hi:
            lo, hi = (mid, hi) if count >= k else (lo, mid)
    return float(lo) if finite else -math.inf


def epilogue_quad(z, col0, col_end, first_tile, state, tau, staged_cap):
    """z[p][i]: the scores of quad lane p (values i = e + 2h + 4n: row h, column frag_col(p, i));
    tau[h] = +inf marks a row beyond N. Columns >= col_end pass the gate but are dropped when inserted."""
    k = state[0].k
    if first_tile and col_end - col0 >= TILE_COLS:
        for h in range(2):
            bound = tile_kth_lower_bound(z, h, k, BISECTIONS)
            if tau[h] != math.inf:
                tau[h] = bound
    start = [0] * 4
    while any(s < VALUES for s in start):
        staged = [[] for _ in range(4)]
        for p in range(4):
            stop = VALUES
            for i in range(VALUES):
                h = (i // 2) % 2
                if i >= start[p] and not (z[p][i] < tau[h]):
                    if len(staged[p]) < staged_cap:
                        staged[p].append((z[p][i], frag_col(0, i) | (h << 8)))  # the kernel's staged code
                    else:
                        stop = min(stop, i)
            start[p] = stop
        if not any(staged):
            break
        for e in range(max(len(s) for s in staged)):
            for p in range(4):  # the quad's lanes take turns
                if e < len(staged[p]):
                    v, code = staged[p][e]
                    col, h = col0 + 2 * p + (code & 0xFF), code >> 8
                    if col < col_end:
                        state[h].offer(v, col)
        for h in range(2):
            if state[h].count >= k and not math.isnan(state[h].worst[0]):
                tau[h] = max(tau[h], state[h].worst[0])


def sm90_cta_model(scores, k, staged_cap=K_STAGED, valid=(True, True), col_begin=0, col_end=None):
    """Two rows (one quad) over the columns [col_begin, col_end) of a chunk (whole tiles; col_end is M
    or the next chunk's start): two consumers take alternate 256-column tiles, then consumer 1's list
    is merged into consumer 0's and written sorted (empty slots included, as a partial list)."""
    M = scores.shape[1]
    col_end = M if col_end is None else col_end
    ntiles = -(-(col_end - col_begin) // TILE_COLS)
    states = [[QuadTopk(k) for _ in range(2)] for _ in range(2)]  # [consumer][h]
    taus = [[-math.inf if v else math.inf for v in valid] for _ in range(2)]
    for j in range(ntiles):
        col0, c = col_begin + j * TILE_COLS, j % 2
        z = [[0.0] * VALUES for _ in range(4)]
        for p in range(4):
            for i in range(VALUES):
                col = col0 + frag_col(p, i)
                z[p][i] = float(scores[(i // 2) % 2, col]) if col < M else 0.0  # beyond M: padded bias, 0
        epilogue_quad(z, col0, col_end, j == c, states[c], taus[c], staged_cap)
    rows = []
    for h in range(2):
        q0, q1 = states[0][h], states[1][h]
        lv, li = list(q0.lv), list(q0.li)
        worst = group_worst(lv, li, k, 32)
        for s0 in range(0, k, 32):
            worst = warp_offer(lv, li, k, worst, [(q1.lv[s], q1.li[s]) if s < k else None for s in range(s0, s0 + 32)])
        rows.append(write_sorted(lv, li, k))
    return rows


def same(a, b):
    return len(a) == len(b) and all((x[1] == y[1]) and (x[0] == y[0] or (math.isnan(x[0]) and math.isnan(y[0])))
                                    for x, y in zip(a, b))


CASES = {
    "random": lambda rng, M: rng.standard_normal((2, M)).astype(np.float32),
    "ties": lambda rng, M: rng.integers(-3, 4, (2, M)).astype(np.float32),
    "all_equal": lambda rng, M: np.full((2, M), 0.5, np.float32),
    "nan": lambda rng, M: np.where(rng.random((2, M)) < 0.02, np.nan, rng.standard_normal((2, M))).astype(np.float32),
    "increasing": lambda rng, M: np.tile(np.arange(M, dtype=np.float32), (2, 1)),
    "relu_zeros": lambda rng, M: np.maximum(rng.standard_normal((2, M)), 0).astype(np.float32),
}


@pytest.mark.parametrize("staged_cap", [K_STAGED, 4], ids=["kernel_staging", "tiny_staging"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("M,k", [(300, 1), (700, 32), (1100, 128), (256, 64), (512, 128), (129, 100)])
def test_hopper_epilogue_model_is_an_exact_topk(M, k, case, staged_cap):
    rng = np.random.default_rng(M * 1000 + k)
    scores = CASES[case](rng, M)
    if k > M:
        pytest.skip("k <= M")
    got = sm90_cta_model(scores, k, staged_cap)
    for h in range(2):
        want = expected_topk([float(v) for v in scores[h]], list(range(M)), k)
        assert same(got[h], want), (case, h, got[h][:5], want[:5])


@pytest.mark.parametrize("M,k,tiles_per_chunk", [(560, 100, 1), (1100, 128, 2), (2000, 32, 3), (300, 1, 1)])
def test_hopper_chunks_and_merge_model_is_an_exact_topk(M, k, tiles_per_chunk):
    # Several chunks (the last one may hold fewer than k latents: its partial list keeps empty
    # slots), each a CTA as above, then merge_topk_kernel: chunk 0's list, the others offered in order.
    rng = np.random.default_rng(M + k)
    scores = CASES["ties"](rng, M)
    chunk_cols = tiles_per_chunk * TILE_COLS
    parts = [sm90_cta_model(scores, k, col_begin=c0, col_end=min(M, c0 + chunk_cols)) for c0 in range(0, M, chunk_cols)]
    for h in range(2):
        lv, li = [v for v, _ in parts[0][h]], [i for _, i in parts[0][h]]
        worst = group_worst(lv, li, k, 32)
        for part in parts[1:]:
            for s0 in range(0, k, 32):
                worst = warp_offer(lv, li, k, worst, [part[h][s] if s < k else None for s in range(s0, s0 + 32)])
        want = expected_topk([float(v) for v in scores[h]], list(range(M)), k)
        assert same(write_sorted(lv, li, k), want), (M, k, h)


def test_hopper_epilogue_model_skips_rows_beyond_n():
    # A row beyond N (tau = +inf, valid = False) stages nothing and keeps an empty list.
    z = [[1.0] * VALUES for _ in range(4)]
    state, tau = [QuadTopk(3), QuadTopk(3)], [-math.inf, math.inf]
    epilogue_quad(z, 0, TILE_COLS, True, state, tau, K_STAGED)
    assert state[0].count == 3 and state[1].count == 0 and tau[1] == math.inf


def test_first_tile_bound_lets_about_k_scores_through():
    # The point of the bisection: the first tile inserts about k scores per row, not 256.
    rng = np.random.default_rng(0)
    for k in (1, 32, 128):
        scores = rng.standard_normal((2, TILE_COLS)).astype(np.float32)
        z = [[float(scores[(i // 2) % 2, frag_col(p, i)]) for i in range(VALUES)] for p in range(4)]
        for h in range(2):
            bound = tile_kth_lower_bound(z, h, k, BISECTIONS)
            passed = int((scores[h] >= bound).sum())
            assert k <= passed <= k + 4, (k, passed)


# ---------------------------------------------------------------------------------------------
# The Hopper kernel's pipeline (encode_sm90_kernel): the producer's TMA ring, the two consumers'
# ping-pong named barriers and their mbarrier waits, run under random interleavings. A hang shows
# as a state where nobody can move; a stage overwritten while a consumer still reads it, or a slab
# read from the wrong use of a stage (a parity slip), fails an assertion.
# ---------------------------------------------------------------------------------------------


class Ring:
    """encode_sm90.cu's Ring: the slot and parity of the current use of a ring of stages."""

    def __init__(self, stages):
        self.slot, self.phase, self.stages = 0, 0, stages

    def advance(self, steps):
        flips = steps // self.stages
        self.slot += steps % self.stages
        if self.slot >= self.stages:
            self.slot -= self.stages
            flips += 1
        self.phase ^= flips & 1


class MBarrier:
    """`count` arrivals and the expected transaction bytes complete a phase; a parity wait passes
    once the phase of that parity has completed (a fresh barrier passes parity 1 at once)."""

    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def arrive(self, expect_tx=0):
        self.tx += expect_tx
        self.pending -= 1
        assert self.pending >= 0, "more arrivals than the barrier's count in one phase"
        self.complete_tx(0)

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        if self.pending == 0 and self.tx == 0:
            self.phase, self.pending = self.phase + 1, self.count

    def passed(self, parity):
        return (self.phase & 1) != parity


class NamedBarrier:
    """bar.arrive / bar.sync of 256 threads, counted by warps of 32."""

    def __init__(self):
        self.threads, self.generation = 0, 0

    def add_warp(self):
        self.threads += 32
        assert self.threads <= 256
        if self.threads == 256:
            self.threads, self.generation = 0, self.generation + 1


def sm90_pipeline_model(ntiles, nk, stages, seed):
    """One CTA: the producer thread and the 8 consumer warps (barrier ids as the kernel's, 8 + id)."""
    full, empty = [MBarrier(1) for _ in range(stages)], [MBarrier(4) for _ in range(stages)]
    named = {8: NamedBarrier(), 9: NamedBarrier(), 10: NamedBarrier()}
    held = [None] * stages  # the (tile, slab) a stage holds
    readers = [set() for _ in range(stages)]
    in_flight, consumed = [], []

    def sync(barrier):
        generation = named[barrier].generation
        named[barrier].add_warp()
        return lambda: named[barrier].generation > generation

    def producer():
        ring = Ring(stages)
        for j in range(ntiles):
            for kb in range(nk):
                s = ring.slot
                yield lambda: empty[s].passed(ring.phase ^ 1)
                full[s].arrive(expect_tx=1)
                in_flight.append((s, (j, kb)))
                ring.advance(1)

    def consumer_warp(c, w):
        ring = Ring(stages)
        if c == 1:
            ring.advance(nk)
            named[8].add_warp()
        for j in range(c, ntiles, 2):
            yield sync(8 + c)
            previous = None
            for kb in range(nk):
                s = ring.slot
                yield lambda: full[s].passed(ring.phase)
                assert held[s] == (j, kb), f"consumer {c} got {held[s]} for tile {j}, slab {kb}"
                readers[s].add((c, w))
                consumed.append((c, w, j, kb))
                if previous is not None:
                    readers[previous].discard((c, w))
                    empty[previous].arrive()
                previous = s
                ring.advance(1)
            if j + 1 < ntiles:
                named[9 - c].add_warp()
            readers[previous].discard((c, w))
            empty[previous].arrive()
            ring.advance(nk)
        yield sync(10)

    rng = np.random.default_rng(seed)
    agents = [producer()] + [consumer_warp(c, w) for c in range(2) for w in range(4)]
    blocked = {id(a): (lambda: True) for a in agents}
    while agents or in_flight:
        choices = [a for a in agents if blocked[id(a)]()] + (["tma"] if in_flight else [])
        assert choices, f"hang: ntiles={ntiles} nk={nk} stages={stages}"
        pick = choices[rng.integers(len(choices))]
        if pick == "tma":  # TMA loads land in any order
            s, slab = in_flight.pop(rng.integers(len(in_flight)))
            assert not readers[s], f"stage {s} overwritten while {readers[s]} still read it"
            held[s] = slab
            full[s].complete_tx(1)
        else:
            try:
                blocked[id(pick)] = next(pick)
            except StopIteration:
                agents.remove(pick)
    assert sorted(consumed) == sorted((j % 2, w, j, kb) for j in range(ntiles) for kb in range(nk) for w in range(4))


def test_hopper_pipeline_model_never_hangs_or_reads_a_stale_stage():
    for ntiles in range(1, 6):
        for nk in range(1, 5):
            for stages in range(2, 5):
                for seed in range(4):
                    sm90_pipeline_model(ntiles, nk, stages, seed)


# ---------------------------------------------------------------------------------------------
# The fallback's packed keys (score_key / decode_keys_kernel in encode_forward.cu)
# ---------------------------------------------------------------------------------------------


def score_key(z: float, index: int) -> int:
    bits = int(np.array(z, np.float32).view(np.int32))
    if z != z:
        bits = 0x7FC00000
    if z == 0.0:
        bits = 0
    ordered = bits if bits >= 0 else bits ^ 0x7FFFFFFF
    return ordered * 2**32 + (0xFFFFFFFF - index)


def decode_key(key: int):
    ordered = key >> 32
    bits = ordered if ordered >= 0 else ordered ^ 0x7FFFFFFF
    return float(np.array(bits, np.int32).view(np.float32)), 0xFFFFFFFF - (key & 0xFFFFFFFF)


def test_packed_keys_order_like_the_kernels():
    rng = np.random.default_rng(1)
    special = [0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 1.0, -1.0, 1e-45, -1e-45, 3.4e38, -3.4e38]
    values = special + list(rng.standard_normal(200)) + [1.0] * 5 + [math.nan] * 3
    values = [float(np.float32(v)) for v in values]  # the kernels' scores are float32
    indices = list(rng.permutation(len(values)) * 1000 + 7)
    indices[0] = 2**31 - 2  # the largest latent index
    keys = [score_key(v, i) for v, i in zip(values, indices)]
    assert all(-(2**63) <= key < 2**63 for key in keys)
    by_key = sorted(range(len(values)), key=lambda j: -keys[j])
    for a, b in zip(by_key, by_key[1:]):  # the key order is the `beats` order (with -0 == +0)
        assert beats(values[a], indices[a], values[b], indices[b]), (values[a], values[b])
    for v, i, key in zip(values, indices, keys):
        dv, di = decode_key(key)
        assert di == i and (dv == v or (math.isnan(dv) and math.isnan(v)))


# ---------------------------------------------------------------------------------------------
# On a GPU: each fused kernel against the reference
# ---------------------------------------------------------------------------------------------

DEV = "cuda"
GPU = torch.cuda.is_available()
IS_SM90 = GPU and torch.cuda.get_device_capability() == (9, 0)
KERNELS = ["sm80", "sm90"]


@pytest.fixture
def kernel(request, monkeypatch):
    name = request.param
    if not GPU:
        pytest.skip("needs a CUDA GPU")
    if name == "sm90" and not IS_SM90:
        pytest.skip("the sm_90 kernel runs on compute capability 9.0 only")
    from binsparse_kernels.backends import cuda  # noqa: F401  (builds or fails with instructions)

    monkeypatch.setenv("BINSPARSE_CUDA_ENCODE", name)
    return name


def gpu_encode(x, W, b, theta, k):
    return torch.ops.binsparse.cuda_encode_forward(x, W, b, theta, k, theta is not None)


def expected(x, W, b, theta, k):
    """fp64 scores of the same fp32 math (weights rounded to x's dtype), then the kernels' order."""
    pre = x.double() @ W.to(x.dtype).double().T + b.double()
    z = (pre - theta.double() if theta is not None else torch.relu(pre)).float()
    return z


def check(z, values, indices, k):
    """A valid exact top-k of z, sorted, with the lowest index among ties (exact ties are exact)."""
    N, M = z.shape
    assert values.shape == (N, k) and indices.shape == (N, k) and indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < M)).all()
    assert (indices.sort(1).values.diff(1) != 0).all(), "duplicate index in a row"
    picked = z.gather(1, indices)
    nan = picked.isnan()
    assert torch.equal(nan, values.isnan())
    torch.testing.assert_close(values[~nan], picked[~nan], atol=1e-4, rtol=1e-4)
    kth = torch.where(z.isnan(), torch.inf, z).topk(k, 1).values[:, -1:]
    assert (torch.where(nan, torch.inf, picked) >= kth - 1e-4 * (1 + kth.abs())).all()
    v = torch.where(values.isnan(), torch.inf, values)
    assert (v[:, 1:] <= v[:, :-1]).all(), "rows must be sorted by decreasing value"
    tie = v[:, 1:] == v[:, :-1]
    assert (~tie | (indices[:, 1:] > indices[:, :-1])).all(), "equal values must come in increasing index"


SHAPES = [  # (N, d, M, k): partial row blocks and tiles, one chunk and many, k = 1, k = M, k = 128
    (37, 64, 300, 5),
    (200, 72, 1000, 1),
    (9, 16, 13, 13),
    (130, 576, 3000, 32),
    (70, 128, 2000, 128),
    (1, 64, 70_000, 64),
    (5000, 64, 600, 32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_kernel_matches_reference(kernel, shape, binary, dtype):
    N, d, M, k = shape
    x = torch.randn(N, d, device=DEV).to(dtype)
    W = ((torch.rand(M, d, device=DEV) * 2 - 1) / math.sqrt(d)).to(dtype)
    b = torch.randn(M, device=DEV) * 0.1
    theta = torch.rand(M, device=DEV) * 0.01 if binary else None
    values, indices = gpu_encode(x, W, b, theta, k)
    check(expected(x, W, b, theta, k), values, indices, k)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("M,k", [(1000, 32), (600, 128), (256, 7)])
def test_fused_kernel_ties_all_equal_and_nan(kernel, M, k):
    # Integer-valued scores (exact in every summation order), all-equal rows and NaN weights.
    N, d = 70, 64
    x = torch.randint(-2, 3, (N, d), device=DEV).to(torch.bfloat16)
    W = torch.randint(-1, 2, (M, d), device=DEV).to(torch.bfloat16)
    W[:, :] = W[torch.randint(0, 5, (M,), device=DEV)]  # 5 distinct rows: many exact ties
    W[3] = float("nan")
    x[1] = 0  # row 1: scores equal to the bias
    b = torch.zeros(M, device=DEV)
    values, indices = gpu_encode(x, W, b, torch.zeros(M, device=DEV), k)
    z = expected(x, W, b, torch.zeros(M, device=DEV), k)
    check(z, values, indices, k)
    # Integer scores are exact in any summation order: the selection itself must match exactly.
    order = torch.sort(torch.where(z.isnan(), torch.inf, z), dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(indices, order)
    assert (indices[:, 0] == 3).all(), "NaN ranks first"
    assert torch.equal(indices[1, 1:], torch.tensor([j for j in range(M) if j != 3][: k - 1], device=DEV))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
def test_fused_kernel_one_chunk_many_tiles(kernel, binary):
    # The training case: enough row blocks that one latent chunk fills the GPU, so each CTA walks all
    # tiles (sm90: 5, both consumers and the ring wrapping; sm80: 9) and writes its rows sorted
    # straight into the output. 12 row blocks per SM fill every wave at 1 to 4 CTAs per SM.
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    N, d, M, k = 12 * sms * 64 - 7, 64, 1100, 32
    x = torch.randint(-2, 3, (N, d), device=DEV).to(torch.bfloat16)
    W = torch.randint(-1, 2, (7, d), device=DEV).to(torch.bfloat16)[torch.randint(0, 7, (M,), device=DEV)]
    W[300] = float("nan")  # in the second tile of either kernel
    b = torch.randint(-3, 4, (M,), device=DEV).float()
    theta = torch.randint(0, 3, (M,), device=DEV).float() if binary else None
    values, indices = gpu_encode(x, W, b, theta, k)
    z = expected(x, W, b, theta, k)  # integer-valued: exact in every summation order
    check(z, values, indices, k)
    order = torch.sort(torch.where(z.isnan(), torch.inf, z), dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(indices, order)


@pytest.mark.gpu
def test_forcing_a_kernel_that_cannot_run_raises(monkeypatch):
    if not GPU:
        pytest.skip("needs a CUDA GPU")
    from binsparse_kernels.backends import cuda  # noqa: F401

    x, W, b = torch.randn(4, 16, device=DEV), torch.randn(300, 16, device=DEV), torch.zeros(300, device=DEV)
    monkeypatch.setenv("BINSPARSE_CUDA_ENCODE", "sm90")
    with pytest.raises(RuntimeError, match="sm_90"):
        gpu_encode(x, W, b, None, 3)  # fp32 (and not 9.0 on other GPUs)
    monkeypatch.setenv("BINSPARSE_CUDA_ENCODE", "sm80")
    with pytest.raises(RuntimeError, match="chunked"):
        gpu_encode(x.half(), W.half(), b, None, 200)
    monkeypatch.setenv("BINSPARSE_CUDA_ENCODE", "fastest")
    with pytest.raises(RuntimeError, match="auto, sm80 or sm90"):
        gpu_encode(x, W, b, None, 3)
