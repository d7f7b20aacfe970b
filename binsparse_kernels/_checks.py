"""Input validation shared by every public op.

Shape, dtype and device checks are free and always run. Checks that must read tensor data (finite
inputs, index range, 0/1 codes) cost one device sync; they run unless the environment variable
``BINSPARSE_CHECK_VALUES=0`` is set or the op is being traced by ``torch.compile``.
"""

from __future__ import annotations

import os

import torch

# float64 is accepted for torch.autograd.gradcheck and runs on the reference backend only.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64,)


def value_checks_enabled() -> bool:
    if os.environ.get("BINSPARSE_CHECK_VALUES", "1") == "0":
        return False
    return not torch.compiler.is_compiling()


def tensor(name: str, t, *, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        hint = ""
        if name == "x" and t.ndim == 3:
            hint = " (flatten a [batch, seq, d] activation to [batch*seq, d] first)"
        want = "(N, d)" if ndim == 2 else "a 1-D vector"
        raise ValueError(f"{name} must be {ndim}-D {want}, got shape {tuple(t.shape)}{hint}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {names}")


def same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise RuntimeError(f"all tensors must be on one device, got {listing}")
    return first


def shape(name: str, t: torch.Tensor, expected: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(t.shape)}")


def k_in_range(k, M: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= M:
        raise ValueError(f"k must be in [1, {M}] (the number of latents), got {k}")
    return k


def finite(**tensors) -> None:
    if not value_checks_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or infinite values")


def indices_in_range(indices: torch.Tensor, M: int) -> None:
    if not value_checks_enabled() or indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= M:
        raise ValueError(f"indices must lie in [0, {M}) (rows of W_dec), found values in [{lo}, {hi}]")


def binary_codes(acts: torch.Tensor) -> None:
    if not value_checks_enabled() or acts.numel() == 0:
        return
    if not bool(((acts == 0) | (acts == 1)).all()):
        raise ValueError("binary=True needs acts that are exactly 0 or 1")
