"""Triton kernels for the O(N k d) half of the coder: the sparse decode and the backward passes.

Same signatures and conventions as ``backends/reference.py``: the compute dtype is the dtype of
``acts`` (decoder) or ``x`` (encoder), weights are rounded to it, products accumulate in float32,
weight gradients come back float32, ``None`` where not requested.

Kernels (design: ``benchmarks/TRITON_NOTES_sparse.md``):

* ``_gather_rows_kernel``: ``out[t] = sum_j a[t,j] * round(W[idx[t,j]]) (+ bias)``. A program owns
  ``BLOCK_T`` tokens x ``BLOCK_D`` columns (d is tiled, never padded to a power of two: 576 =
  9 x 64) and walks the k selections, gathering one row chunk per token per step into a float32
  accumulator. Binary codes add the rows whose act is nonzero with no multiplication, and the
  masked loads of zero acts fetch nothing. Serves the decode forward and the encoder's ``grad_x``
  (weights ``grad_z``, rows rounded to x's dtype).
* ``_dot_rows_kernel``: ``grad_acts[t,j] = round(W_dec[idx[t,j]]) . grad_y[t]``, k dot products per
  token, d in ``BLOCK_D`` chunks.
* ``_ste_kernel``: ``grad_z`` from ``grad_acts``, ``grad_values`` and the values (``STE_MODES``).
* Weight gradients through the CSR transpose of the indices: a stable ``torch.sort`` of the
  flattened indices by latent (deterministic) and ``searchsorted`` bucket bounds, both in the
  wrapper and without a host sync. ``_bucket_kernel`` then runs one program per (bucket segment,
  column block): it sums ``w[t,j] * rows[t]`` over the segment's selections in sorted order
  (``BLOCK_E`` at a time), and for the encoder also ``sum w`` (``grad_b_enc``). Buckets are cut into
  segments of ``SEGMENT`` selections, so a latent firing on half the tokens spreads over many
  programs; a latent with one segment writes its gradient row directly, the partial rows of
  multi-segment latents go to a scratch buffer that ``_bucket_reduce_kernel`` sums in segment
  order. No atomics anywhere: every output element is written once, so results are bitwise
  reproducible run to run.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..reference import STE_MODES

# Selections per program in the weight-gradient buckets. Read at call time (tests lower it to
# exercise multi-segment buckets with few tokens).
SEGMENT = 256
# Selections gathered per step inside a bucket segment.
BLOCK_E = 16

_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_BLOCK_DS = (256, 128, 64, 32)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _round(w, ROUND: tl.constexpr):
    """``w`` (any float) rounded to the compute dtype (0 fp32, 1 fp16, 2 bf16), as float32."""
    if ROUND == 1:
        w = w.to(tl.float16)
    elif ROUND == 2:
        w = w.to(tl.bfloat16)
    return w.to(tl.float32)


@triton.jit
def _gather_rows_kernel(idx_ptr, a_ptr, w_ptr, bias_ptr, out_ptr, N, k, d,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ROUND: tl.constexpr,
                        BINARY: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    tm = t < N
    cm = c < d
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(k):
        sel = t * k + j
        i = tl.load(idx_ptr + sel, mask=tm, other=0)
        a = tl.load(a_ptr + sel, mask=tm, other=0).to(tl.float32)
        if BINARY:
            rm = tm & (a != 0)
        else:
            rm = tm
        w = tl.load(w_ptr + i[:, None] * d + c[None, :], mask=rm[:, None] & cm[None, :], other=0)
        w = _round(w, ROUND)
        if BINARY:
            acc += w
        else:
            acc += a[:, None] * w
    if HAS_BIAS:
        b = tl.load(bias_ptr + c, mask=cm, other=0).to(tl.float32)
        acc += b[None, :]
    tl.store(out_ptr + t[:, None] * d + c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tm[:, None] & cm[None, :])


@triton.jit
def _ste(ga, gv, v, temperature, MODE: tl.constexpr):
    """grad_z from grad_acts, grad_values and the values (float32), as ``reference.ste_factor``.
    ``v / T`` is divided with IEEE rounding (``div_rn``; a plain ``/`` compiles to an approximate
    division that can flip the rectangle's ``|v/T| < 1/2`` at the boundary)."""
    if MODE == 0:  # exact ReLU gradient: acts and values are one tensor
        gz = (ga + gv) * (v > 0).to(tl.float32)
    else:
        if MODE == 1:  # sigmoid: s (1 - s), no 1/T factor
            s = 1.0 / (1.0 + tl.exp(-tl.math.div_rn(v, temperature)))
            f = s * (1.0 - s)
        elif MODE == 2:  # rectangle
            f = (tl.abs(tl.math.div_rn(v, temperature)) < 0.5).to(tl.float32)
        else:  # identity
            f = tl.full(v.shape, 1.0, tl.float32)
        gz = ga * f + gv
    return gz


@triton.jit
def _ste_kernel(ga_ptr, gv_ptr, v_ptr, gz_ptr, n, temperature, MODE: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = p < n
    ga = tl.load(ga_ptr + p, mask=m, other=0).to(tl.float32)
    gv = tl.load(gv_ptr + p, mask=m, other=0).to(tl.float32)
    v = tl.load(v_ptr + p, mask=m, other=0).to(tl.float32)
    tl.store(gz_ptr + p, _ste(ga, gv, v, temperature, MODE), mask=m)


@triton.jit
def _segment(offsets_ptr, seg_start_ptr, i, s, SEG):
    """(local segment number, first selection, end selection) of bucket segment ``s`` of latent ``i``."""
    local = s - tl.load(seg_start_ptr + i)
    start = tl.load(offsets_ptr + i) + local * SEG
    end = tl.minimum(tl.load(offsets_ptr + i + 1), start + SEG)
    return local, start, end


@triton.jit
def _bucket_dot_kernel(perm_ptr, offsets_ptr, seg_latent_ptr, seg_start_ptr, w_ptr, g_ptr, ga_in_ptr, gv_ptr,
                       v_ptr, ga_out_ptr, gz_ptr, M, k, d, SEG, temperature,
                       BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, ROUND: tl.constexpr, MODE: tl.constexpr,
                       WRITE_GA: tl.constexpr, WRITE_GZ: tl.constexpr):
    """The decoder's grad_acts, latent by latent: ``dot[p] = round(W_dec[i]) . grad_y[p // k]`` for
    the selections p of one bucket segment of latent i (the W_dec row is one row for the whole
    segment, not one gathered row per selection). Writes ``dot`` (WRITE_GA) and/or
    ``grad_z = STE(grad_acts_in + dot, grad_values, values)`` (WRITE_GZ); each p once."""
    s = tl.program_id(0)
    i = tl.load(seg_latent_ptr + s)  # M for the spare programs of the upper-bound grid
    if i < M:
        _local, start, end = _segment(offsets_ptr, seg_start_ptr, i, s, SEG)
        es = tl.arange(0, BLOCK_E)
        cols = tl.arange(0, BLOCK_D)
        for e0 in range(start, end, BLOCK_E):
            e = e0 + es
            em = e < end
            p = tl.load(perm_ptr + e, mask=em, other=0)
            t = p // k
            acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)
            for c0 in range(0, d, BLOCK_D):
                c = c0 + cols
                cm = c < d
                w = _round(tl.load(w_ptr + i * d + c, mask=cm, other=0), ROUND)
                g = tl.load(g_ptr + t[:, None] * d + c[None, :], mask=em[:, None] & cm[None, :], other=0)
                acc += w[None, :] * g.to(tl.float32)
            dot = tl.sum(acc, axis=1)
            if WRITE_GA:
                tl.store(ga_out_ptr + p, dot, mask=em)
            if WRITE_GZ:
                ga = tl.load(ga_in_ptr + p, mask=em, other=0).to(tl.float32) + dot
                gv = tl.load(gv_ptr + p, mask=em, other=0).to(tl.float32)
                v = tl.load(v_ptr + p, mask=em, other=0).to(tl.float32)
                tl.store(gz_ptr + p, _ste(ga, gv, v, temperature, MODE), mask=em)


@triton.jit
def _segment_rows(perm_ptr, start, end, w_ptr, rows_ptr, out_ptr, k, d,
                  BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, PLAIN: tl.constexpr):
    """``out[:d] = sum of w[p] * rows[p // k]`` over the selections p = perm[start:end] (PLAIN: the
    rows whose w is nonzero, unweighted), every column tile of the row in this one program. One
    partial sum per lane of the [BLOCK_E, BLOCK_D] tile, reduced once at the end: a fixed
    summation order, so the result is bitwise reproducible."""
    es = tl.arange(0, BLOCK_E)
    for c0 in range(0, d, BLOCK_D):
        c = c0 + tl.arange(0, BLOCK_D)
        cm = c < d
        acc2 = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)
        for e0 in range(start, end, BLOCK_E):
            e = e0 + es
            em = e < end
            p = tl.load(perm_ptr + e, mask=em, other=0)
            w = tl.load(w_ptr + p, mask=em, other=0)
            if PLAIN:
                em = em & (w != 0)
            r = tl.load(rows_ptr + (p // k)[:, None] * d + c[None, :], mask=em[:, None] & cm[None, :],
                        other=0).to(tl.float32)
            if PLAIN:
                acc2 += r
            else:
                acc2 += w[:, None] * r
        tl.store(out_ptr + c, tl.sum(acc2, axis=0), mask=cm)


@triton.jit
def _bucket_kernel(perm_ptr, offsets_ptr, seg_latent_ptr, seg_start_ptr, nseg_ptr, multi_off_ptr,
                   wa_ptr, rows_a_ptr, grad_a_ptr, scratch_a_ptr, wb_ptr, rows_b_ptr, grad_b_ptr, scratch_b_ptr,
                   bias_ptr, scratch_bias_ptr, M, k, d_a, d_b, SEG,
                   BLOCK_E: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, PLAIN_A: tl.constexpr,
                   HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One program per bucket segment (all column tiles): the weight gradients of one latent's
    selections, for up to two (weights, rows) pairs sharing the transpose: A (the decoder:
    ``grad_W_dec`` from acts and grad_y) and B (the encoder: ``grad_W_enc`` from grad_z and x),
    plus ``sum of wb`` (``grad_b_enc``). A latent with one segment writes its rows directly; the
    partial rows of multi-segment latents go to the scratch buffers at ``multi_off[i] + local``."""
    s = tl.program_id(0)
    i = tl.load(seg_latent_ptr + s)  # M for the spare programs of the upper-bound grid
    if i < M:
        local, start, end = _segment(offsets_ptr, seg_start_ptr, i, s, SEG)
        single = tl.load(nseg_ptr + i) == 1
        out_row = tl.load(multi_off_ptr + i) + local
        if HAS_A:
            if single:
                out_a = grad_a_ptr + i * d_a
            else:
                out_a = scratch_a_ptr + out_row * d_a
            _segment_rows(perm_ptr, start, end, wa_ptr, rows_a_ptr, out_a, k, d_a, BLOCK_E, BLOCK_DA, PLAIN_A)
        if HAS_B:
            if single:
                out_b = grad_b_ptr + i * d_b
            else:
                out_b = scratch_b_ptr + out_row * d_b
            _segment_rows(perm_ptr, start, end, wb_ptr, rows_b_ptr, out_b, k, d_b, BLOCK_E, BLOCK_DB, False)
        if HAS_BIAS:
            es = tl.arange(0, BLOCK_E)
            acc_b = tl.zeros((BLOCK_E,), dtype=tl.float32)
            for e0 in range(start, end, BLOCK_E):
                e = e0 + es
                em = e < end
                p = tl.load(perm_ptr + e, mask=em, other=0)
                acc_b += tl.load(wb_ptr + p, mask=em, other=0)
            total = tl.sum(acc_b, axis=0)
            if single:
                tl.store(bias_ptr + i, total)
            else:
                tl.store(scratch_bias_ptr + out_row, total)


@triton.jit
def _bucket_reduce_kernel(multi_ptr, nseg_ptr, multi_off_ptr, scratch_ptr, scratch_b_ptr, grad_ptr, grad_b_ptr,
                          d, BLOCK_D: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_B: tl.constexpr):
    i = tl.load(multi_ptr + tl.program_id(0))
    pid_d = tl.program_id(1)
    nseg = tl.load(nseg_ptr + i)
    if nseg > 1:
        first = tl.load(multi_off_ptr + i)
        if HAS_ROWS:
            c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
            cm = c < d
            acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for l in range(nseg):
                acc += tl.load(scratch_ptr + (first + l) * d + c, mask=cm, other=0)
            tl.store(grad_ptr + i * d + c, acc, mask=cm)
        if HAS_B:
            if pid_d == 0:
                acc_b = tl.load(scratch_b_ptr + first)
                for l in range(1, nseg):
                    acc_b += tl.load(scratch_b_ptr + first + l)
                tl.store(grad_b_ptr + i, acc_b)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------


def _block_d(d: int) -> int:
    """Column tile: the least padding of d among tiles >= min(64, d), the larger tile on ties."""
    floor = min(64, triton.next_power_of_2(max(d, 32)))
    best = None
    for b in _BLOCK_DS:
        if b < floor:
            continue
        waste = -(-d // b) * b - d
        if best is None or waste < best[0]:
            best = (waste, b)
    return best[1]


def _block_t(block_d: int) -> int:
    """Tokens per program for a column tile: about 4096 accumulator elements, 32 at most."""
    return max(4, min(32, 4096 // block_d))


def _device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _round_code(dtype: torch.dtype) -> int:
    if dtype not in _ROUND:
        raise TypeError(f"the triton backend computes in float32, float16 or bfloat16, got {dtype}")
    return _ROUND[dtype]


def _gather(indices, weights, W, bias, out, round_code: int, binary: bool):
    N, k = indices.shape
    d = W.shape[1]
    if N == 0 or d == 0:
        return out
    BD = _block_d(d)
    BT = _block_t(BD)
    grid = (triton.cdiv(N, BT), triton.cdiv(d, BD))
    _gather_rows_kernel[grid](indices, weights, W, bias if bias is not None else out, out, N, k, d,
                              BLOCK_T=BT, BLOCK_D=BD, ROUND=round_code, BINARY=binary,
                              HAS_BIAS=bias is not None)
    return out


class _Buckets:
    """The CSR transpose of ``indices`` [N, k] by latent, cut into segments of ``seg`` selections.

    Built with a stable ``torch.sort`` and ``searchsorted`` (no host sync, deterministic):
    ``perm`` lists the flat selections t * k + j latent by latent, in token order within a latent;
    ``offsets[i]:offsets[i+1]`` is latent i's range. Every latent gets max(1, ceil(count / seg))
    segments (empty latents one, which writes zeros); ``seg_latent[s]`` is segment s's latent (M
    for the spare entries of the upper-bound grid). Multi-segment latents write their partial rows
    at ``multi_off[i] + local`` in a scratch buffer; ``multi`` lists them first.
    """

    def __init__(self, indices: torch.Tensor, M: int, seg: int):
        dev = indices.device
        flat = indices.reshape(-1)
        NK = flat.numel()
        # int32 keys: half the radix passes of int64 (the latents fit; validated by ops.py)
        keys, self.perm = torch.sort(flat.to(torch.int32) if M < 2**31 - 1 else flat, stable=True)
        self.offsets = torch.searchsorted(keys, torch.arange(M + 1, device=dev, dtype=keys.dtype))
        counts = self.offsets[1:] - self.offsets[:-1]
        self.nseg = torch.clamp((counts + seg - 1) // seg, min=1)
        seg_end = torch.cumsum(self.nseg, 0)
        self.seg_start = seg_end - self.nseg
        # Upper bounds known without a sync: each latent has one segment plus one per full `seg`.
        self.max_segments = M + NK // seg
        self.seg_latent = torch.searchsorted(seg_end, torch.arange(self.max_segments, device=dev, dtype=seg_end.dtype),
                                             right=True)
        multi = torch.where(self.nseg > 1, self.nseg, torch.zeros_like(self.nseg))
        self.multi_off = torch.cumsum(multi, 0) - multi
        # a multi-segment latent has > seg selections, so at most NK // seg of them, each with
        # ceil(count / seg) < 2 count / seg segments
        self.max_multi = min(M, NK // seg)
        self.scratch_rows = 2 * NK // seg + 1
        self.multi = torch.argsort((self.nseg <= 1).to(torch.int8), stable=True)[: self.max_multi]
        self.seg = seg
        self.M = M


def _bucket_dot(b: _Buckets, k: int, W_dec, grad_y, round_code: int, *, ga_out=None, ste=None):
    """Fills ``ga_out[p] = round(W_dec[i]) . grad_y[p // k]`` and/or, with ``ste = (gz, grad_acts,
    grad_values, values, mode, temperature)``, ``gz[p] = STE(grad_acts[p] + that dot, ...)``."""
    d = W_dec.shape[1]
    gz, ga_in, gv, v, mode, temperature = ste if ste is not None else (None,) * 4 + (0, 1.0)
    dummy = ga_out if ga_out is not None else gz
    BD = _block_d(d) if d > 0 else 32
    _bucket_dot_kernel[(b.max_segments,)](
        b.perm, b.offsets, b.seg_latent, b.seg_start, W_dec, grad_y,
        ga_in if ste is not None else dummy, gv if ste is not None else dummy, v if ste is not None else dummy,
        ga_out if ga_out is not None else dummy, gz if ste is not None else dummy,
        b.M, k, d, b.seg, float(temperature), BLOCK_E=BLOCK_E, BLOCK_D=BD, ROUND=round_code, MODE=int(mode),
        WRITE_GA=ga_out is not None, WRITE_GZ=ste is not None)


def _bucket_sums(b: _Buckets, k: int, *, dec=None, enc=None):
    """Weight gradients over the selections of each latent, in one pass over the transpose ``b``:

    * ``dec = (acts f32 [N*k], grad_y [N, d_out], binary)`` -> ``grad_W_dec[i] = sum acts[p] * grad_y[p // k]``
      (binary: the rows where acts[p] != 0);
    * ``enc = (grad_z f32 [N*k], x [N, d_in] or None, want_b)`` -> ``grad_W_enc[i] = sum grad_z[p] * x[p // k]``
      and ``grad_b_enc[i] = sum grad_z[p]``.

    Returns ``(grad_W_dec, grad_W_enc, grad_b_enc)``, float32, ``None`` where not asked for."""
    M = b.M
    has_a = dec is not None
    x = enc[1] if enc is not None else None
    has_b = x is not None
    has_bias = enc is not None and enc[2]
    some = dec[0] if has_a else enc[0]
    dev = some.device
    f32 = dict(dtype=torch.float32, device=dev)
    d_a = dec[1].shape[1] if has_a else 0
    d_b = x.shape[1] if has_b else 0
    grad_a = torch.empty(M, d_a, **f32) if has_a else None
    grad_b = torch.empty(M, d_b, **f32) if has_b else None
    bias = torch.empty(M, **f32) if has_bias else None
    if M == 0 or not (has_a or has_b or has_bias):
        return grad_a, grad_b, bias
    rows = max(b.scratch_rows, 1)
    scratch_a = torch.empty(rows if has_a else 1, max(d_a, 1), **f32)
    scratch_b = torch.empty(rows if has_b else 1, max(d_b, 1), **f32)
    scratch_bias = torch.empty(rows, **f32)
    dummy = scratch_bias
    BDA = _block_d(d_a) if d_a > 0 else 32
    BDB = _block_d(d_b) if d_b > 0 else 32
    _bucket_kernel[(b.max_segments,)](
        b.perm, b.offsets, b.seg_latent, b.seg_start, b.nseg, b.multi_off,
        dec[0] if has_a else dummy, dec[1] if has_a else dummy, grad_a if has_a else dummy, scratch_a,
        enc[0] if enc is not None else dummy, x if has_b else dummy, grad_b if has_b else dummy, scratch_b,
        bias if has_bias else dummy, scratch_bias, M, k, d_a, d_b, b.seg,
        BLOCK_E=BLOCK_E, BLOCK_DA=BDA, BLOCK_DB=BDB, PLAIN_A=bool(has_a and dec[2]), HAS_A=has_a, HAS_B=has_b,
        HAS_BIAS=has_bias)
    if b.max_multi > 0:  # latents with several segments: their partial rows summed in segment order
        if has_a and d_a > 0:
            _bucket_reduce_kernel[(b.max_multi, triton.cdiv(d_a, BDA))](
                b.multi, b.nseg, b.multi_off, scratch_a, dummy, grad_a, dummy, d_a, BLOCK_D=BDA, HAS_ROWS=True,
                HAS_B=False)
        if (has_b and d_b > 0) or has_bias:
            _bucket_reduce_kernel[(b.max_multi, triton.cdiv(d_b, BDB) if has_b and d_b > 0 else 1)](
                b.multi, b.nseg, b.multi_off, scratch_b, scratch_bias, grad_b if has_b else dummy,
                bias if has_bias else dummy, d_b, BLOCK_D=BDB, HAS_ROWS=has_b and d_b > 0, HAS_B=has_bias)
    return grad_a, grad_b, bias


# ---------------------------------------------------------------------------------------------
# Backend functions (signatures of backends/reference.py)
# ---------------------------------------------------------------------------------------------


def decode_forward(indices, acts, W_dec, b_dec, binary: bool):
    """``y[t] = b_dec + sum_j acts[t,j] * W_dec[indices[t,j]]`` in acts' dtype (binary: masked sum)."""
    N = indices.shape[0]
    d = W_dec.shape[1]
    out = torch.empty(N, d, dtype=acts.dtype, device=acts.device)
    with _device(acts):
        return _gather(indices.contiguous(), acts.contiguous(), W_dec.contiguous(),
                       # float32, exactly as the kernel adds it: one compiled variant whatever b_dec's dtype
                       b_dec.to(torch.float32).contiguous() if b_dec is not None else None, out,
                       _round_code(acts.dtype), binary)


def decode_backward(grad_y, indices, acts, W_dec, binary: bool, need_acts: bool, need_W: bool):
    """``(grad_acts f32 [N,k], grad_W_dec f32 [M,d])``, ``None`` where not needed; both latent by
    latent over one transpose of the indices."""
    N, k = indices.shape
    M = W_dec.shape[0]
    grad_acts = grad_W = None
    if not (need_acts or need_W):
        return grad_acts, grad_W
    with _device(acts):
        b = _Buckets(indices.contiguous(), M, SEGMENT)
        grad_y = grad_y.contiguous()
        if need_acts:
            grad_acts = torch.empty(N, k, dtype=torch.float32, device=acts.device)
            _bucket_dot(b, k, W_dec.contiguous(), grad_y, _round_code(acts.dtype), ga_out=grad_acts)
        if need_W:
            dec = (acts.contiguous().to(torch.float32).reshape(-1), grad_y, binary)
            grad_W = _bucket_sums(b, k, dec=dec)[0]
    return grad_acts, grad_W


def _check_mode(mode: int) -> None:
    if mode not in STE_MODES.values():
        raise ValueError(f"unknown STE mode {mode}")


def encode_backward(grad_acts, grad_values, values, x, W_enc, indices, mode: int, temperature: float,
                    need_x: bool, need_W: bool, need_b: bool):
    """``(grad_x, grad_W_enc, grad_b_enc)`` in float32 from ``grad_z = grad_acts * STE'(values) +
    grad_values`` (mode 0: ``(grad_acts + grad_values) * 1[values > 0]``), ``None`` where not needed."""
    _check_mode(mode)
    N, k = indices.shape
    M, d = W_enc.shape
    dev = x.device
    grad_x = grad_W = grad_b = None
    if not (need_x or need_W or need_b):
        return grad_x, grad_W, grad_b
    indices = indices.contiguous()
    NK = N * k
    with _device(x):
        grad_z = torch.empty(N, k, dtype=torch.float32, device=dev)
        if NK > 0:
            BLOCK = 1024
            _ste_kernel[(triton.cdiv(NK, BLOCK),)](grad_acts.contiguous(), grad_values.contiguous(),
                                                   values.contiguous(), grad_z, NK, float(temperature),
                                                   MODE=int(mode), BLOCK=BLOCK)
        if need_x:
            grad_x = torch.empty(N, d, dtype=torch.float32, device=dev)  # every element written
            _gather(indices, grad_z, W_enc.contiguous(), None, grad_x, _round_code(x.dtype), False)
        if need_W or need_b:
            b = _Buckets(indices, M, SEGMENT)
            _, grad_W, grad_b = _bucket_sums(b, k, enc=(grad_z.reshape(-1), x.contiguous() if need_W else None, need_b))
    return grad_x, grad_W, grad_b


def coder_backward(grad_y, grad_acts, grad_values, indices, acts, values, x, W_enc, W_dec, binary: bool, mode: int,
                   temperature: float, need_x: bool, need_W_enc: bool, need_b_enc: bool, need_W_dec: bool):
    """The backward of an encode + the decode of its codes (``reference.coder_backward``): one
    transpose of the indices serves the decoder's grad_acts (fused with the STE into grad_z, each
    W_dec row read once per segment), grad_W_dec, grad_W_enc and grad_b_enc; grad_x is a per-token gather."""
    _check_mode(mode)
    N, k = indices.shape
    M, d_in = W_enc.shape
    dev = x.device
    need_enc = need_x or need_W_enc or need_b_enc
    grad_x = grad_W_enc = grad_b_enc = grad_W_dec = None
    if not (need_enc or need_W_dec):
        return grad_x, grad_W_enc, grad_b_enc, grad_W_dec
    indices = indices.contiguous()
    with _device(x):
        b = _Buckets(indices, M, SEGMENT)
        grad_y = grad_y.contiguous()
        grad_z = None
        if need_enc:
            grad_z = torch.empty(N, k, dtype=torch.float32, device=dev)
            _bucket_dot(b, k, W_dec.contiguous(), grad_y, _round_code(acts.dtype),
                        ste=(grad_z, grad_acts.contiguous(), grad_values.contiguous(), values.contiguous(), mode,
                             temperature))
        dec = (acts.contiguous().to(torch.float32).reshape(-1), grad_y, binary) if need_W_dec else None
        enc = (grad_z.reshape(-1), x.contiguous() if need_W_enc else None, need_b_enc) if (need_W_enc or need_b_enc) else None
        if dec is not None or enc is not None:
            grad_W_dec, grad_W_enc, grad_b_enc = _bucket_sums(b, k, dec=dec, enc=enc)
        if need_x:
            grad_x = torch.empty(N, d_in, dtype=torch.float32, device=dev)
            _gather(indices, grad_z, W_enc.contiguous(), None, grad_x, _round_code(x.dtype), False)
    return grad_x, grad_W_enc, grad_b_enc, grad_W_dec


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/test_triton_sparse.py compiles them for sm_90 and sm_80)
# ---------------------------------------------------------------------------------------------

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _spec(fn, types: dict, constexprs: dict):
    sig = {name: types.get(name, "constexpr" if name in constexprs else "i32") for name in fn.arg_names}
    missing = [name for name in fn.arg_names if name not in types and name not in constexprs]
    assert all(name in ("N", "k", "d", "d_a", "d_b", "M", "SEG", "n") for name in missing), missing
    return fn, sig, dict(constexprs)


def _launch_triples():
    """Every (kernel, type dict, constexpr dict) the wrappers can launch (the exhaustive list)."""
    blocks = [(_block_t(bd), bd) for bd in sorted(_BLOCK_DS)]
    out = []
    # decode forward: acts dtype a (output and rounding), weights any float, bias float32 (decode_forward)
    for a in _FLOATS:
        for w in _FLOATS:
            for binary in (False, True):
                for has_bias in (False, True):
                    types = {"idx_ptr": "*i64", "a_ptr": f"*{_TY[a]}", "w_ptr": f"*{_TY[w]}",
                             "bias_ptr": "*fp32" if has_bias else f"*{_TY[a]}", "out_ptr": f"*{_TY[a]}"}
                    for bt, bd in blocks:
                        out.append((_gather_rows_kernel, types, dict(BLOCK_T=bt, BLOCK_D=bd, ROUND=_ROUND[a],
                                                                     BINARY=binary, HAS_BIAS=has_bias)))
    # encoder grad_x: float32 weights (grad_z) and output, weight rows rounded to x's dtype
    for x in _FLOATS:
        for w in _FLOATS:
            types = {"idx_ptr": "*i64", "a_ptr": "*fp32", "w_ptr": f"*{_TY[w]}", "bias_ptr": "*fp32",
                     "out_ptr": "*fp32"}
            for bt, bd in blocks:
                out.append((_gather_rows_kernel, types,
                            dict(BLOCK_T=bt, BLOCK_D=bd, ROUND=_ROUND[x], BINARY=False, HAS_BIAS=False)))
    for g in _FLOATS:
        types = {"ga_ptr": f"*{_TY[g]}", "gv_ptr": f"*{_TY[g]}", "v_ptr": "*fp32", "gz_ptr": "*fp32",
                 "temperature": "fp32"}
        for m in (0, 1, 2, 3):
            out.append((_ste_kernel, types, dict(MODE=m, BLOCK=1024)))
    # the decoder's grad_acts per latent segment: W_dec any float, grad_y in acts' dtype a; with the
    # STE fused in (coder_backward: grad_acts/grad_values in a) or not (decode_backward)
    dot_ptrs = {"perm_ptr": "*i64", "offsets_ptr": "*i64", "seg_latent_ptr": "*i64", "seg_start_ptr": "*i64",
                "v_ptr": "*fp32", "ga_out_ptr": "*fp32", "gz_ptr": "*fp32", "temperature": "fp32"}
    for a in _FLOATS:
        for w in _FLOATS:
            for bd in sorted(_BLOCK_DS):
                base = dict(dot_ptrs, w_ptr=f"*{_TY[w]}", g_ptr=f"*{_TY[a]}")
                out.append((_bucket_dot_kernel, dict(base, ga_in_ptr="*fp32", gv_ptr="*fp32", v_ptr="*fp32"),
                            dict(BLOCK_E=BLOCK_E, BLOCK_D=bd, ROUND=_ROUND[a], MODE=0, WRITE_GA=True, WRITE_GZ=False)))
                for m in (0, 1, 2, 3):  # TopK (mode 0): grad_values is ops.py's float32 zeros
                    gv = "*fp32" if m == 0 else f"*{_TY[a]}"
                    out.append((_bucket_dot_kernel, dict(base, ga_in_ptr=f"*{_TY[a]}", gv_ptr=gv),
                                dict(BLOCK_E=BLOCK_E, BLOCK_D=bd, ROUND=_ROUND[a], MODE=m, WRITE_GA=False,
                                     WRITE_GZ=True)))
    bucket_ptrs = {"perm_ptr": "*i64", "offsets_ptr": "*i64", "seg_latent_ptr": "*i64", "seg_start_ptr": "*i64",
                   "nseg_ptr": "*i64", "multi_off_ptr": "*i64", "wa_ptr": "*fp32", "grad_a_ptr": "*fp32",
                   "scratch_a_ptr": "*fp32", "wb_ptr": "*fp32", "grad_b_ptr": "*fp32", "scratch_b_ptr": "*fp32",
                   "bias_ptr": "*fp32", "scratch_bias_ptr": "*fp32"}
    reduce_ptrs = {"multi_ptr": "*i64", "nseg_ptr": "*i64", "multi_off_ptr": "*i64", "scratch_ptr": "*fp32",
                   "scratch_b_ptr": "*fp32", "grad_ptr": "*fp32", "grad_b_ptr": "*fp32"}
    # (HAS_A, PLAIN_A, HAS_B, HAS_BIAS): decode_backward (binary / continuous); encode_backward (W and b,
    # W only, b only); coder_backward (the decoder's A with any of the encoder's B/bias)
    combos = [(True, p, False, False) for p in (True, False)]
    combos += [(False, False, hb, hbias) for hb, hbias in ((True, True), (True, False), (False, True))]
    combos += [(True, p, hb, hbias) for p in (True, False) for hb, hbias in ((True, True), (True, False), (False, True))]
    blocks = sorted(_BLOCK_DS)
    for has_a, plain, has_b, has_bias in combos:
        for ra in (_FLOATS if has_a else (torch.float32,)):
            for rb in (_FLOATS if has_b else (torch.float32,)):
                if has_a and has_b and ra != rb:
                    continue  # coder_backward: grad_y and x share the compute dtype
                types = dict(bucket_ptrs, rows_a_ptr=f"*{_TY[ra]}", rows_b_ptr=f"*{_TY[rb]}")
                for bda in (blocks if has_a else [32]):
                    for bdb in (blocks if has_b else [32]):
                        if has_a and has_b and bda != bdb:
                            continue  # d_out == d_in in the coders this package builds
                        out.append((_bucket_kernel, types, dict(BLOCK_E=BLOCK_E, BLOCK_DA=bda, BLOCK_DB=bdb,
                                                                PLAIN_A=plain, HAS_A=has_a, HAS_B=has_b,
                                                                HAS_BIAS=has_bias)))
    for has_rows, has_b in ((True, False), (True, True), (False, True)):
        for bd in (blocks if has_rows else [32]):
            out.append((_bucket_reduce_kernel, reduce_ptrs, dict(BLOCK_D=bd, HAS_ROWS=has_rows, HAS_B=has_b)))
    return out


def _is_main(types: dict) -> bool:
    """The dtypes of a bf16 model with fp32 master weights (or no low-precision tensor at all)."""
    vals = set(types.values())
    return "*fp16" not in vals and types.get("w_ptr", "*fp32") == "*fp32" and (
        "*bf16" in vals or "rows_a_ptr" not in types and types.get("ga_ptr", "*bf16") == "*bf16"
        and types.get("g_ptr", "*bf16") == "*bf16" and types.get("a_ptr") in (None, "*fp32"))


def aot_specs(exhaustive: bool = False):
    """``[(JITFunction, signature dict, constexpr dict)]`` covering every kernel and every constexpr
    configuration the wrappers can launch, for ``triton.compile(ASTSource(...))``.

    By default: every constexpr configuration once (with bf16 activations and fp32 weights where
    the wrapper can launch it so), and every dtype combination once; ``exhaustive=True`` gives every
    launchable (dtypes, constexprs) pair. Scalar arguments are typed i32, as a launch with values
    that fit specialises them (``temperature`` fp32); one more spec per kernel has every integer
    argument specialised to 1, as a launch with N, k or d = 1 gets.
    """
    triples = _launch_triples()
    if not exhaustive:
        chosen, seen_cfg, seen_types = [], set(), set()
        key = lambda fn, d: (fn.__name__, tuple(sorted(d.items())))  # noqa: E731
        for fn, types, cfg in sorted(triples, key=lambda t: not _is_main(t[1])):
            if key(fn, cfg) not in seen_cfg or key(fn, types) not in seen_types:
                chosen.append((fn, types, cfg))
                seen_cfg.add(key(fn, cfg))
                seen_types.add(key(fn, types))
        triples = chosen
    specs = [_spec(fn, types, cfg) for fn, types, cfg in triples]
    # A launch also specialises integer arguments equal to 1 (N = 1, k = 1, d = 1) as constants:
    # one such launch per kernel, on its first configuration with the main dtypes.
    ones = {}
    for fn, types, cfg in sorted(_launch_triples(), key=lambda t: not _is_main(t[1])):
        fn, sig, cx = _spec(fn, types, cfg)
        if fn.__name__ not in ones:
            ints = [name for name, ty in sig.items() if ty == "i32"]
            ones[fn.__name__] = (fn, dict(sig, **{name: "constexpr" for name in ints}),
                                 dict(cx, **{name: 1 for name in ints}))
    return specs + list(ones.values())


def aot_attrs(fn, signature: dict) -> dict:
    """Divisibility-by-16 hints on every pointer and on d, as a launch with 16-byte aligned tensors
    and d % 16 == 0 gets (the vectorised-load path that runs at d = 576 and 2048)."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if signature[name].startswith("*") or (name in ("d", "d_a", "d_b") and signature[name] == "i32")}
