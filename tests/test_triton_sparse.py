"""The Triton sparse decode and backward kernels (``backends/triton/sparse.py``) against the reference,
and the Triton backend end to end against the dense model.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), so the shapes are small and the dtypes fp32/fp16: the backend refuses bf16 on
CPU tensors (the interpreter's bf16 tl.dot is wrong); bf16 and the larger shapes run in the
``gpu``-marked tests. Every kernel and every constexpr configuration the wrappers launch is also
compiled ahead of time for sm_90 and sm_80 (in a subprocess without the interpreter), since the
interpreter accepts code the compiler rejects. Tolerances are set by each output's dtype.

Covered: decode values and every backward output against ``backends/reference.py`` (identical
inputs), binary and continuous, all four STE modes, b_dec None, weights of another dtype rounded to
the compute dtype, odd sizes (several column tiles, partial token blocks), k = 1, k = M, large k,
duplicate indices in a row, a latent firing on half the tokens (multi-segment buckets, with the
segment size lowered), the STE kernel over several programs, need_* flags off, zero tokens, bitwise
determinism run to run, and the gradients of every parameter (log_threshold included) through the
public API on the backend's own selection, at d = 576 too (grad_b_enc over nine column tiles).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import binsparse_kernels as bk
from binsparse_kernels.backends import reference
from binsparse_kernels.backends import triton as triton_backend
from binsparse_kernels.backends.triton import sparse
from helpers import assert_close_out, check_coder, coder_case

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERP_DTYPES = [torch.float32, torch.float16]


@pytest.fixture
def small_segments(monkeypatch):
    """Segments of 4 selections: a latent with more than 4 selections spans several programs."""
    monkeypatch.setattr(sparse, "SEGMENT", 4)


def codes(N, M, k, dtype, binary, *, hot=None):
    """Distinct indices per row (latent `hot` forced into every other row), and acts."""
    indices = torch.rand(N, M).argsort(1)[:, :k]
    if hot is not None:
        rows = torch.arange(0, N, 2)
        has = (indices[rows] == hot).any(1)
        indices[rows[~has], 0] = hot
    if binary:
        acts = (torch.rand(N, k) > 0.3).to(dtype)
    else:
        acts = torch.randn(N, k).to(dtype)
    return indices.to(DEV), acts.to(DEV)


def assert_same(got, ref, terms, dtype=None):
    """A kernel's output against the reference's on identical inputs, at the tolerance of its dtype."""
    assert (got is None) == (ref is None)
    if ref is None:
        return
    assert got.dtype == (dtype or ref.dtype) and got.shape == ref.shape
    assert_close_out(got, ref, terms=terms)


# ---------------------------------------------------------------------------------------------
# Decode forward
# ---------------------------------------------------------------------------------------------

# (N, M, d, k): d = 13 and 40 one column tile; d = 300 five tiles of 64; N not a multiple of the
# token block; k = 1, k = M, and a large k.
DECODE_SHAPES = [(37, 53, 13, 5), (9, 7, 40, 7), (20, 30, 300, 1), (5, 150, 19, 140)]


@pytest.mark.parametrize("with_b_dec", [True, False], ids=["b_dec", "no_b_dec"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=str)
def test_decode_forward_matches_reference(shape, dtype, binary, with_b_dec):
    N, M, d, k = shape
    indices, acts = codes(N, M, k, dtype, binary)
    W = torch.randn(M, d, device=DEV)
    b = torch.randn(d, device=DEV) if with_b_dec else None
    got = sparse.decode_forward(indices, acts, W, b, binary)
    ref = reference.decode_forward(indices, acts, W, b, binary)
    assert_same(got, ref, k + 1)


@pytest.mark.parametrize("acts_dtype,w_dtype,b_dtype", [(torch.float32, torch.float32, torch.float16),
                                                      (torch.float16, torch.float16, torch.float32),
                                                      (torch.float16, torch.float32, torch.float16)], ids=str)
def test_decode_forward_with_b_dec_in_another_dtype(acts_dtype, w_dtype, b_dtype, monkeypatch):
    # b_dec is added in float32 whatever its dtype, so the launch is one of the compiled variants
    # (aot_specs types bias_ptr *fp32): the launch's pointer types are recorded and looked up.
    indices, acts = codes(23, 40, 6, acts_dtype, False)
    W = torch.randn(40, 19, device=DEV).to(w_dtype)
    b = torch.randn(19, device=DEV).to(b_dtype)
    assert_same(sparse.decode_forward(indices, acts, W, b, False), reference.decode_forward(indices, acts, W, b, False), 7)
    kernel, triples, launched = sparse._gather_rows_kernel, sparse._launch_triples(), []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                launched.append(({n: f"*{sparse._TY[a.dtype]}" for n, a in zip(kernel.arg_names, args)
                                  if isinstance(a, torch.Tensor) and a.dtype in sparse._TY}, constexprs))
            return launch

    monkeypatch.setattr(sparse, "_gather_rows_kernel", Recorder())
    sparse.decode_forward(indices, acts, W, b, False)
    (types, constexprs), = launched
    assert types["bias_ptr"] == "*fp32"
    assert any(fn is kernel and all(t[n] == ty for n, ty in types.items()) and cx == constexprs
               for fn, t, cx in triples)


@pytest.mark.parametrize("dtype,eps", [(torch.float16, 2.0**-12)], ids=str)
def test_weights_of_another_dtype_are_rounded_to_the_compute_dtype(dtype, eps):
    # W holds 1 + eps (exact in fp32, rounds to 1 in `dtype`) and -1: every op sees the difference.
    W = torch.tensor([[1.0 + eps, 1.0 + eps], [-1.0, -1.0]], device=DEV)
    x = torch.ones(1, 2, dtype=dtype, device=DEV)
    indices, acts = torch.tensor([[0, 1]], device=DEV), torch.ones(1, 2, dtype=dtype, device=DEV)
    g32, g = torch.ones(1, 2, device=DEV), torch.ones(1, 2, dtype=dtype, device=DEV)
    assert sparse.decode_forward(indices, acts, W, None, True).float().abs().max().item() == 0.0
    assert sparse.decode_forward(indices, acts, W, None, False).float().abs().max().item() == 0.0
    grad_x = sparse.encode_backward(g32, g32, torch.ones(1, 2, device=DEV), x, W, indices, 3, 1.0, True, False,
                                    False)[0]
    assert torch.equal(grad_x, torch.zeros(1, 2, device=DEV))
    grad_acts = sparse.decode_backward(g, indices, acts, W, False, True, False)[0]
    assert torch.equal(grad_acts, torch.tensor([[2.0, -2.0]], device=DEV))


def test_binary_decode_skips_rows_whose_act_is_zero():
    # A row of infinities selected with act 0 never reaches the sum (the load is masked off).
    indices = torch.tensor([[0, 1], [1, 2]], device=DEV)
    acts = torch.tensor([[1.0, 0.0], [1.0, 1.0]], device=DEV)
    W = torch.tensor([[1.0, 2.0], [float("inf"), float("inf")], [3.0, 4.0]], device=DEV)
    y = sparse.decode_forward(indices, acts, W, None, True)
    assert y[0].tolist() == [1.0, 2.0] and y[1].isinf().all()


# ---------------------------------------------------------------------------------------------
# Decode backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 53, 13, 5), (20, 30, 300, 1), (6, 9, 24, 9), (4, 140, 19, 130)], ids=str)
def test_decode_backward_matches_reference(shape, dtype, binary, small_segments):
    N, M, d, k = shape
    indices, acts = codes(N, M, k, dtype, binary, hot=2)
    W = torch.randn(M, d, device=DEV)
    g = torch.randn(N, d, device=DEV).to(dtype)
    got = sparse.decode_backward(g, indices, acts, W, binary, True, True)
    ref = reference.decode_backward(g, indices, acts, W, binary, True, True)
    for a, r in zip(got, ref):
        assert_same(a, r, max(N, d), torch.float32)


@pytest.mark.parametrize("need", [(True, False), (False, True), (False, False)], ids=str)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
def test_decode_backward_computes_only_what_is_needed(binary, need, small_segments):
    indices, acts = codes(21, 17, 4, torch.float32, binary, hot=5)
    W, g = torch.randn(17, 10, device=DEV), torch.randn(21, 10, device=DEV)
    got = sparse.decode_backward(g, indices, acts, W, binary, *need)
    ref = reference.decode_backward(g, indices, acts, W, binary, *need)
    for a, r in zip(got, ref):
        assert_same(a, r, 21)


def test_decode_backward_with_duplicate_indices_in_a_row(small_segments):
    # never produced by the encoder, but the gradients must still sum every selection
    indices = torch.tensor([[1, 1, 2], [1, 3, 1], [1, 1, 1]] * 5, device=DEV)
    for binary in (True, False):
        acts = (torch.rand(15, 3, device=DEV) > 0.3).float() if binary else torch.randn(15, 3, device=DEV)
        W, g = torch.randn(5, 11, device=DEV), torch.randn(15, 11, device=DEV)
        got = sparse.decode_backward(g, indices, acts, W, binary, True, True)
        ref = reference.decode_backward(g, indices, acts, W, binary, True, True)
        for a, r in zip(got, ref):
            assert_same(a, r, 15)


# ---------------------------------------------------------------------------------------------
# Encoder backward
# ---------------------------------------------------------------------------------------------

NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
         (False, True, True), (False, False, False)]


ENC_CASES = ([(mode, dtype, NEEDS[0]) for mode in (0, 1, 2, 3) for dtype in INTERP_DTYPES]
             + [(1, torch.float32, need) for need in NEEDS[1:]] + [(0, torch.float16, NEEDS[2])])


@pytest.mark.parametrize("mode,dtype,need", ENC_CASES,
                         ids=lambda v: {0: "relu", 1: "sigmoid", 2: "rectangle", 3: "identity"}.get(v, str(v))
                         if not isinstance(v, bool) else str(v))
def test_encode_backward_matches_reference(mode, dtype, need, small_segments):
    # latent 7 on half the tokens: 35 selections, 9 segments of 4, reduced by the second kernel
    N, d, M, k = 69, 21, 90, 6
    indices, _ = codes(N, M, k, dtype, True, hot=7)
    x = torch.randn(N, d, device=DEV).to(dtype)
    W = torch.randn(M, d, device=DEV)
    values = torch.randn(N, k, device=DEV) * 2
    values[0, :3] = 0.0  # the ReLU mask's boundary
    ga, gv = torch.randn(N, k, device=DEV).to(dtype), torch.randn(N, k, device=DEV).to(dtype)
    args = (ga, gv, values, x, W, indices, mode, 0.7, *need)
    got = sparse.encode_backward(*args)
    ref = reference.encode_backward(*args)
    for a, r in zip(got, ref):
        assert_same(a, r, N, torch.float32)


@pytest.mark.parametrize("shape", [(8, 5, 5, 1), (8, 5, 5, 5), (4, 140, 7, 130)], ids=["k1", "kM", "large_k"])
def test_encode_backward_k_extremes(shape, small_segments):
    N, M, d, k = shape
    indices, _ = codes(N, M, k, torch.float32, True)
    x, W = torch.randn(N, d, device=DEV), torch.randn(M, d, device=DEV)
    values, ga, gv = (torch.randn(N, k, device=DEV) for _ in range(3))
    for mode in (0, 1):
        args = (ga, gv, values, x, W, indices, mode, 2.0, True, True, True)
        for a, r in zip(sparse.encode_backward(*args), reference.encode_backward(*args)):
            assert_same(a, r, N)


def test_ste_kernel_over_several_programs():
    # N * k = 1040 selections: two programs of 1024 (the second one partial), every STE mode
    N, M, d, k = 130, 20, 3, 8
    indices, _ = codes(N, M, k, torch.float32, True)
    x, W = torch.randn(N, d, device=DEV), torch.randn(M, d, device=DEV)
    values, ga, gv = (torch.randn(N, k, device=DEV) for _ in range(3))
    for mode in (0, 1, 2, 3):
        args = (ga, gv, values, x, W, indices, mode, 0.7, True, False, True)
        for a, r in zip(sparse.encode_backward(*args), reference.encode_backward(*args)):
            assert_same(a, r, N)


def test_bucket_segments_split_and_reduce_exactly(monkeypatch):
    # A latent on every token and another on half of them, at segment sizes that divide the
    # buckets evenly, unevenly, and not at all (one segment): the same sums each time.
    N, M, d, k = 40, 12, 24, 3
    indices = torch.stack([torch.zeros(N, dtype=torch.long), torch.arange(N) % 2 + 1,
                           torch.randint(3, M, (N,))], 1).to(DEV)
    g, acts = torch.randn(N, d, device=DEV), torch.randn(N, k, device=DEV)
    W = torch.randn(M, d, device=DEV)
    ref = reference.decode_backward(g, indices, acts, W, False, False, True)[1]
    for seg in (1, 3, 20, 1000):
        monkeypatch.setattr(sparse, "SEGMENT", seg)
        got = sparse.decode_backward(g, indices, acts, W, False, False, True)[1]
        assert_close_out(got, ref, terms=N)
        _, gW, gb = sparse.encode_backward(acts, acts, acts, g, W, indices, 3, 1.0, False, True, True)
        _, rW, rb = reference.encode_backward(acts, acts, acts, g, W, indices, 3, 1.0, False, True, True)
        assert_close_out(gW, rW, terms=N)
        assert_close_out(gb, rb, terms=N)


def test_zero_tokens_and_unused_latents():
    indices = torch.zeros(0, 3, dtype=torch.long, device=DEV)
    acts, W = torch.zeros(0, 3, device=DEV), torch.randn(6, 5, device=DEV)
    assert sparse.decode_forward(indices, acts, W, torch.randn(5, device=DEV), True).shape == (0, 5)
    ga, gW = sparse.decode_backward(torch.zeros(0, 5, device=DEV), indices, acts, W, True, True, True)
    assert ga.shape == (0, 3) and torch.equal(gW, torch.zeros(6, 5, device=DEV))
    gx, gWe, gb = sparse.encode_backward(acts, acts, acts, torch.zeros(0, 5, device=DEV), W, indices, 1, 2.0,
                                         True, True, True)
    assert gx.shape == (0, 5) and not gWe.any() and not gb.any() and gb.shape == (6,)


def test_results_are_bitwise_reproducible(small_segments):
    N, M, d, k = 30, 10, 20, 5  # 15 selections per latent on average: several segments each
    indices, acts = codes(N, M, k, torch.float32, True, hot=3)
    g, values = torch.randn(N, k, device=DEV), torch.randn(N, k, device=DEV)
    x, gy = torch.randn(N, d, device=DEV), torch.randn(N, d, device=DEV)
    W = torch.randn(M, d, device=DEV)

    def run():
        return (sparse.decode_forward(indices, g, W, None, False),
                *sparse.decode_backward(gy, indices, acts, W, True, True, True),
                *sparse.decode_backward(gy, indices, g, W, False, True, True),
                *sparse.encode_backward(g, g, values, x, W, indices, 1, 2.0, True, True, True))

    first = run()
    for _ in range(2):
        for a, b in zip(run(), first):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Through the public API: encode (triton) + decode (triton), gradients of every parameter
# ---------------------------------------------------------------------------------------------


E2E_CASES = [(True, "sigmoid", 2.0, True), (True, "rectangle", 0.3, True), (True, "identity", 1.0, False),
             (False, "sigmoid", 2.0, True), (False, "sigmoid", 2.0, False)]


def check_end_to_end(N, d_in, M, d_out, k, dtype, case, *, hot=None, threshold=0.6):
    """The triton backend through the public API against the dense model on its own selection;
    latent ``hot`` (if given) selected on every token. ``threshold``: leaves some selected z <= 0."""
    binary, ste, temperature, with_b_dec = case
    p, upstream = coder_case(N, d_in, M, d_out, x_dtype=dtype, device=DEV, threshold=threshold)
    if hot is not None:
        p["b_enc"][hot] = 50.0
    out, _ = check_coder(p, k, "triton", binary=binary, ste=ste, temperature=temperature, with_b_dec=with_b_dec,
                         upstream=upstream)
    if binary:
        assert (out.acts == 0).any() and (out.acts == 1).any(), "want a mix of 0/1 acts"
    if hot is not None:
        assert (out.indices == hot).any(1).all()


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("case", E2E_CASES, ids=lambda c: f"{'binary-' + c[1] if c[0] else 'continuous'}"
                                                          f"{'' if c[3] else '-no_b_dec'}")
def test_gradients_through_the_public_api(case, dtype, small_segments):
    check_end_to_end(33, 19, 45, 17, 6, dtype, case)


def test_gradients_at_d576_over_several_column_tiles(small_segments):
    # d = 576: nine column tiles of 64 in every backward kernel, grad_b_enc (and so the log_threshold
    # gradient) written by the first; latent 2 on every token: multi-segment buckets
    assert sparse._block_d(576) == 64
    check_end_to_end(8, 576, 20, 576, 3, torch.float32, (True, "sigmoid", 2.0, True), hot=2)


# ---------------------------------------------------------------------------------------------
# bf16 under the interpreter: refused, for every op
# ---------------------------------------------------------------------------------------------


def test_cpu_tensors_in_bf16_are_refused_by_every_op():
    x, W, b, t = torch.randn(4, 8).bfloat16(), torch.randn(10, 8), torch.zeros(10), torch.ones(10)
    idx, g = torch.zeros(4, 2, dtype=torch.int64), torch.ones(4, 2)
    calls = {
        "encode_forward": lambda: triton_backend.encode_forward(x, W, b, t, 2, True),
        "encode_forward bf16 W": lambda: triton_backend.encode_forward(x.float(), W.bfloat16(), b, t, 2, True),
        "encode_backward": lambda: triton_backend.encode_backward(g, g, g, x, W, idx, 1, 2.0, True, True, True),
        "decode_forward": lambda: triton_backend.decode_forward(idx, g.bfloat16(), W, None, True),
        "decode_backward": lambda: triton_backend.decode_backward(x, idx, g.bfloat16(), W, True, True, True),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=r"Triton interpreter \(TRITON_INTERPRET=1\).*bfloat16 tl.dot"):
            call()
    if DEV == "cpu":  # and through the public API
        with pytest.raises(TypeError, match="Triton interpreter"):
            bk.topk_binary_encode(x, W, b, t.log(), 2, backend="triton")
        with pytest.raises(TypeError, match="Triton interpreter"):
            bk.topk_encode(x, W, b, 2, backend="triton")
        with pytest.raises(TypeError, match="Triton interpreter"):
            bk.sparse_decode(idx, g.bfloat16(), W, backend="triton")


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation for sm_90 and sm_80 (the interpreter accepts code the compiler rejects)
# ---------------------------------------------------------------------------------------------

_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from binsparse_kernels.backends.triton import sparse

arch = int(sys.argv[1])
target = GPUTarget("cuda", arch, 32)
specs = sparse.aot_specs()
failures = []
for fn, sig, cx in specs:
    types = {k: v for k, v in sig.items() if v.startswith("*")}
    attrs = sparse.aot_attrs(fn, sig) if sparse._is_main(types) else None
    try:
        compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                                  target=target)
        assert len(compiled.asm["cubin"]) > 0, "empty cubin"
    except Exception as exc:  # report every failing configuration, not only the first
        failures.append(f"{fn.__name__} {sig} {cx}: {type(exc).__name__}: {str(exc)[:500]}")
print(f"compiled {len(specs) - len(failures)} of {len(specs)} for sm_{arch}")
for f in failures:
    print(f)
sys.exit(1 if failures else 0)
"""


