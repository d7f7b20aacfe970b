"""What users would run without this package, and the package's own backends, behind one interface.

Every implementation ("impl") offers

    encode(x, W_enc, b_enc, log_threshold, k, binary, temperature) -> (acts, indices, values)
    decode(indices, acts, W_dec, b_dec, binary)                     -> y
    wrap(fn)                                                         -> fn, or fn compiled

with the semantics of ``binsparse_kernels.topk_binary_encode`` / ``topk_encode`` / ``sparse_decode``
(binary: ``acts = 1[z > 0]`` at the top-k of ``z = x W_enc^T + b_enc - exp(log_threshold)`` with the
sigmoid straight-through estimator, no 1/T factor; continuous: top-k of ReLU). Weights may be float32
masters while ``x`` is bfloat16: every impl computes in the dtype of ``x`` (weights rounded to it),
as autocast would.

The baselines:

* ``eager``: ``F.linear`` + ``torch.topk`` + ``F.embedding_bag``, gradients by plain autograd (the
  top-k backward scatters into a dense N x M gradient and ``F.linear``'s backward is a dense GEMM).
* ``compile``: the same code under ``torch.compile`` (``dynamic=False``, a fresh compile per case).
* ``sparsify``: the reference trainer's formulation (EleutherAI sparsify, binary branch),
  re-implemented here from its description: ``F.linear`` + ``torch.topk`` forward (binary: subtract
  the threshold in float32, binarize), decode by gathering the selected rows, and a hand-written
  backward that builds an ``[N*k, d]`` product of per-slot gradients and gathered rows and
  ``index_add_``s it into the dense weight gradient, in chunks of tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import binsparse_kernels as bk

BASELINES = ("eager", "compile", "sparsify")

# Tokens per chunk of the sparsify formulation's [chunk*k, d] products (bounds their memory).
CONTRIB_CHUNK = 4096


def _sigmoid_ste(values: Tensor, temperature: float) -> Tensor:
    """0/1 forward; backward d/dv = s(1-s) with s = sigmoid(v/T), the reference's convention (no 1/T)."""
    soft = torch.sigmoid(values / temperature) * temperature  # d/dv (T * sigmoid(v/T)) = s(1-s)
    hard = (values > 0).to(values.dtype)
    return hard + (soft - soft.detach())


# ----------------------------------------------------------------------------------------------
# eager / compile: plain PyTorch, autograd does the backward
# ----------------------------------------------------------------------------------------------


def eager_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, log_threshold: Tensor | None, k: int, binary: bool,
                 temperature: float = 2.0):
    pre = F.linear(x, W_enc.to(x.dtype), b_enc.to(x.dtype))
    if binary:
        z = pre - log_threshold.exp()  # float32 threshold: z (and its top-k) in float32, as in the trainer
        values, indices = z.topk(k, dim=1, sorted=False)
        acts = _sigmoid_ste(values, temperature).to(x.dtype)
        return acts, indices, values.to(x.dtype)
    values, indices = torch.relu(pre).topk(k, dim=1, sorted=False)
    return values, indices, values


def eager_decode(indices: Tensor, acts: Tensor, W_dec: Tensor, b_dec: Tensor | None, binary: bool) -> Tensor:
    y = F.embedding_bag(indices, W_dec.to(acts.dtype), per_sample_weights=acts, mode="sum")
    return y if b_dec is None else y + b_dec.to(y.dtype)


# ----------------------------------------------------------------------------------------------
# sparsify: hand-written autograd.Functions, gathers and [N*k, d] index_add_ products
# ----------------------------------------------------------------------------------------------


def _token_chunks(N: int):
    for start in range(0, N, CONTRIB_CHUNK):
        yield start, min(N, start + CONTRIB_CHUNK)


