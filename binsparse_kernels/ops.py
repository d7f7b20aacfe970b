"""The public ops: validation, backend dispatch, torch custom ops and autograd.

Layers, top to bottom:

1. ``topk_binary_encode`` / ``topk_encode`` / ``sparse_decode``, and the encode + decode pairs
   ``topk_binary_encode_decode`` / ``topk_encode_decode`` (what ``SparseCoder`` runs): the Python
   API. They validate the inputs, apply autocast, pick the backend and call the autograd Functions below.
2. ``TopKBinaryEncode`` / ``TopKEncode`` / ``SparseDecode`` / ``TopKBinaryEncodeDecode`` /
   ``TopKEncodeDecode``: ``torch.autograd.Function``s. Their forward calls the forward custom op;
   their backward (shared with the custom ops' registered autograd) calls the backward custom ops,
   only for the inputs that need a gradient. An encode + decode pair has one backward op
   (``coder_backward``), so a backend builds the index transpose once per step.
3. ``torch.ops.binsparse.*``: custom ops with fake implementations, so ``torch.compile`` traces
   through them without graph breaks. Each takes the backend name as its last argument.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _checks
from . import backends as _backends
from .backends.reference import STE_MODES


class EncoderOutput(NamedTuple):
    """Top-k codes, one row per token. ``acts`` and ``values`` have the dtype of ``x``."""

    acts: Tensor  # [N, k]: 0/1 for binary codes, ReLU(pre) for continuous ones
    indices: Tensor  # [N, k] int64 latent indices, in no particular order
    values: Tensor  # [N, k]: z = pre - theta (binary) or ReLU(pre) (continuous)


class CoderOutput(NamedTuple):
    """The decode ``y`` of a coder's top-k codes, and the codes (see ``EncoderOutput``)."""

    y: Tensor  # [N, d_out] in the dtype of x
    acts: Tensor
    indices: Tensor
    values: Tensor


