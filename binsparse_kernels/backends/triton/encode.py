"""Triton fused encode forward: ``x @ W_enc.T + b_enc (- theta | ReLU)`` and an exact per-row top-k,
without ever writing the ``[N, M]`` pre-activations.

Design (an exact split-M partial top-k with a threshold gate, kernel-design-notes §10.3-§10.7;
benchmarks/TRITON_NOTES_encode.md has the evidence):

1. ``_encode_partial_kernel``: one program per (block of ``BLOCK_N`` rows) x (chunk of latents), the
   chunk index fastest in the 1-D grid. It walks its chunk in ``BLOCK_M``-latent tiles, each two column
   halves: two ``tl.dot`` GEMMs over ``d`` in ``BLOCK_K`` steps sharing x's block (tensor cores for
   bf16/fp16, fp32 FMAs for fp32 with ``input_precision="ieee"``, never TF32), accumulated in fp32, plus
   ``b_enc`` and minus theta (binary) or ReLU (continuous). Each row has a running top-``KP`` list of
   int64 *keys* (below), ascending, kept in this program's slots of the keys output, and a float
   threshold tau: the list's k-th best score; a later score that does not beat it cannot enter the
   row's top k (a tie loses: its latent is higher than every listed one's).
   **The gate** (``_append``): every score above tau is appended, as its float bits and latent, to
   one of the row's four candidate buffers (per-program global scratch), the one of its quad group (the
   columns a thread holds in a tensor-core accumulator), so no data moves between threads; a tile half
   costs as many append rounds as the block's fullest group has survivors (usually 0-2). **The flush**
   (``_flush``), only when a group buffer may not hold the next tile's survivors (more than
   ``FLUSH_AT``) or at the chunk's end: per ``FLUSH_ROWS`` rows, the buffered keys cut to their top KP
   by a bitonic top-k and folded into the running list by one bitonic merge (the element-wise max of
   an ascending and a descending list holds the top KP of both and is bitonic); then tau is re-read.
   The result is bit for bit that of sorting every tile (``GATE=False``, the tests' baseline): keys
   are unique, and every key of the chunk's top k is >= the chunk's k-th key >= the listed k-th key
   when it arrives; a chunk is walked in latent order, so a score equal to tau (the listed k-th's)
   has the lower key and is dropped: ties at tau, e.g. a ReLU coder's zeros once a row has k, cost
   nothing.
   The chunk's list stays in the keys output, ``N * n_chunks * KP`` int64: O(N*k), never O(N*M).
2. ``_merge_kernel``: one program per block of rows folds the ``n_chunks`` partial lists the same way
   (each next list read back to front, i.e. descending), decodes the keys and writes the largest ``k``
   values (float32) and indices (int64), largest first.

The sorting networks use builtins only (reshape, permute, split, join, where), not ``tl.topk``: the
same code runs on a GPU and under the interpreter, so the tests run the code a GPU runs.

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
fp32, TF32 allowed for 16-bit inputs on a GPU, so products are exact and accumulation is fp32, as in
the reference) and ``torch.topk`` on the same int64 keys, O(N * chunk) memory, the same tie and NaN
rules. Block sizes
(``_config``) come from the compiled code (spill-free launch variants for sm_90a and sm_80), not from
timings: no GPU was available when this was written.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.multiprocessing.reductions import StorageWeakRef

MAX_FUSED_K = 128
_MIN_KP = 16
_SENTINEL = tl.constexpr(-(2**63 - 1))  # below every real key (the lowest is about -2**63 + 2**55)
_NO_SCORE = tl.constexpr(-(2**31))  # below every ordered score (see _ordered)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _ordered(s):
    """float32 scores -> int32 in the same order: the high word of the keys. Never -2**31 (that would
    be a NaN's or -0.0's bits, both canonicalised), so -2**31 can mark "no score"."""
    bits = s.to(tl.int32, bitcast=True)
    magnitude = bits & 2147483647  # integer tests: nothing a float fast-math rewrite could fold away
    bits = tl.where(magnitude == 0, 0, bits)  # -0.0 ties with +0.0
    bits = tl.where(magnitude > 2139095040, 2147483647, bits)  # every NaN -> one class above +inf
    return tl.where(bits < 0, bits ^ 2147483647, bits)


@triton.jit
def _ordered_to_keys(ordered, idx):
    """int32 ordered scores and int32 latent indices -> int64 keys: low 32 bits ~idx as an unsigned
    32-bit number (= 2**32 - 1 - idx), zero-extended, so the lower index is the larger key."""
    low = (idx.to(tl.int32) ^ -1).to(tl.uint32, bitcast=True).to(tl.int64)
    return (ordered.to(tl.int64) << 32) | low


@triton.jit
def _scores_to_keys(s, idx):
    """float32 scores [R, C] and int32 latent indices [C] (or [R, C]) -> int64 keys [R, C]."""
    return _ordered_to_keys(_ordered(s), idx)


@triton.jit
def _keys_to_scores(key):
    """int64 keys -> (float32 scores, int64 indices)."""
    ordered = key >> 32
    idx = (key.to(tl.int32) ^ -1).to(tl.int64)
    bits = ordered.to(tl.int32)
    bits = tl.where(bits < 0, bits ^ 2147483647, bits)
    return bits.to(tl.float32, bitcast=True), idx


# Sorting networks, written with builtins only (reshape, permute, split, join, where, maximum): the
# same code runs compiled on a GPU and under the interpreter (where ``tl.topk``'s xor-reductions run
# element by element in Python, ~1000x slower), so the tests run the code a GPU runs. Compiled for
# sm_90a it also takes fewer instructions than ``tl.topk`` + ``tl.bitonic_merge`` at KP = 32 and 128
# (benchmarks/TRITON_NOTES_encode.md): a compare-exchange is one compare and two selects per pair.
#
# A compare-exchange along column bit j views the [R, W] tile as [R, W / 2^(j+1), 2, 2^j], moves the
# size-2 axis last and splits it: a and b are the partners. Blocks of 2^LOG_K columns are sorted
# in alternating directions (bit s of the column picks the direction of a block of 2^s); then,
# while the row is wider than 2^LOG_K, the element-wise max of neighbouring blocks (a bitonic
# sequence holding the top 2^LOG_K of both) is kept and re-merged; the last merge is descending.


@triton.jit
def _exchange_layer(h, R: tl.constexpr, W: tl.constexpr, BLOCKS: tl.constexpr, HALF: tl.constexpr, i: tl.constexpr,
                    ALTERNATE: tl.constexpr, DESCENDING: tl.constexpr):
    """One compare-exchange layer on [R, W] viewed as [R, BLOCKS, 2, HALF] (partners HALF apart): one
    compare and two selects per pair. The first partner takes the larger key in a descending block.
    ALTERNATE: block q is descending where bit i of q is set; else every block is DESCENDING or not."""
    a, b = tl.split(tl.permute(tl.reshape(h, [R, BLOCKS, 2, HALF]), (0, 1, 3, 2)))
    if ALTERNATE:
        q = tl.arange(0, BLOCKS)
        swap = (a < b) == (((q >> i) & 1)[None, :, None] != 0)
    elif DESCENDING:
        swap = a < b
    else:
        swap = b < a
    a, b = tl.where(swap, b, a), tl.where(swap, a, b)
    return tl.reshape(tl.permute(tl.join(a, b), (0, 1, 3, 2)), [R, W])


@triton.jit
def _topk_desc(x, LOG_R: tl.constexpr, LOG_C: tl.constexpr, LOG_K: tl.constexpr, DESCENDING: tl.constexpr):
    """The 2^LOG_K largest entries of each row of x [2^LOG_R, 2^LOG_C], in decreasing order (increasing
    if not DESCENDING)."""
    R: tl.constexpr = 2**LOG_R
    h = x
    for s in tl.static_range(1, LOG_K + 1):  # sort blocks of 2^s; bit s of the column = bit i of the block
        for i in tl.static_range(s):
            h = _exchange_layer(h, R, 2**LOG_C, 2**(LOG_C - s + i), 2**(s - 1 - i), i, s < LOG_C, DESCENDING)
    for s in tl.static_range(LOG_K + 1, LOG_C + 1):  # halve: width 2^(LOG_C - s + LOG_K + 1) -> half
        a, b = tl.split(tl.permute(tl.reshape(h, [R, 2**(LOG_C - s), 2, 2**LOG_K]), (0, 1, 3, 2)))
        h = tl.reshape(tl.maximum(a, b), [R, 2**(LOG_C - s + LOG_K)])
        for i in tl.static_range(LOG_K):  # re-merge blocks of 2^LOG_K; bit LOG_K = bit i of the block
            h = _exchange_layer(h, R, 2**(LOG_C - s + LOG_K), 2**(LOG_C - s + i), 2**(LOG_K - 1 - i), i,
                                s < LOG_C, DESCENDING)
    return h


@triton.jit
def _fold(running, top, LOG_R: tl.constexpr, LOG_KP: tl.constexpr, DESCENDING: tl.constexpr = False):
    """Merge an ascending [R, KP] list with a descending one: the top KP of both, ascending (or
    descending if DESCENDING).

    The element-wise max of an ascending and a descending sequence holds the top KP of their union
    and is bitonic, so one bitonic merge (log2 KP compare-exchange layers) sorts it, instead of a
    top-k over the 2 * KP keys of both lists.
    """
    h = tl.maximum(running, top)
    for i in tl.static_range(LOG_KP):  # column bit LOG_KP - 1 - i
        h = _exchange_layer(h, 2**LOG_R, 2**LOG_KP, 2**i, 2**(LOG_KP - 1 - i), 0, False, DESCENDING)
    return h


@triton.jit
def _scores(acc, bias, theta, binary):
    """The accumulator of a tile -> its scores: plus b_enc, minus theta (binary) or ReLU (continuous)."""
    s = acc + bias[None, :]
    if binary != 0:  # a uniform runtime branch: one compiled kernel for both encoders
        s = s - theta[None, :]
    else:
        s = tl.where(s <= 0.0, 0.0, s)  # ReLU that keeps NaN (NaN <= 0 is false)
    return s


@triton.jit
def _popcount(x):
    """Set bits of each uint32 (SWAR)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (x * 0x01010101) >> 24


