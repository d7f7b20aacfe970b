"""The fused encode + decode ops (``topk_binary_encode_decode`` / ``topk_encode_decode``) and their
one backward op (``coder_backward``), on every backend against the dense definition of the method
and the reference backend: values and every gradient (including gradients that reach the codes
from outside), odd sizes, k = 1 and k = M, several bucket segments, 16-bit inputs; opcheck,
torch.compile, and the index transpose built once per step.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import binsparse_kernels as bk
from binsparse_kernels.backends import reference
from binsparse_kernels.coder import SparseCoder, SparseCoderConfig
from helpers import STES, backend_params, dense_z, device_for, make_params, surrogate

KEYS = ("x", "W_enc", "b_enc", "log_threshold", "W_dec", "b_dec")
SHAPES = [  # (N, d_in, M, d_out, k): odd sizes, transcoder shapes, k = 1 and k = M
    (37, 19, 53, None, 5),
    (11, 16, 40, 24, 1),
    (9, 7, 13, None, 13),
]


def fused(p, k, backend, *, binary, ste="sigmoid", temperature=2.0, b_dec=True):
    bd = p["b_dec"] if b_dec else None
    if binary:
        return bk.topk_binary_encode_decode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], p["W_dec"], bd, k,
                                            ste=ste, temperature=temperature, backend=backend)
    return bk.topk_encode_decode(p["x"], p["W_enc"], p["b_enc"], p["W_dec"], bd, k, backend=backend)


def dense_outputs(p, indices, *, binary, ste, temperature):
    """(y, acts, values) as dense [N, M] tensors from plain autograd, on the given selection:
    independent of every backend (a dense mask, a straight-through surrogate, a dense matmul)."""
    z = dense_z(p, binary)
    mask = torch.zeros_like(z, dtype=torch.bool).scatter_(1, indices, True)
    if binary:
        s = surrogate(z, ste, temperature)
        acts = torch.where(mask, (z > 0).float() + s - s.detach(), torch.zeros_like(z))
        values = torch.where(mask, z, torch.zeros_like(z))
    else:
        acts = values = torch.where(mask, z, torch.zeros_like(z))
    return acts @ p["W_dec"].float() + p["b_dec"].float(), acts, values


def upstream(N, M, d_out, device):
    g = torch.Generator().manual_seed(7)
    return tuple(torch.randn(*shape, generator=g).to(device) for shape in ((N, d_out), (N, M), (N, M)))


def leaves(p, device):
    return {name: t.detach().to(device).requires_grad_() for name, t in p.items()}


@pytest.mark.parametrize("backend,dtype", backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["continuous"] + STES)
def test_fused_values_and_gradients_match_the_dense_definition(backend, dtype, shape, mode):
    N, d_in, M, d_out, k = shape
    binary = mode != "continuous"
    ste = mode if binary else "sigmoid"
    device = device_for(backend)
    p = leaves(make_params(N, d_in, M, d_out, threshold=0.05), device)
    G_y, G_acts, G_values = upstream(N, M, d_out or d_in, device)

    out = fused(p, k, backend, binary=binary, ste=ste, temperature=1.5)
    y_dense, acts_dense, values_dense = dense_outputs(p, out.indices, binary=binary, ste=ste, temperature=1.5)
    torch.testing.assert_close(out.y.float(), y_dense, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.acts.float(), acts_dense.gather(1, out.indices), atol=1e-5, rtol=1e-5)
    if binary:
        assert 0 < out.acts.sum() <= out.acts.numel() and set(out.acts.unique().tolist()) <= {0.0, 1.0}
    # a loss on y, on the acts and on the values: the acts' gradient from outside and the decoder's meet
    loss = ((out.y.float() * G_y).sum() + (out.acts.float() * G_acts.gather(1, out.indices)).sum()
            + (out.values.float() * G_values.gather(1, out.indices)).sum())
    dense_loss = (y_dense * G_y).sum() + (acts_dense * G_acts).sum() + (values_dense * G_values).sum()
    names = [n for n in KEYS if binary or n != "log_threshold"]
    got = torch.autograd.grad(loss, [p[n] for n in names])
    want = torch.autograd.grad(dense_loss, [p[n] for n in names])
    for name, g, w in zip(names, got, want):
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, w, atol=2e-4, rtol=2e-4, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend,dtype", backend_params(dtypes=(torch.float32, torch.bfloat16, torch.float16)))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "topk"])
def test_fused_op_equals_the_separate_ops(backend, dtype, binary):
    """Same codes and y as encode + decode (bitwise: the forward is the same two kernels) and the same
    gradients up to summation order (the fused backward keeps the decoder's grad_acts in float32)."""
    device = device_for(backend)
    base = make_params(40, 24, 96, 20, threshold=0.05)
    base["x"] = base["x"].detach().to(dtype)
    p, q = leaves(base, device), leaves(base, device)
    out = fused(p, 8, backend, binary=binary)
    enc = (bk.topk_binary_encode(q["x"], q["W_enc"], q["b_enc"], q["log_threshold"], 8, backend=backend) if binary
           else bk.topk_encode(q["x"], q["W_enc"], q["b_enc"], 8, backend=backend))
    y = bk.sparse_decode(enc.indices, enc.acts, q["W_dec"], q["b_dec"], binary=binary, backend=backend)
    assert out.y.dtype == out.acts.dtype == dtype
    for a, b in zip((out.y, out.acts, out.indices, out.values), (y, enc.acts, enc.indices, enc.values)):
        assert torch.equal(a, b)
    G = torch.linspace(-1, 1, y.numel(), device=device).view_as(y)
    names = [n for n in KEYS if binary or n != "log_threshold"]
    got = torch.autograd.grad((out.y.float() * G).sum(), [p[n] for n in names])
    want = torch.autograd.grad((y.float() * G).sum(), [q[n] for n in names])
    # 16-bit: the separate decode backward rounds grad_acts to the acts' dtype, the fused one keeps it in
    # float32, so the weight gradients differ by a few roundings of that dtype (eps 2^-10 fp16, 2^-7 bf16)
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend,dtype", [p for p in backend_params(dtypes=(torch.float32, torch.float16,
                                                                              torch.bfloat16))
                                           if p.values[0] != "reference"])
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_backend_coder_backward_matches_reference(backend, dtype, mode):
    """The backend function itself, every subset of needed gradients, a latent on every token (several
    bucket segments in the Triton and CUDA backends); 16-bit x, acts and grad_y with float32 weights
    (rounded to the compute dtype by both), as under autocast."""
    device = device_for(backend)
    impl = bk.backends.get(backend, torch.device(device))
    g = torch.Generator().manual_seed(3)
    N, d_in, M, d_out, k = 300, 12, 40, 9, 4
    indices = torch.stack([torch.randperm(M - 1, generator=g)[: k - 1] + 1 for _ in range(N)])
    indices = torch.cat([torch.zeros(N, 1, dtype=torch.long), indices], 1)  # latent 0 on every token
    values = torch.randn(N, k, generator=g)
    binary = mode != 0
    acts = (values > 0).float() if binary else values.relu()
    args = [torch.randn(N, d_out, generator=g), torch.randn(N, k, generator=g), torch.randn(N, k, generator=g),
            indices, acts, values, torch.randn(N, d_in, generator=g), torch.randn(M, d_in, generator=g),
            torch.randn(M, d_out, generator=g)]
    for i in (0, 4, 6):  # grad_y, acts, x in the compute dtype
        args[i] = args[i].to(dtype)
    args = [a.to(device) for a in args]
    for need in [(True, True, True, True), (False, False, False, True), (True, False, False, False),
                 (False, True, True, False), (False, False, True, True)]:
        want = reference.coder_backward(*args, binary, mode, 0.7, *need)
        got = impl.coder_backward(*args, binary, mode, 0.7, *need)
        for name, a, b in zip(("grad_x", "grad_W_enc", "grad_b_enc", "grad_W_dec"), got, want):
            assert (a is None) == (b is None), (name, need)
            if b is not None:
                assert a.dtype == torch.float32
                torch.testing.assert_close(a.cpu(), b.cpu(), atol=1e-4, rtol=1e-4, msg=lambda m: f"{name} {need}: {m}")


