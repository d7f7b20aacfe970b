"""Shared test utilities: random coders, an independent dense formulation of the method, and the
comparisons every backend test uses, at tolerances set by the dtype of each output.

Tolerances. A float32 output is compared at ``fp32_rtol(terms) = 1e-5 * sqrt(terms)`` relative to its
largest magnitude (two correct implementations differ only by their summation order); a 16-bit output
also gets one unit in its last place (both round the same float32 sum, which may fall on either side
of a rounding boundary). Selections are compared by value with the float32 rounding error of the
scores as the only slack, so returning the (k+1)-th latent for the k-th fails wherever the two are
not within rounding error of each other, and as exact index sets on every row whose gap is clear.
"""

from __future__ import annotations

import math

import torch

import binsparse_kernels as bk
from binsparse_kernels.backends.reference import STE_MODES

# One unit in the last place, relative to the value (at the bottom of a binade, where it is largest).
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def make_params(N, d_in, M, d_out=None, *, dtype=torch.float32, x_dtype=None, device="cpu", threshold=0.004,
                requires_grad=True):
    """Random encoder/decoder parameters as in method.md's init (scaled so codes are mixed 0/1)."""
    d_out = d_out or d_in
    g = dict(device=device, dtype=dtype)
    p = {
        "x": torch.randn(N, d_in, device=device).to(x_dtype or dtype),
        "W_enc": (torch.rand(M, d_in, **g) * 2 - 1) / math.sqrt(d_in),
        "b_enc": torch.randn(M, **g) * 0.1,
        "log_threshold": torch.full((M,), math.log(threshold), **g) + torch.randn(M, **g) * 0.1,
        "W_dec": torch.randn(M, d_out, **g) / math.sqrt(d_out),
        "b_dec": torch.randn(d_out, **g) * 0.1,
    }
    for t in p.values():
        t.requires_grad_(requires_grad)
    return p


def coder_case(N, d_in, M, d_out=None, *, x_dtype=torch.float32, dtype=torch.float32, device="cpu",
               threshold=0.004):
    """Parameters (``make_params``, no grad) and upstream gradients ``(G_acts [N, M], G_values [N, M],
    G_y [N, d_out])`` for ``check_coder``.

    With a 16-bit x, W_dec and G_y lie on grids (multiples of 1/32 and 1/256 in [-1, 1]): the decode
    backward's float32 dot products are then exact (for d_out <= 2048), so every implementation
    rounds them to the same 16-bit act gradient. Otherwise a last-bit difference between two correct
    implementations, rounded to 16 bits, would move the float32 weight gradients downstream by a
    16-bit ulp. The grids are fine enough that the decode's sums still need more than 8 bits (a bf16
    accumulator fails).
    """
    d_out = d_out or d_in
    assert d_out <= 2048
    p = make_params(N, d_in, M, d_out, dtype=dtype, x_dtype=x_dtype, device=device, threshold=threshold,
                    requires_grad=False)
    G_y = torch.randn(N, d_out, device=device)
    if x_dtype in LOW_PRECISION:
        p["W_dec"] = (torch.randint(-32, 33, (M, d_out), device=device) / 32).to(dtype)
        G_y = torch.randint(-256, 257, (N, d_out), device=device) / 256
    return p, (torch.randn(N, M, device=device), torch.randn(N, M, device=device), G_y)


# ---------------------------------------------------------------------------------------------
# The dense model: the method written with plain autograd on a given selection
# ---------------------------------------------------------------------------------------------


def rounded(w, dtype):
    """``w`` rounded to ``dtype`` as a value, with the identity float32 gradient: how every backend
    rounds weights to the compute dtype (their gradients stay float32)."""
    w32 = w.float()
    return w32 + (w.to(dtype).float() - w32).detach()


def dense_z(p, binary=True):
    """Scores in float32 (weights rounded to x's dtype), the convention of every backend."""
    x = p["x"]
    pre = x.float() @ rounded(p["W_enc"], x.dtype).T + p["b_enc"].float()
    return pre - p["log_threshold"].float().exp() if binary else torch.relu(pre)


def surrogate(z, ste, temperature):
    """A function whose derivative is the STE factor of method.md (value unused, only the gradient)."""
    if ste == "sigmoid":
        return temperature * torch.sigmoid(z / temperature)  # d/dz = s(1-s), no 1/T
    if ste == "rectangle":
        return torch.clamp(z, -temperature / 2, temperature / 2)  # d/dz = 1[|z/T| < 1/2]
    return z


