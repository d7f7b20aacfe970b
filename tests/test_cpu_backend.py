"""The compiled CPU backend (``backend="cpu"``, csrc/cpu) against the dense model and the reference.

Values through the public API (selections by value against the dense scores, exact index sets
where the k-th/(k+1)-th gap is clear), gradients of every input against the dense model on the
backend's own selection, fp32/bf16/fp16 at tolerances set by each output's dtype, odd sizes, k = 1
and k = M, transcoder shapes, d = 576, non-contiguous inputs, N = 0, exact tie-breaking,
determinism, opcheck on the cpu_* ops, and bad calls straight through torch.ops.binsparse.cpu_*.
The extension is always built (setup.py): if it does not load, this module fails to import.
"""

from __future__ import annotations

import pytest
import torch

import binsparse_kernels as bk
from binsparse_kernels.backends import cpu as cpu_backend
from binsparse_kernels.backends import reference
from helpers import (assert_close_out, assert_topk_by_value, check_coder, check_encoder_output, coder_case, dense_z,
                     encode, make_params, score_slack)

ops = torch.ops.binsparse

# (N, d_in, M, d_out, k): odd sizes, k = 1, k = M, a transcoder (d_out != d_in), M above the
# kernel's 4096-latent GEMM chunk (so the running top-k is merged across chunks).
SHAPES = [
    (37, 19, 53, 19, 5),
    (16, 8, 40, 24, 1),
    (9, 7, 13, 7, 13),
    (5, 6, 4100, 11, 33),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---------------------------------------------------------------------------------------------
# Encode forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_encode_matches_the_dense_scores(shape, binary, dtype):
    N, d_in, M, d_out, k = shape
    p = make_params(N, d_in, M, d_out, x_dtype=dtype, requires_grad=False)
    check_encoder_output(p, encode(p, k, "cpu", binary=binary), k, binary=binary)


@pytest.mark.parametrize("dtype,eps", [(torch.bfloat16, 2.0**-9), (torch.float16, 2.0**-12)], ids=str)
def test_weights_of_another_dtype_are_rounded_to_the_activation_dtype(dtype, eps):
    # W holds 1 + eps (exact in fp32, rounds to 1 in `dtype`) and -1: every op sees the difference.
    W = torch.tensor([[1.0 + eps, 1.0 + eps], [-1.0, -1.0]])
    x = torch.ones(1, 2, dtype=dtype)
    indices, acts = torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=dtype)
    g2, g1 = torch.ones(1, 2), torch.ones(1, 2, dtype=dtype)
    for impl in (reference, cpu_backend):
        values, _ = impl.encode_forward(x, W, torch.zeros(2), None, 1, False)
        assert values.item() == 2.0
        grad_x = impl.encode_backward(g2, g2, torch.ones(1, 2), x, W, indices, 3, 1.0, True, False, False)[0]
        assert torch.equal(grad_x, torch.zeros(1, 2))  # 2 * (1 + 0) rounded rows cancel exactly
        assert impl.decode_forward(indices, acts, W, None, True).float().abs().max().item() == 0.0
        grad_acts = impl.decode_backward(g1, indices, acts, W, False, True, False)[0]
        assert torch.equal(grad_acts, torch.tensor([[2.0, -2.0]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weight_rounding_is_bit_exact(dtype):
    # Rows gathered by the sparse kernels are rounded like W.to(dtype).float(), specials included.
    M, d = 64, 40
    W = torch.randn(M, d) * torch.logspace(-8, 8, d)
    W[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.3895e38, -0.0])
    idx = torch.arange(M).view(M, 1)
    one = torch.ones(M, 1)
    grad_x = ops.cpu_encode_backward(one, torch.zeros(M, 1), one, torch.zeros(M, d, dtype=dtype), W, idx, 3, 1.0,
                                     True, False, False)[0]  # grad_x[t] = 1 * rounded W[t]
    want = W.to(dtype).float()
    assert torch.equal(grad_x.isnan(), want.isnan())
    assert torch.equal(grad_x.nan_to_num(0.0), want.nan_to_num(0.0))


@pytest.mark.parametrize("M,k", [(10, 3), (5000, 7), (4100, 4100), (4100, 4097)])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
def test_ties_go_to_the_lowest_index(M, k, binary):
    # x = 0, so every score of a row is b - theta (binary) or ReLU(b): many exact ties.
    b = torch.tensor([1.0, 2.0, 2.0, -1.0, 2.0]).repeat(M // 5 + 1)[:M]
    x, W = torch.zeros(3, 2), torch.randn(M, 2)
    theta = torch.full((M,), 0.5)
    values, indices = ops.cpu_encode_forward(x, W, b, theta if binary else None, k, binary)
    s = (b - theta) if binary else torch.relu(b)
    # The expected set: sort by (value desc, index asc) and take the first k.
    order = sorted(range(M), key=lambda i: (-s[i].item(), i))[:k]
    for row in range(3):
        assert sorted(indices[row].tolist()) == sorted(order)
        assert torch.equal(values[row], s[indices[row]])
        # rows come back by decreasing value, ties by increasing index
        assert indices[row].tolist() == order


def test_nan_scores_rank_first_and_never_crash():
    # The public API rejects non-finite inputs; the op itself must still behave: NaN ranks above
    # every number (as in torch.topk), ties among NaN go to the lowest index.
    x, W, b = torch.randn(6, 4), torch.randn(5000, 4), torch.zeros(5000)
    b[[7, 4500]] = float("nan")
    x[2] = float("nan")  # a row of NaN scores only
    for binary in (True, False):
        values, indices = ops.cpu_encode_forward(x, W, b, torch.zeros(5000) if binary else None, 3, binary)
        for row in (0, 1, 3, 4, 5):
            assert indices[row, :2].tolist() == [7, 4500] and values[row, :2].isnan().all()
            assert not values[row, 2].isnan()
        assert indices[2].tolist() == [0, 1, 2]


def test_encode_accepts_zero_tokens():
    p = make_params(0, 6, 20, 6, requires_grad=False)
    for binary in (True, False):
        ref, got = encode(p, 4, "reference", binary=binary), encode(p, 4, "cpu", binary=binary)
        assert got.indices.shape == ref.indices.shape == (0, 4)
    leaves = {n: t.requires_grad_(True) for n, t in p.items()}
    out = encode(leaves, 4, "cpu")
    y = bk.sparse_decode(out.indices, out.acts, leaves["W_dec"], leaves["b_dec"], binary=True, backend="cpu")
    assert y.shape == (0, 6)
    grads = torch.autograd.grad(y.sum() + out.values.sum(), list(leaves.values()))
    assert all(g is not None and not g.any() for g in grads)


# ---------------------------------------------------------------------------------------------
# Gradients of every input, through the public API
# ---------------------------------------------------------------------------------------------

GRAD_CASES = [  # (binary, ste, temperature)
    (True, "sigmoid", 2.0),
    (True, "sigmoid", 0.5),
    (True, "rectangle", 2.0),
    (True, "rectangle", 0.3),
    (True, "identity", 2.0),
    (False, None, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "continuous" if not c[0] else f"{c[1]}-T{c[2]}")
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_gradients_match_the_dense_model(shape, case, dtype):
    binary, ste, temperature = case
    N, d_in, M, d_out, k = shape
    # 16-bit: 16-bit activations with fp32 master weights, as under autocast
    p, upstream = coder_case(N, d_in, M, d_out, x_dtype=dtype, threshold=1.2)  # some selected z <= 0
    out, _ = check_coder(p, k, "cpu", binary=binary, ste=ste or "sigmoid", temperature=temperature or 2.0,
                         upstream=upstream)
    if binary:
        assert (out.acts == 0).any() and (out.acts == 1).any(), "want a mix of 0/1 acts"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
def test_gradients_without_b_dec_and_with_a_transcoder_shape(binary):
    p, upstream = coder_case(29, 10, 45, 17)
    _, got = check_coder(p, 6, "cpu", binary=binary, with_b_dec=False, upstream=upstream)
    assert "b_dec" not in got


@pytest.mark.parametrize("d", [12, 576], ids=lambda d: f"d{d}")
def test_gradients_with_an_ultra_high_frequency_latent(d):
    # Latent 3 wins on every token: one large bucket in the CSR transpose; at the real width 576 too.
    p, upstream = coder_case(300 if d < 100 else 40, d, 64, d)
    p["b_enc"][3] = 50.0
    out, _ = check_coder(p, 4, "cpu", binary=True, upstream=upstream)
    assert (out.indices == 3).any(1).all()


# ---------------------------------------------------------------------------------------------
# Decode and its backward, directly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=lambda t: "W_" + str(t)[6:])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("with_b_dec", [True, False], ids=["b_dec", "no_b_dec"])
def test_decode_matches_reference(with_b_dec, binary, dtype, w_dtype):
    N, k, M, d = 23, 7, 41, 13
    indices = torch.rand(N, M).argsort(1)[:, :k]
    acts = ((torch.rand(N, k) > 0.3).to(dtype) if binary else torch.randn(N, k).to(dtype)).requires_grad_(True)
    W = torch.randn(M, d).to(w_dtype).requires_grad_(True)
    b = (torch.randn(d).to(w_dtype).requires_grad_(True)) if with_b_dec else None
    g = torch.randn(N, d).to(dtype)
    results = {}
    for backend in ("reference", "cpu"):
        y = bk.sparse_decode(indices, acts, W, b, binary=binary, backend=backend)
        inputs = [acts, W] + ([b] if with_b_dec else [])
        results[backend] = (y, *torch.autograd.grad(y, inputs, g))
    for what, ref, got in zip(("y", "grad acts", "grad W_dec", "grad b_dec"), results["reference"], results["cpu"]):
        assert got.dtype == ref.dtype
        assert_close_out(got, ref, terms=N, what=what)


def test_decode_backward_skips_what_is_not_needed():
    indices, acts, W = torch.randint(0, 9, (4, 3)), torch.rand(4, 3), torch.randn(9, 5)
    g = torch.randn(4, 5)
    assert cpu_backend.decode_backward(g, indices, acts, W, False, True, False)[1] is None
    assert cpu_backend.decode_backward(g, indices, acts, W, False, False, True)[0] is None
    out = cpu_backend.encode_backward(acts, acts, acts, torch.randn(4, 2), torch.randn(9, 2), indices, 1, 2.0,
                                      False, True, False)
    assert out[0] is None and out[1].shape == (9, 2) and out[2] is None
    # duplicate indices in a row (never produced by the encoder) still sum correctly
    dup = torch.tensor([[1, 1, 2]] * 4)
    ref = reference.decode_backward(g, dup, acts, W, False, True, True)
    got = cpu_backend.decode_backward(g, dup, acts, W, False, True, True)
    for r, c in zip(ref, got):
        torch.testing.assert_close(c, r)


def test_non_contiguous_inputs():
    x_t = torch.randn(9, 17).T  # transposed views and strided slices
    W_enc = torch.randn(9, 31).T
    b_enc = torch.randn(62)[::2]
    theta = torch.rand(31)
    W_dec = torch.randn(31, 18)[:, ::2]
    assert not any(t.is_contiguous() for t in (x_t, W_enc, b_enc, W_dec))
    # straight through the ops
    v, i = ops.cpu_encode_forward(x_t, W_enc, b_enc, theta, 5, True)
    p = {"x": x_t, "W_enc": W_enc, "b_enc": b_enc, "log_threshold": theta.log()}
    assert_topk_by_value(dense_z(p), i, 5, score_slack(p))
    acts = (v > 0).float()
    ref_y = reference.decode_forward(i, acts, W_dec.contiguous(), None, True)
    torch.testing.assert_close(ops.cpu_decode_forward(i.T.contiguous().T, acts.T.contiguous().T, W_dec, None, True),
                               ref_y)
    # and through the public API, with gradients (w.r.t. the tensors the views come from)
    bases = [torch.randn(9, 17, requires_grad=True), torch.randn(9, 31, requires_grad=True),
             torch.randn(31, 18, requires_grad=True)]
    grads = {}
    for backend in ("reference", "cpu"):
        x_v, W_v, Wd_v = bases[0].T, bases[1].T, bases[2][:, ::2]
        assert not any(t.is_contiguous() for t in (x_v, W_v, Wd_v))
        out = bk.topk_encode(x_v, W_v, b_enc, 5, backend=backend)
        y = bk.sparse_decode(out.indices, out.acts, Wd_v, None, backend=backend)
        grads[backend] = torch.autograd.grad(y.pow(2).sum(), bases)
    for r, c in zip(grads["reference"], grads["cpu"]):
        assert_close_out(c, r, terms=17, what="gradient")


def test_results_are_bitwise_reproducible_and_independent_of_thread_count():
    # The sparse kernels split work by token or by latent bucket, never inside a sum, so the thread
    # count cannot change a result: a property of the code (no BLAS in them), true on every CPU.
    # (The encoder's GEMM is a BLAS call, whose blocking may follow the thread count: only run twice.)
    p = make_params(200, 24, 300, 24, requires_grad=False)
    theta = p["log_threshold"].exp()
    values, indices = ops.cpu_encode_forward(p["x"], p["W_enc"], p["b_enc"], theta, 8, True)
    again = ops.cpu_encode_forward(p["x"], p["W_enc"], p["b_enc"], theta, 8, True)
    assert torch.equal(values, again[0]) and torch.equal(indices, again[1])
    acts, g, gy = (values > 0).float(), torch.randn(200, 8), torch.randn(200, 24)

    def sparse_ops():
        return (*ops.cpu_encode_backward(g, g, values, p["x"], p["W_enc"], indices, 1, 2.0, True, True, True),
                ops.cpu_decode_forward(indices, acts, p["W_dec"], p["b_dec"], True),
                *ops.cpu_decode_backward(gy, indices, acts, p["W_dec"], True, True, True),
                *ops.cpu_decode_backward(gy, indices, g, p["W_dec"], False, True, True))

    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (threads, 1, threads, 3):
            torch.set_num_threads(n)
            runs.append(sparse_ops())
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The custom ops themselves: opcheck, and bad calls that must raise, never crash
# ---------------------------------------------------------------------------------------------


def test_opcheck_cpu_ops():
    x, W, b, t = torch.randn(7, 5), torch.randn(12, 5), torch.randn(12), torch.rand(12)
    for binary in (True, False):
        torch.library.opcheck(ops.cpu_encode_forward, (x, W, b, t if binary else None, 3, binary))
    values, idx = ops.cpu_encode_forward(x, W, b, t, 3, True)
    g = torch.randn(7, 3)
    for mode, need in [(1, (True, True, True)), (0, (False, True, False)), (3, (True, False, True))]:
        torch.library.opcheck(ops.cpu_encode_backward, (g, g, values, x, W, idx, mode, 2.0, *need))
    Wd, bd, acts = torch.randn(12, 4), torch.randn(4), (values > 0).float()
    for binary in (True, False):
        torch.library.opcheck(ops.cpu_decode_forward, (idx, acts, Wd, bd, binary))
        torch.library.opcheck(ops.cpu_decode_forward, (idx, acts.bfloat16(), Wd, None, binary))
        for need in [(True, True), (True, False), (False, True)]:
            torch.library.opcheck(ops.cpu_decode_backward, (torch.randn(7, 4), idx, acts, Wd, binary, *need))
    # the whole coder's backward (decoder and encoder in one pass): binary with the sigmoid STE, and TopK
    gy = torch.randn(7, 4)
    for binary, mode, need in [(True, 1, (True, True, True, True)), (True, 1, (False, True, False, True)),
                               (False, 0, (True, False, True, False))]:
        a = (values > 0).float() if binary else values.relu()
        torch.library.opcheck(ops.cpu_coder_backward, (gy, g, g, idx, a, values, x, W, Wd, binary, mode, 2.0, *need))


def _bad_calls():
    x, W, b, t = torch.randn(3, 4), torch.randn(10, 4), torch.zeros(10), torch.ones(10)
    idx, acts, g = torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2), torch.randn(3, 2)
    Wd, gy = torch.randn(10, 5), torch.randn(3, 5)
    enc_b = ops.cpu_encode_backward
    return {
        "encode x 3-D": (lambda: ops.cpu_encode_forward(x[None], W, b, t, 2, True), "x must be 2-D"),
        "encode d mismatch": (lambda: ops.cpu_encode_forward(torch.randn(3, 5), W, b, t, 2, True), "W_enc"),
        "encode b shape": (lambda: ops.cpu_encode_forward(x, W, torch.zeros(9), t, 2, True), "b_enc"),
        "encode threshold shape": (lambda: ops.cpu_encode_forward(x, W, b, torch.ones(3), 2, True), "threshold"),
        "encode k too big": (lambda: ops.cpu_encode_forward(x, W, b, t, 11, True), "k must be in"),
        "encode k zero": (lambda: ops.cpu_encode_forward(x, W, b, t, 0, True), "k must be in"),
        "encode binary no threshold": (lambda: ops.cpu_encode_forward(x, W, b, None, 2, True), "threshold"),
        "encode int x": (lambda: ops.cpu_encode_forward(x.long(), W, b, t, 2, True), "float32, bfloat16"),
        "encode float64 W": (lambda: ops.cpu_encode_forward(x, W.double(), b, t, 2, True), "W_enc"),
        "enc bwd index range": (lambda: enc_b(g, g, g, x, W, idx + 10, 1, 2.0, True, True, True), "indices must lie"),
        "enc bwd negative index": (lambda: enc_b(g, g, g, x, W, idx - 1, 1, 2.0, True, True, True), "indices"),
        "enc bwd int32 indices": (lambda: enc_b(g, g, g, x, W, idx.int(), 1, 2.0, True, True, True), "int64"),
        "enc bwd grad shape": (lambda: enc_b(g[:, :1], g, g, x, W, idx, 1, 2.0, True, True, True), "grad_acts"),
        "enc bwd mode": (lambda: enc_b(g, g, g, x, W, idx, 7, 2.0, True, True, True), "mode"),
        "enc bwd temperature": (lambda: enc_b(g, g, g, x, W, idx, 1, 0.0, True, True, True), "temperature"),
        "decode index range": (lambda: ops.cpu_decode_forward(idx + 10, acts, Wd, None, True), "indices must lie"),
        "decode acts shape": (lambda: ops.cpu_decode_forward(idx, torch.ones(3, 5), Wd, None, True), "acts"),
        "decode b_dec shape": (lambda: ops.cpu_decode_forward(idx, acts, Wd, torch.zeros(4), True), "b_dec"),
        "decode 1-D indices": (lambda: ops.cpu_decode_forward(idx[0], acts[0], Wd, None, True), "indices"),
        "dec bwd grad_y shape": (lambda: ops.cpu_decode_backward(gy[:, :4], idx, acts, Wd, True, True, True),
                                 "grad_y"),
        "dec bwd index range": (lambda: ops.cpu_decode_backward(gy, idx - 1, acts, Wd, True, True, True),
                                "indices must lie"),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_calls_raise_runtime_error(name):
    call, match = _bad_calls()[name]
    with pytest.raises(RuntimeError, match=match):
        call()
