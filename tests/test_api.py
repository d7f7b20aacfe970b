"""The API's edges: bad input, backend selection, custom-op registration, torch.compile, fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import binsparse_kernels as bk
from helpers import assert_close_out, backend_params, device_for, make_params


def params(N=8, d=6, M=20, d_out=None):
    return make_params(N, d, M, d_out, requires_grad=False)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear Python exception naming the problem
# ---------------------------------------------------------------------------------------------


def encode_case(**overrides):
    p = params()
    args = {"x": p["x"], "W_enc": p["W_enc"], "b_enc": p["b_enc"], "log_threshold": p["log_threshold"], "k": 3}
    args.update(overrides)
    return lambda: bk.topk_binary_encode(args["x"], args["W_enc"], args["b_enc"], args["log_threshold"], args["k"],
                                         **args.get("kw", {}))


def topk_case(**overrides):
    p = params()
    args = {"x": p["x"], "W_enc": p["W_enc"], "b_enc": p["b_enc"], "k": 3}
    args.update(overrides)
    return lambda: bk.topk_encode(args["x"], args["W_enc"], args["b_enc"], args["k"], **args.get("kw", {}))


def decode_case(**overrides):
    p = params()
    args = {"indices": torch.randint(0, 20, (8, 3)), "acts": torch.ones(8, 3), "W_dec": p["W_dec"],
            "b_dec": p["b_dec"]}
    args.update(overrides)
    kw = args.pop("kw", {})
    return lambda: bk.sparse_decode(args["indices"], args["acts"], args["W_dec"], args["b_dec"], **kw)


BAD_INPUTS = {
    "x 3-D": (encode_case(x=torch.randn(2, 4, 6)), ValueError, r"x must be 2-D .*flatten"),
    "x 1-D": (encode_case(x=torch.randn(6)), ValueError, "x must be 2-D"),
    "x int": (encode_case(x=torch.ones(8, 6, dtype=torch.int32)), TypeError, "x has dtype int32"),
    "x list": (encode_case(x=[[1.0] * 6] * 8), TypeError, "x must be a torch.Tensor"),
    "d mismatch": (encode_case(x=torch.randn(8, 7)), ValueError, r"W_enc must have shape \(20, 7\)"),
    "b_enc shape": (encode_case(b_enc=torch.zeros(19)), ValueError, r"b_enc must have shape \(20,\)"),
    "log_threshold shape": (encode_case(log_threshold=torch.zeros(21)), ValueError, "log_threshold must have shape"),
    "log_threshold 2-D": (encode_case(log_threshold=torch.zeros(20, 1)), ValueError, "log_threshold must be 1-D"),
    "k zero": (encode_case(k=0), ValueError, r"k must be in \[1, 20\]"),
    "k too large": (encode_case(k=21), ValueError, r"k must be in \[1, 20\]"),
    "k float": (encode_case(k=3.0), TypeError, "k must be an int"),
    "k bool": (encode_case(k=True), TypeError, "k must be an int"),
    "ste unknown": (encode_case(kw={"ste": "tanh"}), ValueError, "ste must be one of"),
    "ste relu": (encode_case(kw={"ste": "relu"}), ValueError, "ste must be one of"),
    "temperature zero": (encode_case(kw={"temperature": 0.0}), ValueError, "temperature must be a positive"),
    "temperature negative": (encode_case(kw={"temperature": -1.0}), ValueError, "temperature must be a positive"),
    "temperature NaN": (encode_case(kw={"temperature": float("nan")}), ValueError, "temperature must be a positive"),
    "temperature bool": (encode_case(kw={"temperature": True}), ValueError, "temperature must be a positive"),
    "temperature tensor": (encode_case(kw={"temperature": torch.tensor(2.0)}), ValueError,
                           "temperature must be a positive"),
    "float64 triton": (encode_case(x=torch.randn(8, 6, dtype=torch.float64), kw={"backend": "triton"}), TypeError,
                       "float64 inputs are supported by the 'reference' backend only, not 'triton'"),
    "topk x 3-D": (topk_case(x=torch.randn(2, 4, 6)), ValueError, r"x must be 2-D .*flatten"),
    "topk x int": (topk_case(x=torch.ones(8, 6, dtype=torch.int64)), TypeError, "x has dtype int64"),
    "topk d mismatch": (topk_case(x=torch.randn(8, 7)), ValueError, r"W_enc must have shape \(20, 7\)"),
    "topk b_enc shape": (topk_case(b_enc=torch.zeros(21)), ValueError, r"b_enc must have shape \(20,\)"),
    "topk k too large": (topk_case(k=21), ValueError, r"k must be in \[1, 20\]"),
    "topk k float": (topk_case(k=2.5), TypeError, "k must be an int"),
    "topk x NaN": (topk_case(x=torch.full((8, 6), float("nan"))), ValueError, "x contains NaN"),
    "topk b_enc inf": (topk_case(b_enc=torch.full((20,), float("inf"))), ValueError, "b_enc contains NaN or infinite"),
    "topk backend unknown": (topk_case(kw={"backend": "tpu"}), ValueError, "unknown backend 'tpu'"),
    "topk W_enc on meta": (topk_case(W_enc=torch.empty(20, 6, device="meta")), RuntimeError,
                           "one device.*W_enc on meta"),
    "backend unknown": (encode_case(kw={"backend": "opencl"}), ValueError, "unknown backend 'opencl'"),
    "x NaN": (encode_case(x=torch.full((8, 6), float("nan"))), ValueError, "x contains NaN"),
    "threshold inf": (encode_case(log_threshold=torch.full((20,), float("inf"))), ValueError,
                      "log_threshold contains NaN or infinite"),
    "indices int32": (decode_case(indices=torch.zeros(8, 3, dtype=torch.int32)), TypeError, "indices has dtype int32"),
    "indices float": (decode_case(indices=torch.zeros(8, 3)), TypeError, "indices has dtype float32"),
    "indices too large": (decode_case(indices=torch.full((8, 3), 20)), ValueError, r"indices must lie in \[0, 20\)"),
    "indices negative": (decode_case(indices=torch.full((8, 3), -1)), ValueError, r"indices must lie in \[0, 20\)"),
    "acts shape": (decode_case(acts=torch.ones(8, 4)), ValueError, r"acts must have shape \(8, 3\)"),
    "acts int": (decode_case(acts=torch.ones(8, 3, dtype=torch.int64)), TypeError, "acts has dtype int64"),
    "acts bool": (decode_case(acts=torch.ones(8, 3, dtype=torch.bool)), TypeError, "acts has dtype bool"),
    "W_dec on meta": (decode_case(W_dec=torch.empty(20, 6, device="meta")), RuntimeError, "one device.*W_dec on meta"),
    "b_dec on meta": (decode_case(b_dec=torch.empty(6, device="meta")), RuntimeError, "one device.*b_dec on meta"),
    "b_dec shape": (decode_case(b_dec=torch.zeros(5)), ValueError, r"b_dec must have shape \(6,\)"),
    "W_dec 3-D": (decode_case(W_dec=torch.zeros(20, 6, 1)), ValueError, "W_dec must be 2-D"),
    "binary not 0/1": (decode_case(acts=torch.full((8, 3), 0.5), kw={"binary": True}), ValueError, "exactly 0 or 1"),
    "binary acts NaN": (decode_case(acts=torch.full((8, 3), float("nan")), kw={"binary": True}), ValueError,
                        "exactly 0 or 1"),
    "acts NaN": (decode_case(acts=torch.full((8, 3), float("nan"))), ValueError, "acts contains NaN or infinite"),
    "b_dec inf": (decode_case(b_dec=torch.full((6,), float("inf"))), ValueError, "b_dec contains NaN or infinite"),
    "binary b_dec NaN": (decode_case(b_dec=torch.full((6,), float("nan")), kw={"binary": True}), ValueError,
                         "b_dec contains NaN or infinite"),
    "binary not bool": (decode_case(kw={"binary": 1}), TypeError, "binary must be a bool"),
    "cuda backend on cpu": (decode_case(kw={"backend": "cuda"}), RuntimeError, "cuda"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_raises_clear_error(case):
    fn, exc, pattern = BAD_INPUTS[case]
    with pytest.raises(exc, match=pattern):
        fn()


def test_tensors_on_different_devices():
    p = params()
    meta_W = torch.empty(20, 6, device="meta")
    with pytest.raises(RuntimeError, match="one device.*W_enc on meta"):
        bk.topk_encode(p["x"], meta_W, p["b_enc"], 3)


def test_value_checks_can_be_disabled_for_speed(monkeypatch):
    monkeypatch.setenv("BINSPARSE_CHECK_VALUES", "0")
    p = params()
    # NaN input is no longer scanned for (one less device sync); shape checks still run
    bk.topk_encode(torch.full((8, 6), float("nan")), p["W_enc"], p["b_enc"], 3, backend="reference")
    with pytest.raises(ValueError, match="k must be"):
        bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 0)


# ---------------------------------------------------------------------------------------------
# Backends and dispatch
# ---------------------------------------------------------------------------------------------


def test_available_backends_and_default():
    names = bk.available_backends()
    assert names[0] == "reference" and set(names) <= {"reference", "cpu", "triton", "cuda"}
    if not torch.cuda.is_available():
        assert "cuda" not in names
    from binsparse_kernels import backends

    chosen = backends.resolve_name(None, torch.device("cpu"))
    assert chosen == ("cpu" if "cpu" in names else "reference")


def test_every_backend_appears_under_torch_ops():
    for op in ("topk_binary_encode", "topk_encode", "encode_backward", "sparse_decode", "sparse_decode_backward"):
        assert hasattr(torch.ops.binsparse, op), op
    if "cpu" in bk.available_backends():
        for op in ("cpu_encode_forward", "cpu_encode_backward", "cpu_decode_forward", "cpu_decode_backward"):
            assert hasattr(torch.ops.binsparse, op), op


@pytest.mark.parametrize("backend,dtype", backend_params())
def test_custom_ops_are_differentiable_directly(backend, dtype):
    # the custom ops' registered autograd gives the gradients of the public API, on the same leaves
    p = make_params(9, 6, 20, device=device_for(backend))
    names = ("x", "W_enc", "b_enc", "log_threshold", "W_dec", "b_dec")
    leaves = [p[n] for n in names]
    G = torch.randn(9, 6, device=p["x"].device)
    acts, idx, values, _ = torch.ops.binsparse.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"],
                                                                     p["log_threshold"], 4, "sigmoid", 2.0, backend)
    y = torch.ops.binsparse.sparse_decode(idx, acts, p["W_dec"], p["b_dec"], True, backend)
    got = torch.autograd.grad((y * G).sum() + (values * values).sum(), leaves)
    out = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 4, backend=backend)
    y_api = bk.sparse_decode(out.indices, out.acts, p["W_dec"], p["b_dec"], binary=True, backend=backend)
    want = torch.autograd.grad((y_api * G).sum() + (out.values * out.values).sum(), leaves)
    assert torch.equal(out.indices, idx)  # the same launch
    for name, g, w in zip(names, got, want):
        assert g.abs().sum() > 0, name
        assert_close_out(g, w, terms=9, what=f"grad of {name}")
    # topk_encode too
    acts, idx, _ = torch.ops.binsparse.topk_encode(p["x"], p["W_enc"], p["b_enc"], 4, backend)
    got = torch.autograd.grad((acts * acts).sum(), leaves[:3])
    out = bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 4, backend=backend)
    want = torch.autograd.grad((out.acts * out.acts).sum(), leaves[:3])
    for name, g, w in zip(names, got, want):
        assert_close_out(g, w, terms=9, what=f"topk_encode grad of {name}")


@pytest.mark.parametrize("backend", bk.available_backends())
def test_opcheck(backend):
    # the public custom ops with every backend, on the device it runs on (CUDA tensors on a GPU)
    device = device_for(backend)
    p = make_params(7, 5, 16, 6, device=device)
    x, W, b, lt, Wd, bd = (p[n] for n in ("x", "W_enc", "b_enc", "log_threshold", "W_dec", "b_dec"))
    ops = torch.ops.binsparse
    torch.library.opcheck(ops.topk_binary_encode, (x, W, b, lt, 3, "sigmoid", 2.0, backend))
    torch.library.opcheck(ops.topk_encode, (x, W, b, 3, backend))
    idx = bk.topk_encode(x, W, b, 3).indices
    acts = torch.rand(7, 3, requires_grad=True, device=device)
    torch.library.opcheck(ops.sparse_decode, (idx, acts, Wd, bd, False, backend))
    torch.library.opcheck(ops.sparse_decode, (idx, torch.ones(7, 3, device=device), Wd, None, True, backend))
    values = torch.randn(7, 3, device=device)
    g = torch.randn(7, 3, device=device)
    torch.library.opcheck(ops.encode_backward, (g, g, values, x.detach(), W.detach(), idx, 1, 2.0, True, True, True,
                                                backend))
    torch.library.opcheck(ops.sparse_decode_backward, (torch.randn(7, 6, device=device), idx, acts.detach(),
                                                       Wd.detach(), False, True, True, backend))


# The op is opaque to the compiler (a custom op with a fake implementation): the backends differ only
# in their device, so the interpreter's triton is left out (its CPU tensors add nothing but time).
@pytest.mark.parametrize("backend", [b for b in bk.available_backends()
                                     if b != "reference" and not (b == "triton" and device_for(b) == "cpu")])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend, compiler):
    # both encoders and the decode in one graph, compiled once for a dynamic number of tokens, by
    # AOTAutograd alone and by inductor (torch.compile's default: it generates code around the ops)
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    device = device_for(backend)
    counter = CompileCounterWithBackend(compiler)

    def step(x, W, b, lt, Wd, bd):
        out = bk.topk_binary_encode(x, W, b, lt, 4, backend=backend)
        y = bk.sparse_decode(out.indices, out.acts, Wd, bd, binary=True, backend=backend)
        cont = bk.topk_encode(x, W, b, 3, backend=backend)
        y2 = bk.sparse_decode(cont.indices, cont.acts, Wd, None, backend=backend)
        return (y - x).square().sum() + (y2 - x).square().sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for N in (12, 17):
        p = make_params(N, 8, 24, device=device)
        args = [p[n] for n in ("x", "W_enc", "b_enc", "log_threshold", "W_dec", "b_dec")]
        eager = step(*args)
        g_eager = torch.autograd.grad(eager, args)
        got = compiled(*args)
        frames.append(counter.frame_count)
        g_comp = torch.autograd.grad(got, args)
        assert_close_out(got, eager, terms=24, what="loss")
        for a, b in zip(g_comp, g_eager):
            assert_close_out(a, b, terms=24, what="gradient")
    assert frames[1] == frames[0], "recompiled for another number of tokens"


# ---------------------------------------------------------------------------------------------
# Compiled code must fail as Python exceptions, never crash (run in a subprocess)
# ---------------------------------------------------------------------------------------------


def run_python(code: str, env=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cpu_ops_reject_bad_calls_without_crashing():
    result = run_python("""
        import torch, binsparse_kernels as bk
        from binsparse_kernels.backends import cpu  # loads the extension
        ops = torch.ops.binsparse
        W = torch.randn(10, 4)
        cases = [
            lambda: ops.cpu_decode_forward(torch.full((3, 2), 10), torch.ones(3, 2), W, None, True),
            lambda: ops.cpu_decode_forward(torch.full((3, 2), -1), torch.ones(3, 2), W, None, False),
            lambda: ops.cpu_decode_forward(torch.zeros(3, 2, dtype=torch.int32), torch.ones(3, 2), W, None, True),
            lambda: ops.cpu_decode_forward(torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 5), W, None, True),
            lambda: ops.cpu_encode_forward(torch.randn(3, 5), W, torch.zeros(10), None, 3, False),
            lambda: ops.cpu_encode_forward(torch.randn(3, 4), W, torch.zeros(10), None, 11, False),
        ]
        for i, case in enumerate(cases):
            try:
                case()
            except RuntimeError as e:
                print("raised", i)
            else:
                print("no error", i)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:6] == [f"raised {i}" for i in range(6)], result.stdout


