"""The compiled CUDA backend (``backend="cuda"``, csrc/cuda) against the dense model and the reference.

Every test needs a CUDA GPU and is skipped without one (marked ``gpu``). On a GPU machine the
extension must be built (``binsparse_kernels._C_cuda``, or ``BINSPARSE_CUDA_JIT=1``); a missing
build fails the tests instead of skipping them.

Covered: values (selections by value against the dense scores, exact index sets where no near-tie
makes the choice ambiguous), gradients of every input through the public API against the dense
model on the backend's own selection, binary (3 STE modes) and continuous, bf16/fp16/fp32 and mixed
weight dtypes at tolerances set by each output's dtype, odd sizes (scalar and 16-byte load paths,
partial tiles, several latent chunks), k = 1, k = M, k at and beyond the fused limit, exact ties,
all-equal rows, a latent firing on every token (multi-segment buckets) at d = 72, 576 and 2048,
bitwise determinism run to run, the current stream and device, torch.library.opcheck on the cuda_*
ops, and bad calls that must raise RuntimeError.
"""

from __future__ import annotations

import pytest
import torch

import binsparse_kernels as bk
from binsparse_kernels.backends import reference
from helpers import (assert_close_out, check_coder, check_encoder_output, coder_case, dense_model, encode,
                     make_params)

pytestmark = pytest.mark.gpu

DEV = "cuda"
ops = torch.ops.binsparse


@pytest.fixture(scope="module", autouse=True)
def cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from binsparse_kernels.backends import cuda  # raises ImportError with build instructions if not built

    assert "cuda" in bk.available_backends()
    return cuda


