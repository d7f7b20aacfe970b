"""The Triton fused encode forward (``backends/triton/encode.py``) against the reference backend.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py) on CPU tensors, in
fp32 and fp16 (the interpreter's bf16 ``tl.dot`` is wrong, so the backend refuses bf16 there:
tests/test_triton_sparse.py checks that for every op). The
interpreter runs the same code a GPU runs: the sorting networks are written with builtins only
(no ``tl.topk``), so every KP (16..128), the threshold gate (append rounds per quad group, flushes
at the FLUSH_AT boundary and at the chunk's end) run here. Small shapes, odd sizes, small block overrides for several row blocks, tiles and
chunks, k = 1, k = KP, k = M, the chunked fallback beyond k = 128, ties, NaN, adversarial orders.
The gated kernel is compared bit for bit with the ungated one (``_gate=False``) and, on exact
(integer) scores, index for index with an independent stable sort.

The kernels must also compile for real GPUs, which the interpreter does not check:
``test_every_kernel_configuration_compiles_for_sm90_and_sm80`` compiles every configuration the
wrapper launches, as a launch specialises it and unspecialised, for sm_90a and sm_80, and fails on
spills of the launched variant (registers and local memory read from the cubin, benchmarks/sass.py).

Tests marked ``gpu`` (bf16, large shapes, the CUDA backend as a second opinion) need a CUDA GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import binsparse_kernels as bk
from binsparse_kernels.backends import reference
from binsparse_kernels.backends.triton import encode as enc

ROOT = Path(__file__).resolve().parents[1]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
Config = enc.Config

# Small blocks so that tiny shapes still have several row blocks, latent tiles and chunks.
SMALL = Config(BLOCK_N=16, BLOCK_M=32, BLOCK_K=16, num_warps=4, num_stages=1)
SMALL_K128 = Config(BLOCK_N=16, BLOCK_M=128, BLOCK_K=16, num_warps=4, num_stages=1)
def value_tol(d):
    """Values are float32 whatever x's dtype (exact products of the rounded inputs summed in fp32):
    fp32 rounding of a d-term sum, about 1e-6 * sqrt(d) relative to the terms' scale (~1 here)."""
    t = 2e-6 * math.sqrt(max(d, 1))
    return dict(atol=t, rtol=t)


def make(N, d, M, *, dtype=torch.float32, w_dtype=torch.float32, threshold=0.004, device=DEV):
    return {
        "x": torch.randn(N, d, device=device).to(dtype),
        "W": ((torch.rand(M, d, device=device) * 2 - 1) / math.sqrt(d)).to(w_dtype),
        "b": (torch.randn(M, device=device) * 0.1).to(w_dtype),
        "theta": (torch.full((M,), math.log(threshold), device=device) + torch.randn(M, device=device) * 0.1).exp(),
    }


def scores(p, binary):
    """float64 scores, weights rounded to x's dtype (the reference's convention)."""
    x = p["x"]
    pre = x.double() @ p["W"].to(x.dtype).double().T + p["b"].double()
    return pre - p["theta"].double() if binary else torch.relu(pre)


def run(p, k, binary, **kw):
    return enc.encode_forward(p["x"], p["W"], p["b"], p["theta"] if binary else None, k, binary, **kw)


def check(p, k, binary, values, indices):
    """A valid top-k by value against float64 scores of the rounded inputs, at the float32 output's
    tolerance: the values are the scores at the returned indices; every selected score is at least the
    k-th largest minus a slack that is below the k-th/(k+1)-th gap of the rows where that gap is
    clear, and on those rows the index set is exactly the top k (a (k+1)-th-for-k-th slip fails);
    distinct indices in range, rows sorted by decreasing value."""
    z = scores(p, binary)
    N, M = z.shape
    assert values.shape == (N, k) and values.dtype == torch.float32
    assert indices.shape == (N, k) and indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < M)).all(), "a padded or masked slot was returned"
    ids = indices.sort(1).values
    assert (ids[:, 1:] != ids[:, :-1]).all(), "duplicate indices in a row"
    picked = z.gather(1, indices)
    tol = value_tol(p["x"].shape[1])
    torch.testing.assert_close(values.double(), picked, **tol)
    top = z.topk(min(k + 1, M), 1)
    kth = top.values[:, k - 1:k]
    slack = tol["atol"] + tol["rtol"] * kth.abs()
    assert (picked >= kth - slack).all(), "a selected score is below the k-th largest"
    if k < M:
        clear = (kth - top.values[:, k:k + 1] > 4 * slack).squeeze(1)
        want = top.indices[:, :k].sort(1).values
        assert torch.equal(ids[clear], want[clear]), "not the top k on a row with a clear k-th/(k+1)-th gap"
    assert (values[:, 1:] <= values[:, :-1]).all(), "rows are not sorted by decreasing value"
    ref_values, _ = reference.encode_forward(p["x"], p["W"], p["b"], p["theta"] if binary else None, k, binary)
    torch.testing.assert_close(values.sort(1).values, ref_values.sort(1).values, **tol)


