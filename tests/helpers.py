"""Shared test utilities: random coders, an independent dense formulation of the method, comparisons."""

from __future__ import annotations

import math

import torch

import binsparse_kernels as bk
from binsparse_kernels.backends.reference import STE_MODES


def make_params(N, d_in, M, d_out=None, *, dtype=torch.float32, x_dtype=None, device="cpu", threshold=0.004,
                requires_grad=True):
    """Random encoder/decoder parameters as in method.md's init (scaled so codes are mixed 0/1)."""
    d_out = d_out or d_in
    g = dict(device=device, dtype=dtype)
    p = {
        "x": torch.randn(N, d_in, device=device, dtype=x_dtype or dtype),
        "W_enc": (torch.rand(M, d_in, **g) * 2 - 1) / math.sqrt(d_in),
        "b_enc": torch.randn(M, **g) * 0.1,
        "log_threshold": torch.full((M,), math.log(threshold), **g) + torch.randn(M, **g) * 0.1,
        "W_dec": torch.randn(M, d_out, **g) / math.sqrt(d_out),
        "b_dec": torch.randn(d_out, **g) * 0.1,
    }
    for t in p.values():
        t.requires_grad_(requires_grad)
    return p


def dense_z(p, binary=True):
    """Pre-activations in float32 (weights rounded to x's dtype), the reference's convention."""
    x = p["x"]
    pre = x.float() @ p["W_enc"].to(x.dtype).float().T + p["b_enc"].float()
    return pre - p["log_threshold"].float().exp() if binary else torch.relu(pre)


def surrogate(z, ste, temperature):
    """A function whose derivative is the STE factor of method.md (value unused, only the gradient)."""
    if ste == "sigmoid":
        return temperature * torch.sigmoid(z / temperature)  # d/dz = s(1-s), no 1/T
    if ste == "rectangle":
        return torch.clamp(z, -temperature / 2, temperature / 2)  # d/dz = 1[|z/T| < 1/2]
    return z


def dense_model(p, indices, *, binary=True, ste="sigmoid", temperature=2.0):
    """The coder written densely with plain autograd, given the selected ``indices``.

    Independent of every backend: the selection mask is dense [N, M], binary acts use a
    straight-through surrogate, and the decode is a dense matmul.
    """
    z = dense_z(p, binary)
    mask = torch.zeros_like(z, dtype=torch.bool).scatter_(1, indices, True)
    if binary:
        s = surrogate(z, ste, temperature)
        hard = (z > 0).float()
        a = torch.where(mask, hard + s - s.detach(), torch.zeros_like(z))
    else:
        a = torch.where(mask, z, torch.zeros_like(z))
    return a @ p["W_dec"].float() + p["b_dec"].float()


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def assert_topk_by_value(z, out, k, *, atol=1e-5):
    """``out`` holds a valid top-k of ``z`` per row: distinct indices, values that are z at the indices,
    and every selected z >= the row's k-th largest value (ties may be broken either way)."""
    N = z.shape[0]
    assert out.indices.shape == (N, k) and out.indices.dtype == torch.int64
    assert out.values.shape == (N, k)
    if N == 0:
        return
    sorted_idx = out.indices.sort(1).values
    assert (sorted_idx[:, 1:] != sorted_idx[:, :-1]).all(), "duplicate indices in a row"
    picked = z.gather(1, out.indices)
    torch.testing.assert_close(out.values.float(), picked, atol=atol, rtol=1e-3)
    kth = z.topk(k, 1).values[:, -1:]
    assert (picked >= kth - atol).all(), "a selected value is below the k-th largest"


def backend_params(backends=None, *, dtypes=(torch.float32,)):
    """(backend, dtype) pairs usable here; the Triton interpreter has no bf16 (design notes §7)."""
    import pytest

    out = []
    for name in backends or bk.available_backends():
        for dtype in dtypes:
            marks = []
            if name == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
                continue
            out.append(pytest.param(name, dtype, id=f"{name}-{str(dtype).replace('torch.', '')}", marks=marks))
    return out


def device_for(backend):
    if backend in ("cuda",) or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


STES = [s for s in STE_MODES if s != "relu"]


def encode(p, k, backend, *, binary=True, ste="sigmoid", temperature=2.0):
    if binary:
        return bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], k, ste=ste,
                                     temperature=temperature, backend=backend)
    return bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], k, backend=backend)


def coder_grads(p, k, backend, *, binary, ste="sigmoid", temperature=2.0, with_b_dec=True, upstream):
    """Gradients of every input of encode + decode, under a loss that also weighs acts and values
    per (token, latent) so the slot order of each backend does not matter."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in p.items()}
    out = encode(leaves, k, backend, binary=binary, ste=ste, temperature=temperature)
    y = bk.sparse_decode(out.indices, out.acts, leaves["W_dec"], leaves["b_dec"] if with_b_dec else None,
                         binary=binary, backend=backend)
    G_acts, G_values, G_y = upstream
    loss = ((y.float() * G_y).sum() + (out.acts.float() * G_acts.gather(1, out.indices)).sum()
            + (out.values.float() * G_values.gather(1, out.indices)).sum())
    names = [n for n in leaves if (binary or n != "log_threshold") and (with_b_dec or n != "b_dec")]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return out, dict(zip(names, grads))
