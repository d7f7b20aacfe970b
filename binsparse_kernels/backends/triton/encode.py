"""Triton fused encode forward: ``x @ W_enc.T + b_enc (- theta | ReLU)`` and an exact per-row top-k,
without ever writing the ``[N, M]`` pre-activations.

Design (an exact split-M partial top-k, kernel-design-notes §10.3 and §10.7):

1. ``_encode_partial_kernel``: one program per (block of ``BLOCK_N`` rows) x (chunk of latents). It
   walks its chunk in ``BLOCK_M``-latent tiles; each tile is a ``tl.dot`` GEMM over ``d`` in
   ``BLOCK_K`` steps (tensor cores for bf16/fp16, fp32 FMAs for fp32 with ``input_precision="ieee"``,
   never TF32), accumulated in fp32. The epilogue adds ``b_enc`` and subtracts theta (binary) or
   applies ReLU (continuous), turns every score into an int64 *key* (below) and folds the tile into a
   running per-row top-``KP`` list held in registers: ``tl.topk`` cuts the tile to its top ``KP``
   (descending), and the element-wise max of that and the running list (kept ascending) is bitonic and
   holds the top ``KP`` of both, so one ``tl.bitonic_merge`` (log2 KP layers) restores the running list.
   The chunk's list (``KP`` keys per row, ascending) goes to a scratch buffer of ``N * n_chunks * KP``
   int64: O(N*k), never O(N*M).
2. ``_merge_kernel``: one program per block of rows folds the ``n_chunks`` partial lists the same way
   (each next list read back to front, i.e. descending), decodes the keys and writes the largest ``k``
   values (float32) and indices (int64), largest first. A Triton kernel rather than
   ``torch.topk`` over the scratch buffer: one launch instead of topk + decode + slicing, and the same
   key semantics as the first pass by construction.

Keys. A float32 score ``s`` becomes a signed int64 whose order is the order of (score, -index):
the high 32 bits are the float's bits made order-preserving as a signed int32 (negative floats get
their low 31 bits flipped), the low 32 bits are ``2**32 - 1 - index``. So keys are unique, the larger
key is the larger score, and among equal scores the *lowest index wins* (deterministic, independent
of the tiling). NaN scores are canonicalised to the largest key class (above +inf, lowest index first
among NaNs), as ``torch.topk`` ranks NaN above every number; ``-0.0`` is folded into ``+0.0`` so the
two zeros tie. Latents past ``M`` (tile tails) and the unused slots of the running lists hold the
sentinel ``-(2**63 - 1)``, below every real key; since ``k <= M`` the first ``k`` keys of a row's final
(descending) list are always real, so padded slots are never returned.

Rows come back sorted by decreasing score (lowest index first among equal scores).

k up to ``MAX_FUSED_K = 128`` takes the fused path (``KP`` = next power of two of ``k``, at least 16).
Larger k takes ``_chunked_fallback``: a chunked fp32 matmul (``x`` and the rounded weights widened to
fp32, so products are exact and accumulation is fp32, as in the reference) and a ``torch.topk`` merge
on the same int64 keys, O(N * chunk) memory and the same tie and NaN rules.

Block sizes (``_config``) are a small fixed heuristic by dtype and ``KP`` for H100/H200-class GPUs,
not tuned (no GPU was available when this was written; see benchmarks/TRITON_NOTES_encode.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_FUSED_K = 128
_MIN_KP = 16
_SENTINEL = tl.constexpr(-(2**63 - 1))  # below every real key (the lowest is about -2**63 + 2**55)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _scores_to_keys(s, idx):
    """float32 scores [R, C] and int32 latent indices [C] (or [R, C]) -> int64 keys [R, C]."""
    bits = s.to(tl.int32, bitcast=True)
    magnitude = bits & 2147483647  # integer tests: nothing a float fast-math rewrite could fold away
    bits = tl.where(magnitude == 0, 0, bits)  # -0.0 ties with +0.0
    bits = tl.where(magnitude > 2139095040, 2147483647, bits)  # every NaN -> one class above +inf
    ordered = tl.where(bits < 0, bits ^ 2147483647, bits).to(tl.int64)
    # low 32 bits: ~idx as an unsigned 32-bit number (= 2**32 - 1 - idx), zero-extended
    low = (idx.to(tl.int32) ^ -1).to(tl.uint32, bitcast=True).to(tl.int64)
    return (ordered << 32) | low


@triton.jit
def _keys_to_scores(key):
    """int64 keys -> (float32 scores, int64 indices)."""
    ordered = key >> 32
    idx = (key.to(tl.int32) ^ -1).to(tl.int64)
    bits = ordered.to(tl.int32)
    bits = tl.where(bits < 0, bits ^ 2147483647, bits)
    return bits.to(tl.float32, bitcast=True), idx


# Top-k of each row. On a GPU: Triton's ``tl.topk`` (a bitonic top-k). Under the interpreter: the
# same algorithm written here with builtins only (reshape, permute, split, join, min, max), because
# the interpreter runs ``tl.topk``'s combine-function reductions element by element in Python
# (~1000x slower) and pays for every nested jit call. Both are exact on the unique int64 keys, so
# they return the same lists (tests check both).
#
# A compare-exchange along column bit j views the [R, W] tile as [R, W / 2^(j+1), 2, 2^j], moves the
# size-2 axis last and splits it: a and b are the partners. Blocks of 2^LOG_K columns are sorted
# in alternating directions (bit s of the column picks the direction of a block of 2^s); then,
# while the row is wider than 2^LOG_K, the element-wise max of neighbouring blocks (a bitonic
# sequence holding the top 2^LOG_K of both) is kept and re-merged; the last merge is descending.


@triton.jit
def _topk_desc(x, LOG_R: tl.constexpr, LOG_C: tl.constexpr, LOG_K: tl.constexpr, TL_TOPK: tl.constexpr):
    """The 2^LOG_K largest entries of each row of x [2^LOG_R, 2^LOG_C], in decreasing order."""
    if TL_TOPK:
        return tl.topk(x, 2**LOG_K)
    else:
        R: tl.constexpr = 2**LOG_R
        h = x
        for s in tl.static_range(1, LOG_K + 1):  # sort blocks of 2^s
            for i in tl.static_range(s):  # column bit j = s - 1 - i; bit s of the column = bit i of q
                v = tl.permute(tl.reshape(h, [R, 2**(LOG_C - s + i), 2, 2**(s - 1 - i)]), (0, 1, 3, 2))
                a, b = tl.split(v)
                lo = tl.minimum(a, b)
                hi = tl.maximum(a, b)
                if s < LOG_C:
                    q = tl.arange(0, 2**(LOG_C - s + i))
                    d = ((q >> i) & 1)[None, :, None] != 0
                    v = tl.join(tl.where(d, hi, lo), tl.where(d, lo, hi))
                else:
                    v = tl.join(hi, lo)
                h = tl.reshape(tl.permute(v, (0, 1, 3, 2)), [R, 2**LOG_C])
        for s in tl.static_range(LOG_K + 1, LOG_C + 1):  # halve: width 2^(LOG_C - s + LOG_K + 1) -> half
            v = tl.permute(tl.reshape(h, [R, 2**(LOG_C - s), 2, 2**LOG_K]), (0, 1, 3, 2))
            a, b = tl.split(v)
            h = tl.reshape(tl.maximum(a, b), [R, 2**(LOG_C - s + LOG_K)])
            for i in tl.static_range(LOG_K):  # re-merge blocks of 2^LOG_K; bit LOG_K = bit i of q
                v = tl.permute(tl.reshape(h, [R, 2**(LOG_C - s + i), 2, 2**(LOG_K - 1 - i)]), (0, 1, 3, 2))
                a, b = tl.split(v)
                lo = tl.minimum(a, b)
                hi = tl.maximum(a, b)
                if s < LOG_C:
                    q = tl.arange(0, 2**(LOG_C - s + i))
                    d = ((q >> i) & 1)[None, :, None] != 0
                    v = tl.join(tl.where(d, hi, lo), tl.where(d, lo, hi))
                else:
                    v = tl.join(hi, lo)
                h = tl.reshape(tl.permute(v, (0, 1, 3, 2)), [R, 2**(LOG_C - s + LOG_K)])
        return h


@triton.jit
def _fold(running, top, LOG_R: tl.constexpr, LOG_KP: tl.constexpr, TL_TOPK: tl.constexpr):
    """Merge an ascending [R, KP] list with a descending one: the top KP of both, ascending.

    The element-wise max of an ascending and a descending sequence holds the top KP of their union
    and is bitonic, so one bitonic merge (log2 KP compare-exchange layers) sorts it, instead of a
    top-k over the 2 * KP keys of both lists.
    """
    h = tl.maximum(running, top)
    if TL_TOPK:
        return tl.bitonic_merge(h, descending=False)
    else:
        R: tl.constexpr = 2**LOG_R
        for i in tl.static_range(LOG_KP):  # column bit LOG_KP - 1 - i
            v = tl.permute(tl.reshape(h, [R, 2**i, 2, 2**(LOG_KP - 1 - i)]), (0, 1, 3, 2))
            a, b = tl.split(v)
            h = tl.reshape(tl.permute(tl.join(tl.minimum(a, b), tl.maximum(a, b)), (0, 1, 3, 2)), [R, 2**LOG_KP])
        return h


@triton.jit(do_not_specialize=["binary"])
def _encode_partial_kernel(
    x_ptr, w_ptr, b_ptr, t_ptr, keys_ptr,
    N, M, D, tiles_per_chunk, n_chunks, binary,
    IEEE: tl.constexpr, KP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    LOG_KP: tl.constexpr, LOG_BN: tl.constexpr, LOG_BM: tl.constexpr, TL_TOPK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * D

    running = tl.full((BLOCK_N, KP), _SENTINEL, tl.int64)
    chunk_start = pid_c * tiles_per_chunk * BLOCK_M
    n_tiles = tl.minimum(tiles_per_chunk, tl.cdiv(M - chunk_start, BLOCK_M))
    for t in range(0, n_tiles):
        lat = chunk_start + t * BLOCK_M + tl.arange(0, BLOCK_M)
        lat_ok = lat < M
        w_cols = w_ptr + lat.to(tl.int64)[None, :] * D  # W viewed as [BLOCK_K, BLOCK_M]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + ks
            k_ok = kk < D
            a = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols + kk[:, None], mask=k_ok[:, None] & lat_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        bias = tl.load(b_ptr + lat, mask=lat_ok, other=0.0)
        s = acc + bias[None, :]
        if binary != 0:  # a uniform runtime branch: one compiled kernel for both encoders
            theta = tl.load(t_ptr + lat, mask=lat_ok, other=0.0)
            s = s - theta[None, :]
        else:
            s = tl.where(s <= 0.0, 0.0, s)  # ReLU that keeps NaN (NaN <= 0 is false)
        keys = _scores_to_keys(s, lat[None, :])
        keys = tl.where(lat_ok[None, :], keys, _SENTINEL)
        top = _topk_desc(keys, LOG_BN, LOG_BM, LOG_KP, TL_TOPK)  # the tile's top KP, descending
        running = _fold(running, top, LOG_BN, LOG_KP, TL_TOPK)  # the chunk's top KP so far, ascending

    slots = tl.arange(0, KP)
    out = keys_ptr + (rows.to(tl.int64)[:, None] * n_chunks + pid_c) * KP + slots[None, :]
    tl.store(out, running, mask=row_ok[:, None])


@triton.jit
def _merge_kernel(
    keys_ptr, values_ptr, indices_ptr,
    N, n_chunks, k,
    KP: tl.constexpr, BLOCK_N: tl.constexpr, LOG_KP: tl.constexpr, LOG_BN: tl.constexpr, TL_TOPK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    slots = tl.arange(0, KP)
    rank = KP - 1 - slots  # the lists are ascending: slot KP - 1 holds the largest key
    base = keys_ptr + rows.to(tl.int64)[:, None] * n_chunks * KP
    running = tl.load(base + slots[None, :], mask=row_ok[:, None], other=_SENTINEL)
    for c in range(1, n_chunks):
        # chunk c's list read back to front, i.e. descending, as _fold wants it
        part = tl.load(base + c * KP + rank[None, :], mask=row_ok[:, None], other=_SENTINEL)
        running = _fold(running, part, LOG_BN, LOG_KP, TL_TOPK)
    values, idx = _keys_to_scores(running)
    out = rows.to(tl.int64)[:, None] * k + rank[None, :]
    ok = row_ok[:, None] & (rank[None, :] < k)
    tl.store(values_ptr + out, values, mask=ok)
    tl.store(indices_ptr + out, idx, mask=ok)


# ------------------------------------------------------------------------------------------------
# Launch configuration
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    BLOCK_N: int
    BLOCK_M: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


_MERGE_BLOCK_N = {16: 32, 32: 32, 64: 16, 128: 8}
_MERGE_WARPS = 4


def _log2(n: int) -> int:
    assert n > 0 and n & (n - 1) == 0, n
    return n.bit_length() - 1


def _kp(k: int) -> int:
    return max(_MIN_KP, triton.next_power_of_2(k))


def _config(dtype: torch.dtype, kp: int) -> Config:
    """Block sizes for H100/H200-class GPUs: chosen from compile-time facts, not from timings.

    Per tile the program sorts ``BLOCK_N x BLOCK_M`` int64 keys down to ``KP`` per row and merges them
    with its running ``BLOCK_N x KP`` list, all in registers next to the fp32 accumulator, in fully
    unrolled sorting networks. Chosen so that ptxas (sm_90a, bf16) reports no spills, with BLOCK_N >= 64
    where possible (wgmma needs 64-row tiles; fewer rows per W tile means more L2 traffic per FLOP):
    KP <= 32: 128 x 64 (246 registers); KP = 64: 64 x 64 (255); KP = 128: 32 x 128 (237). 8 warps.
    (64 x 128 tiles at 4 warps gave ~1 MB cubins and minutes of compile; 16 x 128 at KP = 128 spilled.)
    fp32 inputs (fp32 FMAs, never TF32; not the speed target) take half the rows and half BLOCK_K,
    which keeps them spill-free too.
    """
    if dtype == torch.float32:
        if kp <= 32:
            return Config(64, 64, 32, 8, 3)
        if kp == 64:
            return Config(32, 64, 32, 8, 3)
        return Config(32, 128, 32, 8, 3)
    if kp <= 32:
        return Config(128, 64, 64, 8, 3)
    if kp == 64:
        return Config(64, 64, 64, 8, 3)
    return Config(32, 128, 64, 8, 3)


def _n_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _n_chunks(N: int, M: int, block_n: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(tiles per chunk, chunks): enough programs for ~2 waves, chunks as long as that allows."""
    tiles = triton.cdiv(M, block_m)
    row_blocks = triton.cdiv(N, block_n)
    want = max(1, min(tiles, triton.cdiv(2 * _n_sms(device), row_blocks)))
    per_chunk = triton.cdiv(tiles, want)
    return per_chunk, triton.cdiv(tiles, per_chunk)


