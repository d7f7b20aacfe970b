"""Input validation shared by every public op.

Shape, dtype and device checks are free and always run. Checks that must read tensor data (finite
inputs, index range, 0/1 codes) run unless the environment variable ``BINSPARSE_CHECK_VALUES=0``
is set or the op is being traced by ``torch.compile``. By default they are eager: the op reads the
answer on the host (one device sync each) and raises at once.

Inside ``deferred_checks()`` the same checks read nothing on the host: each one folds "bad input
seen" into a small accumulator tensor on the input's device (keyed by which check and which
tensor), and ``raise_deferred()``, or leaving the outermost ``deferred_checks()`` block, reads all
accumulators in one transfer per device and raises the error the eager check would have raised.
A training loop enters the block once and calls ``raise_deferred()`` at its logging steps, where
it reads its metrics anyway. (Device-side asserts are not used: a failed one kills the CUDA context.)
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable

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


# ----------------------------------------------------------------------------------------------
# Deferred mode
# ----------------------------------------------------------------------------------------------


class _Deferred:
    """What the checks have recorded inside ``deferred_checks()``, per (check, tensor, device).

    ``flags[(message, device)]``: a 0-d bool tensor, True once a bad input was seen.
    ``ranges[(name, M, device)]``: an int64 [2] tensor, the (min, max) of every index seen.
    Accumulated in place, so a captured CUDA graph keeps accumulating into the same tensors.
    Module-global rather than thread-local: autograd runs CUDA backwards on its own threads.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.depth = 0
        self.flags: dict = {}
        self.ranges: dict = {}
        self.listeners: list[Callable[[bool], None]] = []


_deferred = _Deferred()


def deferring() -> bool:
    """Whether the value checks are deferred (inside ``deferred_checks()``)."""
    return _deferred.depth > 0


def add_deferred_listener(fn: Callable[[bool], None]) -> None:
    """Call ``fn(deferring())`` now and whenever deferred mode is entered or left (the CUDA
    extension's own index checks use this to skip their host read while deferring)."""
    with _deferred.lock:
        _deferred.listeners.append(fn)
        fn(_deferred.depth > 0)


def _set_depth(depth: int) -> None:
    with _deferred.lock:
        was = _deferred.depth > 0
        _deferred.depth = depth
        if was != (depth > 0):
            for fn in _deferred.listeners:
                fn(depth > 0)


@contextlib.contextmanager
def deferred_checks():
    """Run the ops' value checks without host syncs; raise what they saw on leaving the block.

    Inside the block, ``topk_binary_encode``, ``topk_encode``, ``topk_*_encode_decode`` and
    ``sparse_decode`` record bad input (NaN or infinite values, indices out of range, acts that
    are not 0/1) in a device-side accumulator instead of raising at once. ``raise_deferred()``
    raises the recorded error at a moment of the caller's choosing; leaving the outermost block
    calls it (unless the block is left by an exception, whose records are then dropped).
    """
    _set_depth(_deferred.depth + 1)
    ok = False
    try:
        yield
        ok = True
    finally:
        _set_depth(_deferred.depth - 1)
        if _deferred.depth == 0:
            if ok:
                raise_deferred()
            else:
                _clear()


def _clear() -> None:
    with _deferred.lock:
        _deferred.flags.clear()
        _deferred.ranges.clear()


def raise_deferred() -> None:
    """Read what the deferred checks recorded (one device-to-host transfer per device), forget it,
    and raise the first error as the eager check would have (ValueError); a no-op if nothing was
    recorded or everything was fine."""
    with _deferred.lock:
        flags, ranges = dict(_deferred.flags), dict(_deferred.ranges)
        _deferred.flags.clear()
        _deferred.ranges.clear()
    if not flags and not ranges:
        return
    by_device: dict = {}
    for key, t in flags.items():
        by_device.setdefault(key[1], []).append(("flag", key, t.reshape(1).to(torch.int64)))
    for key, t in ranges.items():
        by_device.setdefault(key[2], []).append(("range", key, t))
    errors = []
    for entries in by_device.values():
        values = torch.cat([t for _, _, t in entries]).tolist()  # the one host read per device
        pos = 0
        for kind, key, t in entries:
            if kind == "flag":
                if values[pos]:
                    errors.append(key[0])
                pos += 1
            else:
                lo, hi = values[pos], values[pos + 1]
                name, M = key[0], key[1]
                if lo < 0 or hi >= M:
                    errors.append(_range_message(name, M, lo, hi))
                pos += 2
    if errors:
        more = f" (and {len(errors) - 1} other check(s): {'; '.join(errors[1:])})" if len(errors) > 1 else ""
        raise ValueError(f"{errors[0]} [recorded inside deferred_checks()]{more}")


def _record_flag(message: str, bad: torch.Tensor) -> None:
    key = (message, bad.device)
    with _deferred.lock:
        flag = _deferred.flags.get(key)
        if flag is None:
            _deferred.flags[key] = bad.clone()
        else:
            flag.logical_or_(bad)


def _record_range(name: str, M: int, indices: torch.Tensor) -> None:
    lo_hi = torch.stack([indices.min(), indices.max()])
    key = (name, M, indices.device)
    with _deferred.lock:
        acc = _deferred.ranges.get(key)
        if acc is None:
            _deferred.ranges[key] = lo_hi
        else:
            torch.minimum(acc[:1], lo_hi[:1], out=acc[:1])
            torch.maximum(acc[1:], lo_hi[1:], out=acc[1:])


# ----------------------------------------------------------------------------------------------
# Value checks: eager (raise now) or deferred (record on the device)
# ----------------------------------------------------------------------------------------------


def _range_message(name: str, M: int, lo: int, hi: int) -> str:
    return f"{name} must lie in [0, {M}) (rows of W_dec), found values in [{lo}, {hi}]"


def finite(**tensors) -> None:
    if not value_checks_enabled():
        return
    for name, t in tensors.items():
        if t is None or not t.numel():
            continue
        message = f"{name} contains NaN or infinite values"
        if deferring():
            _record_flag(message, ~torch.isfinite(t).all())
        elif not bool(torch.isfinite(t).all()):
            raise ValueError(message)


def indices_in_range(indices: torch.Tensor, M: int, name: str = "indices") -> None:
    if not value_checks_enabled() or indices.numel() == 0:
        return
    if deferring():
        _record_range(name, M, indices)
        return
    lo, hi = torch.aminmax(indices)
    lo, hi = torch.stack([lo, hi]).tolist()  # one host read
    if lo < 0 or hi >= M:
        raise ValueError(_range_message(name, M, lo, hi))


def binary_codes(acts: torch.Tensor) -> None:
    if not value_checks_enabled() or acts.numel() == 0:
        return
    message = "binary=True needs acts that are exactly 0 or 1"
    bad = ~((acts == 0) | (acts == 1)).all()
    if deferring():
        _record_flag(message, bad)
    elif bool(bad):
        raise ValueError(message)
