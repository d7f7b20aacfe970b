"""The op contract: every available backend against the method's math (an independent dense model).

Values and gradients of every input, on each backend's own selection, odd sizes, k = 1 and k = M,
ties, fp32 and 16-bit (the reference's too), SAE and transcoder shapes, the three STE variants,
upstream gradients of any layout, autocast, plus float64 gradcheck of the reference. Tolerances are
set by the dtype of each output (tests/helpers.py).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import binsparse_kernels as bk
from helpers import (STES, assert_close_out, assert_topk_by_value, backend_params, check_coder, check_encoder_output,
                     coder_case, dense_coder, device_for, make_params)

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
# The comparison helpers themselves: they must fail on the mistakes they exist to catch
# ---------------------------------------------------------------------------------------------


def test_selection_check_fails_on_a_slip_to_the_next_latent_and_on_a_duplicate():
    torch.manual_seed(5)
    z, k = torch.randn(16, 40), 6
    good = z.topk(k, 1).indices
    assert_topk_by_value(z, good, k, slack=1e-6)
    # the (k+1)-th latent returned for the k-th, in one row
    slipped = good.clone()
    slipped[3, k - 1] = z.topk(k + 1, 1).indices[3, k]
    with pytest.raises(AssertionError, match="below the k-th"):
        assert_topk_by_value(z, slipped, k, slack=1e-6)
    # a duplicate inside one row that a whole-column unique(dim=1) cannot see
    dup = good.clone()
    dup[0, 1] = dup[0, 0]
    assert dup.sort(1).values.unique(dim=1).shape[1] == k  # the old check passes it
    with pytest.raises(AssertionError, match="duplicate"):
        assert_topk_by_value(z, dup, k, slack=1e-6)
    # a tie at the k-th value may go either way, but not a clear gap
    z[0, good[0, k - 1]] = z[0].topk(k + 1).values[k]
    assert_topk_by_value(z, z.topk(k, 1).indices, k, slack=1e-6)


def test_output_tolerance_is_set_by_the_output_dtype():
    want = torch.randn(300) * 4
    assert_close_out(want * (1 + 1e-6), want, terms=20)  # float32 summation-order noise passes
    with pytest.raises(AssertionError):  # a bf16-rounded accumulation in a float32 output fails
        assert_close_out(want.bfloat16().float(), want, terms=20)
    assert_close_out(want.bfloat16(), want, terms=20)  # one bf16 rounding of a bf16 output passes
    with pytest.raises(AssertionError):  # two ulps off in a bf16 output fail
        assert_close_out((want * (1 + 2.0**-6)).bfloat16(), want.bfloat16().float(), terms=20)


# ---------------------------------------------------------------------------------------------
# Reference backend against the dense definition of the method
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_reference_encode_is_topk_of_the_definition(binary):
    p = make_params(23, 17, 41)
    out = (bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 6, backend="reference")
           if binary else bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 6, backend="reference"))
    check_encoder_output(p, out, 6, binary=binary)
    if not binary:
        assert (out.acts >= 0).all()


@pytest.mark.parametrize("binary", [True, False])
def test_reference_decode_is_dense_matmul(binary):
    p = make_params(19, 9, 31, d_out=13)
    out = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 5, backend="reference")
    acts = out.acts.detach() if binary else torch.rand(19, 5)
    y = bk.sparse_decode(out.indices, acts, p["W_dec"], p["b_dec"], binary=binary, backend="reference")
    dense = torch.zeros(19, 31).scatter_(1, out.indices, acts)
    torch.testing.assert_close(y, dense @ p["W_dec"].detach() + p["b_dec"].detach())


@pytest.mark.parametrize("backend,dtype", backend_params())
def test_binary_acts_are_one_only_where_z_is_positive(backend, dtype):
    # a large threshold leaves some selected z <= 0; acts are checked against the dense z
    p = to_device(make_params(64, 8, 32, threshold=0.5), device_for(backend))
    out = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 12, backend=backend)
    assert (out.acts == 0).any() and (out.acts == 1).any()
    check_encoder_output(p, out, 12, binary=True)


# ---------------------------------------------------------------------------------------------
# Every backend: values and gradients against the dense model, on the backend's own selection
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
    p, upstream = coder_case(N, d_in, M, d_out, device=device_for(backend), threshold=0.05)
    check_coder(p, k, backend, binary=binary, ste=mode if binary else "sigmoid", temperature=1.5,
                upstream=upstream)


@pytest.mark.parametrize("backend,dtype", backend_params(dtypes=(torch.bfloat16, torch.float16)))
@pytest.mark.parametrize("binary", [True, False])
def test_backend_low_precision_against_the_dense_model(backend, dtype, binary):
    # 16-bit x with fp32 weights (the reference's own 16-bit path included): codes, values, y and
    # grad_x in x's dtype at 1 ulp; the fp32 weight gradients at fp32 tolerance.
    p, upstream = coder_case(40, 24, 96, 20, x_dtype=dtype, device=device_for(backend), threshold=0.05)
    out, got = check_coder(p, 8, backend, binary=binary, upstream=upstream)
    assert got["x"].dtype == dtype and got["W_enc"].dtype == torch.float32


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
    ids = out.indices.sort(1).values
    assert (ids[:, 1:] != ids[:, :-1]).all(), "duplicate indices in a row"
    assert (out.acts == 1).all()
    # all-equal rows: every latent ties
    b.zero_()
    out = bk.topk_encode(x, W, b, k, backend=backend)
    assert (out.acts == 0).all()
    ids = out.indices.sort(1).values
    assert (ids[:, 1:] != ids[:, :-1]).all() and ((ids >= 0) & (ids < M)).all()
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
    # the same values in another layout: the same launch, so the same bits
    want = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 4, backend=backend)
    got = bk.topk_binary_encode(nc["x"], nc["W_enc"], nc["b_enc"], nc["log_threshold"], 4, backend=backend)
    assert torch.equal(want.indices, got.indices) and torch.equal(want.acts, got.acts)
    W_dec_nc = p["W_dec"].T.contiguous().T
    idx_nc = want.indices.T.contiguous().T
    y1 = bk.sparse_decode(want.indices, want.acts, p["W_dec"], p["b_dec"], binary=True, backend=backend)
    y2 = bk.sparse_decode(idx_nc, want.acts, W_dec_nc, p["b_dec"], binary=True, backend=backend)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("binary", [True, False])
def test_upstream_gradients_of_any_layout(backend, dtype, binary):
    # Autograd hands the backward expanded (y.sum()) or strided gradients: they must give the same
    # gradients as contiguous copies of themselves (the same launches, so the same bits).
    device = device_for(backend)
    p = make_params(13, 9, 30, 11, device=device, threshold=0.05)
    names = [n for n in ENC_KEYS if binary or n != "log_threshold"]
    leaves = [p[n] for n in names]
    out, y = run_coder(p, 5, backend, binary=binary)
    outputs = [out.acts, out.values, y] if binary else [out.acts, y]  # continuous: values is acts
    layouts = {
        "expanded": [torch.rand(1, o.shape[1], device=device).expand_as(o) for o in outputs],
        "transposed": [torch.randn(o.shape[1], o.shape[0], device=device).T for o in outputs],
    }
    for name, upstream in layouts.items():
        assert not any(g.is_contiguous() for g in upstream), name
        got = torch.autograd.grad(outputs, leaves, upstream, retain_graph=True)
        want = torch.autograd.grad(outputs, leaves, [g.contiguous() for g in upstream], retain_graph=True)
        for leaf, a, b in zip(names, got, want):
            if leaf == "b_dec":  # torch's own sum over tokens, whose order follows the layout
                assert_close_out(a, b, terms=13, what=f"{name} b_dec")
            else:
                assert torch.equal(a, b), (name, leaf)


@pytest.mark.parametrize("backend,dtype", backend_params())
def test_empty_batch(backend, dtype):
    device = device_for(backend)
    p = make_params(0, 8, 20, requires_grad=False)
    p = {n: t.to(device) for n, t in p.items()}
    out = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 3, backend=backend)
    assert out.acts.shape == (0, 3) and out.indices.shape == (0, 3)
    y = bk.sparse_decode(out.indices, out.acts, p["W_dec"], p["b_dec"], binary=True, backend=backend)
    assert y.shape == (0, 8)


# Besides small sizes, sizes that leave one tile behind (the merge paths), one dimension at a time
# so the interpreter stays fast: M above the Triton encoder's 64-latent tile (several chunks,
# merged) or d above the Triton decode and backward kernels' column tile (129..150: three tiles of
# 64); M above the compiled CPU backend's 4096-latent chunk.
_SMALL = dict(N=st.integers(1, 24), d=st.integers(1, 20), M=st.integers(1, 48))
_WIDE = {
    "triton": [dict(N=st.integers(1, 12), d=st.integers(1, 20), M=st.integers(65, 100)),
               dict(N=st.integers(1, 12), d=st.integers(129, 150), M=st.integers(1, 30))],
    "cpu": [dict(N=st.integers(1, 8), d=st.integers(1, 20), M=st.integers(4097, 4200))],
    "reference": [dict(N=st.integers(1, 40), d=st.integers(1, 160), M=st.integers(1, 300))],
}


@pytest.mark.parametrize("backend,dtype", backend_params())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_shapes_and_k(backend, dtype, data):
    sizes = data.draw(st.sampled_from([_SMALL] + _WIDE.get(backend, [])), label="sizes")
    N, d, M = (data.draw(sizes[name], label=name) for name in ("N", "d", "M"))
    k = data.draw(st.one_of(st.integers(1, min(M, 8)), st.integers(1, M)), label="k")
    binary = data.draw(st.booleans(), label="binary")
    p, upstream = coder_case(N, d, M, device=device_for(backend), threshold=0.05)
    check_coder(p, k, backend, binary=binary, upstream=upstream)


# ---------------------------------------------------------------------------------------------
# Gradients only where needed; float64 gradcheck of the reference's differentiable paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wanted", [("W_enc",), ("log_threshold",), ("x", "b_enc")])
def test_gradients_only_for_inputs_that_need_them(monkeypatch, wanted):
    from binsparse_kernels.backends import reference

    seen = {}
    original = reference.encode_backward

    def spy(*args):
        seen["flags"] = args[-3:]
        return original(*args)

    monkeypatch.setattr(reference, "encode_backward", spy)
    p = make_params(10, 6, 20, requires_grad=False)
    for name in wanted:
        p[name].requires_grad_()
    out = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 3, backend="reference")
    y = bk.sparse_decode(out.indices, out.acts, p["W_dec"], backend="reference")
    (y * torch.linspace(-1, 1, 6)).sum().backward()
    # need_x, need_W, need_b (the log_threshold gradient is -theta * grad_b_enc)
    assert seen["flags"] == ("x" in wanted, "W_enc" in wanted, "b_enc" in wanted or "log_threshold" in wanted)
    leaves = {n: t.detach().clone().requires_grad_(n in wanted) for n, t in p.items()}
    y_dense = dense_coder(leaves, out.indices, out.acts, with_b_dec=False)[2]
    want = torch.autograd.grad((y_dense * torch.linspace(-1, 1, 6)).sum(), [leaves[n] for n in wanted])
    for name, w in zip(wanted, want):
        assert_close_out(p[name].grad, w, terms=10, what=name)
    for name in set(p) - set(wanted):
        assert p[name].grad is None, name


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


@pytest.mark.parametrize("backend", [b for b in bk.available_backends() if b != "reference"])
def test_float64_is_reference_only(backend):
    p = make_params(3, 4, 6, dtype=torch.float64, requires_grad=False, device=device_for(backend))
    assert bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 2).values.dtype == torch.float64
    with pytest.raises(TypeError, match="float64 inputs are supported by the 'reference' backend only"):
        bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 2, backend=backend)
    with pytest.raises(TypeError, match="float64"):
        bk.sparse_decode(torch.zeros(3, 2, dtype=torch.int64, device=p["x"].device), p["x"][:, :2], p["W_dec"],
                         backend=backend)


# ---------------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------------

# Autocast runs the op in bf16 on its device: the triton backend on CPU tensors refuses bf16.
AUTOCAST_BACKENDS = [b for b in bk.available_backends() if not (b == "triton" and device_for(b) == "cpu")]
# The op runs its backend outside the caller's autocast (ops._custom_op): the torch matmuls of the
# reference backend and of the k > 128 fallbacks stay fp32 (under autocast they would run in bf16:
# values off by a bf16 ulp, gradients by ~1e-3, which these cases catch).


def _autocast_params():
    out = []
    for b in AUTOCAST_BACKENDS:
        for k in (4, 130):
            marks = [pytest.mark.gpu] if device_for(b) == "cuda" else []
            out.append(pytest.param(b, k, marks=marks, id=f"{b}-k{k}"))
    return out


@pytest.mark.parametrize("backend,k", _autocast_params())
@pytest.mark.parametrize("binary", [True, False])
def test_autocast_bf16_codes_and_fp32_weight_grads(backend, k, binary):
    # fp32 master weights and x, autocast to bf16: the op on bf16 x, its codes and y in bf16, the
    # weight gradients fp32 at fp32 tolerance (against the dense model on x rounded to bf16)
    device = device_for(backend)
    p, upstream = coder_case(16, 12, 160, x_dtype=torch.bfloat16, device=device, threshold=0.05)
    leaves = {n: t.float().requires_grad_() for n, t in p.items()}  # x: bf16 values held in fp32
    with torch.autocast(device, dtype=torch.bfloat16):
        out, y = run_coder(leaves, k, backend, binary=binary)
    assert out.acts.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    check_encoder_output(p, out, k, binary=binary)
    G_y = upstream[2]
    got = torch.autograd.grad((y.float() * G_y).sum(), list(leaves.values()), allow_unused=True)
    dense_leaves = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    dense_p = dict(dense_leaves, x=dense_leaves["x"].to(torch.bfloat16))
    y_dense = dense_coder(dense_p, out.indices, out.acts, binary=binary)[2]
    assert_close_out(y, y_dense, terms=k, what="y")
    want = torch.autograd.grad((y_dense.float() * G_y).sum(), list(dense_leaves.values()), allow_unused=True)
    for name, g, w in zip(leaves, got, want):
        if name == "log_threshold" and not binary:
            assert g is None and w is None
            continue
        assert g.dtype == torch.float32, name
        if name == "x":  # computed in bf16 inside the op, then cast back to x's fp32
            g, w = g.bfloat16(), w.bfloat16()
        assert_close_out(g, w, terms=160, what=f"grad of {name}")


def test_mixed_weight_dtypes_round_weights_to_activation_dtype():
    p = make_params(8, 10, 20, requires_grad=False)
    x16 = p["x"].to(torch.bfloat16)
    got = bk.topk_encode(x16, p["W_enc"], p["b_enc"], 5, backend="reference")
    want = bk.topk_encode(x16, p["W_enc"].to(torch.bfloat16).float(), p["b_enc"], 5, backend="reference")
    assert torch.equal(got.indices, want.indices)