@triton.jit
def _pick(v, low, R: tl.constexpr, LOG_J: tl.constexpr):
    """v [R, 2**LOG_J, 4, 2] -> ([R, 4], [R, 4]): per (row, group) the entry at position p = 2 j + b, given
    as its bit ``low = 1 << p`` (uint32), and its column offset 8 j + b; a tree of selects (one select
    per entry), each level's choice one test of ``low`` against a constant."""
    J: tl.constexpr = 2**LOG_J
    v0, v1 = tl.split(v)
    odd = (low & 0xAAAAAAAA) != 0  # b
    v = tl.where(odd[:, None, :], v1, v0)  # [R, J, 4]
    offset = odd.to(tl.int32)
    for i in tl.static_range(LOG_J):
        # the positions whose bit i + 1 is set (0xCCCCCCCC for i = 0, 0xF0F0F0F0, ...)
        take = (low & (0xFFFFFFFF - 0xFFFFFFFF // ((1 << (2 << i)) + 1))) != 0  # bit i of j
        w0, w1 = tl.split(tl.permute(tl.reshape(v, [R, J >> (i + 1), 2, 4]), (0, 1, 3, 2)))
        v = tl.where(take[:, None, :], w1, w0)
        offset += tl.where(take, 8 << i, 0)
    return tl.reshape(v, [R, 4]), offset


@triton.jit
def _in_range_bits(first, M, HALF: tl.constexpr):
    """uint32 [4]: per group q the bits (2 j + b) of its columns 8 j + 2 q + b that are latents below M
    (``first`` is the half tile's first latent): all of them except in the last tile."""
    n = tl.minimum(tl.maximum(M - first, 0), HALF)
    q = tl.arange(0, 4)
    even = tl.minimum(tl.maximum(n - 2 * q + 7, 0) // 8, HALF // 8)  # columns 8 j + 2 q below n
    odd = tl.minimum(tl.maximum(n - 2 * q + 6, 0) // 8, HALF // 8)  # columns 8 j + 2 q + 1 below n
    one = tl.full((4,), 1, tl.uint64)
    lows = ((one << (2 * even).to(tl.uint64)) - 1) & 0x55555555
    highs = ((one << (2 * odd).to(tl.uint64)) - 1) & 0xAAAAAAAA
    return (lows | highs).to(tl.uint32)


@triton.jit
def _append(s, lat0, M, tau, fill, group_slot, buf, GROUP_WIDTH: tl.constexpr, LATENTS: tl.constexpr,
            BLOCK_N: tl.constexpr, LOG_J: tl.constexpr):
    """The gate: every score of s [BLOCK_N, 2**LOG_J * 8] (latents lat0, lat0 + 1, ...) that can still
    enter its row's list is appended to one of the row's four candidate buffers; returns the buffers'
    new fills [BLOCK_N, 4]. That is a score above tau, every NaN (NaN keys beat every number; a NaN at
    the k-th slot makes tau +inf and a later NaN's key is lower, so surviving is only a harmless
    superset), and every score while the list is not full (tau is NaN then, so even -inf passes). A
    score equal to tau loses to the listed k-th key, whose latent is lower (-0.0 and +0.0 tie, as in
    the keys)

    Column 8 j + 2 q + b of a row belongs to group q (q < 4): the columns a thread holds in the
    accumulator of a tensor-core dot (wgmma and mma.sync give lane q of a quad columns 8 j + 2 q + b), so
    a group's survivors are one thread's, found without moving data between threads. Per group a bit mask
    of its survivors (bit 2 j + b); then, as many rounds as the block's largest group count, every group
    takes its lowest set bit, selects that score (_pick) and writes its bits at ``buf + group_slot + fill x
    BLOCK_N`` and its latent LATENTS further on (a group with nothing left writes to its buffer's last
    slot, never read), and its fill grows. The keys are made when the buffers are flushed."""
    J: tl.constexpr = 2**LOG_J
    s4 = tl.reshape(s, [BLOCK_N, J, 4, 2])
    j = tl.arange(0, J)[None, :, None, None]
    b = tl.arange(0, 2)[None, None, None, :]
    # one compare: not (s <= tau) is true for s > tau, for a NaN s, and for every s when tau is NaN
    surv = tl.where(~(s4 <= tau[:, None, None, None]), tl.full((1, J, 1, 2), 1, tl.uint32) << (2 * j + b).to(tl.uint32), 0)
    # [BLOCK_N, 4]: the bits are distinct, so their sum is their union
    mask = tl.sum(tl.sum(surv, axis=3), axis=1) & _in_range_bits(lat0, M, 8 * J)[None, :]
    bits = s4.to(tl.int32, bitcast=True)
    q = tl.arange(0, 4)[None, :]
    for _ in range(tl.max(tl.max(_popcount(mask), axis=1), axis=0)):
        low = mask & (0 - mask)  # the lowest set bit
        mask = mask ^ low
        score, offset = _pick(bits, low, BLOCK_N, LOG_J)
        slot = buf + group_slot + tl.where(low != 0, fill, GROUP_WIDTH - 1) * BLOCK_N
        tl.store(slot, score)
        tl.store(slot + LATENTS, lat0 + 2 * q + offset)
        fill += (low != 0).to(tl.int32)
    return fill


@triton.jit
def _flush(buf, fills, lists, list_stride, rows_left,
           BLOCK_N: tl.constexpr, KP: tl.constexpr, GROUP_WIDTH: tl.constexpr, LATENTS: tl.constexpr,
           FLUSH_ROWS: tl.constexpr,
           FLUSH_COLS: tl.constexpr, LOG_KP: tl.constexpr, LOG_FR: tl.constexpr, LOG_FC: tl.constexpr):
    """Fold every buffered candidate into the running lists: per group of FLUSH_ROWS rows, the running
    lists (ascending, in the keys buffer) and, FLUSH_COLS / 4 candidates of each of a row's four buffers
    at a time, their keys cut to the top KP (descending) and folded in; the lists go back to the keys
    buffer."""
    FQ: tl.constexpr = FLUSH_COLS // 4
    slots = tl.arange(0, KP)
    q = tl.arange(0, 4)[None, :, None]
    c = tl.arange(0, FQ)[None, None, :]
    for g in range(0, BLOCK_N, FLUSH_ROWS):
        r = g + tl.arange(0, FLUSH_ROWS)
        r_ok = r < rows_left
        # [FLUSH_ROWS, 4]; rows past N buffer nothing: masked, a group of them loads nothing (no round trip)
        fill = tl.load(fills + r[:, None] * 4 + tl.arange(0, 4)[None, :], mask=r_ok[:, None], other=0)
        lst = lists + r.to(tl.int64)[:, None] * list_stride + slots[None, :]
        running = tl.load(lst, mask=r_ok[:, None], other=_SENTINEL)
        cand = buf + q * (GROUP_WIDTH * BLOCK_N) + r[:, None, None]
        for c0 in range(0, tl.max(tl.max(fill, axis=1), axis=0), FQ):
            at = cand + (c0 + c) * BLOCK_N
            ok = c0 + c < fill[:, :, None]
            score = tl.load(at, mask=ok, other=0).to(tl.float32, bitcast=True)
            keys = tl.where(ok, _scores_to_keys(score, tl.load(at + LATENTS, mask=ok, other=0)), _SENTINEL)
            top = _topk_desc(tl.reshape(keys, [FLUSH_ROWS, FLUSH_COLS]), LOG_FR, LOG_FC, LOG_KP, True)
            running = _fold(running, top, LOG_FR, LOG_KP)
        tl.store(lst, running, mask=r_ok[:, None])


@triton.jit
def _threshold(kth_keys, row_ok):
    """The float threshold of each row (``kth_keys``: pointers to each row's k-th best key), for
    ``_append``'s exact gate.

    The running list's k-th best key (slot KP - k of the ascending list) is a lower bound of the
    chunk's final k-th key, so a later score whose key is below it can be dropped. tau = NaN while the
    slot is the sentinel (the list is not full: all survive), +inf when the k-th key is a NaN
    (only NaN scores survive), else the k-th score. Rows past N get +inf: nothing to buffer.
    """
    kth = tl.load(kth_keys, mask=row_ok, other=_SENTINEL)
    score, _ = _keys_to_scores(kth)
    tau = tl.where(score != score, float("inf"), score)
    tau = tl.where(kth == _SENTINEL, float("nan"), tau)  # not full: NaN, every score passes
    return tl.where(row_ok, tau, float("inf"))


@triton.jit(do_not_specialize=["N", "M", "k", "tiles_per_chunk", "n_chunks", "binary"])
def _encode_partial_kernel(
    x_ptr, w_ptr, b_ptr, t_ptr, keys_ptr, buf_ptr,
    N, M, D, k, tiles_per_chunk, n_chunks, binary,
    IEEE: tl.constexpr, KP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    LOG_KP: tl.constexpr, LOG_BN: tl.constexpr, LOG_BM: tl.constexpr,
    GATE: tl.constexpr, FLUSH_AT: tl.constexpr, FLUSH_ROWS: tl.constexpr, FLUSH_COLS: tl.constexpr,
    LOG_FR: tl.constexpr, LOG_FC: tl.constexpr,
):
    # chunk index fastest: the programs of a wave share row blocks (x stays in L2), see _n_chunks
    pid = tl.program_id(0)
    pid_c = pid % n_chunks
    pid_n = pid // n_chunks
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ks = tl.arange(0, BLOCK_K)
    slots = tl.arange(0, KP)
    HALF: tl.constexpr = BLOCK_M // 2
    halves = tl.arange(0, HALF)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * D
    list_stride = n_chunks * KP
    lists = keys_ptr + (pid_n.to(tl.int64) * BLOCK_N * n_chunks + pid_c) * KP  # this block's first list

    if GATE:
        # a row's four candidate buffers, each room for FLUSH_AT keys, one more tile's (BLOCK_M / 4) and
        # a last slot that takes the stores of groups with nothing to append, slot-major ([4, GROUP_WIDTH,
        # BLOCK_N]: a flush reads each slot of many rows at once); then the fills, [BLOCK_N, 4]
        GROUP_WIDTH: tl.constexpr = FLUSH_AT + BLOCK_M // 4 + 1
        LATENTS: tl.constexpr = BLOCK_N * 4 * GROUP_WIDTH  # the latents after the scores' bits
        buf = buf_ptr + pid.to(tl.int64) * (BLOCK_N * 4 * (2 * GROUP_WIDTH + 1))
        fills = buf + 2 * LATENTS
        local = tl.arange(0, BLOCK_N)
        group_slot = tl.arange(0, 4)[None, :] * (GROUP_WIDTH * BLOCK_N) + local[:, None]
        rows_left = N - pid_n * BLOCK_N
        fl = lists + local.to(tl.int64)[:, None] * list_stride + slots[None, :]
        tl.store(fl, tl.full((BLOCK_N, KP), _SENTINEL, tl.int64), mask=row_ok[:, None])
        tau = tl.where(row_ok, float("nan"), float("inf"))  # empty lists take every score
        fill = tl.zeros((BLOCK_N, 4), tl.int32)
    else:
        running = tl.full((BLOCK_N, KP), _SENTINEL, tl.int64)
    chunk_start = pid_c * tiles_per_chunk * BLOCK_M
    n_tiles = tl.minimum(tiles_per_chunk, tl.cdiv(M - chunk_start, BLOCK_M))
    for t in tl.range(0, n_tiles, disable_licm=True):  # (hoisted flush addresses would take registers)
        # the tile is two column halves, two dots sharing x's block: half the registers per epilogue step
        lat0 = chunk_start + t * BLOCK_M + halves
        lat1 = lat0 + HALF
        ok0 = lat0 < M
        ok1 = lat1 < M
        # issued before the k-loop, whole (a spread layout: few registers while the k-loop runs)
        lat = chunk_start + t * BLOCK_M + tl.arange(0, BLOCK_M)
        bias = tl.load(b_ptr + lat, mask=lat < M, other=0.0)
        theta = tl.load(t_ptr + lat, mask=lat < M, other=0.0)  # t_ptr = b_ptr when not binary (unused)
        w0 = w_ptr + lat0.to(tl.int64)[None, :] * D  # W viewed as [BLOCK_K, HALF]
        w1 = w_ptr + lat1.to(tl.int64)[None, :] * D
        acc0 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + ks
            k_ok = kk < D
            a = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b0 = tl.load(w0 + kk[:, None], mask=k_ok[:, None] & ok0[None, :], other=0.0)
            b1 = tl.load(w1 + kk[:, None], mask=k_ok[:, None] & ok1[None, :], other=0.0)
            b0 = b0.to(x_ptr.dtype.element_ty)  # a no-op as launched (W comes in x's dtype)
            b1 = b1.to(x_ptr.dtype.element_ty)
            if IEEE:
                acc0 = tl.dot(a, b0, acc0, input_precision="ieee")
                acc1 = tl.dot(a, b1, acc1, input_precision="ieee")
            else:
                acc0 = tl.dot(a, b0, acc0)
                acc1 = tl.dot(a, b1, acc1)
        bias0, bias1 = tl.split(tl.permute(tl.reshape(bias, [2, HALF]), (1, 0)))
        theta0, theta1 = tl.split(tl.permute(tl.reshape(theta, [2, HALF]), (1, 0)))
        s0 = _scores(acc0, bias0, theta0, binary)
        s1 = _scores(acc1, bias1, theta1, binary)
        if GATE:
            first = chunk_start + t * BLOCK_M
            fill = _append(s0, first, M, tau, fill, group_slot, buf, GROUP_WIDTH, LATENTS, BLOCK_N, LOG_BM - 4)
            fill = _append(s1, first + HALF, M, tau, fill, group_slot, buf, GROUP_WIDTH, LATENTS, BLOCK_N,
                           LOG_BM - 4)
            most = tl.max(tl.max(fill, axis=1), axis=0)
            # a flush when a buffer might not hold the next tile's survivors, and at the chunk's end
            # (`most` is a block-wide max: every thread takes the same branch, so the barriers are uniform).
            # The buffers, fills and lists are global memory written by some threads of this program and
            # read by others (the flush reads them in its own layout): each barrier (bar.sync) makes every
            # access before it visible to every thread of the CTA after it, which the interpreter (one
            # thread) cannot check. First: the appends, the fills and the lists' initial sentinels (or
            # the last flush's lists) before the flush reads them. Second: the flush's list stores before
            # _threshold reads them, and its buffer and fill reads before the next tile's appends and the
            # next flush's fill stores overwrite them. Inside the flush each row group's list is loaded
            # and stored back with nothing in between but its own merge (a store's value depends on the
            # loads of its row), and different groups touch different rows.
            if (most > FLUSH_AT) | ((t == n_tiles - 1) & (most > 0)):
                tl.store(fills + local[:, None] * 4 + tl.arange(0, 4)[None, :], fill)
                tl.debug_barrier()
                _flush(buf, fills, lists, list_stride, rows_left, BLOCK_N, KP, GROUP_WIDTH, LATENTS, FLUSH_ROWS,
                       FLUSH_COLS, LOG_KP, LOG_FR, LOG_FC)
                tl.debug_barrier()
                tau = _threshold(lists + local.to(tl.int64) * list_stride + (KP - k), row_ok)
                fill = tl.zeros((BLOCK_N, 4), tl.int32)
        else:  # every tile sorted and folded (the tests' bit-for-bit baseline)
            s = tl.reshape(tl.permute(tl.join(s0, s1), (0, 2, 1)), [BLOCK_N, BLOCK_M])
            lat = tl.reshape(tl.permute(tl.join(lat0, lat1), (1, 0)), [BLOCK_M])
            keys = tl.where(lat[None, :] < M, _scores_to_keys(s, lat[None, :]), _SENTINEL)
            running = _fold(running, _topk_desc(keys, LOG_BN, LOG_BM, LOG_KP, True), LOG_BN, LOG_KP)

    if not GATE:
        out = lists + tl.arange(0, BLOCK_N).to(tl.int64)[:, None] * list_stride + slots[None, :]
        tl.store(out, running, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["N", "n_chunks", "k"])
def _merge_kernel(
    keys_ptr, values_ptr, indices_ptr,
    N, n_chunks, k,
    KP: tl.constexpr, BLOCK_N: tl.constexpr, LOG_KP: tl.constexpr, LOG_BN: tl.constexpr,
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
        running = _fold(running, part, LOG_BN, LOG_KP)
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
    BLOCK_M: int  # the tile's latents: two column halves of BLOCK_M / 2
    BLOCK_K: int
    num_warps: int
    num_stages: int
    FLUSH_AT: int = 16  # flush the candidate buffers when one holds more than this many
    FLUSH_ROWS: int = 16  # rows per step of a flush (at most BLOCK_N)
    FLUSH_COLS: int = 32  # candidates per row per step of a flush (at least KP)

    def flush_shape(self, kp: int) -> tuple[int, int]:
        return min(self.FLUSH_ROWS, self.BLOCK_N), max(self.FLUSH_COLS, kp)

    def buffer_words(self) -> int:
        """int32 words of one program's candidate buffers (a row's four groups of FLUSH_AT + BLOCK_M / 4 + 1
        slots, each a score's bits and a latent) and their fills [BLOCK_N, 4]."""
        return self.BLOCK_N * 4 * (2 * (self.FLUSH_AT + self.BLOCK_M // 4 + 1) + 1)


_MERGE_BLOCK_N = {16: 32, 32: 32, 64: 16, 128: 8}
_MERGE_WARPS = 4


def _log2(n: int) -> int:
    assert n > 0 and n & (n - 1) == 0, n
    return n.bit_length() - 1


def _kp(k: int) -> int:
    return max(_MIN_KP, triton.next_power_of_2(k))


SMALL_N_ROWS = 64  # at most this many rows: the small-N configuration (16-bit inputs)


def _config(dtype: torch.dtype, kp: int, arch: int, n_rows: int) -> Config:
    """Block sizes for H100/H200 (``arch`` 90) and A100 (80)-class GPUs and a call with ``n_rows`` rows,
    chosen from the compiled code (registers, spills and instruction counts of the variant a launch
    compiles, benchmarks/static_cost.py), not from timings. The running lists live in memory, not
    registers, so the tile does not depend on KP: 128 x 256 (two 128-latent halves) on sm_90a, 128 x 128
    on sm_80; fp32 inputs (fp32 FMAs, never TF32; not the speed target) 32 x 128.
    At most SMALL_N_ROWS rows (inference on a few tokens, small eval batches): 64 x 128, one warpgroup
    (4 warps: wgmma's 64 rows), instead of a 128-row tile whose epilogue (the gate's compares, appends
    and flushes, a cost per BLOCK_N x BLOCK_M scores) would mostly work on padding. The static model
    (benchmarks/TRITON_NOTES_encode.md, "Small N") puts it ahead of 64 x 256 (4 or 8 warps; 4 warps
    also spills at KP 64) and of 32- and 16-row tiles (mma.sync: the gate's per-row reductions cross
    warps). On sm_80 its flush takes 8 rows at a time (16 spill 104 bytes at KP 128). Every launched
    variant compiles without spills (tested)."""
    if dtype == torch.float32:
        return Config(32, 128, 32, 8, 3)  # 64 x 128 spills 24 bytes at KP >= 32 on sm_90a
    if n_rows <= SMALL_N_ROWS:
        return Config(64, 128, 32, 4, 4) if arch >= 90 else Config(64, 128, 32, 4, 4, FLUSH_ROWS=8)
    return Config(128, 256, 32, 8, 4) if arch >= 90 else Config(128, 128, 32, 8, 4)


def _configs(dtype: torch.dtype, kp: int, arch: int) -> list[Config]:
    """Every configuration ``_config`` gives for some row count (one per row-count class)."""
    return list(dict.fromkeys(_config(dtype, kp, arch, n) for n in (1, SMALL_N_ROWS + 1)))


def _arch(device: torch.device) -> int:
    """Compute capability as 10 * major + minor (90 for an H100); 90 on the CPU (the interpreter)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def _device_facts(device: torch.device) -> tuple[int, int]:
    """(SM count, L2 bytes); an H100's on the CPU (the interpreter), so chunking is tested as on it."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count, props.L2_cache_size
    return 132, 50 * 2**20


def _n_chunks(N: int, M: int, D: int, x_bytes: int, block_n: int, block_m: int,
              device: torch.device) -> tuple[int, int]:
    """(tiles per chunk, chunks). As few chunks as possible (a longer chunk gives the gate a tighter
    threshold sooner, and fewer partial lists to merge), but enough programs for 90% of the SMs, and
    enough that one wave's rows of x fit in half of L2: the chunk index varies fastest in the grid,
    so a wave of ``SMs`` programs covers ``SMs / chunks`` row blocks, each re-read once per tile."""
    tiles = triton.cdiv(M, block_m)
    row_blocks = triton.cdiv(N, block_n)
    sms, l2 = _device_facts(device)
    chunks = max(1, triton.cdiv(9 * sms, 10 * row_blocks))
    while chunks < tiles and min(row_blocks, triton.cdiv(sms, chunks)) * block_n * D * x_bytes > l2 // 2:
        chunks += 1
    per_chunk = triton.cdiv(tiles, min(chunks, tiles))
    return per_chunk, triton.cdiv(tiles, per_chunk)


_DTYPE_ARG = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _partial_constexprs(x_dtype: torch.dtype, kp: int, cfg: Config, gate: bool) -> dict:
    fr, fc = cfg.flush_shape(kp)
    return {"IEEE": x_dtype == torch.float32, "KP": kp, "BLOCK_N": cfg.BLOCK_N, "BLOCK_M": cfg.BLOCK_M,
            "BLOCK_K": cfg.BLOCK_K, "LOG_KP": _log2(kp), "LOG_BN": _log2(cfg.BLOCK_N), "LOG_BM": _log2(cfg.BLOCK_M),
            "GATE": gate, "FLUSH_AT": cfg.FLUSH_AT, "FLUSH_ROWS": fr, "FLUSH_COLS": fc, "LOG_FR": _log2(fr),
            "LOG_FC": _log2(fc)}


def _candidate_buffers(words: int, device: torch.device) -> torch.Tensor:
    """The gate's scratch (every program's candidate buffers and fills, ``Config.buffer_words`` each):
    uninitialised, the kernel writes each slot before it reads it. O(programs x BLOCK_N x BLOCK_M)."""
    return torch.empty(words, dtype=torch.int32, device=device)


def _launch_partial(x, W, b, t, keys, k, binary, cfg: Config, tiles_per_chunk: int, n_chunks: int, gate: bool = True):
    """The GEMM + running top-k kernel (``t`` is theta, or any float32 [M] tensor when not binary)."""
    N, D = x.shape
    kp = keys.shape[2]
    programs = triton.cdiv(N, cfg.BLOCK_N) * n_chunks
    buf = _candidate_buffers(programs * cfg.buffer_words() if gate else 1, x.device)
    _encode_partial_kernel[(programs,)](
        x, W, b, t, keys, buf, N, W.shape[0], D, k, tiles_per_chunk, n_chunks, int(binary),
        **_partial_constexprs(x.dtype, kp, cfg, gate), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _launch_merge(keys, values, indices, k):
    N, n_chunks, kp = keys.shape
    mbn = _MERGE_BLOCK_N[kp]
    _merge_kernel[(triton.cdiv(N, mbn),)](keys, values, indices, N, n_chunks, k, KP=kp, BLOCK_N=mbn,
                                          LOG_KP=_log2(kp), LOG_BN=_log2(mbn), num_warps=_MERGE_WARPS)


def _fused(x, W, b, theta, k, binary, cfg: Config, tiles_per_chunk: int | None = None, gate: bool = True):
    N, D = x.shape
    M = W.shape[0]
    kp = _kp(k)
    assert cfg.BLOCK_M >= kp, "BLOCK_M must hold at least KP latents"
    if tiles_per_chunk is None:
        tiles_per_chunk, n_chunks = _n_chunks(N, M, D, x.element_size(), cfg.BLOCK_N, cfg.BLOCK_M, x.device)
    else:
        n_chunks = triton.cdiv(triton.cdiv(M, cfg.BLOCK_M), tiles_per_chunk)
    keys = torch.empty(N, n_chunks, kp, dtype=torch.int64, device=x.device)
    values = torch.empty(N, k, dtype=torch.float32, device=x.device)
    indices = torch.empty(N, k, dtype=torch.int64, device=x.device)
    _launch_partial(x, W, b, theta if binary else b, keys, k, binary, cfg, tiles_per_chunk, n_chunks, gate)
    _launch_merge(keys, values, indices, k)
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


@contextlib.contextmanager
def _tf32(enabled: bool):
    """TF32 matmuls for 16-bit inputs: a bf16 or fp16 number fits TF32's significand, so every product
    is exact and the sum is fp32, as in the reference; never for fp32 inputs (off even if the caller
    turned it on globally). Sets the process-wide flag for the duration of the block."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _chunked_fallback(x, W, b, theta, k, binary, chunk: int | None = None):
    """Per chunk of latents: fp32 scores, their keys, the chunk's top k (unsorted) folded into the
    running candidates (top k of 2k); one sort at the end."""
    N, _ = x.shape
    M = W.shape[0]
    if chunk is None:  # ~1 GB of fp32 scores + int64 keys + temporaries per chunk
        chunk = max(k, min(M, (1 << 30) // max(1, 24 * N)))
    xf = x.float()
    best = None
    with _tf32(x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda):
        for m0 in range(0, M, chunk):
            m1 = min(M, m0 + chunk)
            s = torch.addmm(b[m0:m1], xf, W[m0:m1].float().T)
            s = s - theta[m0:m1] if binary else torch.where(s <= 0, torch.zeros_like(s), s)
            keys = _torch_keys(s, m0)
            del s
            keys = torch.topk(keys, min(k, keys.shape[1]), dim=1, sorted=False).values
            if best is not None:
                keys = torch.cat([best, keys], dim=1)
                keys = torch.topk(keys, min(k, keys.shape[1]), dim=1, sorted=False).values
            best = keys
    return _torch_decode(torch.sort(best, dim=1, descending=True).values)


# ------------------------------------------------------------------------------------------------
# Backend entry point
# ------------------------------------------------------------------------------------------------

_cast_cache: dict = {}


def _weights_in(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W rounded to ``dtype``, the copy reused while W is unchanged (same storage, same version
    counter: an optimizer step bumps it), so the copy is made once per optimizer step, not per call.
    One entry; the storage is held by a weak reference, so a freed W cannot alias a new one."""
    if W.dtype == dtype:
        return W.contiguous()
    if W.is_inference() or torch.compiler.is_compiling():  # no version counter to key on
        return W.to(dtype).contiguous()
    key = (W.data_ptr(), W.storage_offset(), tuple(W.shape), W.stride(), W.dtype, dtype, W.device, W._version)
    hit = _cast_cache.get("entry")
    if hit is not None and hit[0] == key and not hit[1].expired():
        return hit[2]
    cast = W.detach().to(dtype).contiguous()
    _cast_cache["entry"] = (key, StorageWeakRef(W.untyped_storage()), cast)
    return cast


def encode_forward(x, W_enc, b_enc, threshold, k: int, binary: bool, *, _config_override: Config | None = None,
                   _tiles_per_chunk: int | None = None, _fallback_chunk: int | None = None, _gate: bool = True):
    """Top-k of the scores per row: ``(values float32 [N,k], indices int64 [N,k])``, rows sorted by
    decreasing score, lowest index first among ties (see the module docstring).

    The underscored keywords are test hooks (small blocks, several chunks, small fallback chunks,
    the ungated kernel as the bit-for-bit baseline of the gated one).
    """
    N = x.shape[0]
    M = W_enc.shape[0]
    if N == 0 or k == 0:
        return (torch.empty(N, k, dtype=torch.float32, device=x.device),
                torch.empty(N, k, dtype=torch.int64, device=x.device))
    assert 1 <= k <= M, "k must be in [1, M] (validated by ops.py)"
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        W = _weights_in(W_enc, x.dtype)
        x = x.contiguous()
        b = b_enc.to(torch.float32).contiguous()
        theta = threshold.to(torch.float32).contiguous() if binary else None
        if k > MAX_FUSED_K or x.dtype not in _DTYPE_ARG or x.shape[1] == 0:
            return _chunked_fallback(x, W, b, theta, k, binary, _fallback_chunk)
        cfg = _config_override or _config(x.dtype, _kp(k), _arch(x.device), N)
        return _fused(x, W, b, theta, k, binary, cfg, _tiles_per_chunk, _gate)


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests compile every configuration for sm_90 and sm_80)
# ------------------------------------------------------------------------------------------------


def _partial_spec(dtype: torch.dtype, kp: int, cfg: Config, gate: bool = True):
    name = _DTYPE_ARG[dtype]
    sig = {"x_ptr": f"*{name}", "w_ptr": f"*{name}", "b_ptr": "*fp32", "t_ptr": "*fp32", "keys_ptr": "*i64",
           "buf_ptr": "*i32", "N": "i32", "M": "i32", "D": "i32", "k": "i32", "tiles_per_chunk": "i32", "n_chunks": "i32",
           "binary": "i32"}
    cx = _partial_constexprs(dtype, kp, cfg, gate)
    sig.update({c: "constexpr" for c in cx})
    return _encode_partial_kernel, sig, cx, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _merge_spec(kp: int):
    bn = _MERGE_BLOCK_N[kp]
    sig = {"keys_ptr": "*i64", "values_ptr": "*fp32", "indices_ptr": "*i64", "N": "i32", "n_chunks": "i32",
           "k": "i32"}
    cx = {"KP": kp, "BLOCK_N": bn, "LOG_KP": _log2(kp), "LOG_BN": _log2(bn)}
    sig.update({c: "constexpr" for c in cx})
    return _merge_kernel, sig, cx, {"num_warps": _MERGE_WARPS}


def aot_launches(arch: int = 90):
    """Every (kernel, signature, constexprs, options) the wrapper can launch on a GPU of ``arch``."""
    out = [_partial_spec(dtype, kp, cfg) for dtype in _DTYPE_ARG for kp in (16, 32, 64, 128)
           for cfg in _configs(dtype, kp, arch)]
    return out + [_merge_spec(kp) for kp in _MERGE_BLOCK_N]


def launch_variant(fn, signature: dict, constexprs: dict, *, d: int = 576, ones: tuple = ()):
    """The specialisation a launch gets, as ``(signature, constexprs, attrs)`` for ``ASTSource``:
    16-byte aligned pointers and, where ``d`` is a multiple of 16, ``D`` (``tt.divisibility`` 16);
    integer arguments equal to 1 (named in ``ones``; N = 1, k = 1, D = 1) become constants, as Triton
    specialises them (``do_not_specialize`` arguments excepted)."""
    sig, cx = dict(signature), dict(constexprs)
    for name in ones:
        if name in fn.do_not_specialize or name not in sig:
            continue
        sig[name], cx[name] = "constexpr", 1
    args = list(fn.arg_names)
    attrs = {(args.index(n),): [["tt.divisibility", 16]] for n, ty in sig.items()
             if ty.startswith("*") or (n == "D" and ty == "i32" and d % 16 == 0)}
    return sig, cx, attrs