def _acc(t: Tensor) -> torch.dtype:
    """Accumulation dtype of a computation on ``t``: float32 (float64 for the reference's float64)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    # Custom ops cannot return None: a gradient that was not asked for travels as an empty tensor.
    return t if t is not None else like.new_empty(0)


# ----------------------------------------------------------------------------------------------
# Custom ops (layer 3)
# ----------------------------------------------------------------------------------------------


def _custom_op(name: str):
    """``torch.library.custom_op(name)`` whose body runs outside the caller's autocast.

    The public API has already cast ``x`` to the autocast dtype; inside the op every backend computes
    as documented (fp32 accumulation, weights rounded to x's dtype). Left on, autocast would run the
    torch matmuls inside a backend (the reference, the k > 128 fallbacks) in bf16.
    """

    def decorate(fn):
        @functools.wraps(fn)
        def outside_autocast(*args, **kwargs):
            device = next(a.device for a in args if isinstance(a, Tensor))
            if device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type):
                return fn(*args, **kwargs)
            with torch.autocast(device.type, enabled=False):
                return fn(*args, **kwargs)

        return torch.library.custom_op(name, mutates_args=())(outside_autocast)

    return decorate


def _binary_encode(impl, x: Tensor, W_enc: Tensor, b_enc: Tensor, log_threshold: Tensor, k: int):
    """(acts, indices, values in float32) of the binary encoder."""
    theta = log_threshold.to(_acc(x)).exp()
    values, indices = impl.encode_forward(x, W_enc, b_enc, theta, k, True)
    return (values > 0).to(x.dtype), indices, values


@_custom_op("binsparse::topk_binary_encode")
def _binary_encode_op(x: Tensor, W_enc: Tensor, b_enc: Tensor, log_threshold: Tensor, k: int,
                      ste: str, temperature: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (acts, indices, values in x.dtype, values in float32 for the backward)."""
    acts, indices, values = _binary_encode(_backends.get(backend, x.device), x, W_enc, b_enc, log_threshold, k)
    return acts, indices, values.to(x.dtype, copy=True), values


@_binary_encode_op.register_fake
def _(x, W_enc, b_enc, log_threshold, k, ste, temperature, backend):
    N = x.shape[0]
    return (x.new_empty(N, k), x.new_empty(N, k, dtype=torch.int64), x.new_empty(N, k),
            x.new_empty(N, k, dtype=_acc(x)))


@_custom_op("binsparse::topk_encode")
def _encode_op(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (acts in x.dtype, indices, acts in float32 for the backward)."""
    impl = _backends.get(backend, x.device)
    values, indices = impl.encode_forward(x, W_enc, b_enc, None, k, False)
    return values.to(x.dtype, copy=True), indices, values


@_encode_op.register_fake
def _(x, W_enc, b_enc, k, backend):
    N = x.shape[0]
    return x.new_empty(N, k), x.new_empty(N, k, dtype=torch.int64), x.new_empty(N, k, dtype=_acc(x))


@_custom_op("binsparse::encode_backward")
def _encode_backward_op(grad_acts: Tensor, grad_values: Tensor, values: Tensor, x: Tensor, W_enc: Tensor,
                        indices: Tensor, mode: int, temperature: float, need_x: bool, need_W: bool,
                        need_b: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns float32 (grad_x, grad_W_enc, grad_b_enc); an empty 1-D tensor where not needed."""
    impl = _backends.get(backend, x.device)
    grads = impl.encode_backward(grad_acts, grad_values, values, x, W_enc, indices, mode, temperature,
                                 need_x, need_W, need_b)
    return tuple(_or_empty(g, values) for g in grads)


@_encode_backward_op.register_fake
def _(grad_acts, grad_values, values, x, W_enc, indices, mode, temperature, need_x, need_W, need_b, backend):
    acc = values.dtype
    return (x.new_empty(x.shape, dtype=acc) if need_x else values.new_empty(0),
            W_enc.new_empty(W_enc.shape, dtype=acc) if need_W else values.new_empty(0),
            W_enc.new_empty(W_enc.shape[0], dtype=acc) if need_b else values.new_empty(0))


@_custom_op("binsparse::sparse_decode")
def _decode_op(indices: Tensor, acts: Tensor, W_dec: Tensor, b_dec: Optional[Tensor], binary: bool,
               backend: str) -> Tensor:
    impl = _backends.get(backend, acts.device)
    return impl.decode_forward(indices, acts, W_dec, b_dec, binary)


@_decode_op.register_fake
def _(indices, acts, W_dec, b_dec, binary, backend):
    return acts.new_empty(acts.shape[0], W_dec.shape[1])


@_custom_op("binsparse::sparse_decode_backward")
def _decode_backward_op(grad_y: Tensor, indices: Tensor, acts: Tensor, W_dec: Tensor, binary: bool,
                        need_acts: bool, need_W: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Returns float32 (grad_acts, grad_W_dec); an empty 1-D tensor where not needed."""
    impl = _backends.get(backend, acts.device)
    grads = impl.decode_backward(grad_y, indices, acts, W_dec, binary, need_acts, need_W)
    empty = grad_y.new_empty(0, dtype=_acc(acts))  # a dtype and device for the skipped gradients
    return tuple(_or_empty(g, empty) for g in grads)


@_decode_backward_op.register_fake
def _(grad_y, indices, acts, W_dec, binary, need_acts, need_W, backend):
    acc = _acc(acts)
    return (acts.new_empty(acts.shape, dtype=acc) if need_acts else grad_y.new_empty(0, dtype=acc),
            W_dec.new_empty(W_dec.shape, dtype=acc) if need_W else grad_y.new_empty(0, dtype=acc))


@_custom_op("binsparse::topk_binary_encode_decode")
def _binary_coder_op(x: Tensor, W_enc: Tensor, b_enc: Tensor, log_threshold: Tensor, W_dec: Tensor,
                     b_dec: Optional[Tensor], k: int, ste: str, temperature: float,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, acts, indices, values in x.dtype, values in float32 for the backward)."""
    impl = _backends.get(backend, x.device)
    acts, indices, values = _binary_encode(impl, x, W_enc, b_enc, log_threshold, k)
    y = impl.decode_forward(indices, acts, W_dec, b_dec, True)
    return y, acts, indices, values.to(x.dtype, copy=True), values


@_binary_coder_op.register_fake
def _(x, W_enc, b_enc, log_threshold, W_dec, b_dec, k, ste, temperature, backend):
    N = x.shape[0]
    return (x.new_empty(N, W_dec.shape[1]), x.new_empty(N, k), x.new_empty(N, k, dtype=torch.int64),
            x.new_empty(N, k), x.new_empty(N, k, dtype=_acc(x)))


@_custom_op("binsparse::topk_encode_decode")
def _coder_op(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Optional[Tensor], k: int,
              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, acts in x.dtype, indices, acts in float32 for the backward)."""
    impl = _backends.get(backend, x.device)
    values, indices = impl.encode_forward(x, W_enc, b_enc, None, k, False)
    acts = values.to(x.dtype, copy=True)
    y = impl.decode_forward(indices, acts, W_dec, b_dec, False)
    return y, acts, indices, values


@_coder_op.register_fake
def _(x, W_enc, b_enc, W_dec, b_dec, k, backend):
    N = x.shape[0]
    return (x.new_empty(N, W_dec.shape[1]), x.new_empty(N, k), x.new_empty(N, k, dtype=torch.int64),
            x.new_empty(N, k, dtype=_acc(x)))


@_custom_op("binsparse::coder_backward")
def _coder_backward_op(grad_y: Tensor, grad_acts: Tensor, grad_values: Tensor, indices: Tensor, acts: Tensor,
                       values: Tensor, x: Tensor, W_enc: Tensor, W_dec: Tensor, binary: bool, mode: int,
                       temperature: float, need_x: bool, need_W_enc: bool, need_b_enc: bool, need_W_dec: bool,
                       backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns float32 (grad_x, grad_W_enc, grad_b_enc, grad_W_dec); an empty 1-D tensor where not needed."""
    impl = _backends.get(backend, x.device)
    grads = impl.coder_backward(grad_y, grad_acts, grad_values, indices, acts, values, x, W_enc, W_dec, binary,
                                mode, temperature, need_x, need_W_enc, need_b_enc, need_W_dec)
    return tuple(_or_empty(g, values) for g in grads)


@_coder_backward_op.register_fake
def _(grad_y, grad_acts, grad_values, indices, acts, values, x, W_enc, W_dec, binary, mode, temperature, need_x,
      need_W_enc, need_b_enc, need_W_dec, backend):
    acc = values.dtype
    return (x.new_empty(x.shape, dtype=acc) if need_x else values.new_empty(0),
            W_enc.new_empty(W_enc.shape, dtype=acc) if need_W_enc else values.new_empty(0),
            W_enc.new_empty(W_enc.shape[0], dtype=acc) if need_b_enc else values.new_empty(0),
            W_dec.new_empty(W_dec.shape, dtype=acc) if need_W_dec else values.new_empty(0))


# ----------------------------------------------------------------------------------------------
# Autograd (layer 2). setup_context/backward pairs serve both the autograd.Functions and the
# custom ops' registered autograd, so there is one backward per op.
# ----------------------------------------------------------------------------------------------


def _cast(grad: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    return None if grad is None else grad.to(like.dtype)


def _binary_encode_setup(ctx, inputs, output):
    x, W_enc, b_enc, log_threshold, k, ste, temperature, backend = inputs
    _acts, indices, _values, values_f32 = output
    ctx.save_for_backward(x, W_enc, log_threshold, indices, values_f32)
    ctx.mode, ctx.temperature, ctx.backend = STE_MODES[ste], temperature, backend
    ctx.set_materialize_grads(True)


def _binary_encode_backward(ctx, grad_acts, _grad_indices, grad_values, _grad_values_f32=None):
    x, W_enc, log_threshold, indices, values = ctx.saved_tensors
    need_x, need_W, need_b, need_t = ctx.needs_input_grad[:4]
    if not (need_x or need_W or need_b or need_t):
        return (None,) * 8
    # upstream gradients may be expanded or strided; backends take contiguous tensors
    grad_acts, grad_values = grad_acts.contiguous(), grad_values.contiguous()
    gx, gW, gb = _encode_backward_op(grad_acts, grad_values, values, x, W_enc, indices, ctx.mode,
                                     ctx.temperature, need_x, need_W, need_b or need_t, ctx.backend)
    grad_theta = None
    if need_t:  # dL/dtheta = -sum dL/dz; theta = exp(log_threshold)
        grad_theta = (-gb * log_threshold.to(gb.dtype).exp()).to(log_threshold.dtype)
    return (_cast(gx, x) if need_x else None, _cast(gW, W_enc) if need_W else None,
            _cast(gb, W_enc) if need_b else None, grad_theta, None, None, None, None)


def _encode_setup(ctx, inputs, output):
    x, W_enc, b_enc, k, backend = inputs
    _acts, indices, values_f32 = output
    ctx.save_for_backward(x, W_enc, indices, values_f32)
    ctx.backend = backend
    ctx.set_materialize_grads(True)


def _encode_backward(ctx, grad_acts, _grad_indices, _grad_values_f32=None):
    x, W_enc, indices, values = ctx.saved_tensors
    need_x, need_W, need_b = ctx.needs_input_grad[:3]
    if not (need_x or need_W or need_b):
        return (None,) * 5
    zeros = torch.zeros_like(values)
    gx, gW, gb = _encode_backward_op(grad_acts.contiguous(), zeros, values, x, W_enc, indices, STE_MODES["relu"], 1.0,
                                     need_x, need_W, need_b, ctx.backend)
    return (_cast(gx, x) if need_x else None, _cast(gW, W_enc) if need_W else None,
            _cast(gb, W_enc) if need_b else None, None, None)


def _decode_setup(ctx, inputs, output):
    indices, acts, W_dec, b_dec, binary, backend = inputs
    ctx.save_for_backward(indices, acts, W_dec)
    ctx.binary, ctx.backend, ctx.b_dec_dtype = binary, backend, None if b_dec is None else b_dec.dtype


def _decode_backward(ctx, grad_y):
    indices, acts, W_dec = ctx.saved_tensors
    _, need_acts, need_W, need_b = ctx.needs_input_grad[:4]
    grad_acts = grad_W = grad_b = None
    if need_acts or need_W:
        ga, gW = _decode_backward_op(grad_y.contiguous(), indices, acts, W_dec, ctx.binary, need_acts,
                                     need_W, ctx.backend)
        grad_acts = _cast(ga, acts) if need_acts else None
        grad_W = _cast(gW, W_dec) if need_W else None
    if need_b and ctx.b_dec_dtype is not None:
        grad_b = grad_y.to(_acc(grad_y)).sum(0).to(ctx.b_dec_dtype)
    return None, grad_acts, grad_W, grad_b, None, None


def _grad_b_dec(ctx, grad_y: Tensor) -> Optional[Tensor]:
    return grad_y.to(_acc(grad_y)).sum(0).to(ctx.b_dec_dtype) if ctx.b_dec_dtype is not None else None


def _binary_coder_setup(ctx, inputs, output):
    x, W_enc, b_enc, log_threshold, W_dec, b_dec, k, ste, temperature, backend = inputs
    _y, acts, indices, _values, values_f32 = output
    ctx.save_for_backward(x, W_enc, log_threshold, W_dec, indices, acts, values_f32)
    ctx.mode, ctx.temperature, ctx.backend = STE_MODES[ste], temperature, backend
    ctx.b_dec_dtype = None if b_dec is None else b_dec.dtype
    ctx.set_materialize_grads(True)


def _binary_coder_backward(ctx, grad_y, grad_acts, _grad_indices, grad_values, _grad_values_f32=None):
    x, W_enc, log_threshold, W_dec, indices, acts, values = ctx.saved_tensors
    need_x, need_W, need_b, need_t, need_Wd, need_bd = ctx.needs_input_grad[:6]
    gx = gW = gb = gWd = grad_theta = None
    if need_x or need_W or need_b or need_t or need_Wd:
        # one backward op: the index transpose is built once for the decoder and encoder gradients
        gx, gW, gb, gWd = _coder_backward_op(grad_y.contiguous(), grad_acts.contiguous(), grad_values.contiguous(),
                                             indices, acts, values, x, W_enc, W_dec, True, ctx.mode,
                                             ctx.temperature, need_x, need_W, need_b or need_t, need_Wd,
                                             ctx.backend)
    if need_t:  # dL/dtheta = -sum dL/dz; theta = exp(log_threshold)
        grad_theta = (-gb * log_threshold.to(gb.dtype).exp()).to(log_threshold.dtype)
    return (_cast(gx, x) if need_x else None, _cast(gW, W_enc) if need_W else None,
            _cast(gb, W_enc) if need_b else None, grad_theta, _cast(gWd, W_dec) if need_Wd else None,
            _grad_b_dec(ctx, grad_y) if need_bd else None, None, None, None, None)


def _coder_setup(ctx, inputs, output):
    x, W_enc, b_enc, W_dec, b_dec, k, backend = inputs
    _y, acts, indices, values_f32 = output
    ctx.save_for_backward(x, W_enc, W_dec, indices, acts, values_f32)
    ctx.backend = backend
    ctx.b_dec_dtype = None if b_dec is None else b_dec.dtype
    ctx.set_materialize_grads(True)


def _coder_backward(ctx, grad_y, grad_acts, _grad_indices, _grad_values_f32=None):
    x, W_enc, W_dec, indices, acts, values = ctx.saved_tensors
    need_x, need_W, need_b, need_Wd, need_bd = ctx.needs_input_grad[:5]
    gx = gW = gb = gWd = None
    if need_x or need_W or need_b or need_Wd:
        # acts and values are one tensor here: its whole gradient comes in as grad_acts
        gx, gW, gb, gWd = _coder_backward_op(grad_y.contiguous(), grad_acts.contiguous(), torch.zeros_like(values),
                                             indices, acts, values, x, W_enc, W_dec, False, STE_MODES["relu"], 1.0,
                                             need_x, need_W, need_b, need_Wd, ctx.backend)
    return (_cast(gx, x) if need_x else None, _cast(gW, W_enc) if need_W else None,
            _cast(gb, W_enc) if need_b else None, _cast(gWd, W_dec) if need_Wd else None,
            _grad_b_dec(ctx, grad_y) if need_bd else None, None, None)


torch.library.register_autograd("binsparse::topk_binary_encode", _binary_encode_backward,
                                setup_context=_binary_encode_setup)
torch.library.register_autograd("binsparse::topk_encode", _encode_backward, setup_context=_encode_setup)
torch.library.register_autograd("binsparse::sparse_decode", _decode_backward, setup_context=_decode_setup)
torch.library.register_autograd("binsparse::topk_binary_encode_decode", _binary_coder_backward,
                                setup_context=_binary_coder_setup)
torch.library.register_autograd("binsparse::topk_encode_decode", _coder_backward, setup_context=_coder_setup)


class TopKBinaryEncode(torch.autograd.Function):
    """Fused encode + top-k + binarize, with a straight-through estimator backward."""

    @staticmethod
    def forward(x, W_enc, b_enc, log_threshold, k, ste, temperature, backend):
        return _binary_encode_op(x, W_enc, b_enc, log_threshold, k, ste, temperature, backend)

    setup_context = staticmethod(_binary_encode_setup)
    backward = staticmethod(_binary_encode_backward)


class TopKEncode(torch.autograd.Function):
    """Fused encode + ReLU + top-k (continuous TopK coder), exact sparse gradients."""

    @staticmethod
    def forward(x, W_enc, b_enc, k, backend):
        return _encode_op(x, W_enc, b_enc, k, backend)

    setup_context = staticmethod(_encode_setup)
    backward = staticmethod(_encode_backward)


class SparseDecode(torch.autograd.Function):
    """``b_dec + sum_j acts[:, j] * W_dec[indices[:, j]]`` (a gather-and-sum for binary codes)."""

    @staticmethod
    def forward(indices, acts, W_dec, b_dec, binary, backend):
        return _decode_op(indices, acts, W_dec, b_dec, binary, backend)

    setup_context = staticmethod(_decode_setup)
    backward = staticmethod(_decode_backward)


class TopKBinaryEncodeDecode(torch.autograd.Function):
    """``TopKBinaryEncode`` followed by ``SparseDecode`` of its codes, with one backward for both."""

    @staticmethod
    def forward(x, W_enc, b_enc, log_threshold, W_dec, b_dec, k, ste, temperature, backend):
        return _binary_coder_op(x, W_enc, b_enc, log_threshold, W_dec, b_dec, k, ste, temperature, backend)

    setup_context = staticmethod(_binary_coder_setup)
    backward = staticmethod(_binary_coder_backward)


class TopKEncodeDecode(torch.autograd.Function):
    """``TopKEncode`` followed by ``SparseDecode`` of its codes, with one backward for both."""

    @staticmethod
    def forward(x, W_enc, b_enc, W_dec, b_dec, k, backend):
        return _coder_op(x, W_enc, b_enc, W_dec, b_dec, k, backend)

    setup_context = staticmethod(_coder_setup)
    backward = staticmethod(_coder_backward)


# ----------------------------------------------------------------------------------------------
# Python API (layer 1)
# ----------------------------------------------------------------------------------------------


# A trace-time constant for torch.compile: the choice imports backend modules and may run the first-use
# self-check, neither of which Dynamo can trace; the compiled graph bakes in the name it returns.
@torch.compiler.assume_constant_result
def _backend_for(backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    if dtype == torch.float64:  # for gradcheck: only the reference computes in float64
        if backend not in (None, "reference"):
            raise TypeError(f"float64 inputs are supported by the 'reference' backend only, not {backend!r}")
        return "reference"
    return _backends.resolve_name(backend, device, dtype)  # dtype: first-use self-check of GPU backends


def _autocast(x: Tensor) -> Tensor:
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type))
    return x


def _check_encoder(x, W_enc, b_enc, k):
    _checks.tensor("x", x, ndim=2)
    _checks.tensor("W_enc", W_enc, ndim=2)
    _checks.tensor("b_enc", b_enc, ndim=1)
    M = W_enc.shape[0]
    _checks.shape("W_enc", W_enc, (M, x.shape[1]), "num_latents x d_in, d_in = x.shape[1]")
    _checks.shape("b_enc", b_enc, (M,), "num_latents")
    return _checks.k_in_range(k, M)


def _check_ste(ste, temperature) -> None:
    if ste not in STE_MODES or ste == "relu":
        raise ValueError(f"ste must be one of 'sigmoid', 'rectangle', 'identity', got {ste!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def _check_decoder(W_dec, b_dec, M: int) -> None:
    _checks.tensor("W_dec", W_dec, ndim=2)
    _checks.shape("W_dec", W_dec, (M, W_dec.shape[1]), "num_latents x d_out, num_latents = W_enc.shape[0]")
    if b_dec is not None:
        _checks.tensor("b_dec", b_dec, ndim=1)
        _checks.shape("b_dec", b_dec, (W_dec.shape[1],), "d_out = W_dec.shape[1]")


def topk_binary_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, log_threshold: Tensor, k: int, *,
                       ste: str = "sigmoid", temperature: float = 2.0, backend: Optional[str] = None) -> EncoderOutput:
    """Binary TopK encoder: ``z = x @ W_enc.T + b_enc - exp(log_threshold)``, top-k of z per row,
    ``acts = 1[z > 0]`` at the selected latents.

    Backward: ``dL/dz = dL/dacts * STE'(z) + dL/dvalues`` at the selected latents, where STE' is
    ``sigmoid(z/T) * (1 - sigmoid(z/T))`` (``ste="sigmoid"``, no 1/T factor), ``1[|z/T| < 0.5]``
    (``"rectangle"``) or 1 (``"identity"``). Unselected latents get no gradient.
    """
    k = _check_encoder(x, W_enc, b_enc, k)
    _checks.tensor("log_threshold", log_threshold, ndim=1)
    _checks.shape("log_threshold", log_threshold, (W_enc.shape[0],), "num_latents")
    device = _checks.same_device(x=x, W_enc=W_enc, b_enc=b_enc, log_threshold=log_threshold)
    _check_ste(ste, temperature)
    x = _autocast(x)
    _checks.finite(x=x, W_enc=W_enc, b_enc=b_enc, log_threshold=log_threshold)
    name = _backend_for(backend, device, x.dtype)
    x, W_enc, b_enc, log_threshold = (t.contiguous() for t in (x, W_enc, b_enc, log_threshold))
    acts, indices, values, _ = TopKBinaryEncode.apply(x, W_enc, b_enc, log_threshold, k, ste, float(temperature), name)
    return EncoderOutput(acts, indices, values)


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *, backend: Optional[str] = None) -> EncoderOutput:
    """Continuous TopK encoder: ``acts = values = top-k of ReLU(x @ W_enc.T + b_enc)`` per row."""
    k = _check_encoder(x, W_enc, b_enc, k)
    device = _checks.same_device(x=x, W_enc=W_enc, b_enc=b_enc)
    x = _autocast(x)
    _checks.finite(x=x, W_enc=W_enc, b_enc=b_enc)
    name = _backend_for(backend, device, x.dtype)
    x, W_enc, b_enc = (t.contiguous() for t in (x, W_enc, b_enc))
    acts, indices, _ = TopKEncode.apply(x, W_enc, b_enc, k, name)
    return EncoderOutput(acts, indices, acts)


def sparse_decode(indices: Tensor, acts: Tensor, W_dec: Tensor, b_dec: Optional[Tensor] = None, *,
                  binary: bool = False, backend: Optional[str] = None) -> Tensor:
    """``y = b_dec + sum_j acts[:, j] * W_dec[indices[:, j]]`` in the dtype of ``acts``.

    With ``binary=True`` the acts must be 0/1 and the decode is a gather-and-sum of the rows whose
    act is 1 (no multiplications); gradients still reach every selected act (for the STE).
    """
    _checks.tensor("indices", indices, ndim=2, dtypes=_checks.INDEX_DTYPES)
    _checks.tensor("acts", acts, ndim=2)
    _checks.tensor("W_dec", W_dec, ndim=2)
    _checks.shape("acts", acts, tuple(indices.shape), "same as indices")
    if b_dec is not None:
        _checks.tensor("b_dec", b_dec, ndim=1)
        _checks.shape("b_dec", b_dec, (W_dec.shape[1],), "d_out = W_dec.shape[1]")
    device = _checks.same_device(indices=indices, acts=acts, W_dec=W_dec, b_dec=b_dec)
    if not isinstance(binary, bool):
        raise TypeError(f"binary must be a bool, got {type(binary).__name__}")
    _checks.indices_in_range(indices, W_dec.shape[0])
    if binary:
        _checks.binary_codes(acts)  # (NaN is not 0 or 1: no separate finite check)
        _checks.finite(W_dec=W_dec, b_dec=b_dec)
    else:
        _checks.finite(acts=acts, W_dec=W_dec, b_dec=b_dec)
    name = _backend_for(backend, device, acts.dtype)
    contiguous = [t.contiguous() if t is not None else None for t in (indices, acts, W_dec, b_dec)]
    return SparseDecode.apply(*contiguous, binary, name)


def topk_binary_encode_decode(x: Tensor, W_enc: Tensor, b_enc: Tensor, log_threshold: Tensor, W_dec: Tensor,
                              b_dec: Optional[Tensor], k: int, *, ste: str = "sigmoid", temperature: float = 2.0,
                              backend: Optional[str] = None) -> CoderOutput:
    """``topk_binary_encode`` then ``sparse_decode(..., binary=True)`` of its codes, as one op.

    Same values and gradients as the two calls; the backward is one op, which builds the transpose
    of the indices (latent by latent) once for the decoder's and the encoder's gradients and
    computes the acts' gradient from each ``W_dec`` row read once. ``y`` has the dtype of ``x``.
    """
    k = _check_encoder(x, W_enc, b_enc, k)
    _checks.tensor("log_threshold", log_threshold, ndim=1)
    _checks.shape("log_threshold", log_threshold, (W_enc.shape[0],), "num_latents")
    _check_decoder(W_dec, b_dec, W_enc.shape[0])
    device = _checks.same_device(x=x, W_enc=W_enc, b_enc=b_enc, log_threshold=log_threshold, W_dec=W_dec, b_dec=b_dec)
    _check_ste(ste, temperature)
    x = _autocast(x)
    _checks.finite(x=x, W_enc=W_enc, b_enc=b_enc, log_threshold=log_threshold, W_dec=W_dec, b_dec=b_dec)
    name = _backend_for(backend, device, x.dtype)
    x, W_enc, b_enc, log_threshold, W_dec = (t.contiguous() for t in (x, W_enc, b_enc, log_threshold, W_dec))
    b_dec = b_dec.contiguous() if b_dec is not None else None
    y, acts, indices, values, _ = TopKBinaryEncodeDecode.apply(x, W_enc, b_enc, log_threshold, W_dec, b_dec, k, ste,
                                                               float(temperature), name)
    return CoderOutput(y, acts, indices, values)


def topk_encode_decode(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Optional[Tensor], k: int, *,
                       backend: Optional[str] = None) -> CoderOutput:
    """``topk_encode`` then ``sparse_decode`` of its codes, as one op with one backward (see
    ``topk_binary_encode_decode``). ``y`` has the dtype of ``x``."""
    k = _check_encoder(x, W_enc, b_enc, k)
    _check_decoder(W_dec, b_dec, W_enc.shape[0])
    device = _checks.same_device(x=x, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    x = _autocast(x)
    _checks.finite(x=x, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    name = _backend_for(backend, device, x.dtype)
    x, W_enc, b_enc, W_dec = (t.contiguous() for t in (x, W_enc, b_enc, W_dec))
    b_dec = b_dec.contiguous() if b_dec is not None else None
    y, acts, indices, _ = TopKEncodeDecode.apply(x, W_enc, b_enc, W_dec, b_dec, k, name)
    return CoderOutput(y, acts, indices, acts)
