"""Times the Triton fused encode forward against the bare GEMM and the unfused encode (needs a GPU).

    python benchmarks/bench_triton_encode.py                          # N=16384, k=32, bf16, both shapes
    python benchmarks/bench_triton_encode.py --shapes 576x36864 --k 32 64 128 --repeats 50 --json out.json

Shapes are d x M. Every figure is the median of ``--repeats`` runs, each timed with its own pair of CUDA
events after ``--warmup`` untimed runs. Measured per (shape, k):

* ``gemm``: the bare encoder GEMM ``x @ W_enc.T`` in the compute dtype (cuBLAS; the floor of the encode).
* ``linear+topk``: ``F.linear(x, W, b)`` then ``torch.topk`` (binary: theta subtracted in float32, as the
  reference trainer does): the unfused encode that materialises N x M.
* ``topk``: ``torch.topk`` alone on a precomputed N x M float32 score matrix (kernel-design-notes §11.1).
* ``triton``: ``backends.triton.encode.encode_forward`` (binary), and its two kernels separately
  (``triton partial`` = GEMM + gated running top-k, ``triton partial ungated`` = every tile sorted,
  ``triton merge``); ``triton fp32 W (cast reused)`` with fp32 weights (the cast to bf16 made once and
  reused while W is unchanged) and ``cast W to x dtype`` (what a cast per call would add).
* ``cuda``: the CUDA backend's ``encode_forward`` where it is built.

Prints a table with the ratios the issue asks for (triton / gemm, linear+topk / triton) and, with
``--check``, verifies the Triton result against torch by value first. Writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _gpu_common import DTYPES, time_ms  # noqa: E402  (this folder)

from binsparse_kernels import backends  # noqa: E402
from binsparse_kernels.backends.triton import encode as tenc  # noqa: E402


def make_inputs(N, d, M, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, d, device="cuda", generator=g).to(dtype)
    W = torch.randn(M, d, device="cuda", generator=g) / math.sqrt(d)
    b = torch.randn(M, device="cuda", generator=g) * 0.01
    theta = torch.full((M,), 0.004, device="cuda")
    return x, W, b, theta


def check(x, W, b, theta, k):
    values, indices = tenc.encode_forward(x, W, b, theta, k, True)
    z = (x.float() @ W.to(x.dtype).float().T + b) - theta
    picked = z.gather(1, indices)
    kth = z.topk(k, 1).values[:, -1:]
    ok = (bool(torch.allclose(values, picked, atol=1e-2, rtol=1e-2))
          and bool((picked >= kth - 1e-2 * (1 + kth.abs())).all())
          and bool((indices.sort(1).values.diff(dim=1) != 0).all()))
    del z
    return ok


def bench_shape(N, d, M, k, dtype, repeats, warmup, do_check):
    x, W, b, theta = make_inputs(N, d, M, dtype)
    Wc = W.to(dtype)
    row = {"N": N, "d": d, "M": M, "k": k, "dtype": str(dtype).replace("torch.", "")}
    if do_check:
        row["check_ok"] = check(x, W, b, theta, k)
    res = {}
    res["gemm"] = time_ms(lambda: x @ Wc.T, repeats, warmup)

    def unfused():
        pre = F.linear(x, Wc, b.to(dtype))
        return torch.topk(pre.float() - theta, k, dim=1, sorted=False)

    res["linear+topk"] = time_ms(unfused, repeats, warmup)
    scores = (x @ Wc.T).float()
    res["topk"] = time_ms(lambda: torch.topk(scores, k, dim=1, sorted=False), repeats, warmup)
    del scores
    torch.cuda.empty_cache()
    res["triton"] = time_ms(lambda: tenc.encode_forward(x, Wc, b, theta, k, True), repeats, warmup)
    # the training set-up: fp32 weights, bf16 x; the cast is reused while W is unchanged (one per
    # optimizer step), against the cast every call would cost
    res["triton fp32 W (cast reused)"] = time_ms(lambda: tenc.encode_forward(x, W, b, theta, k, True), repeats, warmup)
    res["cast W to x dtype"] = time_ms(lambda: W.to(dtype), repeats, warmup)
    if k <= tenc.MAX_FUSED_K:
        res.update(bench_triton_parts(x, Wc, b, theta, k, repeats, warmup))
    if backends.unavailable_reason("cuda") is None:
        from binsparse_kernels.backends import cuda

        res["cuda"] = time_ms(lambda: cuda.encode_forward(x, Wc, b, theta, k, True), repeats, warmup)
    row["times"] = res
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tenc.encode_forward(x, Wc, b, theta, k, True)
    torch.cuda.synchronize()
    row["triton_peak_extra_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def bench_triton_parts(x, W, b, theta, k, repeats, warmup):
    """The partial (GEMM + gated running top-k) and merge kernels timed alone, with the wrapper's
    launch, and the ungated partial kernel (every tile sorted) for the gate's A/B."""
    N, D = x.shape
    M = W.shape[0]
    kp = tenc._kp(k)
    cfg = tenc._config(x.dtype, kp, tenc._arch(x.device), N)
    per_chunk, n_chunks = tenc._n_chunks(N, M, D, x.element_size(), cfg.BLOCK_N, cfg.BLOCK_M, x.device)
    keys = torch.empty(N, n_chunks, kp, dtype=torch.int64, device="cuda")
    values = torch.empty(N, k, dtype=torch.float32, device="cuda")
    indices = torch.empty(N, k, dtype=torch.int64, device="cuda")
    out = {}
    for name, gate in (("triton partial", True), ("triton partial ungated", False)):
        out[name] = time_ms(lambda: tenc._launch_partial(x, W, b, theta, keys, k, True, cfg, per_chunk, n_chunks,
                                                         gate), repeats, warmup)
    out["triton merge"] = time_ms(lambda: tenc._launch_merge(keys, values, indices, k), repeats, warmup)
    out["triton partial"]["config"] = {**cfg.__dict__, "KP": kp, "n_chunks": n_chunks, "tiles_per_chunk": per_chunk}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--k", type=int, nargs="+", default=[32])
    ap.add_argument("--shapes", nargs="+", default=["576x36864", "2048x131072"], help="d x M")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--check", action="store_true", help="verify the Triton selection by value first")
    ap.add_argument("--json", help="write all rows to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_triton_encode.py needs a CUDA GPU")
    dtype = DTYPES[args.dtype]
    rows = []
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {__import__('triton').__version__}")
    header = (f"{'shape':>14} {'k':>4} | {'gemm':>8} {'lin+topk':>9} {'topk':>8} {'triton':>8} {'partial':>8} "
              f"{'merge':>7} {'cuda':>8} | {'tri/gemm':>8} {'unfused/tri':>11} {'extra MB':>9}")
    print(header)
    for shape in args.shapes:
        d, M = (int(v) for v in shape.lower().split("x"))
        for k in args.k:
            row = bench_shape(args.N, d, M, k, dtype, args.repeats, args.warmup, args.check)
            rows.append(row)
            t = {name: v["median_ms"] for name, v in row["times"].items()}
            fmt = lambda name: f"{t[name]:8.3f}" if name in t else f"{'-':>8}"  # noqa: E731
            print(f"{shape:>14} {k:>4} | {fmt('gemm')} {t['linear+topk']:9.3f} {fmt('topk')} {fmt('triton')} "
                  f"{fmt('triton partial')} {t.get('triton merge', float('nan')):7.3f} {fmt('cuda')} | "
                  f"{t['triton'] / t['gemm']:8.2f} {t['linear+topk'] / t['triton']:11.2f} "
                  f"{row['triton_peak_extra_MB']:9.1f}" + ("" if row.get("check_ok", True) else "  CHECK FAILED"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": __import__("triton").__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
