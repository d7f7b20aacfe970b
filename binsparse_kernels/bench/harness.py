"""Timing, memory, floors and the results files of the benchmark suite.

Timing: after ``warmup`` untimed calls (which also compile), each timed call gets the next of the
rotating input copies (together larger than twice the L2 cache on a GPU, so no call finds its
inputs cached), and the median of the calls is reported. GPU calls are timed with CUDA events
(device time between two events on the stream, one synchronisation at the end), CPU calls with
``time.perf_counter``. On a CPU a case's impls and floor measurements run in interleaved rounds
(``measure_interleaved``), so load from other processes hits them alike; on a GPU one at a time.

Memory: one extra, untimed call. On a GPU with ``torch.cuda.max_memory_allocated`` reset just
before it: ``peak_mb`` is the allocator's peak (inputs and weights included) and ``extra_mb`` the
peak above what was allocated when the call started (the op's workspace and outputs). On a CPU
under ``torch.profiler`` with ``profile_memory=True``, which records every CPU allocation and free:
``peak_mb`` = ``extra_mb`` = the peak of the bytes the call allocated and had not yet freed (inputs
and weights, allocated before the call, are not in it).

Floors, measured in the same run:

* encode: the bare GEMM ``x @ W_enc.T`` in the case's dtype (on a GPU the op cannot beat it);
* decode: the bytes a gather-sum must move (the N*k gathered rows, the N x d output, the codes)
  at the device-to-device copy bandwidth measured here;
* backward and step: estimates, labelled as such: bytes at the copy bandwidth (and for steps the
  encode GEMM plus the skip GEMMs at the measured GEMM rate); see ``floor_for``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

import binsparse_kernels as bk

from . import baselines
from .cases import Case, build, case_copies, make_inputs

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timing(times: list) -> Timing:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), min(times), q[0], q[2], len(times))


def measure_interleaved(runners: dict, device: torch.device, *, warmup: int = 2, min_repeats: int = 5,
                        max_repeats: int = 100, min_time_s: float = 1.0, keys: Optional[dict] = None,
                        first_outputs: Optional[dict] = None) -> dict:
    """Median times of several ``(prepare, run)`` pairs, timed in interleaved rounds.

    ``runners`` maps a name to an object with ``prepare(i) -> ctx`` (untimed) and ``run(ctx)``
    (timed); ``i`` counts that runner's calls, so ``prepare`` can rotate its inputs. Every runner is
    warmed up (``warmup`` calls; the fastest sets its expected speed), then each round calls every
    runner once, so load from other processes hits them all alike. Rounds: at least
    ``min_repeats``, at most ``max_repeats``, as many as fit in about ``min_time_s`` per runner.
    Returns name -> ``Timing``, or the exception that runner raised (it is dropped from later
    rounds). For the names in ``keys`` (name -> function of an output), ``first_outputs[name]``
    receives that function of the runner's first output.
    """
    if min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(f"need 1 <= min_repeats <= max_repeats, got {min_repeats}, {max_repeats}")
    result: dict = {}
    calls = dict.fromkeys(runners, 0)
    per_call = {}
    for name, r in runners.items():
        try:
            for _ in range(max(1, warmup)):
                ctx = r.prepare(calls[name])
                start = time.perf_counter()
                out = r.run(ctx)
                _sync(device)
                per_call[name] = min(per_call.get(name, math.inf), time.perf_counter() - start)
                if keys and name in keys and first_outputs is not None and name not in first_outputs:
                    first_outputs[name] = keys[name](out)
                del ctx, out
                calls[name] += 1
        except Exception as exc:  # noqa: BLE001 - recorded per runner, the others go on
            result[name] = exc
            _free(device)
    live = [name for name in runners if name not in result]
    if not live:
        return result
    budget = min_time_s * len(live) / max(sum(per_call[n] for n in live), 1e-6)
    rounds = int(min(max_repeats, max(min_repeats, math.ceil(budget))))
    times: dict = {name: [] for name in live}
    events: dict = {name: [] for name in live}
    for _ in range(rounds):
        for name in live:
            if name in result:
                continue
            r = runners[name]
            try:
                ctx = r.prepare(calls[name])
                if device.type == "cuda":
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    out = r.run(ctx)
                    end.record()
                    events[name].append((begin, end))
                else:
                    t0 = time.perf_counter()
                    out = r.run(ctx)
                    times[name].append((time.perf_counter() - t0) * 1e3)
                del ctx, out
                calls[name] += 1
            except Exception as exc:  # noqa: BLE001
                result[name] = exc
                _free(device)
    _sync(device)
    for name in live:
        if name not in result:
            ts = times[name] or [b.elapsed_time(e) for b, e in events[name]]
            result[name] = _timing(ts)
    return result


@dataclass
class _Pair:
    prepare: Callable[[int], object]
    run: Callable[[object], object]


def measure(prepare: Callable[[int], object], run: Callable[[object], object], device: torch.device, *,
            warmup: int = 2, min_repeats: int = 5, max_repeats: int = 100, min_time_s: float = 1.0) -> Timing:
    """Median time of ``run(prepare(i))`` over rotating ``i`` (``prepare`` is not timed); see
    ``measure_interleaved``. Raises what ``run`` raises."""
    out = measure_interleaved({"fn": _Pair(prepare, run)}, device, warmup=warmup, min_repeats=min_repeats,
                              max_repeats=max_repeats, min_time_s=min_time_s)["fn"]
    if isinstance(out, BaseException):
        raise out
    return out


def measure_memory(prepare: Callable[[int], object], run: Callable[[object], object],
                   device: torch.device) -> tuple[Optional[float], Optional[float]]:
    """(peak MiB, MiB above the allocation at the call's start) of one call (see the module docstring)."""
    ctx = prepare(0)
    if device.type != "cuda":
        extra = cpu_peak_bytes(lambda: run(ctx))
        del ctx
        return extra / 2**20, extra / 2**20
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = run(ctx)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out, ctx
    return peak / 2**20, (peak - before) / 2**20


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the CPU bytes ``fn()`` allocated and had not freed yet (its output counted while
    alive): the running sum, in time order, of the allocation (+bytes) and free (-bytes) records
    that ``torch.profiler`` keeps with ``profile_memory=True``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # else kineto logs every profiler start/stop on stderr
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    records = [e for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    current = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        current += record.nbytes()
        peak = max(peak, current)
    return peak


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Floors: measured per case, in the same rounds as the impls
# ----------------------------------------------------------------------------------------------

COPY_BYTES = 256 * 2**20


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def copy_runner(device: torch.device, nbytes: int = COPY_BYTES) -> _Pair:
    """``dst.copy_(src)`` of ``nbytes``, alternating two sources; bandwidth = 2 * nbytes / time."""
    n = nbytes // 4
    src = [torch.empty(n, dtype=torch.float32, device=device).uniform_() for _ in range(2)]
    dst = torch.empty(n, dtype=torch.float32, device=device)
    return _Pair(lambda i: src[i % 2], dst.copy_)


def gemm_runner(N: int, d: int, M: int, dtype: torch.dtype, device: torch.device, rotate_bytes: int) -> _Pair:
    """The bare encode GEMM ``x @ W_enc.T`` ([N, d] x [d, M]) in ``dtype``, x rotating past the L2."""
    g = torch.Generator(device=device).manual_seed(0)
    W = (torch.randn(M, d, device=device, generator=g) / math.sqrt(d)).to(dtype)
    elem = torch.finfo(dtype).bits // 8
    copies = max(1, min(16, math.ceil(rotate_bytes / (N * d * elem)))) if rotate_bytes else 1
    xs = [torch.randn(N, d, device=device, generator=g).to(dtype) for _ in range(copies)]
    return _Pair(lambda i: xs[i % copies], lambda x: x @ W.T)


def copy_bandwidth(device: torch.device, nbytes: int = COPY_BYTES, min_time_s: float = 0.3) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    r = copy_runner(device, nbytes)
    t = measure(r.prepare, r.run, device, warmup=2, min_repeats=5, max_repeats=50, min_time_s=min_time_s)
    return 2 * nbytes / (t.median_ms / 1e3)


def floor_runners(case: Case, device: torch.device, rotate_bytes: int) -> dict:
    """What the case's floor is measured from: ``gemm`` (encode, step) and/or ``copy`` (the rest)."""
    out = {}
    if case.op in ("encode", "step"):
        out["gemm"] = gemm_runner(case.N, case.d, case.M, case.torch_dtype, device, rotate_bytes)
    if case.op != "encode":
        out["copy"] = copy_runner(device)
    return out


def decode_bytes(N, d, k, elem) -> int:
    """A gather-sum's bytes: N*k gathered rows, the N x d output, indices (int64) and acts."""
    return N * k * d * elem + N * d * elem + N * k * (8 + elem)


def backward_bytes(N, d, M, k, elem) -> int:
    """Sparse backward (est.): W_dec rows gathered again for the latent gradients, the x and dL/dy rows
    read per selection, and the two dense float32 weight gradients written once."""
    return N * k * d * elem + 2 * N * k * d * elem + 2 * M * d * 4


def floor_for(case: Case, gemm_ms: Optional[float], bandwidth: Optional[float]) -> tuple[float, str]:
    """(floor in ms, what it is) for ``case``, from the bare GEMM's time and the copy bandwidth (bytes/s)."""
    elem = torch.finfo(case.torch_dtype).bits // 8
    N, d, M, k = case.N, case.d, case.M, case.k
    if case.op == "encode":
        return gemm_ms, "GEMM x@W_enc.T (measured)"
    if case.op == "decode":
        return decode_bytes(N, d, k, elem) / bandwidth * 1e3, "gathered bytes at copy bandwidth"
    if case.op == "backward":
        return backward_bytes(N, d, M, k, elem) / bandwidth * 1e3, "bytes at copy bandwidth (est.)"
    # step: encode GEMM + decode + backward bytes + optimizer (20 B/param: read p, g, m; write p, m)
    ms = gemm_ms
    n_params = 2 * M * d
    if case.coder == "btc":  # x @ W_skip forward and its weight gradient: two N x d x d GEMMs at the GEMM rate
        n_params += d * d
        ms += gemm_ms * 2 * d / M
    nbytes = decode_bytes(N, d, k, elem) + backward_bytes(N, d, M, k, elem) + 20 * n_params
    return ms + nbytes / bandwidth * 1e3, "encode GEMM + bytes at copy bandwidth (est.)"


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_avg() -> Optional[list]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> tuple[str, bool]:
    """(commit of the source tree, whether it has uncommitted changes); ("unknown", False) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=30).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional
        triton_version = None
    commit, dirty = git_commit()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        extra = {"gpu_memory_gib": round(props.total_memory / 2**30, 1), "l2_mib": l2_bytes(device) / 2**20,
                 "sm_count": props.multi_processor_count, "capability": f"{props.major}.{props.minor}"}
    else:
        name = _cpu_name()
        extra = {}
    return {
        "device": name,
        "device_type": device.type,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "dirty": dirty,
        "binsparse_kernels": bk.__version__,
        "available_backends": bk.available_backends(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_avg_start": _load_avg(),  # other processes on the machine skew CPU timings: look here
        **extra,
    }


@contextmanager
def _value_checks(enabled: bool):
    old = os.environ.get("BINSPARSE_CHECK_VALUES")
    os.environ["BINSPARSE_CHECK_VALUES"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["BINSPARSE_CHECK_VALUES"]
        else:
            os.environ["BINSPARSE_CHECK_VALUES"] = old


# ----------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------


COMPILED = ("compile",)  # impls that run torch.compile'd code


def default_impls(device: torch.device) -> list[str]:
    """Every backend that runs natively on ``device`` plus every baseline.

    Triton under its CPU interpreter (``TRITON_INTERPRET=1``) is left out: it checks correctness,
    its speed means nothing. Name it in ``impls`` to time it anyway.
    """
    names = [n for n in bk.available_backends()
             if not (n == "triton" and device.type == "cpu") and not (n == "cuda" and device.type != "cuda")
             and not (n == "cpu" and device.type != "cpu")]
    return names + list(baselines.BASELINES)


SPEEDUP_VS = {"eager": "eager", "sparsify": "sparsify", "saelens": "saelens",
              baselines.FORMULATION: "formulation"}  # impl -> column suffix of speedup_vs_<suffix>


@dataclass
class Options:
    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 100
    min_time_s: float = 1.0
    memory: bool = True
    check: bool = True
    value_checks: bool = False
    interleave: Optional[bool] = None
    """Time a case's impls (and its floor) in interleaved rounds; default: on a CPU (where other
    processes skew timings), not on a GPU (where every impl then holds its memory at once).
    ``torch.compile``'d impls always get rounds of their own (their OpenMP threads spin)."""


@dataclass
class Results:
    meta: dict
    rows: list

    def by(self, case_name: str, impl: str) -> dict:
        return next(r for r in self.rows if r["case"] == case_name and r["impl"] == impl)


def _check_reference(impls: Sequence[str]) -> Optional[str]:
    for name in ("eager", "reference", *impls):
        if name in impls:
            return name
    return None


def run_suite(cases: Sequence[Case], impls: Optional[Sequence[str]] = None, device="cpu", *,
              options: Optional[Options] = None, log: Optional[Callable[[str], None]] = print,
              preset: str = "") -> Results:
    """Time every impl on every case; returns rows of results plus the run's metadata."""
    options = options or Options()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    impls = list(impls) if impls else default_impls(device)
    for name in impls:  # fail early on an unknown or unavailable name
        baselines.make_impl(name)
    interleave = device.type == "cpu" if options.interleave is None else options.interleave
    say = log or (lambda _msg: None)
    rotate = 2 * l2_bytes(device)
    with _value_checks(options.value_checks):
        meta = environment(device)
        meta.update(preset=preset, impls=impls, rotate_bytes=rotate, options={**vars(options), "interleave": interleave},
                    memory_note=("peak_mb/extra_mb: torch.cuda.max_memory_allocated" if device.type == "cuda"
                                 else "peak_mb = extra_mb: peak of the bytes allocated during the call "
                                      "(torch.profiler, profile_memory=True); inputs and weights not included"),
                    topk_stand_in_note=("rows with note 'topk stand-in': a TopK-only library runs its TopK coder "
                                        "on a binary case (no output check)"),
                    value_checks_note=("data-dependent input checks of the ops "
                                       + ("on" if options.value_checks else "off (BINSPARSE_CHECK_VALUES=0)")))
        say(f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit'][:10]}"
            f" | impls {', '.join(impls)} | {'interleaved' if interleave else 'one impl at a time'}")
        rows = []
        for n_case, case in enumerate(cases, 1):
            say(f"[{n_case}/{len(cases)}] {case.name}")
            rows += _run_case(case, impls, device, rotate, options, interleave, say)
        meta["load_avg_end"] = _load_avg()
    return Results(meta, rows)


def _status(exc: BaseException) -> str:
    return "oom" if _is_oom(exc) else f"error: {type(exc).__name__}: {exc}"[:300]


def _run_case(case: Case, impls: list[str], device: torch.device, rotate: int, options: Options,
              interleave: bool, say) -> list:
    base = {"case": case.name, **case.to_dict()}
    made = {name: baselines.make_impl(name) for name in impls}
    impls = [name for name in impls if made[name].supports(case)]  # e.g. a binary-only formulation
    rows = {name: {**base, "impl": name, "kind": _kind(name)} for name in impls}
    for name in impls:
        if not made[name].exact(case):
            rows[name]["note"] = "topk stand-in"
    try:
        inputs = make_inputs(case, device, rotate)
        floors = {f"floor:{k}": r for k, r in floor_runners(case, device, rotate).items()}
    except Exception as exc:  # noqa: BLE001 - e.g. the inputs alone do not fit
        _free(device)
        return [{**row, "status": _status(exc)} for row in rows.values()]
    timing_kw = dict(warmup=options.warmup, min_repeats=options.min_repeats, max_repeats=options.max_repeats,
                     min_time_s=options.min_time_s)
    ref_name = _check_reference(impls) if options.check and case.op in ("encode", "decode") else None
    checked = [name for name in impls if made[name].exact(case)]
    # Every impl's first output, reduced to a comparable tensor (encode/decode), for the check.
    firsts: dict = {}
    memory = options.memory

    def build_runner(name):
        try:
            return build(case, made[name], inputs, device)
        except Exception as exc:  # noqa: BLE001
            rows[name]["status"] = _status(exc)
            return None

    def record_memory(name, runner):
        try:
            peak, extra = measure_memory(runner.prepare, runner.run, device)
            rows[name].update(peak_mb=peak, extra_mb=extra)
        except Exception as exc:  # noqa: BLE001
            rows[name]["status"] = _status(exc)

    if interleave:  # every runner alive at once, timed round-robin together with the floors
        runners = {name: r for name in impls if (r := build_runner(name)) is not None}
        keys = {name: r.key for name, r in runners.items() if r.key is not None and ref_name and name in checked}
        # torch.compile'd CPU code brings its own OpenMP threads, which spin after each call and
        # slow whatever runs next (measured: 2-5x on 2 cores): compiled impls get rounds of their own.
        alone = [name for name in runners if name in COMPILED]
        together = {name: r for name, r in runners.items() if name not in alone}
        timings = measure_interleaved({**floors, **together}, device, keys=keys, first_outputs=firsts, **timing_kw)
        for name in alone:
            timings.update(measure_interleaved({name: runners[name]}, device, keys=keys, first_outputs=firsts,
                                               **timing_kw))
        _free(device)
        if memory:
            for name, runner in runners.items():
                if isinstance(timings.get(name), Timing):
                    record_memory(name, runner)
                    _free(device)
        del runners
    else:  # one impl at a time, built just before and freed just after (GPU memory)
        timings = measure_interleaved(floors, device, **timing_kw)
        for name in impls:
            runner = build_runner(name)
            if runner is None:
                continue
            keys = {name: runner.key} if runner.key is not None and ref_name and name in checked else {}
            timings.update(measure_interleaved({name: runner}, device, keys=keys, first_outputs=firsts, **timing_kw))
            _free(device)
            if memory and isinstance(timings.get(name), Timing):
                record_memory(name, runner)
            del runner
            _free(device)
    del inputs, floors

    floor_ms, floor_kind, floor_info = None, "", {}
    failed = {k: t for k, t in timings.items() if k.startswith("floor:") and not isinstance(t, Timing)}
    if not failed:
        gemm = timings.get("floor:gemm")
        gemm_ms = gemm.median_ms if gemm else None
        bandwidth = 2 * COPY_BYTES / (timings["floor:copy"].median_ms / 1e3) if "floor:copy" in timings else None
        floor_ms, floor_kind = floor_for(case, gemm_ms, bandwidth)
        if gemm_ms:
            floor_info.update(gemm_ms=gemm_ms, gemm_tflops=2 * case.N * case.d * case.M / (gemm_ms / 1e3) / 1e12)
        if bandwidth:
            floor_info["copy_gbs"] = bandwidth / 1e9
    else:
        floor_kind = "; ".join(f"{k}: {_status(t)}" for k, t in failed.items())
    ref_key = firsts.get(ref_name)
    for name in impls:
        row = rows[name]
        if "status" in row and name not in timings:  # failed to build
            continue
        row.update(floor_ms=floor_ms, floor=floor_kind, **floor_info)
        t = timings.get(name)
        if not isinstance(t, Timing):
            row["status"] = _status(t) if t is not None else "error: not run"
            continue
        row.update(median_ms=t.median_ms, min_ms=t.min_ms, q1_ms=t.q1_ms, q3_ms=t.q3_ms, repeats=t.repeats,
                   x_floor=t.median_ms / floor_ms if floor_ms else None, copies=case_copies(case, device, rotate))
        row.setdefault("status", "ok")
        row.setdefault("peak_mb", None)
        row.setdefault("extra_mb", None)
        if ref_key is not None and name != ref_name and firsts.get(name) is not None:
            scale = ref_key.abs().max().clamp_min(1e-12)
            row.update(check_vs=ref_name, max_rel_diff=float((firsts[name] - ref_key).abs().max() / scale))
    firsts.clear()
    del ref_key
    _free(device)
    for name in impls:
        row = rows[name]
        for ref, suffix in SPEEDUP_VS.items():
            other = rows.get(ref)
            if row.get("status") == "ok" and other and other.get("status") == "ok":
                row[f"speedup_vs_{suffix}"] = other["median_ms"] / row["median_ms"]
        say("    " + _short(row))
    return list(rows.values())


def _kind(name: str) -> str:
    return "baseline" if name in baselines.BASELINES else "backend"


def _short(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row['impl']:<10} {row.get('status')}"
    mem = f"  peak {row['peak_mb']:.0f} MiB" if row.get("peak_mb") is not None else ""
    floor = f"  x{row['x_floor']:.2f} floor" if row.get("x_floor") else ""
    return f"{row['impl']:<10} {row['median_ms']:10.3f} ms{floor}  ({row['repeats']} runs){mem}"


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

CSV_FIELDS = ("case", "op", "variant", "coder", "model", "N", "d", "M", "k", "dtype", "impl", "kind", "note", "status",
              "median_ms", "min_ms", "q1_ms", "q3_ms", "repeats", "floor_ms", "floor", "x_floor",
              "speedup_vs_eager", "speedup_vs_sparsify", "speedup_vs_saelens", "speedup_vs_formulation",
              "peak_mb", "extra_mb", "check_vs", "max_rel_diff",
              "copies", "device", "torch", "triton", "commit")


def format_table(results: Results) -> str:
    """A markdown table: one row per (case, impl)."""
    head = ("| case | impl | median ms | IQR ms | floor ms | x floor | vs eager | vs sparsify | vs saelens "
            "| vs formulation | peak MiB | status |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in results.rows:
        ok = r.get("status") == "ok"
        lines.append("| " + " | ".join([
            r["case"], r["impl"] + (f" ({r['note']})" if r.get("note") else ""), f(r.get("median_ms"), ".3f"),
            f"{r['q1_ms']:.3f}-{r['q3_ms']:.3f}" if ok else "",
            f(r.get("floor_ms"), ".3f"), f(r.get("x_floor"), ".2f"),
            f(r.get("speedup_vs_eager"), ".2f"), f(r.get("speedup_vs_sparsify"), ".2f"),
            f(r.get("speedup_vs_saelens"), ".2f"), f(r.get("speedup_vs_formulation"), ".2f"),
            f(r.get("peak_mb"), ".0f"), "ok" if ok else str(r.get("status", "")).replace("|", "/"),
        ]) + " |")
    return "\n".join(lines)


def write_results(results: Results, out_dir, name: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.json`` (metadata + rows) and ``<name>.csv`` (rows + device/versions/commit)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{name}.json", out_dir / f"{name}.csv"
    json_path.write_text(json.dumps({"meta": results.meta, "rows": results.rows}, indent=1, default=str) + "\n")
    env = {key: results.meta.get(key) for key in ("device", "torch", "triton", "commit")}
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in results.rows:
            writer.writerow({**row, **env})
    return json_path, csv_path


def default_name(meta: dict, preset: str) -> str:
    """``cpu-<preset>-<date>`` or ``<gpu name>-<preset>-<date>``, file-system safe."""
    tag = "cpu" if meta["device_type"] == "cpu" else meta["device"]
    stamp = meta["date_utc"].replace(":", "").replace("-", "")
    parts = [tag] + ([preset or "custom"] if preset != tag else []) + [stamp]
    raw = "-".join(parts).lower()
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in raw)
