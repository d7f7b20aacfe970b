"""The op contract: every available backend against the method's math and the reference backend.

Values and gradients of every input, odd sizes, k = 1 and k = M, ties, bf16 and fp32, SAE and
transcoder shapes, the three STE variants, plus float64 gradcheck of the reference.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import binsparse_kernels as bk
from helpers import (STES, assert_topk_by_value, backend_params, dense_model, dense_z, device_for, grads,
                     make_params)

ENC_KEYS = ("x", "W_enc", "b_enc", "log_threshold", "W_dec", "b_dec")


def run_coder(p, k, backend, *, binary=True, ste="sigmoid", temperature=2.0):
    if binary:
        out = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], k, ste=ste,
                                    temperature=temperature, backend=backend)
    else:
        out = bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], k, backend=backend)
    y = bk.sparse_decode(out.indices, out.acts, p["W_dec"], p["b_dec"], binary=binary, backend=backend)
    return out, y


def to_device(p, device):
    return {name: t.detach().to(device).requires_grad_() for name, t in p.items()}


# ---------------------------------------------------------------------------------------------
# Reference backend against the dense definition of the method
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_reference_encode_is_topk_of_the_definition(binary):
    p = make_params(23, 17, 41)
    out = (bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 6, backend="reference")
           if binary else bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 6, backend="reference"))
    z = dense_z(p, binary).detach()
    assert_topk_by_value(z, out, 6)
    if binary:
        assert torch.equal(out.acts, (out.values > 0).to(out.acts.dtype))
        assert set(out.acts.unique().tolist()) <= {0.0, 1.0}
    else:
        assert torch.equal(out.acts, out.values)
        assert (out.acts >= 0).all()


@pytest.mark.parametrize("binary", [True, False])
def test_reference_decode_is_dense_matmul(binary):
    p = make_params(19, 9, 31, d_out=13)
    out = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 5, backend="reference")
    acts = out.acts.detach() if binary else torch.rand(19, 5)
    y = bk.sparse_decode(out.indices, acts, p["W_dec"], p["b_dec"], binary=binary, backend="reference")
    dense = torch.zeros(19, 31).scatter_(1, out.indices, acts)
    torch.testing.assert_close(y, dense @ p["W_dec"].detach() + p["b_dec"].detach())


def test_binary_acts_are_one_only_where_z_is_positive():
    p = make_params(64, 8, 32, threshold=0.5)  # a large threshold leaves some selected z <= 0
    out = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 12, backend="reference")
    assert (out.acts == 0).any() and (out.acts == 1).any()
    assert torch.equal(out.acts == 1, out.values > 0)


# ---------------------------------------------------------------------------------------------
# Every backend: values and gradients against the dense definition and the reference backend
# ---------------------------------------------------------------------------------------------

SHAPES = [  # (N, d_in, M, d_out, k): odd sizes, SAE and transcoder shapes, k = 1 and k = M
    (37, 19, 53, None, 5),
    (11, 16, 40, 24, 1),
    (9, 7, 13, None, 13),
    (1, 5, 130, 3, 32),
]


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["continuous"] + STES)
def test_backend_values_and_gradients(backend, dtype, shape, mode):
    N, d_in, M, d_out, k = shape
    binary = mode != "continuous"
    ste = mode if binary else "sigmoid"
    device = device_for(backend)
    p = to_device(make_params(N, d_in, M, d_out, threshold=0.05), device)
    R = torch.randn(N, d_out or d_in, device=device)

    out, y = run_coder(p, k, backend, binary=binary, ste=ste, temperature=1.5)
    z = dense_z(p, binary).detach()
    assert_topk_by_value(z, out, k)
    loss = (y.float() * R).sum()
    got = grads(loss, [p[n] for n in ENC_KEYS])

    # independent dense formulation, on the same selection
    y_dense = dense_model(p, out.indices, binary=binary, ste=ste, temperature=1.5)
    torch.testing.assert_close(y.float(), y_dense, atol=1e-4, rtol=1e-4)
    want = grads((y_dense * R).sum(), [p[n] for n in ENC_KEYS])
    for name, g, w in zip(ENC_KEYS, got, want):
        if name == "log_threshold" and not binary:
            assert g is None and w is None
            continue
        assert g is not None, name
        torch.testing.assert_close(g, w, atol=2e-4, rtol=2e-4, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend,dtype", backend_params(dtypes=(torch.bfloat16, torch.float16)))
@pytest.mark.parametrize("binary", [True, False])
def test_backend_low_precision_matches_reference(backend, dtype, binary):
    device = device_for(backend)
    torch.manual_seed(1)
    base = make_params(40, 24, 96, 20, threshold=0.05)
    base["x"] = base["x"].detach().to(dtype)
    results = {}
    for name in ("reference", backend):
        p = to_device(base, device)
        out, y = run_coder(p, 8, name, binary=binary)
        assert out.acts.dtype == dtype and y.dtype == dtype
        loss = (y.float() * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum()
        results[name] = (out, y, grads(loss, [p[n] for n in ENC_KEYS]))
    (ref_out, ref_y, ref_g), (out, y, g) = results["reference"], results[backend]
    assert torch.equal(ref_out.indices.sort(1).values.cpu(), out.indices.sort(1).values.cpu())
    order, ref_order = out.indices.argsort(1), ref_out.indices.argsort(1)  # slots come in no fixed order
    torch.testing.assert_close(out.values.gather(1, order).cpu(), ref_out.values.gather(1, ref_order).cpu())
    torch.testing.assert_close(y.cpu(), ref_y.cpu())
    for name, a, b in zip(ENC_KEYS, ref_g, g):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(b.cpu(), a.cpu(), atol=2e-2, rtol=2e-2, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend,dtype", backend_params())
def test_ties_and_all_equal_rows(backend, dtype):
    device = device_for(backend)
    N, d, M, k = 6, 8, 37, 5
    x = torch.zeros(N, d, device=device)
    W = torch.randn(M, d, device=device)
    b = torch.zeros(M, device=device)
    b[:9] = 1.0  # nine latents tie at the top, more than k
    lt = torch.full((M,), -3.0, device=device)
    out = bk.topk_binary_encode(x, W, b, lt, k, backend=backend)
    assert (out.indices < 9).all(), "a tie for the top k must be broken among the tied latents"
    assert torch.equal(out.indices.sort(1).values[:, 1:] != out.indices.sort(1).values[:, :-1],
                       torch.ones(N, k - 1, dtype=torch.bool, device=device))
    assert (out.acts == 1).all()
    # all-equal rows: every latent ties
    b.zero_()
    out = bk.topk_encode(x, W, b, k, backend=backend)
    assert (out.acts == 0).all()
    assert out.indices.sort(1).values.unique(dim=1).shape[1] == k
    y = bk.sparse_decode(out.indices, out.acts, torch.randn(M, 3, device=device), backend=backend)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("backend,dtype", backend_params())
def test_non_contiguous_inputs(backend, dtype):
    device = device_for(backend)
    p = make_params(21, 12, 30, requires_grad=False)
    p = {n: t.to(device) for n, t in p.items()}
    nc = {
        "x": p["x"].T.contiguous().T,  # column-major
        "W_enc": p["W_enc"].T.contiguous().T,
        "b_enc": torch.stack([p["b_enc"], p["b_enc"]], 1)[:, 0],  # strided
        "log_threshold": torch.stack([p["log_threshold"]] * 2, 1)[:, 1],
    }
    assert not nc["x"].is_contiguous() and not nc["b_enc"].is_contiguous()
    want = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 4, backend=backend)
    got = bk.topk_binary_encode(nc["x"], nc["W_enc"], nc["b_enc"], nc["log_threshold"], 4, backend=backend)
    assert torch.equal(want.indices, got.indices) and torch.equal(want.acts, got.acts)
    W_dec_nc = p["W_dec"].T.contiguous().T
    idx_nc = want.indices.T.contiguous().T
    y1 = bk.sparse_decode(want.indices, want.acts, p["W_dec"], p["b_dec"], binary=True, backend=backend)
    y2 = bk.sparse_decode(idx_nc, want.acts, W_dec_nc, p["b_dec"], binary=True, backend=backend)
    torch.testing.assert_close(y1, y2)


@pytest.mark.parametrize("backend,dtype", backend_params())
def test_empty_batch(backend, dtype):
    device = device_for(backend)
    p = make_params(0, 8, 20, requires_grad=False)
    p = {n: t.to(device) for n, t in p.items()}
    out = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 3, backend=backend)
    assert out.acts.shape == (0, 3) and out.indices.shape == (0, 3)
    y = bk.sparse_decode(out.indices, out.acts, p["W_dec"], p["b_dec"], binary=True, backend=backend)
    assert y.shape == (0, 8)


@pytest.mark.parametrize("backend,dtype", backend_params())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(N=st.integers(1, 24), d=st.integers(1, 20), M=st.integers(1, 48), data=st.data())
def test_property_shapes_and_k(backend, dtype, N, d, M, data):
    k = data.draw(st.integers(1, M), label="k")
    binary = data.draw(st.booleans(), label="binary")
    device = device_for(backend)
    p = to_device(make_params(N, d, M, threshold=0.05), device)
    out, y = run_coder(p, k, backend, binary=binary)
    assert_topk_by_value(dense_z(p, binary).detach(), out, k)
    if binary:
        assert ((out.acts == 0) | (out.acts == 1)).all()
        assert (out.acts.sum(1) <= k).all()
    y_dense = dense_model(p, out.indices, binary=binary)
    torch.testing.assert_close(y.float(), y_dense, atol=1e-4, rtol=1e-4)
    g = grads(y.square().sum(), [p["W_enc"], p["W_dec"]])
    w = grads(y_dense.square().sum(), [p["W_enc"], p["W_dec"]])
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


# ---------------------------------------------------------------------------------------------
# Gradients only where needed; float64 gradcheck of the reference's differentiable paths
# ---------------------------------------------------------------------------------------------


def test_gradients_only_for_inputs_that_need_them(monkeypatch):
    from binsparse_kernels.backends import reference

    seen = {}
    original = reference.encode_backward

    def spy(*args):
        seen["flags"] = args[-3:]
        return original(*args)

    monkeypatch.setattr(reference, "encode_backward", spy)
    p = make_params(10, 6, 20, requires_grad=False)
    p["W_enc"].requires_grad_()
    out = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 3, backend="reference")
    y = bk.sparse_decode(out.indices, out.acts, p["W_dec"], backend="reference")
    y.sum().backward()
    assert seen["flags"] == (False, True, False)  # need_x, need_W, need_b
    assert p["x"].grad is None and p["b_enc"].grad is None


def test_gradcheck_reference_float64():
    torch.manual_seed(3)
    p = make_params(6, 5, 12, 4, dtype=torch.float64)
    x, W, b, lt, Wd, bd = (p[n] for n in ENC_KEYS)

    # values = z at the selection: its true derivative is what the encoder backward computes
    def binary_values(x, W, b, lt):
        return bk.topk_binary_encode(x, W, b, lt, 3, backend="reference").values

    def relu_values(x, W, b):
        return bk.topk_encode(x, W, b, 3, backend="reference").acts

    idx = bk.topk_encode(x, W, b, 3).indices.detach()

    def decode(acts, Wd, bd):
        return bk.sparse_decode(idx, acts, Wd, bd, backend="reference")

    acts = torch.rand(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(binary_values, (x, W, b, lt))
    assert torch.autograd.gradcheck(relu_values, (x, W, b))
    assert torch.autograd.gradcheck(decode, (acts, Wd, bd))


def test_float64_is_reference_only():
    p = make_params(3, 4, 6, dtype=torch.float64, requires_grad=False)
    assert bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 2).values.dtype == torch.float64
    if "cpu" in bk.available_backends():
        with pytest.raises(TypeError, match="float64"):
            bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 2, backend="cpu")


# ---------------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------------


def test_autocast_bf16_codes_and_fp32_weight_grads():
    p = make_params(16, 12, 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 4)
        y = bk.sparse_decode(out.indices, out.acts, p["W_dec"], p["b_dec"], binary=True)
    assert out.acts.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    for name in ENC_KEYS:
        assert p[name].grad is not None and p[name].grad.dtype == torch.float32, name


def test_mixed_weight_dtypes_round_weights_to_activation_dtype():
    p = make_params(8, 10, 20, requires_grad=False)
    x16 = p["x"].to(torch.bfloat16)
    got = bk.topk_encode(x16, p["W_enc"], p["b_enc"], 5, backend="reference")
    want = bk.topk_encode(x16, p["W_enc"].to(torch.bfloat16).float(), p["b_enc"], 5, backend="reference")
    assert torch.equal(got.indices, want.indices)
