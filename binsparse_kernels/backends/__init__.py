"""Backend registry: which implementations exist, which load here, and which one ``backend=None`` picks.

Every backend is a module exposing five functions with the signatures of ``backends/reference.py``:

    encode_forward(x, W_enc, b_enc, threshold, k, binary)            -> (values f32 [N,k], indices i64 [N,k])
    encode_backward(grad_acts, grad_values, values, x, W_enc, indices, mode, temperature,
                    need_x, need_W, need_b)                         -> (grad_x, grad_W_enc, grad_b_enc)
    decode_forward(indices, acts, W_dec, b_dec, binary)              -> y [N, d_out] (dtype of acts)
    decode_backward(grad_y, indices, acts, W_dec, binary, need_acts, need_W) -> (grad_acts, grad_W_dec)
    coder_backward(grad_y, grad_acts, grad_values, indices, acts, values, x, W_enc, W_dec, binary, mode,
                   temperature, need_x, need_W_enc, need_b_enc, need_W_dec)
                                                                    -> (grad_x, grad_W_enc, grad_b_enc, grad_W_dec)

``coder_backward`` is the backward of an encode followed by the decode of its codes (the fused
``topk_*_encode_decode`` ops): ``decode_backward``'s grad_acts added to ``grad_acts`` and fed to
``encode_backward``, in one call, so a backend builds its transpose of the indices once per step.

Inputs reach a backend validated and contiguous. A new backend is one module plus one line in
``_BACKENDS``; callers never change.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

NAMES = ("reference", "cpu", "triton", "cuda")


class BackendUnavailable(RuntimeError):
    pass


def _triton_devices() -> tuple[str, ...]:
    # Under TRITON_INTERPRET=1 Triton kernels run on CPU tensors (used by CI, which has no GPU).
    return ("cpu",) if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


@dataclass(frozen=True)
class _Spec:
    module: str
    devices: Callable[[], tuple[str, ...]]


_BACKENDS = {
    "reference": _Spec("binsparse_kernels.backends.reference", lambda: ("cpu", "cuda", "meta")),
    "cpu": _Spec("binsparse_kernels.backends.cpu", lambda: ("cpu",)),
    "triton": _Spec("binsparse_kernels.backends.triton", _triton_devices),
    "cuda": _Spec("binsparse_kernels.backends.cuda", lambda: ("cuda",)),
}

# Order in which backend=None tries backends, per device type. On CPU the compiled backend is
# measured faster (benchmarks/CPU_RESULTS.md). On CUDA nothing is measured yet: Triton goes first
# because its kernels have at least run against the reference (under the interpreter), while the
# CUDA kernels have only been compiled. Re-decide per op from scripts/gpu_check.sh's timings.
_PREFERENCE = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}

_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}
_warned: set[str] = set()


def _load(name: str) -> ModuleType:
    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        raise BackendUnavailable(_failed[name])
    try:
        module = importlib.import_module(_BACKENDS[name].module)
    except Exception as exc:  # a missing extension or toolchain must not break the import
        _failed[name] = f"backend {name!r} is unavailable: {type(exc).__name__}: {exc}"
        raise BackendUnavailable(_failed[name]) from exc
    _loaded[name] = module
    return module


def unavailable_reason(name: str) -> str | None:
    """Why ``name`` cannot be used here, or ``None`` if it can."""
    if name not in _BACKENDS:
        return f"unknown backend {name!r}; choose from {list(NAMES)}"
    if name == "cuda" and not torch.cuda.is_available():
        return "backend 'cuda' needs a CUDA GPU, and torch sees none"
    if name == "triton" and _triton_devices() == ("cuda",) and not torch.cuda.is_available():
        return "backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 to run on the CPU)"
    try:
        _load(name)
    except BackendUnavailable as exc:
        return str(exc)
    return None


def available_backends() -> list[str]:
    """The backends usable on this machine, a subset of ``["reference", "cpu", "triton", "cuda"]``."""
    return [name for name in NAMES if unavailable_reason(name) is None]


def get(name: str | None, device: torch.device, dtype: torch.dtype | None = None) -> ModuleType:
    """The backend module to run on ``device``: ``name`` checked, or the fastest one if ``None``.

    With ``dtype`` (the public ops pass it), a GPU backend also has to pass its first-use self-check
    on this kind of device in this dtype (``self_check.first_use_failure``): with ``name=None`` a
    backend that fails it is bypassed, with a warning, for the next one in the preference order; a
    named backend that fails it raises.
    """
    if name is None:
        preference = _PREFERENCE.get(device.type, ("reference",))
        for i, candidate in enumerate(preference):
            if _usable(candidate, device):
                def fallback(rest=preference[i + 1:]) -> str:  # named in the warning of a failed check
                    return repr(next((c for c in rest if _usable(c, device)), "reference"))

                if dtype is None or _self_check_failure(candidate, device, dtype, fallback) is None:
                    return _load(candidate)
                continue
            if candidate not in ("reference",) and candidate not in _warned and candidate in _failed:
                _warned.add(candidate)
                warnings.warn(f"{_failed[candidate]}; falling back to the next backend", stacklevel=3)
        return _load("reference")
    if not isinstance(name, str) or name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {list(NAMES)} or None")
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(reason)
    if device.type not in _BACKENDS[name].devices():
        raise RuntimeError(
            f"backend {name!r} runs on {'/'.join(_BACKENDS[name].devices())} tensors, got tensors on {device}"
        )
    if dtype is not None:
        failure = _self_check_failure(name, device, dtype, None)
        if failure is not None:
            raise RuntimeError(f"{failure} Pass backend=None to fall back to a backend that passes, or set "
                               "BINSPARSE_SELF_CHECK=0 to run it anyway.")
    return _load(name)


def _usable(name: str, device: torch.device) -> bool:
    return device.type in _BACKENDS[name].devices() and unavailable_reason(name) is None


def _self_check_failure(name: str, device: torch.device, dtype: torch.dtype,
                        fallback: Callable[[], str] | None) -> str | None:
    from .. import self_check  # imports this module: loaded on first use

    return self_check.first_use_failure(name, device, dtype, fallback)


def resolve_name(name: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The registry name of ``get(name, device, dtype)``."""
    module = get(name, device, dtype)
    return next(n for n, m in _loaded.items() if m is module)
