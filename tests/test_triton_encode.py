"""The Triton fused encode forward (``backends/triton/encode.py``) against the reference backend.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py) on CPU tensors, in
fp32 and fp16 (the interpreter has no bf16, kernel-design-notes §7). Small shapes, odd sizes (not
multiples of the blocks), small block overrides to get several tiles and several latent chunks per
row, k = 1, k = M, k = 128 (the fused limit) and beyond (the chunked fallback), exact ties, all-equal
rows, NaN scores, binary and continuous, weights of another dtype. Integer-valued inputs make every
score exact, so there the selection is compared index for index (lowest index first among ties).

The kernels must also compile for real GPUs, which the interpreter does not check:
``test_every_kernel_configuration_compiles_for_sm90_and_sm80`` compiles every configuration the
wrapper can launch (``encode.aot_specs()``) in a subprocess without ``TRITON_INTERPRET``.

Tests marked ``gpu`` (bf16, large shapes, the CUDA backend as a second opinion) need a CUDA GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import binsparse_kernels as bk
from binsparse_kernels.backends import reference

ROOT = Path(__file__).resolve().parents[1]
ENCODE_PY = ROOT / "binsparse_kernels" / "backends" / "triton" / "encode.py"
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _load_encode():
    """``binsparse_kernels.backends.triton.encode``; loaded from its file while the package's other
    module (sparse.py) is not there yet."""
    try:
        return importlib.import_module("binsparse_kernels.backends.triton.encode")
    except ImportError:
        name = "_binsparse_triton_encode_standalone"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, ENCODE_PY)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module


enc = _load_encode()
Config = enc.Config

# Small blocks so that tiny shapes still have several row blocks, latent tiles and chunks.
SMALL = Config(BLOCK_N=16, BLOCK_M=32, BLOCK_K=16, num_warps=4, num_stages=1)
SMALL_K128 = Config(BLOCK_N=16, BLOCK_M=128, BLOCK_K=16, num_warps=4, num_stages=1)
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


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
    """A valid top-k by value, equal to the reference's values, rows sorted by decreasing value."""
    z = scores(p, binary)
    N, M = z.shape
    tol = TOL[p["x"].dtype]
    assert values.shape == (N, k) and values.dtype == torch.float32
    assert indices.shape == (N, k) and indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < M)).all(), "a padded or masked slot was returned"
    ids = indices.sort(1).values
    assert (ids[:, 1:] != ids[:, :-1]).all(), "duplicate indices in a row"
    picked = z.gather(1, indices).float()
    torch.testing.assert_close(values, picked, **tol)  # values are the scores at the returned indices
    ref_values, _ = reference.encode_forward(p["x"], p["W"], p["b"], p["theta"] if binary else None, k, binary)
    torch.testing.assert_close(values.sort(1).values, ref_values.sort(1).values, **tol)
    kth = z.topk(k, 1).values[:, -1:].float()
    assert (picked >= kth - tol["atol"] * (1 + kth.abs())).all(), "a selected score is below the k-th largest"
    assert (values[:, 1:] <= values[:, :-1]).all(), "rows are not sorted by decreasing value"


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


def test_empty_rows():
    p = make(0, 8, 20)
    values, indices = run(p, 4, True)
    assert values.shape == (0, 4) and indices.shape == (0, 4)


@pytest.mark.parametrize("N,M", [(1, 100_000), (70, 300), (16384, 36864), (16384, 131072), (5, 3)], ids=str)
def test_chunking_covers_every_tile_once(N, M):
    for kp in (16, 32, 64, 128):
        cfg = enc._config(torch.bfloat16, kp)
        per_chunk, n_chunks = enc._n_chunks(N, M, 576, 2, cfg.BLOCK_N, cfg.BLOCK_M, torch.device("cpu"))
        tiles = -(-M // cfg.BLOCK_M)
        assert per_chunk >= 1 and n_chunks >= 1
        assert (n_chunks - 1) * per_chunk < tiles <= n_chunks * per_chunk  # no empty chunk, none missing
        assert cfg.BLOCK_M >= kp


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
import importlib.util, json, os, sys
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget

def load():
    spec = importlib.util.spec_from_file_location("_enc_aot", sys.argv[1])
    m = importlib.util.module_from_spec(spec)
    sys.modules["_enc_aot"] = m
    spec.loader.exec_module(m)
    return m

def compile_one(job):
    i, cap = job
    fn, sig, cx, opts = load().aot_launches()[i]
    c = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cx),
                       target=GPUTarget("cuda", cap, 32), options=opts)
    return [i, cap, fn.__name__, {k: str(v) for k, v in cx.items()}, len(c.asm["cubin"])]

if __name__ == "__main__":
    assert "TRITON_INTERPRET" not in os.environ
    n = len(load().aot_launches())
    jobs = [(i, cap) for cap in (90, 80) for i in range(n)]
    with ProcessPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        print(json.dumps(list(pool.map(compile_one, jobs))))
"""


def test_aot_specs_cover_every_launch():
    specs = enc.aot_specs()
    assert all(len(s) == 3 for s in specs)
    names = {(fn.__name__, tuple(sorted(sig.items())), tuple(sorted(cx.items()))) for fn, sig, cx in specs}
    assert len(names) == len(specs)
    launched = set()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for k in range(1, enc.MAX_FUSED_K + 1):
            kp = enc._kp(k)
            cfg = enc._config(dtype, kp)
            launched.add(("_encode_partial_kernel", (dtype, kp, cfg)))
    partial = [cx for fn, _, cx in specs if fn.__name__ == "_encode_partial_kernel"]
    for _, (dtype, kp, cfg) in launched:
        assert any(cx["KP"] == kp and cx["BLOCK_N"] == cfg.BLOCK_N and cx["BLOCK_M"] == cfg.BLOCK_M
                   and cx["BLOCK_K"] == cfg.BLOCK_K and cx["IEEE"] == (dtype == torch.float32)
                   for cx in partial)
    merges = [cx for fn, _, cx in specs if fn.__name__ == "_merge_kernel"]
    assert {cx["KP"] for cx in merges} == {16, 32, 64, 128}


def test_every_kernel_configuration_compiles_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(ENCODE_PY)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * len(enc.aot_specs())
    for i, cap, name, cx, cubin_bytes in results:
        assert cubin_bytes > 0, (name, cap, cx)


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
    p = integer_params(500, 8 if dtype == torch.bfloat16 else 24, 3000, dtype=dtype)
    values, indices = run(p, k, True)
    ev, ei = expected_exact(p, k, True)
    assert torch.equal(indices, ei) and torch.equal(values, ev)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [32, 128])
def test_gpu_extra_memory_is_o_n_k_not_o_n_m(k):
    N, d, M = 4096, 64, 200_000
    x, W, b, theta = (t.to(DEV) for t in (torch.randn(N, d).bfloat16(), torch.randn(M, d).bfloat16(),
                                          torch.zeros(M), torch.full((M,), 0.01)))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    enc.encode_forward(x, W, b, theta, k, True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < N * M * 2 / 20, f"{extra / 2**20:.1f} MB: close to an N x M buffer"


@pytest.mark.gpu
def test_gpu_agrees_with_cuda_backend():
    if bk.backends.unavailable_reason("cuda") is not None:
        pytest.skip("CUDA backend not built")
    from binsparse_kernels.backends import cuda

    p = integer_params(2048, 16, 9000, dtype=torch.bfloat16)
    for binary in (True, False):
        for k in (8, 32, 128):
            got = run(p, k, binary)
            want = cuda.encode_forward(p["x"], p["W"], p["b"], p["theta"] if binary else None, k, binary)
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