_DTYPE_ARG = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fused(x, W, b, theta, k, binary, cfg: Config, tiles_per_chunk: int | None = None,
           tl_topk: bool | None = None):
    N, D = x.shape
    M = W.shape[0]
    kp = _kp(k)
    assert cfg.BLOCK_M >= kp, "BLOCK_M must hold at least KP latents"
    if tiles_per_chunk is None:
        tiles_per_chunk, n_chunks = _n_chunks(N, M, cfg.BLOCK_N, cfg.BLOCK_M, x.device)
    else:
        n_chunks = triton.cdiv(triton.cdiv(M, cfg.BLOCK_M), tiles_per_chunk)
    keys = torch.empty(N, n_chunks, kp, dtype=torch.int64, device=x.device)
    values = torch.empty(N, k, dtype=torch.float32, device=x.device)
    indices = torch.empty(N, k, dtype=torch.int64, device=x.device)
    t = theta if binary else b  # unused when not binary
    if tl_topk is None:
        tl_topk = not _interpreting()
    _encode_partial_kernel[(triton.cdiv(N, cfg.BLOCK_N), n_chunks)](
        x, W, b, t, keys, N, M, D, tiles_per_chunk, n_chunks, int(binary),
        IEEE=x.dtype == torch.float32, KP=kp,
        BLOCK_N=cfg.BLOCK_N, BLOCK_M=cfg.BLOCK_M, BLOCK_K=cfg.BLOCK_K,
        LOG_KP=_log2(kp), LOG_BN=_log2(cfg.BLOCK_N), LOG_BM=_log2(cfg.BLOCK_M), TL_TOPK=tl_topk,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    mbn = _MERGE_BLOCK_N[kp]
    _merge_kernel[(triton.cdiv(N, mbn),)](keys, values, indices, N, n_chunks, k, KP=kp, BLOCK_N=mbn,
                                          LOG_KP=_log2(kp), LOG_BN=_log2(mbn), TL_TOPK=tl_topk,
                                          num_warps=_MERGE_WARPS)
    return values, indices


# ------------------------------------------------------------------------------------------------
# Fallback for k > MAX_FUSED_K (plain torch, O(N * chunk) memory)
# ------------------------------------------------------------------------------------------------


def _torch_keys(scores: torch.Tensor, first_index: int) -> torch.Tensor:
    """The kernels' int64 keys, in torch (same NaN / -0.0 / tie rules)."""
    s = torch.where(scores == 0, torch.zeros_like(scores), scores)
    bits = s.view(torch.int32)
    bits = torch.where(torch.isnan(s), torch.full_like(bits, 2**31 - 1), bits)
    ordered = torch.where(bits < 0, bits ^ (2**31 - 1), bits).to(torch.int64)
    idx = torch.arange(first_index, first_index + s.shape[1], device=s.device, dtype=torch.int64)
    return (ordered << 32) + ((2**32 - 1) - idx)


def _torch_decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ordered = keys >> 32
    idx = (2**32 - 1) - (keys - (ordered << 32))
    bits = ordered.to(torch.int32)
    bits = torch.where(bits < 0, bits ^ (2**31 - 1), bits)
    return bits.view(torch.float32), idx


def _chunked_fallback(x, W, b, theta, k, binary, chunk: int | None = None):
    N, _ = x.shape
    M = W.shape[0]
    if chunk is None:  # ~256 MB of fp32 scores + int64 keys per chunk
        chunk = max(k, min(M, (1 << 26) // max(1, 3 * N)))
    xf = x.float()
    best = None
    for m0 in range(0, M, chunk):
        m1 = min(M, m0 + chunk)
        s = xf @ W[m0:m1].float().T + b[m0:m1]
        s = s - theta[m0:m1] if binary else torch.where(s <= 0, torch.zeros_like(s), s)
        keys = _torch_keys(s, m0)
        del s
        if best is not None:
            keys = torch.cat([best, keys], dim=1)
        best = torch.topk(keys, min(k, keys.shape[1]), dim=1, sorted=True).values
    return _torch_decode(best)


# ------------------------------------------------------------------------------------------------
# Backend entry point
# ------------------------------------------------------------------------------------------------


def encode_forward(x, W_enc, b_enc, threshold, k: int, binary: bool, *, _config_override: Config | None = None,
                   _tiles_per_chunk: int | None = None, _fallback_chunk: int | None = None):
    """Top-k of the scores per row: ``(values float32 [N,k], indices int64 [N,k])``, rows sorted by
    decreasing score, lowest index first among ties (see the module docstring).

    The underscored keywords are test hooks (small blocks, several chunks, small fallback chunks).
    """
    N = x.shape[0]
    M = W_enc.shape[0]
    W = W_enc if W_enc.dtype == x.dtype else W_enc.to(x.dtype)
    W = W.contiguous()
    x = x.contiguous()
    b = b_enc.to(torch.float32).contiguous()
    theta = threshold.to(torch.float32).contiguous() if binary else None
    if N == 0 or k == 0:
        return (torch.empty(N, k, dtype=torch.float32, device=x.device),
                torch.empty(N, k, dtype=torch.int64, device=x.device))
    assert 1 <= k <= M, "k must be in [1, M] (validated by ops.py)"
    if k > MAX_FUSED_K or x.dtype not in _DTYPE_ARG or x.shape[1] == 0:
        return _chunked_fallback(x, W, b, theta, k, binary, _fallback_chunk)
    cfg = _config_override or _config(x.dtype, _kp(k))
    return _fused(x, W, b, theta, k, binary, cfg, _tiles_per_chunk)


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests compile every configuration for sm_90 and sm_80)
# ------------------------------------------------------------------------------------------------


def aot_launches():
    """Every (kernel, signature, constexprs, options) the wrapper can launch on a GPU."""
    out = []
    for dtype, name in _DTYPE_ARG.items():
        for kp in (16, 32, 64, 128):
            cfg = _config(dtype, kp)
            sig = {"x_ptr": f"*{name}", "w_ptr": f"*{name}", "b_ptr": "*fp32", "t_ptr": "*fp32", "keys_ptr": "*i64",
                   "N": "i32", "M": "i32", "D": "i32", "tiles_per_chunk": "i32", "n_chunks": "i32", "binary": "i32"}
            cx = {"IEEE": dtype == torch.float32, "KP": kp, "BLOCK_N": cfg.BLOCK_N, "BLOCK_M": cfg.BLOCK_M,
                  "BLOCK_K": cfg.BLOCK_K, "LOG_KP": _log2(kp), "LOG_BN": _log2(cfg.BLOCK_N),
                  "LOG_BM": _log2(cfg.BLOCK_M), "TL_TOPK": True}
            sig.update({c: "constexpr" for c in cx})
            out.append((_encode_partial_kernel, sig, cx, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
    for kp, bn in _MERGE_BLOCK_N.items():
        sig = {"keys_ptr": "*i64", "values_ptr": "*fp32", "indices_ptr": "*i64", "N": "i32", "n_chunks": "i32",
               "k": "i32"}
        cx = {"KP": kp, "BLOCK_N": bn, "LOG_KP": _log2(kp), "LOG_BN": _log2(bn), "TL_TOPK": True}
        sig.update({c: "constexpr" for c in cx})
        out.append((_merge_kernel, sig, cx, {"num_warps": _MERGE_WARPS}))
    return out


def aot_specs():
    """``[(JITFunction, signature, constexprs)]`` for every kernel configuration the wrapper launches."""
    return [(fn, sig, cx) for fn, sig, cx, _ in aot_launches()]
