"""Times the CUDA backend against the Triton backend and plain-PyTorch baselines (needs a GPU).

    python benchmarks/bench_cuda.py                                  # N=16384, k=32, bf16, both shapes
    python benchmarks/bench_cuda.py --shapes 576x36864 --repeats 50 --json cuda.json

Shapes are d x M (d_in = d_out = d). Every figure is the median of ``--repeats`` runs, each timed
with its own pair of CUDA events after ``--warmup`` untimed runs. Measured per shape:

* ``gemm``: the bare encoder GEMM ``F.linear(x, W_enc)`` in the compute dtype (the floor of the encode).
* ``linear+topk``: ``F.linear`` + ``torch.topk`` (binary: theta subtracted in float32, as the
  reference trainer does), the unfused encode.
* ``embedding_bag``: ``F.embedding_bag(indices, W_dec, per_sample_weights=acts, mode="sum")``, the
  usual decode.
* ``index_add bwd``: the reference trainer's sparse backward: gather-dot for the latent gradients,
  then ``[N*k, d]`` products ``index_add_``-ed into float32 weight gradients (decoder and encoder),
  in chunks of 4096 tokens.
* ``cuda encode sm80`` / ``cuda encode sm90``: the CUDA backend's encode with each fused kernel forced
  (``BINSPARSE_CUDA_ENCODE``; sm90 only on compute capability 9.0), side by side with ``gemm``.
* per backend (``cuda``, ``triton`` where available): ``encode`` (binary top-k), ``decode`` (binary
  with b_dec), ``decode bwd`` (grad_acts + grad_W_dec), ``encode bwd`` (sigmoid STE, grad_W_enc +
  grad_b_enc, no grad_x), and ``step`` = encode + decode + MSE + backward through the public API.

Prints a table and writes JSON (device, versions, every timing) with ``--json``.
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

from _gpu_common import DTYPES, index_add_backward, time_ms  # noqa: E402  (this folder)

import binsparse_kernels as bk  # noqa: E402
from binsparse_kernels import backends  # noqa: E402


def make_inputs(N, d, M, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    c = dict(device="cuda", generator=g)
    x = torch.randn(N, d, **c).to(dtype)
    W_enc = torch.randn(M, d, **c) / math.sqrt(d)  # float32 masters, rounded to dtype by every impl
    b_enc = torch.zeros(M, device="cuda")
    log_threshold = torch.full((M,), math.log(0.004), device="cuda")
    W_dec = W_enc / W_enc.norm(dim=1, keepdim=True)
    b_dec = torch.randn(d, **c) * 0.1
    grad_y = torch.randn(N, d, **c).to(dtype)
    return x, W_enc, b_enc, log_threshold, W_dec, b_dec, grad_y


def bench_shape(d, M, args, dtype, names):
    N, k, R, W = args.N, args.k, args.repeats, args.warmup
    x, W_enc, b_enc, log_threshold, W_dec, b_dec, grad_y = make_inputs(N, d, M, k, dtype)
    theta = log_threshold.exp()
    W_enc_c, W_dec_c = W_enc.to(dtype), W_dec.to(dtype)
    out = {}
    out["gemm"] = time_ms(lambda: F.linear(x, W_enc_c), R, W)

    def linear_topk():
        pre = F.linear(x, W_enc_c, b_enc.to(dtype))
        return (pre - theta).topk(k, dim=1, sorted=False)

    out["linear+topk"] = time_ms(linear_topk, R, W)
    values, indices = linear_topk()
    acts = (values > 0).to(dtype)
    out["embedding_bag"] = time_ms(
        lambda: F.embedding_bag(indices, W_dec_c, per_sample_weights=acts, mode="sum") + b_dec.to(dtype), R, W)
    grad_z = torch.randn(N, k, device="cuda")
    out["index_add bwd"] = time_ms(lambda: index_add_backward(grad_y, x, indices, acts, grad_z, W_dec_c, M), R, W)

    for name in names:
        impl = backends.get(name, x.device)
        pre = f"{name} "
        out[pre + "encode"] = time_ms(lambda: impl.encode_forward(x, W_enc, b_enc, theta, k, True), R, W)
        v, i = impl.encode_forward(x, W_enc, b_enc, theta, k, True)
        a = (v > 0).to(dtype)
        out[pre + "decode"] = time_ms(lambda: impl.decode_forward(i, a, W_dec, b_dec, True), R, W)
        out[pre + "decode bwd"] = time_ms(lambda: impl.decode_backward(grad_y, i, a, W_dec, True, True, True), R, W)
        g = torch.randn(N, k, device="cuda")
        out[pre + "encode bwd"] = time_ms(
            lambda: impl.encode_backward(g, g, v, x, W_enc, i, 1, 2.0, False, True, True), R, W)
        leaves = [t.detach().clone().requires_grad_(True) for t in (W_enc, b_enc, log_threshold, W_dec, b_dec)]

        def step():
            enc = bk.topk_binary_encode(x, *leaves[:3], k, backend=name)
            y = bk.sparse_decode(enc.indices, enc.acts, leaves[3], leaves[4], binary=True, backend=name)
            loss = (y.float() - x.float()).pow(2).mean()
            torch.autograd.grad(loss, leaves)

        out[pre + "step"] = time_ms(step, R, W)

    if "cuda" in names:  # each fused encode kernel of the CUDA backend, forced
        impl = backends.get("cuda", x.device)
        kernels = ["sm80"] + (["sm90"] if torch.cuda.get_device_capability() == (9, 0) else [])
        for kernel in kernels:
            previous = os.environ.get("BINSPARSE_CUDA_ENCODE")
            os.environ["BINSPARSE_CUDA_ENCODE"] = kernel
            try:
                out[f"cuda encode {kernel}"] = time_ms(
                    lambda: impl.encode_forward(x, W_enc_c, b_enc, theta, k, True), R, W)
            finally:
                if previous is None:
                    del os.environ["BINSPARSE_CUDA_ENCODE"]
                else:
                    os.environ["BINSPARSE_CUDA_ENCODE"] = previous
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="576x36864,2048x131072", help="comma-separated d x M")
    parser.add_argument("--N", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backends", default="cuda,triton", help="package backends to time, where available")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda.py needs a CUDA GPU", file=sys.stderr)
        return 2
    # Checks that read tensor data sync the device; a training loop would turn them off too.
    os.environ.setdefault("BINSPARSE_CHECK_VALUES", "0")
    dtype = DTYPES[args.dtype]
    available = bk.available_backends()
    names = [n for n in args.backends.split(",") if n]
    for n in names:
        if n not in available:
            print(f"skipping backend {n!r}: {backends.unavailable_reason(n)}", file=sys.stderr)
    names = [n for n in names if n in available]
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "N": args.N, "k": args.k, "dtype": args.dtype, "repeats": args.repeats,
        "shapes": {},
    }
    for shape in args.shapes.split(","):
        d, M = (int(s) for s in shape.lower().split("x"))
        res = bench_shape(d, M, args, dtype, names)
        results["shapes"][shape] = res
        print(f"\nd={d} M={M} N={args.N} k={args.k} {args.dtype} on {results['device']}")
        print(f"| {'measure':<22} | median ms | vs gemm |")
        print(f"|{'-' * 24}|-----------|---------|")
        gemm = res["gemm"]["median_ms"]
        for name, t in res.items():
            print(f"| {name:<22} | {t['median_ms']:9.3f} | {t['median_ms'] / gemm:7.2f} |")
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
