"""Times the compiled CPU backend against the plain-PyTorch reference backend.

    python benchmarks/bench_cpu_backend.py                 # N=4096, d=576, M=18432, k=32, float32
    python benchmarks/bench_cpu_backend.py --repeats 3 --N 1024

Five measurements per backend, each the median of ``--repeats`` timed runs after one warm-up:

* ``encode fwd``: backend.encode_forward (binary: top-k of x W_enc^T + b_enc - theta)
* ``decode fwd``: backend.decode_forward of the binary codes, with b_dec
* ``decode bwd``: backend.decode_backward, grad_acts and grad_W_dec
* ``encode bwd``: backend.encode_backward, sigmoid STE, grad_x, grad_W_enc and grad_b_enc
* ``full fwd+bwd``: topk_binary_encode + sparse_decode + MSE loss + backward through the public API,
  with every parameter (and x) requiring a gradient.

Prints a markdown table (medians in ms and the reference/cpu ratio) and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import binsparse_kernels as bk  # noqa: E402
from binsparse_kernels import backends  # noqa: E402
from binsparse_kernels.backends.reference import STE_MODES  # noqa: E402


def median_ms(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up (allocator, thread pool, first-touch of the weights)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


def make_inputs(N, d, M, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g).to(dtype)
    W_enc = torch.randn(M, d, generator=g) / math.sqrt(d)
    b_enc = torch.zeros(M)
    log_threshold = torch.full((M,), math.log(0.004))
    W_dec = W_enc / W_enc.norm(dim=1, keepdim=True)
    b_dec = torch.randn(d, generator=g) * 0.1
    grad_y = torch.randn(N, d, generator=g).to(dtype)
    return x, W_enc, b_enc, log_threshold, W_dec, b_dec, grad_y


def bench_backend(name, inputs, k, repeats):
    impl = backends.get(name, torch.device("cpu"))
    x, W_enc, b_enc, log_threshold, W_dec, b_dec, grad_y = inputs
    theta = log_threshold.exp()
    values, indices = impl.encode_forward(x, W_enc, b_enc, theta, k, True)
    acts = (values > 0).to(x.dtype)
    grad_acts = torch.randn(values.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    grad_values = torch.zeros_like(grad_acts)
    mode = STE_MODES["sigmoid"]

    def full():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, W_enc, b_enc, log_threshold, W_dec, b_dec)]
        xx, We, be, lt, Wd, bd = leaves
        out = bk.topk_binary_encode(xx, We, be, lt, k, backend=name)
        y = bk.sparse_decode(out.indices, out.acts, Wd, bd, binary=True, backend=name)
        loss = (y.float() - x.float()).pow(2).sum()
        loss.backward()

    cases = {
        "encode fwd": lambda: impl.encode_forward(x, W_enc, b_enc, theta, k, True),
        "decode fwd": lambda: impl.decode_forward(indices, acts, W_dec, b_dec, True),
        "decode bwd": lambda: impl.decode_backward(grad_y, indices, acts, W_dec, True, True, True),
        "encode bwd": lambda: impl.encode_backward(grad_acts, grad_values, values, x, W_enc, indices, mode, 2.0,
                                                   True, True, True),
        "full fwd+bwd": full,
    }
    results = {}
    for case, fn in cases.items():
        med, times = median_ms(fn, repeats)
        results[case] = {"median_ms": med, "times_ms": times}
        print(f"  {name:9s} {case:13s} {med:10.1f} ms", file=sys.stderr, flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--N", type=int, default=4096)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--M", type=int, default=18432)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default="reference,cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    names = args.backends.split(",")
    for name in names:
        reason = backends.unavailable_reason(name)
        if reason is not None:
            parser.error(reason)
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(args.N, args.d, args.M, args.k, dtype)
    results = {name: bench_backend(name, inputs, args.k, args.repeats) for name in names}

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\nN={args.N} d={args.d} M={args.M} k={args.k} {args.dtype}; torch {torch.__version__}; "
          f"{machine}; median of {args.repeats} runs\n")
    header = "| case | " + " | ".join(f"{n} (ms)" for n in names)
    if len(names) == 2:
        header += f" | {names[0]} / {names[1]}"
    print(header + " |")
    print("|" + "---|" * (header.count("|")))
    for case in results[names[0]]:
        meds = [results[n][case]["median_ms"] for n in names]
        row = f"| {case} | " + " | ".join(f"{m:.1f}" for m in meds)
        if len(names) == 2:
            row += f" | {meds[0] / meds[1]:.2f}x"
        print(row + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
