"""Plain-PyTorch reference backend: the ground truth every other backend is tested against.

Written for readability, not speed. Conventions shared by every backend (see ``backends/__init__.py``):

* The *compute dtype* is the dtype of the activations (``x`` for the encoder, ``acts`` for the
  decoder). Weights are rounded to it, as a bf16 tensor-core GEMM or autocast would, and all
  products are accumulated in float32.
* ``values`` are float32 (float64 for float64 inputs, which only this backend accepts, for
  ``torch.autograd.gradcheck``): ``z = x @ W_enc.T + b_enc - theta`` for binary codes and ``ReLU(pre)``
  for continuous ones, at the selected latents.
* Gradients for weights come back in float32; the autograd layer casts them to each weight's dtype.
"""

from __future__ import annotations

import torch

# Straight-through estimator modes for ``encode_backward``. 0 is the exact gradient of the
# continuous (ReLU) encoder; the others are the binary encoder's surrogate gradients.
STE_MODES = {"relu": 0, "sigmoid": 1, "rectangle": 2, "identity": 3}


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rounded(w: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """``w`` rounded to the compute dtype, then widened to the accumulation dtype."""
    return w.to(compute_dtype).to(_acc(compute_dtype))


def encode_forward(x, W_enc, b_enc, threshold, k: int, binary: bool):
    """Top-k of the pre-activations per row. Returns ``(values float32 [N,k], indices int64 [N,k])``.

    ``threshold`` is theta = exp(log_threshold) (float32 [M]) for binary codes, ``None`` otherwise.
    """
    acc = _acc(x.dtype)
    pre = x.to(acc) @ _rounded(W_enc, x.dtype).T + b_enc.to(acc)
    if binary:
        scores = pre - threshold.to(acc)
    else:
        scores = torch.relu(pre)
    values, indices = torch.topk(scores, k, dim=1, sorted=False)
    return values, indices


def ste_factor(values: torch.Tensor, mode: int, temperature: float) -> torch.Tensor:
    """d(act)/d(value) used by the backward pass, per selected latent (float32 [N,k])."""
    if mode == STE_MODES["relu"]:
        return (values > 0).to(values.dtype)
    if mode == STE_MODES["sigmoid"]:
        s = torch.sigmoid(values / temperature)
        return s * (1 - s)  # no 1/T factor: the reference trainer's convention
    if mode == STE_MODES["rectangle"]:
        return ((values / temperature).abs() < 0.5).to(values.dtype)
    if mode == STE_MODES["identity"]:
        return torch.ones_like(values)
    raise ValueError(f"unknown STE mode {mode}")


def encode_backward(grad_acts, grad_values, values, x, W_enc, indices, mode: int, temperature: float,
                    need_x: bool, need_W: bool, need_b: bool):
    """Gradients of the encoder from the gradients of its outputs.

    ``grad_z = grad_acts * ste_factor(values) + grad_values`` at the selected latents (for the
    continuous encoder acts and values are one tensor, so both flow through the ReLU mask).
    Returns ``(grad_x, grad_W_enc, grad_b_enc)`` in float32, ``None`` where not needed;
    ``grad_b_enc[i] = sum of grad_z over the selections of latent i`` (also ``-dL/dtheta``).
    """
    acc = values.dtype
    factor = ste_factor(values, mode, temperature)
    if mode == STE_MODES["relu"]:
        grad_z = (grad_acts.to(acc) + grad_values.to(acc)) * factor
    else:
        grad_z = grad_acts.to(acc) * factor + grad_values.to(acc)
    M = W_enc.shape[0]
    flat_idx = indices.reshape(-1)
    flat_gz = grad_z.reshape(-1)
    grad_x = grad_W = grad_b = None
    if need_x:
        W = _rounded(W_enc, x.dtype)
        grad_x = torch.einsum("nk,nkd->nd", grad_z, W[indices])
    if need_W:
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(indices.shape[1])
        grad_W = torch.zeros(M, x.shape[1], dtype=acc, device=x.device)
        grad_W.index_add_(0, flat_idx, flat_gz[:, None] * x.to(acc)[token])
    if need_b:
        grad_b = torch.zeros(M, dtype=acc, device=x.device)
        grad_b.index_add_(0, flat_idx, flat_gz)
    return grad_x, grad_W, grad_b


def decode_forward(indices, acts, W_dec, b_dec, binary: bool):
    """``y[t] = b_dec + sum_j acts[t,j] * W_dec[indices[t,j]]``, in the dtype of ``acts``.

    For binary codes the products are replaced by a mask: rows with act 1 are summed.
    """
    acc = _acc(acts.dtype)
    rows = _rounded(W_dec, acts.dtype)[indices]  # [N, k, d_out]
    if binary:
        y = (rows * (acts != 0)[..., None]).sum(1)
    else:
        y = (rows * acts.to(acc)[..., None]).sum(1)
    if b_dec is not None:
        y = y + b_dec.to(acc)
    return y.to(acts.dtype)


def decode_backward(grad_y, indices, acts, W_dec, binary: bool, need_acts: bool, need_W: bool):
    """Returns ``(grad_acts [N,k], grad_W_dec [M,d_out])`` (float32), ``None`` where not needed."""
    grad_acts = grad_W = None
    acc = _acc(acts.dtype)
    g = grad_y.to(acc)
    if need_acts:
        W = _rounded(W_dec, acts.dtype)
        grad_acts = torch.einsum("nkd,nd->nk", W[indices], g)
    if need_W:
        weight = (acts != 0).to(acc) if binary else acts.to(acc)
        token = torch.arange(g.shape[0], device=g.device).repeat_interleave(indices.shape[1])
        grad_W = torch.zeros(W_dec.shape, dtype=acc, device=g.device)
        grad_W.index_add_(0, indices.reshape(-1), weight.reshape(-1, 1) * g[token])
    return grad_acts, grad_W


def coder_backward(grad_y, grad_acts, grad_values, indices, acts, values, x, W_enc, W_dec, binary: bool, mode: int,
                   temperature: float, need_x: bool, need_W_enc: bool, need_b_enc: bool, need_W_dec: bool):
    """The backward of an encode followed by the decode of its codes, in one call.

    The acts receive ``grad_acts`` (from outside) plus the decoder's gradient ``W_dec[indices] . grad_y``;
    the encoder's gradients follow from that sum as in ``encode_backward``. Returns ``(grad_x,
    grad_W_enc, grad_b_enc, grad_W_dec)`` in float32, ``None`` where not needed.
    """
    need_enc = need_x or need_W_enc or need_b_enc
    grad_acts_dec, grad_W_dec = decode_backward(grad_y, indices, acts, W_dec, binary, need_enc, need_W_dec)
    grad_x = grad_W_enc = grad_b_enc = None
    if need_enc:
        grad_x, grad_W_enc, grad_b_enc = encode_backward(grad_acts.to(grad_acts_dec.dtype) + grad_acts_dec, grad_values,
                                                         values, x, W_enc, indices, mode, temperature, need_x,
                                                         need_W_enc, need_b_enc)
    return grad_x, grad_W_enc, grad_b_enc, grad_W_dec
