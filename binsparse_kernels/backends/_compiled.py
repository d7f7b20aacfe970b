"""The Python side shared by the compiled backends (``cpu`` and ``cuda``).

Their kernels are torch custom ops ``torch.ops.binsparse.<prefix>_{encode,decode}_{forward,backward}``
and ``<prefix>_coder_backward``, with one schema. ``bind(prefix)`` registers the ops' fake
implementations (so they trace under ``torch.compile``) and returns the five backend functions,
which map the kernels' empty "not computed" outputs back to ``None``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

_F32 = torch.float32


def _register_fakes(prefix: str) -> None:
    def encode_forward(x, W_enc, b_enc, threshold, k, binary):
        N = x.shape[0]
        return x.new_empty(N, k, dtype=_F32), x.new_empty(N, k, dtype=torch.int64)

    def encode_backward(grad_acts, grad_values, values, x, W_enc, indices, mode, temperature, need_x, need_W, need_b):
        # A fresh empty tensor per skipped output: outputs must not alias each other.
        return (x.new_empty(x.shape if need_x else 0, dtype=_F32),
                W_enc.new_empty(W_enc.shape if need_W else 0, dtype=_F32),
                W_enc.new_empty(W_enc.shape[0] if need_b else 0, dtype=_F32))

    def decode_forward(indices, acts, W_dec, b_dec, binary):
        return acts.new_empty(acts.shape[0], W_dec.shape[1])

    def decode_backward(grad_y, indices, acts, W_dec, binary, need_acts, need_W):
        return (acts.new_empty(acts.shape if need_acts else 0, dtype=_F32),
                W_dec.new_empty(W_dec.shape if need_W else 0, dtype=_F32))

    def coder_backward(grad_y, grad_acts, grad_values, indices, acts, values, x, W_enc, W_dec, binary, mode,
                       temperature, need_x, need_W_enc, need_b_enc, need_W_dec):
        return (x.new_empty(x.shape if need_x else 0, dtype=_F32),
                W_enc.new_empty(W_enc.shape if need_W_enc else 0, dtype=_F32),
                W_enc.new_empty(W_enc.shape[0] if need_b_enc else 0, dtype=_F32),
                W_dec.new_empty(W_dec.shape if need_W_dec else 0, dtype=_F32))

    for fake in (encode_forward, encode_backward, decode_forward, decode_backward, coder_backward):
        # A C++ library may name binsparse_kernels.backends.<prefix> as the home of its fakes
        # (m.set_python_module); torch checks that against the module calling register_fake,
        # found _stacklevel frames up: that backend module, which called bind().
        torch.library.register_fake(f"binsparse::{prefix}_{fake.__name__}", fake, _stacklevel=3)


def bind(prefix: str) -> SimpleNamespace:
    """Fakes registered, and the backend interface (see ``backends/__init__.py``) over the ops."""
    _register_fakes(prefix)
    ops = torch.ops.binsparse
    enc_fwd, enc_bwd = getattr(ops, f"{prefix}_encode_forward"), getattr(ops, f"{prefix}_encode_backward")
    dec_fwd, dec_bwd = getattr(ops, f"{prefix}_decode_forward"), getattr(ops, f"{prefix}_decode_backward")
    coder_bwd = getattr(ops, f"{prefix}_coder_backward")

    def encode_forward(x, W_enc, b_enc, threshold, k: int, binary: bool):
        """``(values float32 [N,k], indices int64 [N,k])``: the top-k of each row of the scores."""
        return enc_fwd(x, W_enc, b_enc, threshold if binary else None, k, binary)

    def encode_backward(grad_acts, grad_values, values, x, W_enc, indices, mode: int, temperature: float,
                        need_x: bool, need_W: bool, need_b: bool):
        """``(grad_x, grad_W_enc, grad_b_enc)`` in float32, ``None`` where not needed."""
        gx, gW, gb = enc_bwd(grad_acts, grad_values, values, x, W_enc, indices, mode, float(temperature),
                             need_x, need_W, need_b)
        return gx if need_x else None, gW if need_W else None, gb if need_b else None

    def decode_forward(indices, acts, W_dec, b_dec, binary: bool):
        """``b_dec + sum_j acts[:, j] * W_dec[indices[:, j]]`` in the dtype of ``acts``."""
        return dec_fwd(indices, acts, W_dec, b_dec, binary)

    def decode_backward(grad_y, indices, acts, W_dec, binary: bool, need_acts: bool, need_W: bool):
        """``(grad_acts float32 [N,k], grad_W_dec float32 [M,d_out])``, ``None`` where not needed."""
        ga, gW = dec_bwd(grad_y, indices, acts, W_dec, binary, need_acts, need_W)
        return ga if need_acts else None, gW if need_W else None

    def coder_backward(grad_y, grad_acts, grad_values, indices, acts, values, x, W_enc, W_dec, binary: bool,
                       mode: int, temperature: float, need_x: bool, need_W_enc: bool, need_b_enc: bool,
                       need_W_dec: bool):
        """``(grad_x, grad_W_enc, grad_b_enc, grad_W_dec)`` in float32 of an encode + decode, ``None`` where not needed."""
        grads = coder_bwd(grad_y, grad_acts, grad_values, indices, acts, values, x, W_enc, W_dec, binary, mode,
                          float(temperature), need_x, need_W_enc, need_b_enc, need_W_dec)
        return tuple(g if need else None for g, need in zip(grads, (need_x, need_W_enc, need_b_enc, need_W_dec)))

    return SimpleNamespace(encode_forward=encode_forward, encode_backward=encode_backward,
                           decode_forward=decode_forward, decode_backward=decode_backward,
                           coder_backward=coder_backward)