# (N, d_in, M, d_out, k). Odd sizes exercise masking and the scalar load path; multiples of 8 the
# 16-byte path; M above one 128-latent tile and N above one 64-token block exercise partial tiles
# and the split of the latents across CTAs (merged by the second kernel).
SHAPES = [
    (37, 19, 53, 19, 5),
    (16, 8, 40, 24, 1),
    (9, 7, 13, 7, 13),  # k = M
    (130, 64, 1000, 72, 32),
    (70, 96, 3000, 40, 128),  # the fused limit
    (33, 40, 700, 24, 129),  # the chunked fallback
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def params(N, d_in, M, d_out, *, x_dtype=torch.float32, w_dtype=torch.float32, threshold=0.004):
    return make_params(N, d_in, M, d_out, dtype=w_dtype, x_dtype=x_dtype, device=DEV, threshold=threshold,
                       requires_grad=False)


# ---------------------------------------------------------------------------------------------
# Encode forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_encode_matches_the_dense_scores(shape, binary, dtype):
    N, d_in, M, d_out, k = shape
    p = params(N, d_in, M, d_out, x_dtype=dtype)
    got = encode(p, k, "cuda", binary=binary)
    check_encoder_output(p, got, k, binary=binary)
    values, indices = ops.cuda_encode_forward(p["x"], p["W_enc"], p["b_enc"],
                                              p["log_threshold"].float().exp() if binary else None, k, binary)
    assert values.dtype == torch.float32 and torch.equal(indices, got.indices)  # the same launch
    assert (values[:, 1:] <= values[:, :-1]).all(), "rows come back sorted by decreasing value"


@pytest.mark.parametrize("N,M", [(1, 100_000), (4096, 300), (300, 40_000)])
def test_encode_large_and_lopsided_shapes(N, M):
    # Few tokens and many latents: many latent chunks per row block; many tokens: many row blocks.
    p = params(N, 64, M, 8, x_dtype=torch.bfloat16)
    check_encoder_output(p, encode(p, 32, "cuda"), 32, binary=True)


@pytest.mark.parametrize("dtype,eps", [(torch.bfloat16, 2.0**-9), (torch.float16, 2.0**-12)], ids=str)
def test_weights_of_another_dtype_are_rounded_to_the_activation_dtype(dtype, eps, cuda_backend):
    # W holds 1 + eps (exact in fp32, rounds to 1 in `dtype`) and -1: every op sees the difference.
    W = torch.tensor([[1.0 + eps, 1.0 + eps], [-1.0, -1.0]], device=DEV)
    x = torch.ones(1, 2, dtype=dtype, device=DEV)
    indices, acts = torch.tensor([[0, 1]], device=DEV), torch.ones(1, 2, dtype=dtype, device=DEV)
    g2, g1 = torch.ones(1, 2, device=DEV), torch.ones(1, 2, dtype=dtype, device=DEV)
    values, _ = cuda_backend.encode_forward(x, W, torch.zeros(2, device=DEV), None, 1, False)
    assert values.item() == 2.0
    grad_x = cuda_backend.encode_backward(g2, g2, torch.ones(1, 2, device=DEV), x, W, indices, 3, 1.0, True, False,
                                          False)[0]
    assert torch.equal(grad_x, torch.zeros(1, 2, device=DEV))
    assert cuda_backend.decode_forward(indices, acts, W, None, True).float().abs().max().item() == 0.0
    grad_acts = cuda_backend.decode_backward(g1, indices, acts, W, False, True, False)[0]
    assert torch.equal(grad_acts, torch.tensor([[2.0, -2.0]], device=DEV))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,k", [(10, 3), (5000, 7), (5000, 128), (700, 700), (700, 129), (300, 1)])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
def test_ties_go_to_the_lowest_index(M, k, binary, dtype):
    # x = 0, so every score of a row is b - theta (binary) or ReLU(b): many exact ties, more than k
    # of them at the k-th value, and whole rows of equal values when b is constant.
    for b in (torch.tensor([1.0, 2.0, 2.0, -1.0, 2.0]).repeat(M // 5 + 1)[:M], torch.full((M,), 0.25)):
        b = b.to(DEV)
        x, W = torch.zeros(70, 8, device=DEV, dtype=dtype), torch.randn(M, 8, device=DEV)
        theta = torch.full((M,), 0.5, device=DEV)
        values, indices = ops.cuda_encode_forward(x, W, b, theta if binary else None, k, binary)
        s = (b - theta) if binary else torch.relu(b)
        s_host = s.tolist()
        order = sorted(range(M), key=lambda i: (-s_host[i], i))[:k]
        expected = torch.tensor(order, device=DEV).expand(70, k)
        assert torch.equal(indices, expected)
        assert torch.equal(values, s[indices])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [3, 130], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
def test_nan_scores_rank_first_as_in_torch_topk(k, binary, dtype):
    # A NaN weight row gives NaN scores: ranked above every number (lowest index first among NaNs),
    # so a row never comes back with fewer than k real latents.
    M = 300
    x, W, b = torch.randn(9, 16, device=DEV, dtype=dtype), torch.randn(M, 16, device=DEV), torch.zeros(M, device=DEV)
    W[[7, 5]] = float("nan")
    theta = torch.full((M,), 0.1, device=DEV)
    values, indices = ops.cuda_encode_forward(x, W, b, theta if binary else None, k, binary)
    assert indices[:, :2].tolist() == [[5, 7]] * 9 and values[:, :2].isnan().all()
    assert not values[:, 2:].isnan().any() and ((indices >= 0) & (indices < M)).all()


def test_encode_accepts_zero_tokens():
    p = params(0, 6, 20, 6)
    for binary in (True, False):
        got = encode(p, 4, "cuda", binary=binary)
        assert got.indices.shape == (0, 4)
    leaves = {n: t.requires_grad_(True) for n, t in p.items()}
    out = encode(leaves, 4, "cuda")
    y = bk.sparse_decode(out.indices, out.acts, leaves["W_dec"], leaves["b_dec"], binary=True, backend="cuda")
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
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[5]], ids=str)
def test_gradients_match_the_dense_model(shape, case, dtype):
    binary, ste, temperature = case
    N, d_in, M, d_out, k = shape
    # 16-bit activations with fp32 master weights, as under autocast; the dense model on the
    # backend's own selection (fp32 summation orders differ on a GPU: no identical selections assumed)
    p, upstream = coder_case(N, d_in, M, d_out, x_dtype=dtype, device=DEV, threshold=1.2)  # some z <= 0
    out, _ = check_coder(p, k, "cuda", binary=binary, ste=ste or "sigmoid", temperature=temperature or 2.0,
                         upstream=upstream)
    if binary:
        assert (out.acts == 0).any() and (out.acts == 1).any(), "want a mix of 0/1 acts"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
def test_gradients_without_b_dec_and_with_a_transcoder_shape(binary):
    p, upstream = coder_case(29, 10, 45, 17, device=DEV)
    _, got = check_coder(p, 6, "cuda", binary=binary, with_b_dec=False, upstream=upstream)
    assert "b_dec" not in got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [72, 576, 2048], ids=lambda d: f"d{d}")