def dense_coder(p, indices, acts=None, *, binary=True, ste="sigmoid", temperature=2.0, with_b_dec=True):
    """``(codes [N, M], values [N, M], y [N, d_out])`` of the coder on the selection ``indices``,
    written densely with plain autograd and independent of every backend.

    It rounds where the op does: codes, values and y to x's dtype (so autograd also rounds the
    gradients of codes and values to it), weights to x's dtype as values only. ``acts``, a backend's
    own codes (check them with ``check_encoder_output``), give the codes' values; the gradient still
    flows through the dense surrogate (binary) or ReLU (continuous). Without them the codes are
    ``1[z > 0]`` or ``ReLU(pre)``.
    """
    x = p["x"]
    z = dense_z(p, binary)
    mask = torch.zeros_like(z, dtype=torch.bool).scatter_(1, indices, True)
    own = None if acts is None else torch.zeros_like(z).detach().scatter_(1, indices, acts.detach().float())
    if binary:
        s = surrogate(z, ste, temperature)
        codes = ((z > 0).float() if own is None else own) + (s - s.detach())
    else:
        codes = z if own is None else own + (z - z.detach())
    codes = torch.where(mask, codes, 0.0).to(x.dtype)
    values = torch.where(mask, z, 0.0).to(x.dtype) if binary else codes
    y = codes.float() @ rounded(p["W_dec"], x.dtype)
    if with_b_dec:
        y = y + p["b_dec"].float()
    return codes, values, y.to(x.dtype)


def dense_model(p, indices, *, binary=True, ste="sigmoid", temperature=2.0, acts=None):
    """The decoded output ``y`` of ``dense_coder``."""
    return dense_coder(p, indices, acts, binary=binary, ste=ste, temperature=temperature)[2]


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------


def fp32_rtol(terms):
    """Relative difference of two float32 sums of ``terms`` products in different orders (a bound
    with a wide margin: the expected difference is ~6e-8 * sqrt(terms))."""
    return 1e-5 * math.sqrt(max(terms, 1))


def assert_within(got, want, *, atol, rtol, what="values"):
    """``|got - want| <= atol + rtol * |want|`` elementwise (``atol`` may be a broadcastable tensor)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return
    g, w = got.detach().float(), want.detach().float()
    err = (g - w).abs()
    bound = atol + rtol * w.abs()
    bad = ~(err <= bound)  # NaN is bad
    if bool(bad.any()):
        worst = int(torch.where(bad, err.nan_to_num(float("inf")) - bound, -1.0).flatten().argmax())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements off, e.g. got "
                             f"{g.flatten()[worst].item():.9g} want {w.flatten()[worst].item():.9g} "
                             f"(allowed {bound.flatten()[worst].item():.3g}) at flat index {worst}")


def assert_close_out(got, want, *, terms, what="output"):
    """``got`` (an output of a backend, in its dtype) against ``want`` (an independent float32
    computation of it): float32 accumulation error relative to the output's largest magnitude, plus
    one ulp of got's dtype if that is 16-bit."""
    scale = float(want.detach().float().abs().max()) if want.numel() else 0.0
    rtol = ULP[got.dtype] if got.dtype in LOW_PRECISION else 0.0
    assert_within(got, want, atol=fp32_rtol(terms) * scale, rtol=rtol, what=f"{what} ({got.dtype})")


def score_slack(p, binary=True):
    """[N, 1]: how far any backend's float32 scores may be from ``dense_z`` (summation order only):
    ``1e-6 * sqrt(d)`` times the row's largest sum of absolute terms."""
    x = p["x"].detach()
    W = p["W_enc"].detach().to(x.dtype).float()
    terms = x.float().abs() @ W.abs().T + p["b_enc"].detach().float().abs()
    if binary:
        terms = terms + p["log_threshold"].detach().float().exp()
    return 1e-6 * math.sqrt(max(x.shape[1], 1)) * terms.amax(1, keepdim=True).clamp_min(1e-30)


def assert_topk_by_value(z, indices, k, slack):
    """``indices`` [N, k] is a top-k of the scores ``z`` [N, M] per row, up to ``slack`` ([N, 1] or a
    number, the float32 error of the scores the backend selected from): distinct indices; every
    selected score >= the row's k-th largest - slack (so the (k+1)-th in place of the k-th fails unless
    the two are within rounding error); the exact top-k index set on every row whose k-th and (k+1)-th
    scores are more than 2 * slack apart (where rounding cannot reorder them)."""
    N, M = z.shape
    assert indices.shape == (N, k) and indices.dtype == torch.int64, (tuple(indices.shape), indices.dtype)
    if N == 0:
        return
    assert bool(((indices >= 0) & (indices < M)).all()), "an index out of range"
    ids = indices.sort(1).values
    assert bool((ids[:, 1:] != ids[:, :-1]).all()), "duplicate indices in a row"
    slack = torch.as_tensor(slack, dtype=torch.float32, device=z.device).expand(N, 1)
    picked = z.gather(1, indices)
    top = z.topk(min(k + 1, M), 1).values
    kth = top[:, k - 1:k]
    low = picked < kth - slack
    assert not bool(low.any()), (f"{int(low.any(1).sum())} rows select a score below the k-th largest "
                                 f"(first: row {int(low.any(1).nonzero()[0])})")
    clear = (top[:, k - 1] - top[:, k] > 2 * slack[:, 0]) if k < M else torch.ones(N, dtype=torch.bool,
                                                                                    device=z.device)
    want = z.topk(k, 1).indices.sort(1).values
    differ = clear & (ids != want).any(1)
    assert not bool(differ.any()), f"{int(differ.sum())} rows with a clear k-th/(k+1)-th gap select another set"


