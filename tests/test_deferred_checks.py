"""``deferred_checks()`` / ``raise_deferred()``: the ops' value checks without host syncs.

Inside the block a bad input (NaN or infinite x, W_enc, b_enc, log_threshold or W_dec; indices out
of range; non-0/1 binary acts) is recorded on the device and raised, with the eager check's
message, by ``raise_deferred()`` or on leaving the block; the ops themselves read nothing on the host.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import binsparse_kernels as bk
from binsparse_kernels import _checks
from helpers import make_params, require_backend


class _HostReads(TorchDispatchMode):
    """Counts the ops that read tensor data on the host."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "_local_scalar_dense" in str(func):
            self.count += 1
        return func(*args, **(kwargs or {}))


def params(**kw):
    return {name: t.detach() for name, t in make_params(12, 6, 20, **kw).items()}


def binary_step(p):
    return bk.topk_binary_encode_decode(p["x"], p["W_enc"], p["b_enc"], p["log_threshold"], p["W_dec"], p["b_dec"], 4)


@pytest.mark.parametrize("bad", ["x", "W_enc", "b_enc", "log_threshold", "W_dec", "b_dec"])
def test_a_nan_input_raises_on_leaving_the_block_not_at_the_call(bad):
    p = params()
    p[bad] = p[bad].clone()
    p[bad].view(-1)[3] = math.nan
    with pytest.raises(ValueError, match=f"^{bad} contains NaN or infinite values"):
        binary_step(p)  # eager: raises at once
    with pytest.raises(ValueError, match=f"{bad} contains NaN or infinite values .recorded inside deferred_checks"):
        with bk.deferred_checks():
            with _HostReads() as reads:
                binary_step(p)  # no raise, no host read
            assert reads.count == 0


def test_separate_ops_record_their_checks_too():
    p = params()
    W_dec = p["W_dec"]
    good = bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 4)
    bad_indices = good.indices.clone()
    bad_indices[0, 0] = 20
    bad_indices[1, 1] = -2
    # The range check as sparse_decode runs it (the CPU kernels check the range themselves too and
    # raise at once: on a CPU that costs no device sync, and they must not read outside W_dec).
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 20\) .*found values in \[-2, 20\]"):
        with bk.deferred_checks():
            with _HostReads() as reads:
                _checks.indices_in_range(bad_indices, 20)
                _checks.indices_in_range(good.indices, 20)
            assert reads.count == 0
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 20\)"):
        with bk.deferred_checks():
            bk.sparse_decode(bad_indices, good.acts, W_dec, p["b_dec"], backend="cpu")
    with pytest.raises(ValueError, match="binary=True needs acts that are exactly 0 or 1"):
        with bk.deferred_checks():
            bk.sparse_decode(good.indices, torch.full_like(good.acts, 0.5), W_dec, binary=True)
    inf_x = p["x"].clone()
    inf_x[1, 1] = math.inf
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        with bk.deferred_checks():
            bk.topk_binary_encode(inf_x, p["W_enc"], p["b_enc"], p["log_threshold"], 4)


def test_raise_deferred_raises_once_then_starts_afresh():
    p = params()
    nan_x = p["x"].clone()
    nan_x[0, 0] = math.nan
    with bk.deferred_checks():
        binary_step(p)
        bk.raise_deferred()  # nothing bad yet
        binary_step({**p, "x": nan_x})
        binary_step(p)  # a good call after a bad one does not clear the record
        with pytest.raises(ValueError, match="x contains NaN"):
            bk.raise_deferred()
        bk.raise_deferred()  # forgotten once raised
        binary_step(p)
    # leaving the block found nothing to raise


def test_several_problems_are_all_named():
    p = params()
    p["x"] = p["x"].clone()
    p["x"][0, 0] = math.nan
    p["W_dec"] = p["W_dec"].clone()
    p["W_dec"][2, 1] = -math.inf
    with pytest.raises(ValueError) as info:
        with bk.deferred_checks():
            binary_step(p)
    assert "x contains NaN" in str(info.value) and "W_dec contains NaN" in str(info.value)


def test_nested_blocks_raise_on_leaving_the_outermost():
    p = params()
    p["W_enc"] = p["W_enc"].clone()
    p["W_enc"][0, 0] = math.nan
    with pytest.raises(ValueError, match="W_enc contains NaN"):
        with bk.deferred_checks():
            with bk.deferred_checks():
                binary_step(p)
            assert _checks.deferring()  # the inner block did not raise nor leave deferred mode
    assert not _checks.deferring()


def test_an_exception_in_the_block_propagates_and_drops_the_records():
    p = params()
    p["x"] = p["x"].clone()
    p["x"][0, 0] = math.nan
    with pytest.raises(KeyError):
        with bk.deferred_checks():
            binary_step(p)
            raise KeyError("the caller's own error")
    bk.raise_deferred()  # nothing left over
    with bk.deferred_checks():
        pass


def test_value_checks_off_records_nothing(monkeypatch):
    monkeypatch.setenv("BINSPARSE_CHECK_VALUES", "0")
    p = params()
    p["x"] = p["x"].clone()
    p["x"][0, 0] = math.nan
    with bk.deferred_checks():
        binary_step(p)


def test_listeners_follow_the_outermost_block():
    seen = []
    _checks.add_deferred_listener(seen.append)
    try:
        with bk.deferred_checks():
            with bk.deferred_checks():
                pass
        assert seen == [False, True, False]
    finally:
        _checks._deferred.listeners.remove(seen.append)


@pytest.mark.skipif(not any(f.startswith("_C_cuda") for f in os.listdir(os.path.dirname(bk.__file__))),
                    reason="the package was not built with CUDA")
def test_cuda_extension_registers_its_deferred_switch():
    # Loads without a GPU: the switch is a plain function op, callable anywhere.
    code = ("import torch, binsparse_kernels._C_cuda\n"
            "torch.ops.binsparse.cuda_set_deferred_checks(True)\n"
            "torch.ops.binsparse.cuda_set_deferred_checks(False)\n"
            "print(torch.ops.binsparse.cuda_coder_backward.default._schema)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "binsparse::cuda_coder_backward" in proc.stdout


# ---------------------------------------------------------------------------------------------
# On a GPU: the CUDA extension's own range check must not sync while deferring either
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_deferred_checks_do_not_sync_and_still_raise(backend):
    require_backend(backend)
    p = {n: t.cuda() for n, t in params().items()}
    good = bk.topk_encode(p["x"], p["W_enc"], p["b_enc"], 4, backend=backend)
    bad = good.indices.clone()
    bad[0, 0] = -1
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 20\)"):
        with bk.deferred_checks():
            torch.cuda.set_sync_debug_mode("error")
            try:
                binary_step(p)
                acts = good.acts.detach().requires_grad_()
                bk.sparse_decode(bad, acts, p["W_dec"], backend=backend).sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