def test_gradients_with_hot_latents(d, dtype):
    # Latent 3 is selected on every other token (2048 of 4096 selections: 8 segments of 256) and
    # latent 5 on every token: multi-segment buckets, reduced by the second stage over
    # min(ceil(d / 256), 16) column blocks (3 at d = 576, 8 at d = 2048).
    N, M, k = 4096, 512, 8
    p, upstream = coder_case(N, d, M, d, x_dtype=dtype, device=DEV)
    p["x"][::2, 0] = 30.0
    p["W_enc"][3] = 0.0
    p["W_enc"][3, 0] = 1.0
    p["b_enc"][5] = 50.0
    out, _ = check_coder(p, k, "cuda", binary=True, upstream=upstream)
    assert (out.indices == 3).any(1)[::2].all() and (out.indices == 5).any(1).all()


# ---------------------------------------------------------------------------------------------
# Decode and the backward kernels, directly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w_dtype", DTYPES, ids=lambda t: "W_" + str(t)[6:])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("with_b_dec", [True, False], ids=["b_dec", "no_b_dec"])
@pytest.mark.parametrize("d", [13, 64, 2056], ids=lambda d: f"d{d}")
def test_decode_matches_reference(d, with_b_dec, binary, dtype, w_dtype):
    N, k, M = 23, 7, 41
    indices = torch.rand(N, M, device=DEV).argsort(1)[:, :k]
    acts = (torch.rand(N, k, device=DEV) > 0.3).to(dtype) if binary else torch.randn(N, k, device=DEV).to(dtype)
    acts.requires_grad_(True)
    W = torch.randn(M, d, device=DEV).to(w_dtype).requires_grad_(True)
    b = (torch.randn(d, device=DEV).to(w_dtype).requires_grad_(True)) if with_b_dec else None
    g = torch.randn(N, d, device=DEV).to(dtype)
    results = {}
    for backend in ("reference", "cuda"):
        y = bk.sparse_decode(indices, acts, W, b, binary=binary, backend=backend)
        inputs = [acts, W] + ([b] if with_b_dec else [])
        results[backend] = (y, *torch.autograd.grad(y, inputs, g))
    for what, ref, got in zip(("y", "grad acts", "grad W_dec", "grad b_dec"), results["reference"], results["cuda"]):
        assert got.dtype == ref.dtype
        assert_close_out(got, ref, terms=max(N, d), what=what)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, False),
                                  (False, False, True)], ids=str)
