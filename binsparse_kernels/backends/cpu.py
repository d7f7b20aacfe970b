"""Compiled CPU backend: the C++ kernels of ``csrc/cpu`` (``binsparse_kernels._C``).

Same signatures and semantics as ``backends/reference.py``. The kernels are torch custom ops
``torch.ops.binsparse.cpu_*`` (registered when ``_C`` is imported); this module adds their fake
implementations, so they trace under ``torch.compile``, and maps their empty "not computed"
outputs back to ``None``.

What the kernels do differently from the reference (same results up to fp32 summation order):

* encode: the GEMM runs over chunks of 4096 latents into a bounded fp32 scratch, and each chunk is
  merged into a running exact top-k per row, so the N x M pre-activations never exist. Among equal
  scores the lowest latent index wins; each row comes back sorted by decreasing value.
* backward and decode: gathers with fp32 accumulators, parallel over tokens; weight gradients
  through a stable counting sort of the indices by latent, one latent row per task, no atomics, so
  the results are bitwise reproducible.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the shared library, which registers the ops)

_ops = torch.ops.binsparse


# ----------------------------------------------------------------------------------------------
# Fake (meta) implementations: output shapes and dtypes only.
# ----------------------------------------------------------------------------------------------


@torch.library.register_fake("binsparse::cpu_encode_forward")
def _(x, W_enc, b_enc, threshold, k, binary):
    N = x.shape[0]
    return x.new_empty(N, k, dtype=torch.float32), x.new_empty(N, k, dtype=torch.int64)


@torch.library.register_fake("binsparse::cpu_encode_backward")
def _(grad_acts, grad_values, values, x, W_enc, indices, mode, temperature, need_x, need_W, need_b):
    # A fresh empty tensor per skipped output: outputs must not alias each other.
    f32 = torch.float32
    return (x.new_empty(x.shape if need_x else 0, dtype=f32),
            W_enc.new_empty(W_enc.shape if need_W else 0, dtype=f32),
            W_enc.new_empty(W_enc.shape[0] if need_b else 0, dtype=f32))


@torch.library.register_fake("binsparse::cpu_decode_forward")
def _(indices, acts, W_dec, b_dec, binary):
    return acts.new_empty(acts.shape[0], W_dec.shape[1])


@torch.library.register_fake("binsparse::cpu_decode_backward")
def _(grad_y, indices, acts, W_dec, binary, need_acts, need_W):
    f32 = torch.float32
    return (acts.new_empty(acts.shape if need_acts else 0, dtype=f32),
            W_dec.new_empty(W_dec.shape if need_W else 0, dtype=f32))


# ----------------------------------------------------------------------------------------------
# The backend interface (see backends/__init__.py).
# ----------------------------------------------------------------------------------------------


def encode_forward(x, W_enc, b_enc, threshold, k: int, binary: bool):
    """``(values float32 [N,k], indices int64 [N,k])``: the top-k of each row of the scores."""
    return _ops.cpu_encode_forward(x, W_enc, b_enc, threshold if binary else None, k, binary)


def encode_backward(grad_acts, grad_values, values, x, W_enc, indices, mode: int, temperature: float,
                    need_x: bool, need_W: bool, need_b: bool):
    """``(grad_x, grad_W_enc, grad_b_enc)`` in float32, ``None`` where not needed."""
    gx, gW, gb = _ops.cpu_encode_backward(grad_acts, grad_values, values, x, W_enc, indices, mode,
                                          float(temperature), need_x, need_W, need_b)
    return gx if need_x else None, gW if need_W else None, gb if need_b else None


def decode_forward(indices, acts, W_dec, b_dec, binary: bool):
    """``b_dec + sum_j acts[:, j] * W_dec[indices[:, j]]`` in the dtype of ``acts``."""
    return _ops.cpu_decode_forward(indices, acts, W_dec, b_dec, binary)


def decode_backward(grad_y, indices, acts, W_dec, binary: bool, need_acts: bool, need_W: bool):
    """``(grad_acts float32 [N,k], grad_W_dec float32 [M,d_out])``, ``None`` where not needed."""
    ga, gW = _ops.cpu_decode_backward(grad_y, indices, acts, W_dec, binary, need_acts, need_W)
    return ga if need_acts else None, gW if need_W else None