def test_every_kernel_configuration_compiles_for_sm90_and_sm80():
    specs = sparse.aot_specs()
    names = {fn.__name__ for fn, _, _ in specs}
    assert names == {"_gather_rows_kernel", "_bucket_dot_kernel", "_ste_kernel", "_bucket_kernel",
                     "_bucket_reduce_kernel"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, "-c", _AOT_SCRIPT, str(arch)], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for arch in (90, 80)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
        assert f"compiled {len(specs)} of {len(specs)}" in out, out[-2000:]


def test_aot_specs_cover_every_launch_configuration():
    full = sparse.aot_specs(exhaustive=True)
    cover = sparse.aot_specs()
    key = lambda fn, d: (fn.__name__, tuple(sorted(d.items())))  # noqa: E731
    assert {key(fn, cx) for fn, _, cx in full} <= {key(fn, cx) for fn, _, cx in cover}
    assert {key(fn, sig) for fn, sig, _ in full} <= {key(fn, sig) for fn, sig, _ in cover}
    # plus, per kernel, one launch with every integer argument specialised to 1
    ones = [(fn, cx) for fn, sig, cx in cover if "i32" not in sig.values()]
    assert sorted(fn.__name__ for fn, _ in ones) == sorted({fn.__name__ for fn, _, _ in full})
    assert all(cx[name] == 1 for fn, cx in ones for name in ("k", "d") if name in cx)
    # the wrappers' block choices are among the compiled ones
    blocks = {(cx["BLOCK_T"], cx["BLOCK_D"]) for fn, _, cx in full if "BLOCK_T" in cx}
    for d in (1, 13, 19, 40, 64, 72, 300, 576, 768, 2048, 2304, 4096, 5000):
        bd = sparse._block_d(d)
        assert (sparse._block_t(bd), bd) in blocks
    assert sparse._block_d(576) == 64 and sparse._block_d(2048) == 256


