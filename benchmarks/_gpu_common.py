"""Shared by the per-backend GPU benchmark scripts in this folder: the CUDA-event timer and the
reference trainer's ``index_add_`` backward, the baseline the sparse backward kernels are compared with."""

from __future__ import annotations

import statistics

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHUNK = 4096  # tokens per chunk of the index_add baseline's [chunk*k, d] products


def time_ms(fn, repeats: int, warmup: int) -> dict:
    """Median and minimum of ``repeats`` runs of ``fn`` (ms), each between its own pair of CUDA
    events, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times}


def index_add_backward(grad_y, x, indices, acts, grad_z, W_dec_c, M):
    """The reference trainer's sparse backward (gather-dot + index_add_ of [N*k, d] products)."""
    N, k = indices.shape
    d = grad_y.shape[1]
    grad_W_dec = torch.zeros(M, d, device="cuda")
    grad_W_enc = torch.zeros(M, x.shape[1], device="cuda")
    grad_acts = torch.empty(N, k, device="cuda")
    for s in range(0, N, CHUNK):
        e = min(N, s + CHUNK)
        idx, g = indices[s:e], grad_y[s:e]
        grad_acts[s:e] = torch.einsum("nkd,nd->nk", W_dec_c[idx].float(), g.float())
        rows = (acts[s:e, :, None].float() * g[:, None, :].float()).reshape(-1, d)
        grad_W_dec.index_add_(0, idx.reshape(-1), rows)
        rows = (grad_z[s:e, :, None] * x[s:e, None, :].float()).reshape(-1, x.shape[1])
        grad_W_enc.index_add_(0, idx.reshape(-1), rows)
    return grad_acts, grad_W_dec, grad_W_enc