def check_encoder_output(p, out, k, *, binary):
    """A backend's EncoderOutput against the dense scores: the selection (``assert_topk_by_value``),
    the values (z at the indices, in x's dtype), and the acts (binary: ``1[z > 0]`` wherever z is
    clearly away from 0; continuous: the values). Returns the dense scores."""
    dtype = p["x"].dtype
    z = dense_z(p, binary).detach()
    slack = score_slack(p, binary)
    assert_topk_by_value(z, out.indices, k, slack)
    assert out.values.dtype == dtype and out.acts.dtype == dtype, (out.values.dtype, out.acts.dtype)
    picked = z.gather(1, out.indices)
    rtol = ULP[dtype] if dtype in LOW_PRECISION else 0.0
    assert_within(out.values, picked, atol=slack, rtol=rtol, what="values vs dense z")
    if binary:
        assert bool(((out.acts == 0) | (out.acts == 1)).all()), "binary acts must be 0 or 1"
        clear = picked.abs() > slack
        assert torch.equal(out.acts[clear], (picked[clear] > 0).to(dtype)), "acts != 1[z > 0]"
    else:
        assert_within(out.acts, picked, atol=slack, rtol=rtol, what="acts vs dense ReLU(pre)")
    return z


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


def backend_params(backends=None, *, dtypes=(torch.float32,)):
    """(backend, dtype) pairs usable here. The triton backend refuses bf16 on CPU tensors (the
    Triton interpreter's bf16 tl.dot is wrong): the interpreter runs its 16-bit paths in fp16."""
    import pytest

    out = []
    for name in backends or bk.available_backends():
        for dtype in dtypes:
            if name == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
                continue
            out.append(pytest.param(name, dtype, id=f"{name}-{str(dtype).replace('torch.', '')}"))
    return out


def require_backend(name):
    """GPU tests: on a GPU machine every backend the package ships must be there. A missing one is a
    failed build or import (its reason says which), never a skip."""
    reason = bk.backends.unavailable_reason(name)
    assert reason is None, f"the {name} backend is unavailable on this GPU machine: {reason}"


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


def _names(binary, with_b_dec):
    names = ["x", "W_enc", "b_enc", "log_threshold", "W_dec", "b_dec"]
    return [n for n in names if (binary or n != "log_threshold") and (with_b_dec or n != "b_dec")]


def _loss(acts, values, y, upstream, indices=None, *, binary):
    """Weighs y, and acts and values per (token, latent), so the slot order of a backend does not
    matter. Continuous codes are one tensor (acts is values): one term for both, so autograd adds
    exactly two 16-bit gradients into them (decode's and this one), in either order the same sum."""
    G_acts, G_values, G_y = upstream
    if indices is not None:
        G_acts, G_values = G_acts.gather(1, indices), G_values.gather(1, indices)
    loss = (y.float() * G_y).sum()
    if binary:
        return loss + (acts.float() * G_acts).sum() + (values.float() * G_values).sum()
    return loss + (acts.float() * (G_acts + G_values)).sum()


def coder_grads(p, k, backend, *, binary, ste="sigmoid", temperature=2.0, with_b_dec=True, upstream):
    """``(EncoderOutput, y, {name: gradient})``: encode + decode on ``backend`` through the public API
    and the gradients of every input under ``_loss``."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in p.items()}
    out = encode(leaves, k, backend, binary=binary, ste=ste, temperature=temperature)
    y = bk.sparse_decode(out.indices, out.acts, leaves["W_dec"], leaves["b_dec"] if with_b_dec else None,
                         binary=binary, backend=backend)
    names = _names(binary, with_b_dec)
    loss = _loss(out.acts, out.values, y, upstream, out.indices, binary=binary)
    return out, y.detach(), dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))


def check_coder(p, k, backend, *, binary, ste="sigmoid", temperature=2.0, with_b_dec=True, upstream):
    """Runs ``coder_grads`` on ``backend`` and checks it against the dense model on the backend's OWN
    selection: the encoder output (``check_encoder_output``), y, and the gradient of every input, each
    at the tolerance of its dtype (``assert_close_out``). Returns ``(EncoderOutput, gradients)``."""
    out, y, got = coder_grads(p, k, backend, binary=binary, ste=ste, temperature=temperature,
                              with_b_dec=with_b_dec, upstream=upstream)
    check_encoder_output(p, out, k, binary=binary)
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in p.items()}
    codes, values, y_dense = dense_coder(leaves, out.indices, out.acts, binary=binary, ste=ste,
                                         temperature=temperature, with_b_dec=with_b_dec)
    names = _names(binary, with_b_dec)
    want = torch.autograd.grad(_loss(codes, values, y_dense, upstream, binary=binary), [leaves[n] for n in names])
    N, d_in = p["x"].shape
    M, d_out = p["W_dec"].shape
    terms = max(N, d_in, d_out, k)
    assert y.dtype == p["x"].dtype
    assert_close_out(y, y_dense, terms=terms, what="y")
    assert list(got) == names
    for name, w in zip(names, want):
        assert got[name].dtype == p[name].dtype, (name, got[name].dtype)
        assert_close_out(got[name], w.to(got[name].dtype), terms=terms, what=f"grad of {name}")
    return out, got