def _index_add_rows(M: int, indices: Tensor, weights: Tensor, rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``out[indices[t, j]] += weights[t, j] * rows[t]`` as chunked ``[n*k, d]`` products, fp32 out."""
    N, k = indices.shape
    out = torch.zeros(M, rows.shape[1], dtype=torch.float32, device=rows.device)
    for a, b in _token_chunks(N):
        contributions = weights[a:b, :, None].to(dtype) * rows[a:b, None, :].to(dtype)  # [n, k, d]
        out.index_add_(0, indices[a:b].reshape(-1), contributions.reshape(-1, rows.shape[1]).float())
    return out


def _gather_dot(indices: Tensor, W: Tensor, rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``out[t, j] = W[indices[t, j]] . rows[t]`` by gathering the rows (fp32 out)."""
    out = []
    for a, b in _token_chunks(indices.shape[0]):
        gathered = W.to(dtype)[indices[a:b]].float()  # [n, k, d]
        out.append(torch.einsum("nkd,nd->nk", gathered, rows[a:b].float()))
    return torch.cat(out)


def _gather_sum(indices: Tensor, weights: Tensor, W: Tensor, dtype: torch.dtype) -> Tensor:
    """``out[t] = sum_j weights[t, j] * W[indices[t, j]]`` by gathering the rows (fp32 out)."""
    out = []
    for a, b in _token_chunks(indices.shape[0]):
        gathered = W.to(dtype)[indices[a:b]].float()
        out.append(torch.einsum("nk,nkd->nd", weights[a:b].float(), gathered))
    return torch.cat(out)


class SparsifyEncode(torch.autograd.Function):
    """Encode with a sparse hand-written backward (only the selected latents get gradients)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, log_threshold, k: int, binary: bool, temperature: float):
        pre = F.linear(x, W_enc.to(x.dtype), b_enc.to(x.dtype))
        if binary:
            theta = log_threshold.exp()
            values, indices = (pre - theta).topk(k, dim=1, sorted=False)  # float32
            acts = (values > 0).to(x.dtype)
        else:
            theta = None
            values, indices = torch.relu(pre).topk(k, dim=1, sorted=False)
            acts = values
        ctx.save_for_backward(x, W_enc, indices, values, theta if binary else values.new_empty(0))
        ctx.binary, ctx.temperature = binary, temperature
        ctx.mark_non_differentiable(indices)
        return acts, indices, values.to(x.dtype, copy=True)  # a separate output tensor from acts

    @staticmethod
    def backward(ctx, grad_acts, _grad_indices, grad_values):
        x, W_enc, indices, values, theta = ctx.saved_tensors
        values = values.float()
        if ctx.binary:
            s = torch.sigmoid(values / ctx.temperature)
            grad_z = grad_acts.float() * s * (1 - s) + grad_values.float()
        else:
            grad_z = (grad_acts.float() + grad_values.float()) * (values > 0)
        M = W_enc.shape[0]
        flat_idx = indices.reshape(-1)
        grad_x = grad_W = grad_b = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_x = _gather_sum(indices, grad_z, W_enc, x.dtype).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = _index_add_rows(M, indices, grad_z, x, x.dtype).to(W_enc.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_b = torch.zeros(M, dtype=torch.float32, device=x.device).index_add_(0, flat_idx, grad_z.reshape(-1))
            if ctx.binary and ctx.needs_input_grad[3]:
                grad_t = -grad_b * theta  # z = pre - exp(log_threshold)
        return grad_x, grad_W, grad_b, grad_t, None, None, None


class SparsifyDecode(torch.autograd.Function):
    """Decode by gathering the selected rows; backward via [N*k, d] products + ``index_add_``."""

    @staticmethod
    def forward(ctx, indices, acts, W_dec):
        ctx.save_for_backward(indices, acts, W_dec)
        return _gather_sum(indices, acts, W_dec, acts.dtype).to(acts.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        indices, acts, W_dec = ctx.saved_tensors
        grad_acts = grad_W = None
        if ctx.needs_input_grad[1]:
            grad_acts = _gather_dot(indices, W_dec, grad_y, acts.dtype).to(acts.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = _index_add_rows(W_dec.shape[0], indices, acts, grad_y, acts.dtype).to(W_dec.dtype)
        return None, grad_acts, grad_W


def sparsify_encode(x, W_enc, b_enc, log_threshold, k, binary, temperature=2.0):
    if not binary:
        log_threshold = None
    return SparsifyEncode.apply(x, W_enc, b_enc, log_threshold, k, binary, float(temperature))


def sparsify_decode(indices, acts, W_dec, b_dec, binary):
    y = SparsifyDecode.apply(indices, acts, W_dec)
    return y if b_dec is None else y + b_dec.to(y.dtype)


# ----------------------------------------------------------------------------------------------
# The uniform interface
# ----------------------------------------------------------------------------------------------


class Impl:
    """One implementation under test: a package backend or a baseline."""

    def __init__(self, name: str, kind: str, encode: Callable, decode: Callable, compiled: bool = False):
        self.name, self.kind, self.compiled = name, kind, compiled
        self.encode, self.decode = encode, decode

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` as this impl runs it: compiled (afresh, static shapes) for the compile baseline."""
        if not self.compiled:
            return fn
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no automatic dynamic shapes
        return torch.compile(fn, dynamic=False)

    def __repr__(self) -> str:
        return f"Impl({self.name!r}, {self.kind})"


def backend_impl(name: str) -> Impl:
    """A package backend through the public ops (what ``SparseCoder(backend=name)`` calls)."""

    def encode(x, W_enc, b_enc, log_threshold, k, binary, temperature=2.0):
        if binary:
            return bk.topk_binary_encode(x, W_enc, b_enc, log_threshold, k, ste="sigmoid", temperature=temperature,
                                         backend=name)
        return bk.topk_encode(x, W_enc, b_enc, k, backend=name)

    def decode(indices, acts, W_dec, b_dec, binary):
        return bk.sparse_decode(indices, acts, W_dec, b_dec, binary=binary, backend=name)

    return Impl(name, "backend", encode, decode)


def baseline_impl(name: str) -> Impl:
    if name == "eager":
        return Impl(name, "baseline", eager_encode, eager_decode)
    if name == "compile":
        return Impl(name, "baseline", eager_encode, eager_decode, compiled=True)
    if name == "sparsify":
        return Impl(name, "baseline", sparsify_encode, sparsify_decode)
    raise ValueError(f"unknown baseline {name!r}; choose from {list(BASELINES)}")


def make_impl(name: str) -> Impl:
    if name in BASELINES:
        return baseline_impl(name)
    if name in bk.backends.NAMES:
        reason = bk.backends.unavailable_reason(name)
        if reason is not None:
            raise RuntimeError(reason)
        return backend_impl(name)
    raise ValueError(f"unknown implementation {name!r}; choose from {list(bk.backends.NAMES) + list(BASELINES)}")


# ----------------------------------------------------------------------------------------------
# A sparse coder's forward with any impl (mirrors SparseCoder.forward for binary/TopK coders)
# ----------------------------------------------------------------------------------------------


def coder_fvu(coder, impl: Impl, x: Tensor, y: Tensor | None) -> Tensor:
    """FVU of ``coder`` on (x, y), encoding and decoding with ``impl``; same maths as ``coder(x, y).fvu``."""
    from binsparse_kernels.coder import fvu

    cfg = coder.cfg
    if cfg.hybrid or cfg.multi_topk or cfg.ste != "sigmoid":
        raise ValueError("baseline coders cover binary/TopK coders with the sigmoid STE, no multi-TopK")
    y = x if y is None else y
    xe = x if cfg.transcode else x - coder.b_dec
    if xe.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(xe.device.type):
        xe = xe.to(torch.get_autocast_dtype(xe.device.type))
    acts, indices, _ = impl.encode(xe, coder.encoder.weight, coder.encoder.bias, coder.log_threshold, cfg.k,
                                   cfg.binary, cfg.ste_temperature)
    out = impl.decode(indices, acts, coder.W_dec, coder.b_dec, cfg.binary)
    if coder.W_skip is not None:
        out = out + (x.to(out.dtype) @ coder.W_skip.to(out.dtype).T)
    return fvu(y, out)