@pytest.mark.parametrize("backend", bk.available_backends())
def test_rectangle_ste_at_its_boundary_matches_the_reference(backend):
    """|v / T| < 1/2 with v one ulp either side of T/2: the backends divide as IEEE does."""
    device = device_for(backend)
    impl = bk.backends.get(backend, torch.device(device))
    T = 0.7
    half = torch.tensor(T / 2, dtype=torch.float32)
    vals = torch.stack([torch.nextafter(half, torch.tensor(0.0)), half, torch.nextafter(half, torch.tensor(1.0))])
    values = torch.cat([vals, -vals]).repeat(4).view(6, 4)
    N, k = values.shape
    indices = torch.arange(k).repeat(N, 1)
    ones, zeros = torch.ones(N, k), torch.zeros(N, k)
    x, W = torch.ones(N, 3), torch.ones(k, 3)
    args = [t.to(device) for t in (ones, zeros, values, x, W, indices)]
    got = impl.encode_backward(*args, 2, T, False, False, True)[2]
    want = reference.encode_backward(*args, 2, T, False, False, True)[2]
    assert torch.equal(got.cpu(), want.cpu())


def test_empty_batch_and_gradients_only_where_needed():
    p = make_params(0, 6, 10, 4)
    out = fused(p, 3, None, binary=True)
    assert out.y.shape == (0, 4) and out.indices.shape == (0, 3)
    gW, gWd = torch.autograd.grad(out.y.sum(), [p["W_enc"], p["W_dec"]])
    assert not gW.any() and not gWd.any()
    # only the decoder trains: no encoder gradient is computed
    q = make_params(9, 6, 10, 4)
    for name in ("x", "W_enc", "b_enc", "log_threshold"):
        q[name].requires_grad_(False)
    out = fused(q, 3, None, binary=True)
    out.y.sum().backward()
    assert q["W_dec"].grad is not None and q["W_enc"].grad is None


