"""Times the compiled CPU backend against the plain-PyTorch reference backend.

    python benchmarks/bench_cpu_backend.py                 # N=4096, d=576, M=18432, k=32, float32
    python benchmarks/bench_cpu_backend.py --repeats 3 --N 1024 --coder continuous

Seven measurements per backend, each the median of ``--repeats`` timed runs after one warm-up, the
backends taking turns run by run (the machine may be shared; both see the same load):

* ``encode fwd``: backend.encode_forward (binary: top-k of x W_enc^T + b_enc - theta)
* ``decode fwd``: backend.decode_forward of the codes, with b_dec
* ``decode bwd``: backend.decode_backward, grad_acts and grad_W_dec
* ``encode bwd``: backend.encode_backward (sigmoid STE for binary codes), grad_x, grad_W_enc, grad_b_enc
* ``coder bwd``: backend.coder_backward, the two above in one call (one index transpose, the
  decoder's grad_acts fed to the STE without a round trip)
* ``full fwd+bwd``: encode + sparse_decode + MSE loss + backward through the public API, with every
  parameter (and x) requiring a gradient.
* ``fused fwd+bwd``: the same with ``topk_*_encode_decode`` (what SparseCoder runs).

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


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median wall time (ms) of each callable. The callables run in turn, repeat after repeat, so
    every backend sees the same background load on a shared machine."""
    for fn in fns.values():
        fn()  # warm-up (allocator, thread pool, first touch of the weights)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(t), "times_ms": t} for name, t in times.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def backend_cases(name, inputs, k, binary):
    """The seven timed callables for one backend."""
    impl = backends.get(name, torch.device("cpu"))
    x, W_enc, b_enc, log_threshold, W_dec, b_dec, grad_y = inputs
    theta = log_threshold.exp() if binary else None
    values, indices = impl.encode_forward(x, W_enc, b_enc, theta, k, binary)
    acts = (values > 0).to(x.dtype) if binary else values.to(x.dtype)
    grad_acts = torch.randn(values.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    grad_values = torch.zeros_like(grad_acts)
    mode = STE_MODES["sigmoid" if binary else "relu"]

    def full():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, W_enc, b_enc, log_threshold, W_dec, b_dec)]
        xx, We, be, lt, Wd, bd = leaves
        if binary:
            out = bk.topk_binary_encode(xx, We, be, lt, k, backend=name)
        else:
            out = bk.topk_encode(xx, We, be, k, backend=name)
        y = bk.sparse_decode(out.indices, out.acts, Wd, bd, binary=binary, backend=name)
        loss = (y.float() - x.float()).pow(2).sum()
        loss.backward()

    def fused():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, W_enc, b_enc, log_threshold, W_dec, b_dec)]
        xx, We, be, lt, Wd, bd = leaves
        if binary:
            y = bk.topk_binary_encode_decode(xx, We, be, lt, Wd, bd, k, backend=name).y
        else:
            y = bk.topk_encode_decode(xx, We, be, Wd, bd, k, backend=name).y
        loss = (y.float() - x.float()).pow(2).sum()
        loss.backward()

    return {
        "encode fwd": lambda: impl.encode_forward(x, W_enc, b_enc, theta, k, binary),
        "decode fwd": lambda: impl.decode_forward(indices, acts, W_dec, b_dec, binary),
        "decode bwd": lambda: impl.decode_backward(grad_y, indices, acts, W_dec, binary, True, True),
        "encode bwd": lambda: impl.encode_backward(grad_acts, grad_values, values, x, W_enc, indices, mode, 2.0,
                                                   True, True, True),
        "coder bwd": lambda: impl.coder_backward(grad_y, grad_acts, grad_values, indices, acts, values, x, W_enc,
                                                 W_dec, binary, mode, 2.0, True, True, True, True),
        "full fwd+bwd": full,
        "fused fwd+bwd": fused,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--N", type=int, default=4096)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--M", type=int, default=18432)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--coder", choices=["binary", "continuous"], default="binary")
    parser.add_argument("--repeats", type=int, default=7)
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
    binary = args.coder == "binary"
    cases = {name: backend_cases(name, inputs, args.k, binary) for name in names}
    results = {name: {} for name in names}
    for case in cases[names[0]]:
        timed = interleaved_medians({name: cases[name][case] for name in names}, args.repeats)
        for name in names:
            results[name][case] = timed[name]
        print("  " + case + ": " + ", ".join(f"{n} {timed[n]['median_ms']:.1f} ms" for n in names),
              file=sys.stderr, flush=True)
    # Context: the dense GEMM that every encode pays (fp32, as both backends compute it).
    x, W_enc = inputs[0].float(), inputs[1].to(dtype).float()
    gemm = interleaved_medians({"gemm": lambda: x @ W_enc.T}, args.repeats)["gemm"]["median_ms"]

    machine = f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"\n{args.coder} coder, N={args.N} d={args.d} M={args.M} k={args.k} {args.dtype}; "
          f"torch {torch.__version__}; {machine}; median of {args.repeats} interleaved runs\n")
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
    print(f"\ncontext: the bare fp32 GEMM x @ W_enc.T ({args.N} x {args.M}) takes {gemm:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "machine": machine, "gemm_ms": gemm,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
