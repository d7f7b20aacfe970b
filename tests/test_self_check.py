"""The first-use self-check (binsparse_kernels/self_check.py, hooked into backends.get).

Without a GPU the check is pointed at CPU backends through its two test hooks
(``FIRST_USE_BACKENDS``, ``FIRST_USE_DEVICE_TYPES``): the compiled ``cpu`` backend stands in for a
GPU backend (fast), and one test checks the Triton backend under TRITON_INTERPRET=1 the way a GPU
is checked. Kernels are broken on purpose by monkeypatching one function of the backend module.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import binsparse_kernels as bk
from binsparse_kernels import backends, self_check
from binsparse_kernels.backends import reference
from binsparse_kernels.self_check import Problem, SelfCheckFailed, SelfCheckWarning

from helpers import make_params

CPU = torch.device("cpu")
needs_cpu_backend = pytest.mark.skipif("cpu" not in bk.available_backends(), reason="CPU extension not built")


@pytest.fixture
def checks(monkeypatch):
    """First-use checks on for the cpu and triton backends on the CPU, fresh verdicts; counts the checks."""
    self_check.reset()
    monkeypatch.delenv("BINSPARSE_SELF_CHECK", raising=False)
    monkeypatch.setattr(self_check, "FIRST_USE_BACKENDS", ("triton", "cuda", "cpu"))
    monkeypatch.setattr(self_check, "FIRST_USE_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(self_check, "QUICK", (Problem(N=5, d=16, M=40, k=4, d_out=8),))
    runs = []
    real = self_check._run_quick_check

    def counted(name, device, dtype):
        runs.append((name, device.type, dtype))
        return real(name, device, dtype)

    monkeypatch.setattr(self_check, "_run_quick_check", counted)
    yield runs
    self_check.reset()


def coder_outputs(p, k, backend=None):
    out = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], k, backend=backend)
    y = bk.sparse_decode(out.indices, out.acts, p["W_dec"], p["b_dec"], binary=True, backend=backend)
    cont = bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], k, backend=backend)
    return out, y, cont


# Three ways a kernel goes wrong on a GPU it was never run on: a wrong selection, a weight gradient
# that misses a tile of latents, a kernel that cannot launch.
def wrong_selection(impl):
    real = impl.encode_forward

    def encode_forward(x, W_enc, b_enc, threshold, k, binary):
        values, indices = real(x, W_enc, b_enc, threshold, k, binary)
        return values, (indices + 1) % W_enc.shape[0]
    return "encode_forward", encode_forward, "binary_encode"


def gradient_misses_a_tile(impl):
    real = impl.encode_backward

    def encode_backward(*args):
        gx, gW, gb = real(*args)
        if gW is not None:
            gW = gW.clone()
            gW[gW.shape[0] // 2:] = 0
        return gx, gW, gb
    return "encode_backward", encode_backward, "binary_encode"


def decode_raises(impl):
    def decode_forward(*args):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
    return "decode_forward", decode_forward, "decode"


@needs_cpu_backend
@pytest.mark.parametrize("breakage", [wrong_selection, gradient_misses_a_tile, decode_raises])
def test_a_wrong_kernel_is_caught_warned_about_and_bypassed(checks, monkeypatch, breakage):
    from binsparse_kernels.backends import cpu

    attr, broken, op = breakage(cpu)
    monkeypatch.setattr(cpu, attr, broken)
    p = make_params(9, 16, 40, 8)
    with pytest.warns(SelfCheckWarning) as caught:
        out, y, cont = coder_outputs(p, 4)
    assert len(caught) == 1, [str(w.message) for w in caught]  # once, then silent
    message = str(caught[0].message)
    assert "SELF-CHECK FAILED" in message and "'cpu'" in message and f"op {op}" in message
    assert "cpu" in message and "float32" in message and "Falling back to backend 'reference'" in message
    assert checks == [("cpu", "cpu", torch.float32)]
    # the calls ran on the reference: same selection, same outputs
    ref = bk.topk_binary_encode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], 4, backend="reference")
    assert torch.equal(out.indices, ref.indices) and torch.equal(out.values, ref.values)
    torch.testing.assert_close(y, bk.sparse_decode(ref.indices, ref.acts, p["W_dec"], p["b_dec"], binary=True,
                                                   backend="reference"))
    assert backends.resolve_name(None, CPU, torch.float32) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bypassed quietly from now on
        coder_outputs(p, 4)
    assert len(checks) == 1


@needs_cpu_backend
def test_a_correct_backend_costs_one_check_per_process_and_dtype(checks):
    p = make_params(9, 16, 40, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelfCheckWarning)
        for _ in range(3):
            coder_outputs(p, 4)
        assert checks == [("cpu", "cpu", torch.float32)]
        assert backends.resolve_name(None, CPU, torch.float32) == "cpu"
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a new dtype: one more check
            coder_outputs(p, 4)
            coder_outputs(p, 4)
    assert checks == [("cpu", "cpu", torch.float32), ("cpu", "cpu", torch.bfloat16)]
    # the check ran on its own random stream: the caller's is where it would be without it
    torch.manual_seed(5)
    expected = torch.rand(3)
    self_check.reset()
    torch.manual_seed(5)
    coder_outputs(p, 4)
    assert torch.equal(torch.rand(3), expected) and len(checks) == 3


@needs_cpu_backend
def test_a_named_backend_that_fails_raises(checks, monkeypatch):
    from binsparse_kernels.backends import cpu

    attr, broken, _ = wrong_selection(cpu)
    monkeypatch.setattr(cpu, attr, broken)
    p = make_params(9, 16, 40, 8)
    for _ in range(2):  # the remembered verdict raises too, without a second check
        with pytest.raises(RuntimeError, match="SELF-CHECK FAILED.*Pass backend=None"):
            bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 4, backend="cpu")
    assert len(checks) == 1
    bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 4, backend="reference")  # unchecked, unaffected


@needs_cpu_backend
def test_strict_raises_and_off_runs_the_backend_unchecked(checks, monkeypatch):
    from binsparse_kernels.backends import cpu

    attr, broken, _ = wrong_selection(cpu)
    monkeypatch.setattr(cpu, attr, broken)
    p = make_params(9, 16, 40, 8)
    monkeypatch.setenv("BINSPARSE_SELF_CHECK", "strict")
    with pytest.raises(SelfCheckFailed, match="backend 'cpu'.*op binary_encode"):
        coder_outputs(p, 4)
    self_check.reset()
    monkeypatch.setenv("BINSPARSE_SELF_CHECK", "0")
    checks.clear()
    out = bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 4)
    assert checks == []  # no check: the broken kernel's output comes back
    ref = bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 4, backend="reference")
    assert not torch.equal(out.indices.sort(1).values, ref.indices.sort(1).values)
    monkeypatch.setenv("BINSPARSE_SELF_CHECK", "maybe")
    with pytest.raises(ValueError, match="BINSPARSE_SELF_CHECK"):
        bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 4)


@needs_cpu_backend
def test_not_run_while_torch_compile_traces(checks):
    torch._dynamo.reset()
    p = make_params(12, 16, 40, 8)

    def step(x, W, b, lt, Wd, bd):
        out = bk.topk_binary_encode(x, W, b, lt, 4)
        return bk.sparse_decode(out.indices, out.acts, Wd, bd, binary=True).square().sum()

    args = [p[n] for n in ("x", "W_enc", "b_enc", "log_threshold", "W_dec", "b_dec")]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    assert checks == []  # traced without running kernels; no verdict kept
    eager = step(*args)
    assert checks == [("cpu", "cpu", torch.float32)]
    torch.testing.assert_close(compiled, eager)


def test_the_yardstick_catches_what_it_should():
    """The comparison itself, on the reference backend with one output perturbed by a little more than
    its tolerance, and a selection that skips the best latent."""
    class Perturbed:
        encode_forward = staticmethod(reference.encode_forward)
        encode_backward = staticmethod(reference.encode_backward)
        decode_backward = staticmethod(reference.decode_backward)

        @staticmethod
        def decode_forward(indices, acts, W_dec, b_dec, binary):
            y = reference.decode_forward(indices, acts, W_dec, b_dec, binary)
            return y + (2 * self_check.TOL[y.dtype] * (1 + y.abs())).to(y.dtype) * (torch.arange(y.numel()) == 7).reshape(y.shape)

    class SkipsTheBest(Perturbed):
        @staticmethod
        def encode_forward(x, W_enc, b_enc, threshold, k, binary):
            values, indices = reference.encode_forward(x, W_enc, b_enc, threshold, k + 1, binary)
            order = values.argsort(1, descending=True)[:, 1:]  # the 2nd..(k+1)th
            return values.gather(1, order), indices.gather(1, order)

    problems = (Problem(N=7, d=16, M=40, k=4, d_out=8),)
    good = self_check.check_op(reference, "reference", "decode", CPU, (torch.float32,), problems)
    assert good.passed and good.worst < 0.1
    bad = self_check.check_op(Perturbed, "perturbed", "decode", CPU, (torch.float32,), problems)
    assert not bad.passed and 1.5 < bad.worst < 2.5 and "y (continuous)" in bad.failures[0]
    bad = self_check.check_op(SkipsTheBest, "skips", "topk_encode", CPU, (torch.float32,), problems)
    assert not bad.passed and "selection" in bad.worst_where
    nan = self_check.check_op(type("NaN", (Perturbed,), {"decode_forward": staticmethod(
        lambda i, a, W, b, binary: torch.full((i.shape[0], W.shape[1]), float("nan"), dtype=a.dtype))}),
        "nan", "decode", CPU, (torch.float32,), problems)
    assert not nan.passed and "NaN" in nan.error


def test_triton_under_the_interpreter_is_checked_like_a_gpu(checks, monkeypatch):
    """The GPU code path itself: a correct Triton backend passes its check once; a broken one is bypassed."""
    if backends.unavailable_reason("triton") is not None or "cpu" not in backends._BACKENDS["triton"].devices():
        pytest.skip("needs the Triton backend on CPU tensors (TRITON_INTERPRET=1)")
    from binsparse_kernels.backends import triton as triton_backend

    monkeypatch.setitem(backends._PREFERENCE, "cpu", ("triton", "cpu", "reference"))
    monkeypatch.setattr(self_check, "QUICK", (Problem(N=3, d=16, M=20, k=2, d_out=4),))
    p = make_params(5, 16, 20, 4)
    idx = bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 2, backend="reference").indices
    y = bk.sparse_decode(idx, torch.rand(5, 2), p["W_dec"])
    bk.sparse_decode(idx, torch.rand(5, 2), p["W_dec"])
    assert checks == [("triton", "cpu", torch.float32)] and backends.resolve_name(None, CPU, torch.float32) == "triton"

    self_check.reset()
    monkeypatch.setattr(triton_backend, "decode_forward", lambda *a: torch.zeros(5, 4))
    with pytest.warns(SelfCheckWarning, match="backend 'triton'.*op decode.*Falling back to backend 'cpu'"):
        y = bk.sparse_decode(idx, torch.ones(5, 2), p["W_dec"], binary=True)
    torch.testing.assert_close(y, p["W_dec"][idx].sum(1))
    expected = [("triton", "cpu", torch.float32)] * 2 + ([("cpu", "cpu", torch.float32)] if "cpu" in
                                                           bk.available_backends() else [])
    assert checks == expected


# ---------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_gpu_first_use_check_passes_once_without_later_syncs(name, monkeypatch):
    if backends.unavailable_reason(name) is not None:
        pytest.skip(backends.unavailable_reason(name))
    self_check.reset()
    monkeypatch.delenv("BINSPARSE_SELF_CHECK", raising=False)
    dev = torch.device("cuda")
    p = make_params(33, 64, 300, 48, device="cuda", x_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelfCheckWarning)
        bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 8, backend=name)
    assert self_check._verdicts == {(name, self_check.device_kind(dev), torch.bfloat16): None}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # the remembered verdict costs no sync
        for _ in range(3):
            assert backends.resolve_name(name, dev, torch.bfloat16) == name
    finally:
        torch.cuda.set_sync_debug_mode("default")
    self_check.reset()


@pytest.mark.gpu
def test_gpu_not_run_during_cuda_graph_capture(monkeypatch):
    name = next((n for n in ("triton", "cuda") if backends.unavailable_reason(n) is None), None)
    if name is None:
        pytest.skip("no GPU backend")
    self_check.reset()
    monkeypatch.delenv("BINSPARSE_SELF_CHECK", raising=False)
    runs = []
    real = self_check._run_quick_check
    monkeypatch.setattr(self_check, "_run_quick_check", lambda *a: runs.append(a) or real(*a))
    dev = torch.device("cuda")
    W, Wd = torch.randn(64, 32, device=dev), torch.randn(64, 16, device=dev)
    idx = torch.randint(0, 64, (8, 4), device=dev)
    acts = torch.rand(8, 4, device=dev)
    monkeypatch.setenv("BINSPARSE_CHECK_VALUES", "0")  # the op's own input checks sync
    monkeypatch.setenv("BINSPARSE_SELF_CHECK", "0")
    bk.sparse_decode(idx, acts, Wd, backend=name)  # warm-up (compiles) outside the capture, unchecked
    monkeypatch.delenv("BINSPARSE_SELF_CHECK")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = bk.sparse_decode(idx, acts, Wd, backend=name)
    assert runs == []
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, bk.sparse_decode(idx, acts, Wd, backend=name))
    assert len(runs) == 1
    self_check.reset()


@pytest.mark.parametrize("name", ["reference", pytest.param("cpu", marks=needs_cpu_backend)])
def test_the_check_ignores_the_callers_default_dtype_and_autocast(name):
    problems = (Problem(N=5, d=16, M=40, k=4, d_out=8),)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results = self_check.check_backend(name, CPU, (torch.float32,), problems)
    finally:
        torch.set_default_dtype(previous)
    assert all(r.passed for r in results), [r.line() for r in results]
