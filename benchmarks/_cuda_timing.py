"""CUDA-event timing shared by the per-backend GPU benchmark scripts in this folder."""

from __future__ import annotations

import statistics

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