def test_check_fails_on_a_kth_slip():
    # The check must see a selection that returns the (k+1)-th latent instead of the k-th.
    p = make(40, 24, 90)
    k = 9
    z = scores(p, True)
    order = z.argsort(1, descending=True)
    gaps = z.gather(1, order[:, k - 1:k]) - z.gather(1, order[:, k:k + 1])
    assert (gaps > 1e-3).float().mean() > 0.9  # random data: nearly every row has a clear gap
    good = order[:, :k]
    check(p, k, True, z.gather(1, good).float(), good)
    slipped = torch.cat([order[:, :k - 1], order[:, k:k + 1]], 1)
    with pytest.raises(AssertionError):
        check(p, k, True, z.gather(1, slipped).float(), slipped)


# (N, d, M, k): odd sizes for masked row, latent and d tails; k = 1; k = M (with M not a multiple of a tile)
SHAPES = [(37, 19, 53, 5), (16, 8, 40, 1), (9, 7, 13, 13), (70, 40, 300, 32), (33, 24, 77, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_default_blocks_match_reference(shape, binary, dtype):
    N, d, M, k = shape
    p = make(N, d, M, dtype=dtype)
    check(p, k, binary, *run(p, k, binary))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("tiles_per_chunk", [1, 3], ids=lambda t: f"tiles{t}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_small_blocks_several_tiles_and_chunks(shape, tiles_per_chunk, binary, dtype):
    N, d, M, k = shape
    cfg = SMALL if k <= 32 else Config(16, 64 if k <= 64 else 128, 16, 4, 1)
    p = make(N, d, M, dtype=dtype)
    check(p, k, binary, *run(p, k, binary, _config_override=cfg, _tiles_per_chunk=tiles_per_chunk))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("N,d,M,k,chunks", [(20, 24, 200, 128, 1), (20, 24, 300, 128, 2), (5, 8, 128, 128, 1),
                                             (11, 16, 140, 100, 2)], ids=str)
def test_k_128_fused(N, d, M, k, chunks, binary):
    p = make(N, d, M)
    check(p, k, binary, *run(p, k, binary, _config_override=SMALL_K128, _tiles_per_chunk=chunks))
    if chunks == 1:
        check(p, k, binary, *run(p, k, binary))  # the default k=128 configuration


def test_k_128_default_configuration_fp16():
    # the 16-bit KP = 128 configurations the wrapper launches: 40 rows (64 x 128 tiles) and 70 (128 x 256)
    for N in (40, 70):
        p = make(N, 72, 300, dtype=torch.float16)
        for binary in (True, False):
            check(p, 128, binary, *run(p, 128, binary))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("N,d,M,k,chunk", [(33, 40, 700, 129, None), (33, 40, 700, 129, 150), (7, 9, 150, 150, 64),
                                           (10, 16, 500, 200, 201)], ids=str)
def test_k_beyond_fused_limit_uses_chunked_fallback(N, d, M, k, chunk, binary, dtype):
    assert k > enc.MAX_FUSED_K or k == M
    p = make(N, d, M, dtype=dtype)
    check(p, k, binary, *run(p, k, binary, _fallback_chunk=chunk))


def integer_params(N, d, M, *, dtype=torch.float32, seed=0):
    """Small-integer inputs: every product and sum is exact in fp32 (and fp16 inputs), so the scores
    are exact whatever the summation order, with many exact ties."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randint(-2, 3, (N, d), generator=g).to(dtype).to(DEV),
        "W": torch.randint(-2, 3, (M, d), generator=g).float().to(DEV),
        "b": (torch.randint(-4, 5, (M,), generator=g) * 0.25).to(DEV),
        "theta": (torch.randint(1, 4, (M,), generator=g) * 0.5).to(DEV),
    }


def expected_exact(p, k, binary):
    """Top-k by (score desc, index asc): the kernels' documented order."""
    z = scores(p, binary).float()
    order = torch.sort(-z, dim=1, stable=True).indices[:, :k]
    return z.gather(1, order), order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("N,d,M,k,cfg,chunks", [
    (37, 19, 53, 5, SMALL, 1), (37, 19, 53, 5, SMALL, 2), (20, 8, 70, 32, SMALL, 1), (9, 7, 13, 13, SMALL, 1),
    (12, 5, 250, 128, SMALL_K128, 1), (12, 5, 300, 128, SMALL_K128, 2), (12, 5, 300, 17, None, None),
    (12, 5, 300, 129, None, None),
], ids=str)
def test_exact_scores_select_exactly_with_lowest_index_first(N, d, M, k, cfg, chunks, binary, dtype):
    p = integer_params(N, d, M, dtype=dtype)
    values, indices = run(p, k, binary, _config_override=cfg, _tiles_per_chunk=chunks, _fallback_chunk=40)
    ev, ei = expected_exact(p, k, binary)
    assert torch.equal(indices, ei)
    assert torch.equal(values, ev)


@pytest.mark.parametrize("M,k", [(10, 3), (70, 7), (300, 128), (150, 129), (40, 40), (53, 1)], ids=str)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
def test_ties_and_all_equal_rows_go_to_the_lowest_index(M, k, binary):
    # x = 0: every score of a row is b - theta (binary) or ReLU(b): more than k exact ties at the k-th
    # value, rows of all-equal values (constant b), and ReLU zeros (from negative b) tying with +0.
    for b in (torch.tensor([1.0, 2.0, 2.0, -1.0, 2.0]).repeat(M // 5 + 1)[:M], torch.full((M,), 0.25),
              torch.full((M,), -0.5)):
        p = {"x": torch.zeros(19, 8, device=DEV), "W": torch.randn(M, 8, device=DEV), "b": b.to(DEV),
             "theta": torch.full((M,), 0.5, device=DEV)}
        cfg = SMALL if k <= 32 else SMALL_K128
        values, indices = run(p, k, binary, _config_override=cfg if k <= 128 else None, _tiles_per_chunk=None)
        s = (p["b"] - p["theta"]) if binary else torch.relu(p["b"])
        host = s.tolist()
        order = sorted(range(M), key=lambda i: (-host[i], i))[:k]
        assert torch.equal(indices, torch.tensor(order, device=DEV).expand(19, k))
        assert torch.equal(values, s[indices])


@pytest.mark.parametrize("k", [3, 20, 130], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
def test_nan_scores_rank_first_as_in_torch_topk(k, binary):
    M = 150
    p = make(9, 16, M)
    p["W"][[41, 7, 5]] = float("nan")
    values, indices = run(p, k, binary, _config_override=SMALL if k <= 32 else None)
    assert torch.equal(indices[:, :3], torch.tensor([[5, 7, 41]] * 9, device=DEV))
    assert torch.isnan(values[:, :3]).all() and not torch.isnan(values[:, 3:]).any()
    rest = dict(p, W=p["W"].clone())
    rest["W"][[41, 7, 5]] = 0.0
    z = scores(rest, binary)
    z[:, [41, 7, 5]] = -math.inf  # the other k - 3 must be the top k - 3 of the other latents
    kth = z.topk(k - 3, 1).values[:, -1:]
    assert (z.gather(1, indices[:, 3:]) >= kth - 1e-4).all()


def test_masked_tail_latents_are_selected_when_they_win_and_never_padded():
    # M = 33 with 32-latent tiles: the only latent of the last tile scores highest; with k = M every
    # latent (and no padded slot) comes back.
    M = 33
    p = make(5, 16, M)
    p["b"][32] = 100.0
    for k in (1, 2, M):
        cfg = SMALL if k <= 32 else Config(16, 64, 16, 4, 1)
        values, indices = run(p, k, True, _config_override=cfg, _tiles_per_chunk=1)
        assert (indices[:, 0] == 32).all()
        if k == M:
            assert torch.equal(indices.sort(1).values, torch.arange(M, device=DEV).expand(5, M))
        check(p, k, True, values, indices)


@pytest.mark.parametrize("dtype,eps", [(torch.float16, 2.0**-12)], ids=str)
def test_weights_of_another_dtype_are_rounded_to_the_activation_dtype(dtype, eps):
    # W holds 1 + eps (exact in fp32, rounds to 1 in `dtype`): the score must be exactly 2.
    W = torch.tensor([[1.0 + eps, 1.0 + eps], [-1.0, -1.0]], device=DEV)
    x = torch.ones(1, 2, dtype=dtype, device=DEV)
    values, indices = enc.encode_forward(x, W, torch.zeros(2, device=DEV), None, 1, False)
    assert values.item() == 2.0 and indices.item() == 0
    values, _ = enc.encode_forward(x, W, torch.zeros(2, device=DEV), None, 1, False, _fallback_chunk=1)
    assert values.item() == 2.0


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
def test_mixed_weight_dtype_matches_reference(binary):
    p = make(21, 24, 90, dtype=torch.float16, w_dtype=torch.float32)
    check(p, 9, binary, *run(p, 9, binary, _config_override=SMALL, _tiles_per_chunk=2))
    p = make(21, 24, 90, dtype=torch.float32, w_dtype=torch.float16)
    check(p, 9, binary, *run(p, 9, binary))


TILINGS = [(SMALL, 1), (SMALL, 4), (Config(32, 64, 16, 4, 1), 2)]


def test_bitwise_deterministic_run_to_run():
    # The same launch configuration gives bitwise the same values and indices every time.
    p = make(45, 40, 260, dtype=torch.float16)
    for cfg, t in TILINGS:
        first = run(p, 16, True, _config_override=cfg, _tiles_per_chunk=t)
        again = run(p, 16, True, _config_override=cfg, _tiles_per_chunk=t)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_independent_of_the_tiling():
    # Across row blocks, latent tiles and chunkings the scores may round differently (the interpreter's
    # tl.dot is numpy's matmul, whose summation order depends on the block shape and the CPU's BLAS), so
    # random inputs are compared by value at an fp32 tolerance, and exact (integer) scores index for index.
    p = make(45, 40, 260, dtype=torch.float16)
    for cfg, t in TILINGS:
        check(p, 16, True, *run(p, 16, True, _config_override=cfg, _tiles_per_chunk=t))
    q = integer_params(45, 40, 260, dtype=torch.float16)
    ev, ei = expected_exact(q, 16, True)
    for cfg, t in TILINGS:
        values, indices = run(q, 16, True, _config_override=cfg, _tiles_per_chunk=t)
        assert torch.equal(indices, ei) and torch.equal(values, ev)


# ------------------------------------------------------------------------------------------------
# The threshold gate: every branch, its boundaries and adversarial orders, bit for bit against the
# ungated kernel and index for index against an independent stable sort
# ------------------------------------------------------------------------------------------------

def scores_as_params(z, dtype=torch.float32):
    """Inputs whose binary scores are exactly z [N, M] (integers, or NaN via x): x = I (d = N), W = z^T,
    b = theta = 0, so every score is one exact product."""
    N, M = z.shape
    return {"x": torch.eye(N, dtype=dtype, device=DEV), "W": z.T.contiguous().float().to(DEV),
            "b": torch.zeros(M, device=DEV), "theta": torch.zeros(M, device=DEV)}


def stable_expected(z, k):
    """Top k per row by (NaN first, then decreasing score, then increasing index), by plain Python."""
    rows = []
    for row in z.tolist():
        order = sorted(range(len(row)), key=lambda i: (not math.isnan(row[i]), -row[i] if row[i] == row[i] else 0, i))
        rows.append(order[:k])
    idx = torch.tensor(rows, dtype=torch.int64)
    return z.gather(1, idx), idx


def gated_and_ungated(p, k, binary=True, cfg=None, per_chunk=None):
    kw = dict(_config_override=cfg, _tiles_per_chunk=per_chunk)
    gated = run(p, k, binary, **kw)
    ungated = run(p, k, binary, _gate=False, **kw)
    assert torch.equal(gated[1], ungated[1]), "gated and ungated kernels select differently"
    assert torch.equal(gated[0].view(torch.int32), ungated[0].view(torch.int32)), "values differ in their bits"
    return gated


def assert_exact(p, k, z, cfg=None, per_chunk=None, binary=True):
    values, indices = gated_and_ungated(p, k, binary, cfg, per_chunk)
    ev, ei = stable_expected(z if binary else torch.relu(z), k)
    assert torch.equal(indices.cpu(), ei)
    torch.testing.assert_close(values.cpu(), ev, atol=0, rtol=0, equal_nan=True)


def replay(z, k, cfg, per_chunk=None):
    """Per step the append rounds of each tile half and whether the step ends in a flush, from
    benchmarks/survivor_stats.py's torch replay of the gate (row block 0, chunk 0): confirms which path
    each constructed input drives the kernel through."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import survivor_stats

    tiles = -(-z.shape[1] // cfg.BLOCK_M)
    sim = survivor_stats.simulate(z.float(), k, cfg.BLOCK_N, cfg.BLOCK_M, per_chunk or tiles,
                                  flush_at=cfg.FLUSH_AT, flush_rows=cfg.flush_shape(enc._kp(k))[0])
    return sim["rounds"][0, 0].tolist(), sim["flush"][0, 0].tolist()


# 16 rows, 32-latent tiles (halves of 16: a group q of a half is its columns 2q, 2q + 1, 8 + 2q, 9 + 2q),
# KP 16 (k <= 16), a flush once a group buffer holds more than 2 keys, 8-row flush steps
G16 = Config(16, 32, 16, 4, 1, FLUSH_AT=2, FLUSH_ROWS=8, FLUSH_COLS=16)
G64 = Config(16, 64, 16, 4, 1, FLUSH_AT=4, FLUSH_ROWS=8)  # 64-latent tiles, KP up to 64


def falling(N, M):
    """Row scores falling along M, different per row: after the first tile no score survives."""
    return (torch.arange(M, 0, -1).float()[None, :] * 4 + torch.arange(N).float()[:, None]).contiguous()


def test_gate_rounds_groups_and_flushes():
    # falling scores: tile 0 appends every score (4 rounds per half: each group holds 4 columns) and
    # flushes; then survivors placed by hand (above every other score):
    N, M, k = 16, 32 * 6, 5
    z = falling(N, M)
    z[3, [34, 35, 42]] = 10_000 + torch.arange(3).float()  # tile 1, half 0: 3 in row 3's group 1 -> 3 rounds
    z[9, [48, 50, 52, 54]] = 10_000  # tile 1, half 1: one in each group of row 9 -> 1 round, 4 keys
    z[5, 119] = 10_001  # tile 3, half 1, group 3 of row 5
    z[5, 134] = 10_002  # tile 4, half 0, group 3 of row 5: its fill reaches 2 = FLUSH_AT, no flush
    rounds, flushes = replay(z, k, G16)
    assert rounds == [[4, 4], [3, 1], [0, 0], [0, 1], [1, 0], [0, 0]]
    # row 3's group 1 holds 3 > FLUSH_AT keys after tile 1: a flush; row 5's keys wait for the chunk's end
    assert flushes == [True, True, False, False, False, True]
    for per_chunk in (None, 2, 4):  # one chunk; chunks of 2 and 4 tiles (each starts with an empty list)
        assert_exact(scores_as_params(z), k, z, G16, per_chunk)


@pytest.mark.parametrize("fill", [G16.FLUSH_AT, G16.FLUSH_AT + 1], ids=lambda n: f"fill{n}")
def test_gate_flush_boundary_exactly_flush_at_and_one_more(fill):
    # one group of row 3 collects `fill` keys over tiles 1 and 2: FLUSH_AT of them wait for the chunk's
    # end, FLUSH_AT + 1 make tile 2 flush
    N, M, k = 16, 32 * 5, 5
    z = falling(N, M)
    z[3, 32] = 10_000  # tile 1, half 0, group 0
    z[3, [64, 65, 72][:fill - 1]] = 10_001 + torch.arange(fill - 1).float()  # tile 2, half 0, group 0
    rounds, flushes = replay(z, k, G16)
    assert rounds == [[4, 4], [1, 0], [fill - 1, 0], [0, 0], [0, 0]]
    assert flushes == ([True, False, True, False, False] if fill > G16.FLUSH_AT else [True, False, False, False, True])
    assert_exact(scores_as_params(z), k, z, G16)


@triton.jit
def _in_range_bits_kernel(out_ptr, first, M, HALF: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, 4), enc._in_range_bits(first, M, HALF).to(tl.int64))


@pytest.mark.parametrize("half", [8, 16, 128])
def test_in_range_bits_mark_exactly_the_latents_below_m(half):
    # group q's bit 2 j + b stands for column 8 j + 2 q + b of the half tile starting at latent 1000
    out = torch.empty(4, dtype=torch.int64, device=DEV)
    for n in range(-3, half + 4):  # latents of the half below M: none, some, all
        _in_range_bits_kernel[(1,)](out, 1000, 1000 + n, HALF=half)
        want = [sum(1 << (2 * j + b) for j in range(half // 8) for b in (0, 1) if 8 * j + 2 * q + b < n)
                for q in range(4)]
        assert out.tolist() == want, n


def test_gate_stays_inside_its_candidate_buffers(monkeypatch):
    # the scratch the launcher allocates, with a guard after it and every word poisoned: the kernel must
    # write nothing past it, and read nothing it did not write (a poisoned read would change the result)
    guards = []

    def guarded(words, device):
        buf = torch.full((words + 4096,), -12345, dtype=torch.int32, device=device)
        guards.append((buf, words))
        return buf

    monkeypatch.setattr(enc, "_candidate_buffers", guarded)
    N, M = 37, 32 * 7 + 5  # three row blocks (the last one partial), a partial last tile
    z = torch.randint(-50, 50, (N, M), generator=torch.Generator().manual_seed(3)).float()
    for k, per_chunk in ((5, None), (16, 3)):
        assert_exact(scores_as_params(z), k, z, G16, per_chunk)
    for buf, words in guards:
        assert (buf[words:] == -12345).all(), "the kernel wrote past its candidate buffers"


@pytest.mark.parametrize("order", ["rising", "falling", "all-equal", "ties-at-tau", "nan-rows", "random-integer"])
@pytest.mark.parametrize("k", [1, 16, 40], ids=lambda k: f"k{k}")
def test_gate_adversarial_orders(order, k):
    # k = 1, k = KP (16) and a KP = 64 list; two row blocks (N = 21), odd M, one and several chunks
    N, M = 21, 32 * 5 + 13  # odd, the tail tile's second half partly past M
    g = torch.Generator().manual_seed(k)
    if order == "rising":  # every tile beats the running list: every score appended, a flush every tile
        z = (torch.arange(M).float()[None, :] + torch.randint(0, 3, (N, 1), generator=g)).expand(N, M).clone()
    elif order == "falling":
        z = falling(N, M)
    elif order == "all-equal":
        z = torch.zeros(N, M)
    elif order == "ties-at-tau":  # three values: far more than k ties at every threshold
        z = torch.randint(0, 3, (N, M), generator=g).float()
    elif order == "nan-rows":
        z = torch.randint(-50, 50, (N, M), generator=g).float()
    else:
        z = torch.randint(-1000, 1000, (N, M), generator=g).float()
    p = scores_as_params(z, torch.float16 if order == "random-integer" else torch.float32)
    if order == "nan-rows":
        p["x"][[2, 19], [2, 19]] = math.nan  # rows 2 and 19 score NaN everywhere
        z[[2, 19]] = math.nan
    cfg = G16 if k <= 16 else G64
    for per_chunk in (None, 2):
        assert_exact(p, k, z, cfg, per_chunk)
    if order == "rising":
        rounds, flushes = replay(z, k, cfg)
        assert all(r == [cfg.BLOCK_M // 8] * 2 for r in rounds[:-1]) and all(flushes)
    if order == "all-equal":  # (a ReLU coder's zeros): once the first tile fills the list, ties lose
        rounds, flushes = replay(z, k, cfg)
        assert rounds[0] == [cfg.BLOCK_M // 8] * 2 and all(r == [0, 0] for r in rounds[1:])
        assert flushes == [True] + [False] * (len(flushes) - 1)


def test_gate_k_equal_m_and_nan_columns():
    N, M = 9, 45
    z = torch.randint(-5, 5, (N, M), generator=torch.Generator().manual_seed(1)).float()
    p = scores_as_params(z)
    assert_exact(p, M, z, Config(16, 64, 16, 4, 1), 1)
    p["b"][[3, 40]] = math.nan  # two NaN latents: they rank first in every row, lowest index first
    z2 = z.clone()
    z2[:, [3, 40]] = math.nan
    for k in (1, 2, 5):
        assert_exact(p, k, z2, G16, None)


@pytest.mark.parametrize("kp", [16, 32, 64, 128])
@pytest.mark.parametrize("wide", [False, True], ids=["BLOCK_M=KP", "BLOCK_M=2KP"])
def test_every_kp_through_partial_and_merge_kernels(kp, wide):
    # the code a GPU runs (one sorting network for both): every KP, tiles as wide as the list and
    # twice as wide, several tiles per chunk and several chunks (merge kernel), continuous and binary
    k = kp // 2 + 1 if kp > 16 else 16
    bm = 2 * kp if wide else kp
    M = bm * 5 - 3
    p = integer_params(19, 13, M, dtype=torch.float16)
    for binary in (True, False):
        values, indices = gated_and_ungated(p, k, binary, Config(16, bm, 16, 4, 1), 2)
        ev, ei = expected_exact(p, k, binary)
        assert torch.equal(indices, ei) and torch.equal(values, ev)


@pytest.mark.parametrize("N", [1, 17, enc.SMALL_N_ROWS, enc.SMALL_N_ROWS + 1], ids=lambda n: f"N{n}")
def test_default_configuration_at_small_n(N):
    # the configuration the wrapper picks for N rows of 16-bit inputs (64 x 128 up to SMALL_N_ROWS rows,
    # 128 x 256 above; fp32's 32 x 128 does not depend on N), against the reference and bit for bit
    # against the ungated kernel. Two tiles (odd d, a partial last tile): k = 1 binary over the wrapper's
    # one-tile chunks (two chunks), k = KP continuous over one two-tile chunk (the gate's tau at work),
    # k = M binary and continuous. (The first tile of a chunk appends every score: a few seconds.)
    cfg = enc._config(torch.float16, 16, enc._arch(torch.device(DEV)), N)
    assert cfg.BLOCK_N == (64 if N <= enc.SMALL_N_ROWS else 128)
    torch.manual_seed(N)
    p = make(N, 40, cfg.BLOCK_M + 77, dtype=torch.float16)
    q = make(N, 40, 40, dtype=torch.float16)
    for params, k, binary, per_chunk in ((p, 1, True, None), (p, 16, False, 2), (q, 40, True, None), (q, 40, False, None)):
        check(params, k, binary, *gated_and_ungated(params, k, binary, per_chunk=per_chunk))


def test_weight_cast_is_reused_until_the_weights_change():
    p = make(20, 16, 70, dtype=torch.float16)
    first = run(p, 5, True)
    cast = enc._cast_cache["entry"][2]
    again = run(p, 5, True)
    assert enc._cast_cache["entry"][2] is cast and torch.equal(first[1], again[1])
    with torch.no_grad():
        p["W"].neg_()  # an optimizer-style in-place update: the cast must be made again
    flipped = run(p, 5, True)
    assert enc._cast_cache["entry"][2] is not cast
    check(p, 5, True, *flipped)
    other = dict(p, W=p["W"].clone())  # another tensor with equal contents: its own cast
    check(other, 5, True, *run(other, 5, True))


def test_empty_rows():
    p = make(0, 8, 20)
    values, indices = run(p, 4, True)
    assert values.shape == (0, 4) and indices.shape == (0, 4)


@pytest.mark.parametrize("N,M", [(1, 100_000), (70, 300), (16384, 36864), (16384, 131072), (5, 3)], ids=str)
@pytest.mark.parametrize("d", [576, 2048])
def test_chunking_covers_every_tile_once(N, M, d):
    for kp, arch in ((kp, arch) for kp in (16, 32, 64, 128) for arch in (90, 80)):
        cfg = enc._config(torch.bfloat16, kp, arch, N)
        per_chunk, n_chunks = enc._n_chunks(N, M, d, 2, cfg.BLOCK_N, cfg.BLOCK_M, torch.device("cpu"))
        tiles = -(-M // cfg.BLOCK_M)
        assert per_chunk >= 1 and n_chunks >= 1
        assert (n_chunks - 1) * per_chunk < tiles <= n_chunks * per_chunk  # no empty chunk, none missing
        assert cfg.BLOCK_M >= kp


def test_chunk_count_keeps_a_waves_x_in_l2():
    # (H100 facts on the CPU: 132 SMs, 50 MB L2) one chunk at d = 576 (x of a wave: 19 MB), more at
    # d = 2048 so that a wave's row blocks of x fit in half the L2; small N: enough programs for the SMs
    cfg = enc._config(torch.bfloat16, 32, 90, 16384)
    cpu = torch.device("cpu")
    assert enc._n_chunks(16384, 36864, 576, 2, cfg.BLOCK_N, cfg.BLOCK_M, cpu)[1] == 1
    per, chunks = enc._n_chunks(16384, 131072, 2048, 2, cfg.BLOCK_N, cfg.BLOCK_M, cpu)
    assert chunks >= 3 and -(-132 // chunks) * cfg.BLOCK_N * 2048 * 2 <= 25 * 2**20
    # small N: about one program per SM (the chunk length rounds: 112 chunks of 7 tiles here)
    small = enc._config(torch.bfloat16, 32, 90, 64)
    assert enc._n_chunks(64, 100_000, 576, 2, small.BLOCK_N, small.BLOCK_M, cpu)[1] >= 0.7 * 132


def test_key_encoding_round_trips_and_orders():
    s = torch.tensor([[-math.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, math.inf, math.nan, -math.nan]])
    keys = enc._torch_keys(s, 7)
    values, idx = enc._torch_decode(keys)
    finite = ~torch.isnan(s)
    assert torch.equal(values[finite], s[finite].abs().where(s[finite] == 0, s[finite]))
    assert torch.isnan(values[~finite]).all()
    assert torch.equal(idx, torch.arange(7, 17).unsqueeze(0))
    ordered = keys >> 32
    assert ordered[0, 3] == ordered[0, 4]  # -0.0 == +0.0
    assert (ordered[0, [0, 1, 2, 4, 5, 6, 7, 8]].diff() > 0).all()
    assert ordered[0, 8] == ordered[0, 9]  # every NaN in one class above +inf
    assert (keys[0, 3] > keys[0, 4])  # among equal scores the lower index has the larger key


def test_public_api_through_triton_backend():
    reason = bk.backends.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(reason)
    p = make(23, 16, 70)
    log_threshold = p["theta"].log()
    out = bk.topk_binary_encode(p["x"], p["W"], p["b"], log_threshold, 6, backend="triton")
    ref = bk.topk_binary_encode(p["x"], p["W"], p["b"], log_threshold, 6, backend="reference")
    torch.testing.assert_close(out.values.sort(1).values, ref.values.sort(1).values, atol=1e-4, rtol=1e-4)
    out = bk.topk_encode(p["x"], p["W"], p["b"], 6, backend="triton")
    ref = bk.topk_encode(p["x"], p["W"], p["b"], 6, backend="reference")
    torch.testing.assert_close(out.values.sort(1).values, ref.values.sort(1).values, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for real GPUs (the interpreter accepts code the compiler rejects)
# ------------------------------------------------------------------------------------------------

_AOT_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
import sass
from binsparse_kernels.backends.triton import encode as enc

arch = int(sys.argv[1])
rows, failures = [], []
launches = enc.aot_launches(arch)
jobs = [(fn, sig, cx, opts, "launched") for fn, sig, cx, opts in launches]
# unspecialised (unaligned pointers, D % 16 != 0): every configuration but fp16's, the bf16 ones' twins
jobs += [(fn, sig, cx, opts, "unspecialised") for fn, sig, cx, opts in launches if sig.get("x_ptr") != "*fp16"]
fn, sig, cx, opts = launches[0]
jobs.append((fn, sig, cx, opts, "D=1"))
for fn, sig, cx, opts, variant in jobs:
    attrs = None
    if variant == "launched":
        sig, cx, attrs = enc.launch_variant(fn, sig, cx, d=576)
    elif variant == "D=1":
        sig, cx, attrs = enc.launch_variant(fn, sig, cx, d=1, ones=("N", "M", "D", "k"))
    try:
        cubin, shared = sass.compile_triton(fn, sig, cx, arch, attrs, opts)
        res = sass.resources(cubin)[fn.__name__]
        rows.append([fn.__name__, variant, {k: str(v) for k, v in cx.items()}, res])
    except Exception as exc:  # report every failing configuration, not only the first
        failures.append(f"{fn.__name__} {variant} {cx}: {type(exc).__name__}: {str(exc)[:500]}")
print(json.dumps({"rows": rows, "failures": failures}))
"""


def test_aot_launches_cover_what_the_wrapper_launches(monkeypatch):
    # Record the launches the wrapper really makes (the kernels replaced by recorders, nothing runs)
    # for every dtype, k = 1..128 and N on both sides of the small-N boundary (the wrapper picks the
    # configuration), and check each is among aot_launches() and every entry of it is launched.
    launched = []
    specs = enc.aot_launches(90)

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kw):
                names = {**enc._DTYPE_ARG, torch.int64: "i64", torch.int32: "i32"}
                types = {n: f"*{names[a.dtype]}" for n, a in zip(self.fn.arg_names, args) if isinstance(a, torch.Tensor)}
                opts = {o: kw.pop(o) for o in ("num_warps", "num_stages") if o in kw}
                launched.append((self.fn.__name__, types, kw, opts))
            return launch

    monkeypatch.setattr(enc, "_encode_partial_kernel", Recorder(enc._encode_partial_kernel))
    monkeypatch.setattr(enc, "_merge_kernel", Recorder(enc._merge_kernel))
    assert enc._arch(torch.device("cpu")) == 90
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for N in (1, enc.SMALL_N_ROWS, enc.SMALL_N_ROWS + 1, 300):
            x = torch.zeros(N, 16, dtype=dtype)
            W = torch.zeros(300, 16, dtype=dtype)
            b = torch.zeros(300)
            for k in range(1, enc.MAX_FUSED_K + 1):
                enc.encode_forward(x, W, b, b, k, True)
    matched = set()
    for name, types, cx, opts in launched:
        hits = [i for i, (fn, sig, scx, sopts) in enumerate(specs)
                if fn.__name__ == name and all(sig[n] == t for n, t in types.items())
                and all(scx[c] == v for c, v in cx.items()) and sopts == opts]
        assert hits, (name, types, cx, opts)
        matched.update(hits)
    assert matched == set(range(len(specs))), [specs[i][2] for i in range(len(specs)) if i not in matched]
    assert {cx["KP"] for name, _, cx, _ in launched if name == "_merge_kernel"} == {16, 32, 64, 128}
    small = {cx["BLOCK_N"] for name, types, cx, _ in launched if name == "_encode_partial_kernel"
             and types["x_ptr"] != "*fp32"}
    assert small == {64, 128}  # 16-bit inputs: 64-row tiles up to SMALL_N_ROWS rows, 128-row above


def test_every_kernel_configuration_compiles_for_sm90_and_sm80():
    # Every launch configuration, compiled as a real launch at d = 576 specialises it (16-byte aligned
    # pointers, D % 16 == 0) and unspecialised (fp16 configurations only as launched: the same code as
    # bf16's), plus D = 1 as a constant, for sm_90a and sm_80; the launched variant must not spill.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, "-c", _AOT_SCRIPT, str(arch), str(ROOT / "benchmarks")], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in (90, 80)]
    for arch, proc in zip((90, 80), procs):
        out, err = proc.communicate(timeout=1500)
        assert proc.returncode == 0, err[-4000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert not result["failures"], result["failures"]
        launches = enc.aot_launches(arch)
        fp16 = sum(1 for _, sig, _, _ in launches if sig.get("x_ptr") == "*fp16")
        assert len(result["rows"]) == 2 * len(launches) - fp16 + 1
        for name, variant, cx, res in result["rows"]:
            if variant == "launched":
                assert res["stack"] == 0 and res["spill_ops"] == 0, f"sm_{arch} {name} {cx} spills: {res}"
                assert res["registers"] <= 255


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("N,d,M,k", [(300, 576, 5000, 32), (4096, 64, 300, 32), (1, 64, 100_000, 32),
                                     (700, 96, 3000, 128), (130, 64, 1000, 64), (33, 40, 700, 129),
                                     (256, 2048, 4096, 16), (37, 19, 53, 53)], ids=str)
def test_gpu_matches_reference(N, d, M, k, binary, dtype):
    p = make(N, d, M, dtype=dtype)
    values, indices = run(p, k, binary)
    check(p, k, binary, values, indices)
    again = run(p, k, binary)
    assert torch.equal(values, again[0]) and torch.equal(indices, again[1]), "not bitwise deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("k", [5, 32, 128, 200])
def test_gpu_exact_scores_select_exactly(k, dtype):
    # d = 80: several k-steps of accumulation, exact in every dtype (integer products and sums)
    p = integer_params(500, 80, 3000, dtype=dtype)
    values, indices = run(p, k, True)
    ev, ei = expected_exact(p, k, True)
    assert torch.equal(indices, ei) and torch.equal(values, ev)


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("k", [32, 128])
def test_gpu_extra_memory_is_o_n_k_not_o_n_m(k, w_dtype):
    # fp32 weights with bf16 x (the autocast training set-up): the one reused cast of W counts too
    N, d, M = 4096, 64, 200_000
    x, W, b, theta = (t.to(DEV) for t in (torch.randn(N, d).bfloat16(), torch.randn(M, d).to(w_dtype),
                                          torch.zeros(M), torch.full((M,), 0.01)))
    enc._cast_cache.clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    enc.encode_forward(x, W, b, theta, k, True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    cast = M * d * 2 if w_dtype != torch.bfloat16 else 0
    assert extra - cast < N * M * 2 / 20, f"{extra / 2**20:.1f} MB: close to an N x M buffer"


@pytest.mark.gpu
def test_gpu_launches_on_the_tensors_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    p = make(300, 64, 1000, dtype=torch.bfloat16, device="cuda:1")
    with torch.cuda.device(0):
        check(p, 16, True, *run(p, 16, True))


@pytest.mark.gpu
def test_gpu_agrees_with_cuda_backend():
    from helpers import require_backend

    require_backend("cuda")
    from binsparse_kernels.backends import cuda

    p = integer_params(2048, 16, 9000, dtype=torch.bfloat16)
    for binary in (True, False):
        for k in (8, 32, 128):
            got = run(p, k, binary)
            want = cuda.encode_forward(p["x"], p["W"], p["b"], p["theta"] if binary else None, k, binary)
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