class _OpCounter(TorchDispatchMode):
    """Counts the calls of the binsparse custom ops."""

    def __init__(self):
        super().__init__()
        self.calls: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("binsparse."):
            key = name.split(".")[1]
            self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("activation", ["topk_binary", "topk", "topk_hybrid"])
def test_a_coder_step_runs_one_backward_op_per_part(activation):
    torch.manual_seed(0)
    coder = SparseCoder(16, SparseCoderConfig(activation=activation, num_latents=64, k=6, transcode=True,
                                              skip_connection=True))
    x, y = torch.randn(30, 16), torch.randn(30, 16)
    with _OpCounter() as counter:
        coder(x, y).fvu.backward()
    parts = 2 if activation == "topk_hybrid" else 1
    assert counter.calls.get("coder_backward") == parts, counter.calls
    assert "encode_backward" not in counter.calls and "sparse_decode_backward" not in counter.calls


@pytest.mark.skipif("triton" not in bk.available_backends(), reason="triton backend unavailable")
def test_triton_builds_the_index_transpose_once_per_backward(monkeypatch):
    from binsparse_kernels.backends.triton import sparse

    built = []
    original = sparse._Buckets

    def counting(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sparse, "_Buckets", counting)
    monkeypatch.setattr(sparse, "SEGMENT", 4)  # several segments per latent
    device = device_for("triton")
    p = leaves(make_params(20, 8, 16, 8), device)
    out = fused(p, 4, "triton", binary=True)
    built.clear()
    torch.autograd.grad(out.y.sum() + out.acts.sum(), [p[n] for n in KEYS])
    assert len(built) == 1


@pytest.mark.parametrize("backend", bk.available_backends())
def test_opcheck(backend):
    dev = device_for(backend)  # on a GPU machine the cuda and triton backends are checked on the GPU
    p = make_params(7, 5, 16, 6, device=dev)
    x, W, b, lt, Wd, bd = (p[n] for n in KEYS)
    ops = torch.ops.binsparse
    torch.library.opcheck(ops.topk_binary_encode_decode, (x, W, b, lt, Wd, bd, 3, "sigmoid", 2.0, backend))
    torch.library.opcheck(ops.topk_binary_encode_decode, (x, W, b, lt, Wd, None, 3, "rectangle", 1.0, backend))
    torch.library.opcheck(ops.topk_encode_decode, (x, W, b, Wd, bd, 3, backend))
    out = bk.topk_binary_encode_decode(x, W, b, lt, Wd, bd, 3, backend=backend)
    values = torch.randn(7, 3, device=dev)
    for binary, mode in ((True, 1), (False, 0)):
        for need_x, need_b in ((True, True), (False, False)):
            torch.library.opcheck(ops.coder_backward,
                                  (torch.randn(7, 6, device=dev), torch.randn(7, 3, device=dev),
                                   torch.randn(7, 3, device=dev), out.indices, out.acts.detach(), values, x.detach(),
                                   W.detach(), Wd.detach(), binary, mode, 2.0, need_x, True, need_b, True, backend))


def test_torch_compile_fullgraph_coder_step_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    coder = SparseCoder(8, SparseCoderConfig(activation="topk_hybrid", num_latents=32, k=4, transcode=True,
                                             skip_connection=True))
    x, y = torch.randn(12, 8), torch.randn(12, 8)
    params = list(coder.parameters())

    def loss(x, y):
        return coder(x, y).fvu

    eager = loss(x, y)
    g_eager = torch.autograd.grad(eager, params)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(x, y)
    g_comp = torch.autograd.grad(compiled, params)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)
