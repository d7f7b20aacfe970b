"""Compiled CUDA backend: the kernels of ``csrc/cuda`` (``binsparse_kernels._C_cuda``).

Same signatures and semantics as ``backends/reference.py``. The kernels are torch custom ops
``torch.ops.binsparse.cuda_*`` (registered when ``_C_cuda`` is imported); this module adds their
fake implementations, so they trace under ``torch.compile``, and maps their empty "not computed"
outputs back to ``None``.

What the kernels do (details in ``benchmarks/CUDA_NOTES.md``):

* encode: a GEMM tile loop (tensor cores for bf16/fp16, fp32 FMAs for fp32) whose epilogue adds
  the bias, subtracts theta or applies ReLU and keeps a running exact top-k per row, so the N x M
  pre-activations never reach global memory; latents are split across CTAs and the partial lists
  are merged by a second kernel. Among equal scores the lowest latent index wins; each row comes
  back sorted by decreasing value. k > 128 uses a chunked matmul + stable sort path.
* decode and backward: gathers with fp32 accumulators; weight gradients through a stable sort of
  the indices by latent, with large buckets cut into fixed segments; no atomics, so the results
  are bitwise reproducible.

The extension is built by ``setup.py`` when a CUDA toolkit is present. From a source checkout
without an installed build, ``BINSPARSE_CUDA_JIT=1`` compiles ``csrc/cuda`` on first use with
``torch.utils.cpp_extension.load`` instead.
"""

from __future__ import annotations

import glob
import os

import torch


def _load_extension():
    try:
        from .. import _C_cuda  # noqa: F401  (loads the shared library, which registers the ops)
        return
    except ImportError as exc:
        missing = exc
    if os.environ.get("BINSPARSE_CUDA_JIT") == "1":
        from torch.utils.cpp_extension import load

        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc", "cuda")
        sources = sorted(glob.glob(os.path.join(root, "*.cpp")) + glob.glob(os.path.join(root, "*.cu")))
        if not sources:
            raise ImportError(f"BINSPARSE_CUDA_JIT=1 but no CUDA sources under {os.path.normpath(root)}") from missing
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        load(name="binsparse_cuda_jit", sources=sources, extra_cflags=["-O3"],
             extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo"])
        return
    raise ImportError(
        "the CUDA backend needs the compiled extension binsparse_kernels._C_cuda, which is not built "
        f"({missing}). Build the package with a CUDA toolkit present (CUDA_HOME set, "
        "`pip install --no-build-isolation .`), or set BINSPARSE_CUDA_JIT=1 to compile csrc/cuda on first use."
    ) from missing


_load_extension()
_ops = torch.ops.binsparse

# Largest k of the fused encode kernel; larger k takes the chunked fallback (csrc/cuda/encode_forward.cu).
MAX_FUSED_K = 128


# ----------------------------------------------------------------------------------------------
# Fake (meta) implementations: output shapes and dtypes only.
# ----------------------------------------------------------------------------------------------


@torch.library.register_fake("binsparse::cuda_encode_forward")
def _(x, W_enc, b_enc, threshold, k, binary):
    N = x.shape[0]
    return x.new_empty(N, k, dtype=torch.float32), x.new_empty(N, k, dtype=torch.int64)


@torch.library.register_fake("binsparse::cuda_encode_backward")
def _(grad_acts, grad_values, values, x, W_enc, indices, mode, temperature, need_x, need_W, need_b):
    # A fresh empty tensor per skipped output: outputs must not alias each other.
    f32 = torch.float32
    return (x.new_empty(x.shape if need_x else 0, dtype=f32),
            W_enc.new_empty(W_enc.shape if need_W else 0, dtype=f32),
            W_enc.new_empty(W_enc.shape[0] if need_b else 0, dtype=f32))


@torch.library.register_fake("binsparse::cuda_decode_forward")
def _(indices, acts, W_dec, b_dec, binary):
    return acts.new_empty(acts.shape[0], W_dec.shape[1])


@torch.library.register_fake("binsparse::cuda_decode_backward")
def _(grad_y, indices, acts, W_dec, binary, need_acts, need_W):
    f32 = torch.float32
    return (acts.new_empty(acts.shape if need_acts else 0, dtype=f32),
            W_dec.new_empty(W_dec.shape if need_W else 0, dtype=f32))


# ----------------------------------------------------------------------------------------------
# The backend interface (see backends/__init__.py).
# ----------------------------------------------------------------------------------------------


def encode_forward(x, W_enc, b_enc, threshold, k: int, binary: bool):
    """``(values float32 [N,k], indices int64 [N,k])``: the top-k of each row of the scores."""
    return _ops.cuda_encode_forward(x, W_enc, b_enc, threshold if binary else None, k, binary)


def encode_backward(grad_acts, grad_values, values, x, W_enc, indices, mode: int, temperature: float,
                    need_x: bool, need_W: bool, need_b: bool):
    """``(grad_x, grad_W_enc, grad_b_enc)`` in float32, ``None`` where not needed."""
    gx, gW, gb = _ops.cuda_encode_backward(grad_acts, grad_values, values, x, W_enc, indices, mode,
                                           float(temperature), need_x, need_W, need_b)
    return gx if need_x else None, gW if need_W else None, gb if need_b else None


def decode_forward(indices, acts, W_dec, b_dec, binary: bool):
    """``b_dec + sum_j acts[:, j] * W_dec[indices[:, j]]`` in the dtype of ``acts``."""
    return _ops.cuda_decode_forward(indices, acts, W_dec, b_dec, binary)


def decode_backward(grad_y, indices, acts, W_dec, binary: bool, need_acts: bool, need_W: bool):
    """``(grad_acts float32 [N,k], grad_W_dec float32 [M,d_out])``, ``None`` where not needed."""
    ga, gW = _ops.cuda_decode_backward(grad_y, indices, acts, W_dec, binary, need_acts, need_W)
    return ga if need_acts else None, gW if need_W else None