# ---------------------------------------------------------------------------------------------
# On a GPU: bf16, and sizes the interpreter cannot afford
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "continuous"])
@pytest.mark.parametrize("d", [13, 576, 2056], ids=lambda d: f"d{d}")
def test_gpu_decode_and_backward(d, binary, dtype):
    N, M, k = 1000, 3000, 32
    indices, acts = codes(N, M, k, dtype, binary, hot=11)
    for w_dtype in (torch.float32, dtype):
        W = torch.randn(M, d, device=DEV).to(w_dtype)
        b = torch.randn(d, device=DEV).to(w_dtype)
        g = torch.randn(N, d, device=DEV).to(dtype)
        assert_same(sparse.decode_forward(indices, acts, W, b, binary),
                    reference.decode_forward(indices, acts, W, b, binary), k + 1)
        for a, r in zip(sparse.decode_backward(g, indices, acts, W, binary, True, True),
                        reference.decode_backward(g, indices, acts, W, binary, True, True)):
            assert_same(a, r, max(N, d))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [72, 576, 2048], ids=lambda d: f"d{d}")
def test_gpu_encode_backward_with_a_latent_on_half_the_tokens(d, mode, dtype):
    N, M, k = 4096, 512, 8  # latent 3: ~2048 selections, 8 segments of 256
    indices, _ = codes(N, M, k, dtype, True, hot=3)
    x, W = torch.randn(N, d, device=DEV).to(dtype), torch.randn(M, d, device=DEV)
    values = torch.randn(N, k, device=DEV) * 2
    ga, gv = torch.randn(N, k, device=DEV).to(dtype), torch.randn(N, k, device=DEV).to(dtype)
    args = (ga, gv, values, x, W, indices, mode, 0.7, True, True, True)
    for a, r in zip(sparse.encode_backward(*args), reference.encode_backward(*args)):
        assert_same(a, r, N)
    again = sparse.encode_backward(*args)
    for a, b in zip(sparse.encode_backward(*args), again):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("case", E2E_CASES[:3] + E2E_CASES[3:4], ids=str)
def test_gpu_gradients_through_the_public_api_bf16(case):
    check_end_to_end(64, 64, 1000, 72, 32, torch.bfloat16, case, threshold=1.2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [576, 2048], ids=lambda d: f"d{d}")
def test_gpu_gradients_with_a_latent_on_every_token(d, dtype):
    # multi-segment buckets (4096 selections of latent 5: 16 segments of 256) at the real widths
    check_end_to_end(4096, d, 512, d, 8, dtype, (True, "sigmoid", 2.0, True), hot=5, threshold=1.2)
