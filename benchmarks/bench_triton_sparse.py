"""Times the Triton sparse decode and backward kernels against their baselines (needs a GPU).

    python benchmarks/bench_triton_sparse.py                      # N=16384, k=32, bf16, 4 shapes
    python benchmarks/bench_triton_sparse.py --shapes 576x36864 --repeats 50 --json triton_sparse.json

Shapes are d x M (d_in = d_out = d); default d in {576, 2048} x M in {36864, 131072}. Indices are
uniform random latents per token (``--hot`` adds a latent firing on that fraction of tokens, 0.5
by default, as a second case: the backward's long tail). Every figure is the median of
``--repeats`` runs, each between its own pair of CUDA events, after ``--warmup`` untimed runs.

Measured per shape (W_dec is float32 masters rounded to bf16 in the kernel, as in training, and
also a bf16 copy, the bytes ``F.embedding_bag`` reads):

* decode: ``triton decode`` (binary, b_dec) with fp32 and with bf16 weights; ``embedding_bag``
  (``F.embedding_bag(indices, W_dec_bf16, per_sample_weights=acts, mode="sum") + b_dec``); the
  ``cuda`` backend's decode if built. ``GB/s`` = bytes the decode must move (gathered rows of the
  nonzero acts, the output, indices and acts) / time, and ``% copy`` of the measured device-to-
  device copy bandwidth (target: >= 70%, and faster than embedding_bag).
* backward: ``triton decode bwd`` (grad_acts + grad_W_dec), ``triton encode bwd`` (sigmoid STE,
  grad_W_enc + grad_b_enc, no grad_x), their sum, against ``index_add bwd``: the reference
  trainer's gather-dot for grad_acts plus ``index_add_`` of ``[N*k, d]`` products into float32
  grad_W_dec and grad_W_enc; and the ``cuda`` backend's pair if built. ``coder bwd``: the same
  gradients from one ``coder_backward`` call (one index transpose; the decoder's grad_acts computed
  latent by latent and fed to the STE). Also once per shape: bitwise
  reproducibility of the Triton backward and its agreement with backends/reference.py.

Prints tables and writes JSON (device, versions, every timing) with ``--json``.
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
from binsparse_kernels.backends import reference  # noqa: E402
from binsparse_kernels.backends.triton import sparse  # noqa: E402


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    a = torch.empty(nbytes // 4, device="cuda")
    b = torch.empty_like(a)
    t = time_ms(lambda: b.copy_(a), 20, 3)["median_ms"]
    return 2 * nbytes / (t * 1e-3)


def make_codes(N, M, k, hot: float, g):
    indices = torch.randint(0, M, (N, k), device="cuda", generator=g)
    if hot > 0:
        rows = torch.rand(N, device="cuda", generator=g) < hot
        indices[rows, 0] = 7
        indices[~rows & (indices[:, 0] == 7), 0] = 8
    return indices


def check(N, d, M, k, dtype, indices, acts, W_dec, x, W_enc, grad_y, values, g):
    """Agreement with the reference and bitwise reproducibility of the Triton backward."""
    out = {}
    ref = reference.decode_backward(grad_y, indices, acts, W_dec, True, True, True)
    got = sparse.decode_backward(grad_y, indices, acts, W_dec, True, True, True)
    again = sparse.decode_backward(grad_y, indices, acts, W_dec, True, True, True)
    out["decode bwd max abs err"] = [float((a - r).abs().max()) for a, r in zip(got, ref)]
    out["decode bwd bitwise"] = all(torch.equal(a, b) for a, b in zip(got, again))
    ref = reference.encode_backward(g, g, values, x, W_enc, indices, 1, 2.0, False, True, True)[1:]
    got = sparse.encode_backward(g, g, values, x, W_enc, indices, 1, 2.0, False, True, True)[1:]
    again = sparse.encode_backward(g, g, values, x, W_enc, indices, 1, 2.0, False, True, True)[1:]
    out["encode bwd max abs err"] = [float((a - r).abs().max()) for a, r in zip(got, ref)]
    out["encode bwd bitwise"] = all(torch.equal(a, b) for a, b in zip(got, again))
    y_ref = reference.decode_forward(indices, acts, W_dec, None, True).float()
    out["decode max abs err"] = float((sparse.decode_forward(indices, acts, W_dec, None, True).float() - y_ref)
                                      .abs().max())
    return out


def bench_shape(d, M, args, dtype, hot, with_cuda):
    N, k, R, Wu = args.N, args.k, args.repeats, args.warmup
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, d, device="cuda", generator=g).to(dtype)
    W_enc = torch.randn(M, d, device="cuda", generator=g) / math.sqrt(d)
    W_dec = W_enc / W_enc.norm(dim=1, keepdim=True)
    W_dec_c = W_dec.to(dtype)
    b_dec = torch.randn(d, device="cuda", generator=g) * 0.1
    grad_y = torch.randn(N, d, device="cuda", generator=g).to(dtype)
    indices = make_codes(N, M, k, hot, g)
    acts = (torch.rand(N, k, device="cuda", generator=g) < 0.9).to(dtype)  # most selected z > 0
    values = torch.randn(N, k, device="cuda", generator=g)
    gz = torch.randn(N, k, device="cuda", generator=g)
    elem = torch.finfo(dtype).bits // 8
    nnz = int((acts != 0).sum())
    out = {"nnz": nnz}

    def decode_bytes(w_elem):
        return nnz * d * w_elem + N * d * elem + N * k * (8 + elem)

    def rec(name, fn, nbytes=None):
        t = time_ms(fn, R, Wu)
        if nbytes is not None:
            t["GB/s"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
        out[name] = t

    rec("triton decode (W fp32)", lambda: sparse.decode_forward(indices, acts, W_dec, b_dec, True), decode_bytes(4))
    rec(f"triton decode (W {args.dtype})", lambda: sparse.decode_forward(indices, acts, W_dec_c, b_dec, True),
        decode_bytes(elem))
    b_dec_c = b_dec.to(dtype)
    rec("embedding_bag", lambda: F.embedding_bag(indices, W_dec_c, per_sample_weights=acts, mode="sum") + b_dec_c,
        decode_bytes(elem))
    if with_cuda:
        from binsparse_kernels.backends import cuda
        rec("cuda decode (W fp32)", lambda: cuda.decode_forward(indices, acts, W_dec, b_dec, True), decode_bytes(4))
    rec("index_add bwd", lambda: index_add_backward(grad_y, x, indices, acts, gz, W_dec_c, M))
    rec("triton decode bwd", lambda: sparse.decode_backward(grad_y, indices, acts, W_dec, True, True, True))
    rec("triton encode bwd", lambda: sparse.encode_backward(gz, gz, values, x, W_enc, indices, 1, 2.0, False, True,
                                                            True))
    rec("triton bwd total", lambda: (sparse.decode_backward(grad_y, indices, acts, W_dec, True, True, True),
                                     sparse.encode_backward(gz, gz, values, x, W_enc, indices, 1, 2.0, False, True,
                                                            True)))
    # the same gradients in one call: one index transpose, grad_acts latent by latent fused with the STE
    rec("triton coder bwd", lambda: sparse.coder_backward(grad_y, gz, gz, indices, acts, values, x, W_enc, W_dec,
                                                          True, 1, 2.0, False, True, True, True))
    if with_cuda:
        from binsparse_kernels.backends import cuda
        rec("cuda bwd total", lambda: (cuda.decode_backward(grad_y, indices, acts, W_dec, True, True, True),
                                       cuda.encode_backward(gz, gz, values, x, W_enc, indices, 1, 2.0, False, True,
                                                            True)))
        rec("cuda coder bwd", lambda: cuda.coder_backward(grad_y, gz, gz, indices, acts, values, x, W_enc, W_dec,
                                                          True, 1, 2.0, False, True, True, True))
    b = sparse._Buckets(indices, M, sparse.SEGMENT)
    rec("csr transpose (sort + bounds)", lambda: sparse._Buckets(indices, M, sparse.SEGMENT))
    out["largest bucket"] = int((b.offsets[1:] - b.offsets[:-1]).max())
    if not args.no_check:
        out["check"] = check(N, d, M, k, dtype, indices, acts, W_dec, x, W_enc, grad_y, values, gz)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="576x36864,576x131072,2048x36864,2048x131072", help="d x M, comma-separated")
    parser.add_argument("--N", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--hot", type=float, default=0.5, help="fraction of tokens of the hot-latent case (0: skip)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-check", action="store_true", help="skip the reference / determinism check")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton_sparse.py needs a CUDA GPU", file=sys.stderr)
        return 2
    os.environ.setdefault("BINSPARSE_CHECK_VALUES", "0")
    dtype = DTYPES[args.dtype]
    with_cuda = "cuda" in bk.available_backends()
    bw = copy_bandwidth()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "triton": __import__("triton").__version__, "N": args.N, "k": args.k, "dtype": args.dtype,
               "repeats": args.repeats, "copy_GBps": bw / 1e9, "segment": sparse.SEGMENT, "cases": {}}
    print(f"{results['device']}: copy bandwidth {bw / 1e9:.0f} GB/s; N={args.N} k={args.k} {args.dtype}")
    for shape in args.shapes.split(","):
        d, M = (int(s) for s in shape.lower().split("x"))
        for hot in ([0.0, args.hot] if args.hot > 0 else [0.0]):
            name = f"{shape}" + (f" hot={hot}" if hot else "")
            res = bench_shape(d, M, args, dtype, hot, with_cuda)
            results["cases"][name] = res
            print(f"\nd={d} M={M}{' hot latent on ' + str(hot) + ' of tokens' if hot else ''}"
                  f" (largest bucket {res['largest bucket']})")
            print(f"| {'measure':<30} | median ms | GB/s  | % copy |")
            print(f"|{'-' * 32}|-----------|-------|--------|")
            for key, t in res.items():
                if isinstance(t, dict) and "median_ms" in t:
                    gbs = t.get("GB/s")
                    extra = f"{gbs:5.0f} | {100 * gbs * 1e9 / bw:5.1f}%" if gbs else "      |       "
                    print(f"| {key:<30} | {t['median_ms']:9.3f} | {extra} |")
            ia = res["index_add bwd"]["median_ms"]
            print(f"index_add bwd / triton bwd total = {ia / res['triton bwd total']['median_ms']:.2f}x; "
                  f"embedding_bag / triton decode ({args.dtype} W) = "
                  f"{res['embedding_bag']['median_ms'] / res[f'triton decode (W {args.dtype})']['median_ms']:.2f}x")
            if "check" in res:
                print("check:", res["check"])
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
