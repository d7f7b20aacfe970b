"""Backend self-check: a backend's ops on small random problems, against the reference in float64.

The ops (``OPS``) are the binary encode, the TopK (continuous) encode and the decode, each forward
and backward, and the coder's one fused backward (``coder_backward``), called through the backend
interface of ``backends/__init__.py``. The yardstick is the
reference backend run on the CPU in float64 on the same (rounded) inputs, so it shares no code path
with the GPU under test. The encoders are judged by value: the backend's selection must be a valid
top-k of the float64 scores (distinct indices, the scores at them, none below the k-th largest), so
near-ties broken either way pass; their gradients are compared on the backend's own selection.
Every output is compared at a tolerance set by its dtype (``TOL``), relative to ``1 + |reference|``
(the problems are scaled so every quantity is of order one).

Used in two places:

* ``binsparse doctor`` (``doctor.py``): ``check_backend`` over ``FULL`` (odd sizes, k = 1, a k above
  the fused kernels' limit, 16-bit weights) in every dtype the device supports.
* First use (``first_use_failure``, called by ``backends.get``): the first time a process runs a GPU
  backend on a kind of device (its compute capability) in a dtype, ``QUICK`` runs once before the
  real call (tens of milliseconds once the kernels are compiled; a cold Triton cache adds their JIT
  compile). A failure is remembered for the process. ``BINSPARSE_SELF_CHECK=0`` turns the check off,
  ``=strict`` raises on a failure instead of falling back.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .backends import reference
from .backends.reference import STE_MODES

OPS = ("binary_encode", "topk_encode", "decode", "coder_backward")

# Tolerance per output dtype, as a fraction of (1 + |reference|): a few units in the last place of
# 16-bit outputs, and room for float32 sums of up to a few hundred terms in another order.
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

TEMPERATURE = 2.0
SEED = 1234


@dataclass(frozen=True)
class Problem:
    """One random problem: N tokens, d inputs, M latents, k selected, d_out outputs of the decoder."""

    N: int
    d: int
    M: int
    k: int
    d_out: int
    ste: str = "sigmoid"  # the binary encoder's straight-through estimator
    weights_16bit: bool = False  # weights in the compute dtype instead of float32 master weights

    def __str__(self) -> str:
        extra = ", 16-bit weights" if self.weights_16bit else ""
        return f"N={self.N} d={self.d} M={self.M} k={self.k} ste={self.ste}{extra}"


# First use: sizes a real run has (d and M multiples of 16, so the kernels compiled for the check are
# the ones the run uses), M not a multiple of any latent tile, N not a multiple of any token tile.
QUICK = (Problem(N=37, d=64, M=400, k=32, d_out=48),)

# The doctor: odd sizes everywhere, k = 1, k above the fused kernels' limit of 128 (their fallback
# path), every STE, and weights stored in the compute dtype.
FULL = (
    Problem(N=37, d=72, M=301, k=1, d_out=45),
    Problem(N=19, d=40, M=301, k=17, d_out=23, ste="rectangle"),
    Problem(N=13, d=24, M=403, k=150, d_out=20, ste="identity"),
    Problem(N=21, d=64, M=515, k=32, d_out=64, weights_16bit=True),
)


class SelfCheckFailed(RuntimeError):
    """A backend disagreed with the reference (or raised) in its self-check."""


@dataclass
class OpResult:
    """The self-check of one op of one backend on one device, over some dtypes and problems."""

    backend: str
    op: str
    device: str
    dtypes: tuple[torch.dtype, ...] = ()
    cases: int = 0
    worst: float = 0.0  # worst |error| / tolerance over every compared output (passes at <= 1)
    worst_abs: float = 0.0  # the |error| there
    worst_where: str = ""
    error: Optional[str] = None  # an exception, or an output of the wrong shape/dtype, NaN, bad indices
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.error is None and self.worst <= 1.0

    def line(self) -> str:
        dtypes = ",".join(_short(d) for d in self.dtypes)
        status = "PASS" if self.passed else "FAIL"
        head = f"{self.backend:<9} {self.op:<14} {self.device:<7} {dtypes:<24} {status}"
        if self.error is not None:
            return f"{head}  {self.error}"
        return (f"{head}  worst error {self.worst_abs:.1e} = {self.worst:.2f} x tolerance "
                f"({self.worst_where}); {self.cases} cases, {self.seconds:.2f} s")


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class _Mismatch(Exception):
    pass


class _Scorer:
    """Accumulates the worst error of one op's outputs; raises _Mismatch on structural failures."""

    def __init__(self, result: OpResult, where: str):
        self.result, self.where = result, where

    def structure(self, name: str, got, shape: tuple, dtype: torch.dtype) -> None:
        if not isinstance(got, torch.Tensor):
            raise _Mismatch(f"{name}: expected a tensor, got {type(got).__name__} ({self.where})")
        if tuple(got.shape) != tuple(shape) or got.dtype != dtype:
            raise _Mismatch(f"{name}: expected {_short(dtype)} {list(shape)}, got {_short(got.dtype)} "
                            f"{list(got.shape)} ({self.where})")

    def compare(self, name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
        got = got.detach().to("cpu", torch.float64)
        if not torch.isfinite(got).all():
            raise _Mismatch(f"{name}: NaN or inf in the output ({self.where})")
        if got.numel() == 0:
            return
        err = (got - ref).abs()
        ratio = err / (tol * (1 + ref.abs()))
        i = int(ratio.argmax())
        self.record(name, float(ratio.reshape(-1)[i]), float(err.reshape(-1)[i]))

    def record(self, name: str, ratio: float, abs_err: float) -> None:
        r = self.result
        if ratio > 1.0:
            r.failures.append(f"{name}: error {abs_err:.2e} = {ratio:.1f} x tolerance ({self.where})")
        if ratio > r.worst or not r.worst_where:
            r.worst, r.worst_abs, r.worst_where = ratio, abs_err, f"{name}, {self.where}"


# ----------------------------------------------------------------------------------------------
# Random problems (a private generator: the caller's random state is left alone)
# ----------------------------------------------------------------------------------------------


def _inputs(p: Problem, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w_dtype = dtype if p.weights_16bit else torch.float32

    def randn(*shape):  # float32 on the CPU whatever the caller's default dtype and device
        return torch.randn(*shape, generator=g, dtype=torch.float32, device="cpu")

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float32, device="cpu")

    return {
        "x": randn(p.N, p.d).to(dtype),
        "W_enc": ((rand(p.M, p.d) * 2 - 1) / math.sqrt(p.d)).to(w_dtype),
        "b_enc": (randn(p.M) * 0.1).to(w_dtype),
        "theta": (math.log(0.004) + randn(p.M) * 0.1).exp(),
        "W_dec": (randn(p.M, p.d_out) / math.sqrt(p.d_out)).to(w_dtype),
        "b_dec": (randn(p.d_out) * 0.1).to(w_dtype),
        "grad_acts": randn(p.N, p.k),
        "grad_values": randn(p.N, p.k),
        "grad_y": randn(p.N, p.d_out).to(dtype),
        # distinct latents per row, and codes: continuous (any sign: the kernels must not care) and 0/1
        "indices": rand(p.N, p.M).argsort(1)[:, :p.k].contiguous(),
        "acts": randn(p.N, p.k).to(dtype),
        "codes": (rand(p.N, p.k) < 0.8).to(dtype),
    }


def _f64(t: torch.Tensor, rounded_to: Optional[torch.dtype] = None) -> torch.Tensor:
    """``t`` on the CPU in float64, after rounding to ``rounded_to`` (the reference's weight convention)."""
    t = t.detach().cpu()
    return (t.to(rounded_to) if rounded_to is not None else t).double()


# ----------------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------------


def _check_encode(impl, device, dtype, p: Problem, binary: bool, s: _Scorer, seed: int) -> None:
    t = _inputs(p, dtype, seed)
    dev = {n: v.to(device) for n, v in t.items()}
    values, indices = impl.encode_forward(dev["x"], dev["W_enc"], dev["b_enc"], dev["theta"] if binary else None,
                                          p.k, binary)
    s.structure("values", values, (p.N, p.k), torch.float32)
    s.structure("indices", indices, (p.N, p.k), torch.int64)
    tol = TOL[torch.float32]

    x64, W64 = _f64(t["x"]), _f64(t["W_enc"], dtype)
    pre = x64 @ W64.T + _f64(t["b_enc"])
    z = pre - _f64(t["theta"]) if binary else torch.relu(pre)
    idx = indices.cpu()
    if idx.min() < 0 or idx.max() >= p.M:
        raise _Mismatch(f"indices: a latent index outside [0, {p.M}) ({s.where})")
    ordered = idx.sort(1).values
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise _Mismatch(f"indices: a latent selected twice in one row ({s.where})")
    picked = z.gather(1, idx)
    s.compare("values", values, picked, tol)
    kth = z.topk(p.k, 1).values[:, -1:]
    shortfall = (kth - picked).clamp(min=0) / (tol * (1 + kth.abs()))
    s.record("selection (a score below the k-th largest)", float(shortfall.max()),
             float(((kth - picked).clamp(min=0)).max()))

    mode = STE_MODES[p.ste] if binary else STE_MODES["relu"]
    grad_values = dev["grad_values"] if binary else torch.zeros_like(dev["grad_values"])
    got = impl.encode_backward(dev["grad_acts"], grad_values, values, dev["x"], dev["W_enc"], indices, mode,
                               TEMPERATURE, True, True, True)
    ref = reference.encode_backward(_f64(t["grad_acts"]), _f64(grad_values), _f64(values), x64, W64, idx, mode,
                                    TEMPERATURE, True, True, True)
    for name, g, r, shape in zip(("grad_x", "grad_W_enc", "grad_b_enc"), got, ref,
                                 ((p.N, p.d), (p.M, p.d), (p.M,))):
        s.structure(name, g, shape, torch.float32)
        s.compare(name, g, r, tol)


def _check_decode(impl, device, dtype, p: Problem, s: _Scorer, seed: int) -> None:
    t = _inputs(p, dtype, seed)
    dev = {n: v.to(device) for n, v in t.items()}
    W64 = _f64(t["W_dec"], dtype)
    for binary, acts_name, bias in ((False, "acts", "b_dec"), (True, "codes", None)):
        kind = "binary" if binary else "continuous"
        acts, b = dev[acts_name], dev[bias] if bias else None
        y = impl.decode_forward(dev["indices"], acts, dev["W_dec"], b, binary)
        s.structure(f"y ({kind})", y, (p.N, p.d_out), dtype)
        y_ref = reference.decode_forward(t["indices"], _f64(acts), W64, _f64(b) if bias else None, binary)
        s.compare(f"y ({kind})", y, y_ref, TOL[dtype])
        got = impl.decode_backward(dev["grad_y"], dev["indices"], acts, dev["W_dec"], binary, True, True)
        ref = reference.decode_backward(_f64(t["grad_y"]), t["indices"], _f64(acts), W64, binary, True, True)
        for name, g, r, shape in zip(("grad_acts", "grad_W_dec"), got, ref, ((p.N, p.k), (p.M, p.d_out))):
            s.structure(f"{name} ({kind})", g, shape, torch.float32)
            s.compare(f"{name} ({kind})", g, r, TOL[torch.float32])


def _check_coder_backward(impl, device, dtype, p: Problem, s: _Scorer, seed: int) -> None:
    """The one backward of an encode followed by the decode of its codes (what ``SparseCoder`` runs),
    on the backend's own binary selection, against the reference's encode and decode backwards."""
    t = _inputs(p, dtype, seed)
    dev = {n: v.to(device) for n, v in t.items()}
    values, indices = impl.encode_forward(dev["x"], dev["W_enc"], dev["b_enc"], dev["theta"], p.k, True)
    acts = (values > 0).to(dtype)
    mode = STE_MODES[p.ste]
    got = impl.coder_backward(dev["grad_y"], dev["grad_acts"], dev["grad_values"], indices, acts, values, dev["x"],
                              dev["W_enc"], dev["W_dec"], True, mode, TEMPERATURE, True, True, True, True)
    ref = reference.coder_backward(_f64(t["grad_y"]), _f64(t["grad_acts"]), _f64(t["grad_values"]), indices.cpu(),
                                   _f64(acts), _f64(values), _f64(t["x"]), _f64(t["W_enc"], dtype),
                                   _f64(t["W_dec"], dtype), True, mode, TEMPERATURE, True, True, True, True)
    for name, g, r, shape in zip(("grad_x", "grad_W_enc", "grad_b_enc", "grad_W_dec"), got, ref,
                                 ((p.N, p.d), (p.M, p.d), (p.M,), (p.M, p.d_out))):
        s.structure(name, g, shape, torch.float32)
        s.compare(name, g, r, TOL[torch.float32])


def _run_op(impl, op: str, device: torch.device, dtype: torch.dtype, p: Problem, s: _Scorer, seed: int) -> None:
    if op == "decode":
        _check_decode(impl, device, dtype, p, s, seed)
    elif op == "coder_backward":
        _check_coder_backward(impl, device, dtype, p, s, seed)
    else:
        _check_encode(impl, device, dtype, p, op == "binary_encode", s, seed)


def check_op(impl, name: str, op: str, device: torch.device, dtypes, problems) -> OpResult:
    """One op of backend module ``impl`` (registry name ``name``) over ``dtypes`` x ``problems``."""
    result = OpResult(name, op, str(device), tuple(dtypes))
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        for dtype in dtypes:
            for i, p in enumerate(problems):
                s = _Scorer(result, f"{_short(dtype)}, {p}")
                result.cases += 1
                try:
                    _run_op(impl, op, device, dtype, p, s, SEED + i)
                except _Mismatch as exc:
                    result.error = str(exc)
                except Exception as exc:  # a kernel that raises (no code for this GPU, a launch error) fails
                    result.error = f"raised {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]} ({s.where})"
                if result.error is not None:
                    break
            if result.error is not None:
                break
    result.seconds = time.perf_counter() - t0
    return result


def check_backend(name: str, device: torch.device, dtypes, problems=FULL, ops=OPS) -> list[OpResult]:
    """Every op of backend ``name`` on ``device``: one ``OpResult`` per op."""
    from . import backends

    impl = backends.get(name, device)
    return [check_op(impl, name, op, device, dtypes, problems) for op in ops]


def dtypes_for(name: str, device: torch.device) -> tuple[torch.dtype, ...]:
    """float32 and the 16-bit dtypes ``name`` computes correctly on ``device``."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return (torch.float32, torch.float16) + ((torch.bfloat16,) if bf16 else ())
    if name == "triton":  # the interpreter's bf16 tl.dot is wrong (design notes)
        return (torch.float32, torch.float16)
    return (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# First use
# ----------------------------------------------------------------------------------------------

# The backends checked at first use, and on which device types. The tests add "cpu" to check the
# Triton backend under TRITON_INTERPRET=1 the way a GPU is checked.
FIRST_USE_BACKENDS = ("triton", "cuda")
FIRST_USE_DEVICE_TYPES = ("cuda",)

# (backend, device kind, dtype) -> None (passed) or why it failed; kept for the process.
_verdicts: dict[tuple[str, str, torch.dtype], Optional[str]] = {}
_device_kinds: dict[torch.device, str] = {}


def mode() -> str:
    """``BINSPARSE_SELF_CHECK``: "on" (default, also "1"), "off" ("0") or "strict"."""
    value = os.environ.get("BINSPARSE_SELF_CHECK", "1").strip().lower()
    modes = {"1": "on", "on": "on", "": "on", "0": "off", "off": "off", "strict": "strict"}
    if value not in modes:
        raise ValueError(f"BINSPARSE_SELF_CHECK must be 1, 0 or strict, got {value!r}")
    return modes[value]


def device_kind(device: torch.device) -> str:
    """What a verdict is kept per: the GPU's name and compute capability (``cpu`` for the CPU)."""
    kind = _device_kinds.get(device)
    if kind is None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            kind = f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"
        else:
            kind = device.type
        _device_kinds[device] = kind
    return kind


def _being_traced(device: torch.device) -> bool:
    # No real kernels while torch.compile / export / make_fx trace, or a CUDA graph is captured.
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _run_quick_check(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """``QUICK`` over every op: None if all pass, else what failed."""
    results = check_backend(name, device, (dtype,), QUICK)
    failed = [r for r in results if not r.passed]
    if not failed:
        return None
    return "; ".join(f"op {r.op}: {r.error or r.failures[0]}" for r in failed)


def first_use_failure(name: str, device: torch.device, dtype: torch.dtype,
                      fallback: Optional[Callable[[], str]]) -> Optional[str]:
    """None if backend ``name`` may run on ``device`` in ``dtype``, else why not.

    The first call for a GPU backend, device kind and dtype runs the quick self-check (unless
    ``BINSPARSE_SELF_CHECK=0``, or while traced or captured: then the next eager call checks); later
    calls look the verdict up. A new failure warns once, naming the backend ``fallback()`` says runs
    instead, or raises ``SelfCheckFailed`` under ``BINSPARSE_SELF_CHECK=strict`` (with no ``fallback``,
    for a named backend, the caller raises).
    """
    if name not in FIRST_USE_BACKENDS or device.type not in FIRST_USE_DEVICE_TYPES:
        return None
    key = (name, device_kind(device), dtype)
    if key in _verdicts:
        failure = _verdicts[key]
        if failure is not None and mode() == "strict":
            raise SelfCheckFailed(failure)
        return failure
    if _being_traced(device) or mode() == "off":
        return None
    t0 = time.perf_counter()
    failure = _run_quick_check(name, device, dtype)
    _verdicts[key] = failure
    if failure is None:
        return None
    message = (f"binsparse_kernels SELF-CHECK FAILED: backend {name!r} on {device} ({key[1]}) in {_short(dtype)} "
               f"disagrees with the reference: {failure} [checked in {time.perf_counter() - t0:.2f} s]. "
               "Please report it with the output of `binsparse doctor`.")
    _verdicts[key] = message
    if mode() == "strict":
        raise SelfCheckFailed(message)
    if fallback is not None:
        warnings.warn(f"{message} Falling back to backend {fallback()} for this process.", SelfCheckWarning,
                      stacklevel=2)
    return message


class SelfCheckWarning(UserWarning):
    """A backend failed its first-use self-check and is bypassed for the rest of the process."""


def reset() -> None:
    """Forget every first-use verdict (tests)."""
    _verdicts.clear()
    _device_kinds.clear()