def test_triton_on_cpu_tensors_without_the_interpreter_is_refused():
    # a fresh process without TRITON_INTERPRET: the triton backend runs CUDA tensors only
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = run_python("""
        import torch, binsparse_kernels as bk
        if not torch.cuda.is_available():
            assert "triton" not in bk.available_backends(), bk.available_backends()
        x = torch.randn(4, 3); W = torch.randn(8, 3); b = torch.zeros(8)
        for call in (lambda: bk.topk_encode(x, W, b, 2, backend="triton"),
                     lambda: bk.sparse_decode(torch.zeros(4, 2, dtype=torch.int64), x[:, :2], W, backend="triton")):
            try:
                call()
            except RuntimeError as e:
                print("refused:", e)
    """, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused: backend 'triton'") for line in lines), lines
    if not torch.cuda.is_available():
        assert all("TRITON_INTERPRET=1" in line for line in lines), lines


def test_package_imports_and_falls_back_without_compiled_extension():
    result = run_python("""
        import sys, warnings
        sys.modules["binsparse_kernels._C"] = None  # as if the extension failed to build or load
        sys.modules["binsparse_kernels._C_cuda"] = None
        import torch, binsparse_kernels as bk
        assert "cpu" not in bk.available_backends(), bk.available_backends()
        x = torch.randn(4, 3); W = torch.randn(8, 3); b = torch.zeros(8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bk.topk_encode(x, W, b, 2)
            bk.topk_encode(x, W, b, 2)
        messages = [str(w.message) for w in caught if "unavailable" in str(w.message)]
        print(len(messages), messages[0] if messages else "")
        try:
            bk.topk_encode(x, W, b, 2, backend="cpu")
        except RuntimeError as e:
            print("explicit:", e)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("1 backend 'cpu' is unavailable"), lines  # said once, then silent
    assert lines[1].startswith("explicit: backend 'cpu' is unavailable"), lines


def test_torch_compile_fullgraph_in_a_fresh_process():
    # The first call of a process imports the backend module while Dynamo traces the public op:
    # the backend choice must be a trace-time constant, not traced code (importlib cannot be traced).
    result = run_python("""
        import torch, binsparse_kernels as bk
        x, W, b, lt = torch.randn(8, 16), torch.randn(40, 16), torch.zeros(40), torch.full((40,), -5.5)
        f = torch.compile(lambda x: bk.topk_binary_encode(x, W, b, lt, 4).acts.sum(), fullgraph=True,
                          backend="aot_eager")
        assert f(x) == bk.topk_binary_encode(x, W, b, lt, 4).acts.sum()
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