def test_encode_backward_matches_reference(mode, dtype, need, cuda_backend):
    N, d, M, k = 600, 24, 90, 9
    x = torch.randn(N, d, device=DEV).to(dtype)
    W = torch.randn(M, d, device=DEV)
    r = torch.rand(N, M, device=DEV)
    r[: N // 2, 7] = 2.0  # latent 7 on half the tokens: 300 selections, two segments
    indices = r.argsort(1, descending=True)[:, :k]
    values = torch.randn(N, k, device=DEV) * 2
    ga, gv = torch.randn(N, k, device=DEV).to(dtype), torch.randn(N, k, device=DEV).to(dtype)
    args = (ga, gv, values, x, W, indices, mode, 0.7, *need)
    ref = reference.encode_backward(*args)
    got = cuda_backend.encode_backward(*args)
    for r, c in zip(ref, got):
        assert (r is None) == (c is None)
        if r is not None:
            assert c.dtype == torch.float32
            assert_close_out(c, r, terms=N)


def test_decode_backward_skips_what_is_not_needed(cuda_backend):
    indices = torch.randint(0, 9, (4, 3), device=DEV)
    acts, W = torch.rand(4, 3, device=DEV), torch.randn(9, 5, device=DEV)
    g = torch.randn(4, 5, device=DEV)
    assert cuda_backend.decode_backward(g, indices, acts, W, False, True, False)[1] is None
    assert cuda_backend.decode_backward(g, indices, acts, W, False, False, True)[0] is None
    out = cuda_backend.encode_backward(acts, acts, acts, torch.randn(4, 2, device=DEV), torch.randn(9, 2, device=DEV),
                                       indices, 1, 2.0, False, True, False)
    assert out[0] is None and out[1].shape == (9, 2) and out[2] is None
    # duplicate indices in a row (never produced by the encoder) still sum correctly
    dup = torch.tensor([[1, 1, 2]] * 4, device=DEV)
    ref = reference.decode_backward(g, dup, acts, W, False, True, True)
    got = cuda_backend.decode_backward(g, dup, acts, W, False, True, True)
    for r, c in zip(ref, got):
        torch.testing.assert_close(c, r)
    # upstream gradients of any layout (autograd hands out expanded ones)
    g_exp = torch.ones(1, 5, device=DEV).expand(4, 5)
    ref = reference.decode_backward(g_exp, indices, acts, W, True, True, True)
    got = cuda_backend.decode_backward(g_exp, indices, acts, W, True, True, True)
    for r, c in zip(ref, got):
        torch.testing.assert_close(c, r)


def test_results_are_bitwise_reproducible():
    N, d, M, k = 3000, 40, 64, 16  # buckets of ~750 selections: several segments each
    p = params(N, d, M, d)
    theta = p["log_threshold"].exp()
    values, indices = ops.cuda_encode_forward(p["x"], p["W_enc"], p["b_enc"], theta, k, True)
    again = ops.cuda_encode_forward(p["x"], p["W_enc"], p["b_enc"], theta, k, True)
    assert torch.equal(values, again[0]) and torch.equal(indices, again[1])
    acts, g, gy = (values > 0).float(), torch.randn(N, k, device=DEV), torch.randn(N, d, device=DEV)

    def sparse_ops():
        return (*ops.cuda_encode_backward(g, g, values, p["x"], p["W_enc"], indices, 1, 2.0, True, True, True),
                ops.cuda_decode_forward(indices, acts, p["W_dec"], p["b_dec"], True),
                *ops.cuda_decode_backward(gy, indices, acts, p["W_dec"], True, True, True),
                *ops.cuda_decode_backward(gy, indices, g, p["W_dec"], False, True, True))

    first = sparse_ops()
    for _ in range(3):
        for a, b in zip(sparse_ops(), first):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_runs_on_the_current_stream(backend, monkeypatch):
    # The side stream first sleeps, then overwrites x: an op launched on the current (side) stream
    # sees the new x, one launched on the default stream by mistake reads the old one. Value checks
    # off: their host sync would wait for the side stream and hide a wrong-stream launch.
    monkeypatch.setenv("BINSPARSE_CHECK_VALUES", "0")
    p = make_params(100, 16, 300, 16, x_dtype=torch.bfloat16, device=DEV, requires_grad=False)
    new_x = torch.randn_like(p["x"])
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(10**8)  # tens of milliseconds of GPU time on this stream only
        p["x"].copy_(new_x)
        got = encode(p, 8, backend)
        y = bk.sparse_decode(got.indices, got.acts, p["W_dec"], p["b_dec"], binary=True, backend=backend)
    torch.cuda.synchronize()
    q = dict(p, x=new_x)
    check_encoder_output(q, got, 8, binary=True)
    assert_close_out(y, dense_model(q, got.indices, acts=got.acts), terms=8, what="y")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_runs_on_the_tensors_device(backend):
    # tensors on cuda:1 while cuda:0 is the current device: every kernel must launch on cuda:1
    with torch.cuda.device(0):
        p, upstream = coder_case(64, 24, 300, 24, x_dtype=torch.bfloat16, device="cuda:1", threshold=0.6)
        out, _ = check_coder(p, 8, backend, binary=True, upstream=upstream)
        assert out.indices.device == torch.device("cuda:1")


# ---------------------------------------------------------------------------------------------
# The custom ops themselves: opcheck, and bad calls that must raise, never crash
# ---------------------------------------------------------------------------------------------


def test_opcheck_cuda_ops():
    x, W, b, t = (torch.randn(7, 5, device=DEV), torch.randn(12, 5, device=DEV), torch.randn(12, device=DEV),
                  torch.rand(12, device=DEV))
    for binary in (True, False):
        torch.library.opcheck(ops.cuda_encode_forward, (x, W, b, t if binary else None, 3, binary))
        torch.library.opcheck(ops.cuda_encode_forward, (x.bfloat16(), W, b, t if binary else None, 3, binary))
    values, idx = ops.cuda_encode_forward(x, W, b, t, 3, True)
    g = torch.randn(7, 3, device=DEV)
    for mode, need in [(1, (True, True, True)), (0, (False, True, False)), (3, (True, False, True))]:
        torch.library.opcheck(ops.cuda_encode_backward, (g, g, values, x, W, idx, mode, 2.0, *need))
    Wd, bd, acts = torch.randn(12, 4, device=DEV), torch.randn(4, device=DEV), (values > 0).float()
    for binary in (True, False):
        torch.library.opcheck(ops.cuda_decode_forward, (idx, acts, Wd, bd, binary))
        torch.library.opcheck(ops.cuda_decode_forward, (idx, acts.bfloat16(), Wd, None, binary))
        for need in [(True, True), (True, False), (False, True)]:
            torch.library.opcheck(ops.cuda_decode_backward,
                                  (torch.randn(7, 4, device=DEV), idx, acts, Wd, binary, *need))
    # the whole coder's backward (decoder and encoder in one pass): binary with the sigmoid STE, and TopK
    gy = torch.randn(7, 4, device=DEV)
    for binary, mode, need in [(True, 1, (True, True, True, True)), (True, 1, (False, True, False, True)),
                               (False, 0, (True, False, True, False))]:
        a = (values > 0).float() if binary else values.relu()
        torch.library.opcheck(ops.cuda_coder_backward, (gy, g, g, idx, a, values, x, W, Wd, binary, mode, 2.0, *need))


def _bad_calls():
    c = dict(device=DEV)
    x, W, b, t = torch.randn(3, 4, **c), torch.randn(10, 4, **c), torch.zeros(10, **c), torch.ones(10, **c)
    idx, acts, g = torch.zeros(3, 2, dtype=torch.int64, **c), torch.ones(3, 2, **c), torch.randn(3, 2, **c)
    Wd, gy = torch.randn(10, 5, **c), torch.randn(3, 5, **c)
    enc_b = ops.cuda_encode_backward
    return {
        "encode x 3-D": (lambda: ops.cuda_encode_forward(x[None], W, b, t, 2, True), "x must be 2-D"),
        "encode d mismatch": (lambda: ops.cuda_encode_forward(torch.randn(3, 5, **c), W, b, t, 2, True), "W_enc"),
        "encode b shape": (lambda: ops.cuda_encode_forward(x, W, torch.zeros(9, **c), t, 2, True), "b_enc"),
        "encode threshold shape": (lambda: ops.cuda_encode_forward(x, W, b, torch.ones(3, **c), 2, True),
                                   "threshold"),
        "encode k too big": (lambda: ops.cuda_encode_forward(x, W, b, t, 11, True), "k must be in"),
        "encode k zero": (lambda: ops.cuda_encode_forward(x, W, b, t, 0, True), "k must be in"),
        "encode binary no threshold": (lambda: ops.cuda_encode_forward(x, W, b, None, 2, True), "threshold"),
        "encode int x": (lambda: ops.cuda_encode_forward(x.long(), W, b, t, 2, True), "float32, bfloat16"),
        "encode float64 W": (lambda: ops.cuda_encode_forward(x, W.double(), b, t, 2, True), "W_enc"),
        "encode non-contiguous x": (lambda: ops.cuda_encode_forward(torch.randn(4, 3, **c).T, W, b, t, 2, True),
                                    "contiguous"),
        "encode CPU W": (lambda: ops.cuda_encode_forward(x, W.cpu(), b, t, 2, True), "W_enc"),
        "encode all CPU": (lambda: ops.cuda_encode_forward(x.cpu(), W.cpu(), b.cpu(), t.cpu(), 2, True), "CPU"),
        "enc bwd index range": (lambda: enc_b(g, g, g, x, W, idx + 10, 1, 2.0, True, True, True),
                                "indices must lie"),
        "enc bwd negative index": (lambda: enc_b(g, g, g, x, W, idx - 1, 1, 2.0, True, True, True), "indices"),
        "enc bwd int32 indices": (lambda: enc_b(g, g, g, x, W, idx.int(), 1, 2.0, True, True, True), "int64"),
        "enc bwd grad shape": (lambda: enc_b(g[:, :1], g, g, x, W, idx, 1, 2.0, True, True, True), "grad_acts"),
        "enc bwd mode": (lambda: enc_b(g, g, g, x, W, idx, 7, 2.0, True, True, True), "mode"),
        "enc bwd temperature": (lambda: enc_b(g, g, g, x, W, idx, 1, 0.0, True, True, True), "temperature"),
        "enc bwd values dtype": (lambda: enc_b(g, g, g.half(), x, W, idx, 1, 2.0, True, True, True), "values"),
        "decode index range": (lambda: ops.cuda_decode_forward(idx + 10, acts, Wd, None, True), "indices must lie"),
        "decode acts shape": (lambda: ops.cuda_decode_forward(idx, torch.ones(3, 5, **c), Wd, None, True), "acts"),
        "decode b_dec shape": (lambda: ops.cuda_decode_forward(idx, acts, Wd, torch.zeros(4, **c), True), "b_dec"),
        "decode 1-D indices": (lambda: ops.cuda_decode_forward(idx[0], acts[0], Wd, None, True), "indices"),
        "dec bwd grad_y shape": (lambda: ops.cuda_decode_backward(gy[:, :4], idx, acts, Wd, True, True, True),
                                 "grad_y"),
        "dec bwd index range": (lambda: ops.cuda_decode_backward(gy, idx - 1, acts, Wd, True, True, True),
                                "indices must lie"),
    }


@pytest.mark.parametrize("name", [
    "encode x 3-D", "encode d mismatch", "encode b shape", "encode threshold shape", "encode k too big",
    "encode k zero", "encode binary no threshold", "encode int x", "encode float64 W", "encode non-contiguous x",
    "encode CPU W", "encode all CPU", "enc bwd index range", "enc bwd negative index", "enc bwd int32 indices",
    "enc bwd grad shape", "enc bwd mode", "enc bwd temperature", "enc bwd values dtype", "decode index range",
    "decode acts shape", "decode b_dec shape", "decode 1-D indices", "dec bwd grad_y shape", "dec bwd index range",
])
def test_bad_calls_raise_runtime_error(name):
    call, match = _bad_calls()[name]
    with pytest.raises(RuntimeError, match=match):
        call()
    torch.cuda.synchronize()  # and the context is still healthy
