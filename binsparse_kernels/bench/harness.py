"""Timing, memory, floors and the results files of the benchmark suite.

Timing: after ``warmup`` untimed calls (which also compile), each timed call gets the next of the
rotating input copies (together larger than twice the L2 cache on a GPU, so no call finds its
inputs cached), and the median of the calls is reported. GPU calls are timed with CUDA events
(device time between two events on the stream, one synchronisation at the end), CPU calls with
``time.perf_counter``.

Memory: on a GPU, one extra call with ``torch.cuda.max_memory_allocated`` reset just before it;
``peak_mb`` is the allocator's peak (inputs and weights included) and ``extra_mb`` the peak above
what was allocated when the call started (the op's workspace and outputs). On a CPU it is not
measured (torch has no allocator statistics there); the fields are left empty.

Floors, measured in the same run:

* encode: the bare GEMM ``x @ W_enc.T`` in the case's dtype (the op cannot be faster than this);
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

import binsparse_kernels as bk

from . import baselines
from .cases import Case, build, make_inputs

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


def measure(prepare: Callable[[int], object], run: Callable[[object], object], device: torch.device, *,
            warmup: int = 2, min_repeats: int = 5, max_repeats: int = 100, min_time_s: float = 1.0,
            first_output: Optional[list] = None) -> Timing:
    """Median time of ``run(prepare(i))`` over rotating ``i`` (``prepare`` is not timed).

    Runs at least ``min_repeats`` and at most ``max_repeats`` timed calls, as many as fit in about
    ``min_time_s`` at the speed seen in the warm-up. ``first_output`` receives the first call's output.
    """
    if min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(f"need 1 <= min_repeats <= max_repeats, got {min_repeats}, {max_repeats}")
    i = 0
    per_call = float("inf")
    for _ in range(max(1, warmup)):
        ctx = prepare(i)
        start = time.perf_counter()
        out = run(ctx)
        _sync(device)
        per_call = min(per_call, time.perf_counter() - start)  # the first call may include compilation
        if first_output is not None and not first_output:
            first_output.append(out)
        del ctx, out
        i += 1
    repeats = int(min(max_repeats, max(min_repeats, math.ceil(min_time_s / max(per_call, 1e-6)))))
    times = []
    if device.type == "cuda":
        events = []
        for _ in range(repeats):
            ctx = prepare(i)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = run(ctx)
            end.record()
            events.append((begin, end))
            del ctx, out
            i += 1
        torch.cuda.synchronize(device)
        times = [b.elapsed_time(e) for b, e in events]
    else:
        for _ in range(repeats):
            ctx = prepare(i)
            t0 = time.perf_counter()
            out = run(ctx)
            times.append((time.perf_counter() - t0) * 1e3)
            del ctx, out
            i += 1
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), min(times), q[0], q[2], len(times))


def measure_memory(prepare: Callable[[int], object], run: Callable[[object], object],
                   device: torch.device) -> tuple[Optional[float], Optional[float]]:
    """(peak MiB, MiB above the allocation at the call's start) of one call; (None, None) on a CPU."""
    if device.type != "cuda":
        return None, None
    ctx = prepare(0)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = run(ctx)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out, ctx
    return peak / 2**20, (peak - before) / 2**20


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Floors
# ----------------------------------------------------------------------------------------------


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def copy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20, min_time_s: float = 0.3) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), ``dst.copy_(src)``."""
    n = nbytes // 4
    src = [torch.empty(n, dtype=torch.float32, device=device).uniform_() for _ in range(2)]
    dst = torch.empty(n, dtype=torch.float32, device=device)
    t = measure(lambda i: src[i % 2], dst.copy_, device, warmup=2, min_repeats=5, max_repeats=50,
                min_time_s=min_time_s)
    return 2 * n * 4 / (t.median_ms / 1e3)


def gemm_timing(N: int, d: int, M: int, dtype: torch.dtype, device: torch.device, rotate_bytes: int,
                min_time_s: float = 0.5) -> Timing:
    """The bare encode GEMM ``x @ W_enc.T`` ([N, d] x [d, M]) in ``dtype``."""
    g = torch.Generator(device=device).manual_seed(0)
    W = (torch.randn(M, d, device=device, generator=g) / math.sqrt(d)).to(dtype)
    elem = torch.finfo(dtype).bits // 8
    copies = max(1, min(16, math.ceil(rotate_bytes / (N * d * elem)))) if rotate_bytes else 1
    xs = [torch.randn(N, d, device=device, generator=g).to(dtype) for _ in range(copies)]
    return measure(lambda i: xs[i % copies], lambda x: x @ W.T, device, warmup=2, min_repeats=5, max_repeats=100,
                   min_time_s=min_time_s)


@dataclass
class Rates:
    """What the floors are made of: the copy bandwidth and the GEMM times of this run."""

    device: torch.device
    bandwidth: float  # bytes/s
    rotate_bytes: int
    gemm_min_time_s: float = 0.5
    gemms: dict = field(default_factory=dict)  # (N, d, M, dtype) -> Timing

    def gemm(self, N, d, M, dtype) -> Timing:
        key = (N, d, M, dtype)
        if key not in self.gemms:
            self.gemms[key] = gemm_timing(N, d, M, dtype, self.device, self.rotate_bytes, self.gemm_min_time_s)
        return self.gemms[key]

    def gemm_flops(self, N, d, M, dtype) -> float:
        """Measured GEMM rate (FLOP/s) at this shape."""
        return 2 * N * d * M / (self.gemm(N, d, M, dtype).median_ms / 1e3)


def decode_bytes(N, d, k, elem) -> int:
    """A gather-sum's bytes: N*k gathered rows, the N x d output, indices (int64) and acts."""
    return N * k * d * elem + N * d * elem + N * k * (8 + elem)


def backward_bytes(N, d, M, k, elem) -> int:
    """Sparse backward (est.): W_dec rows gathered again for the latent gradients, the x and dL/dy rows
    read per selection, and the two dense float32 weight gradients written once."""
    return N * k * d * elem + 2 * N * k * d * elem + 2 * M * d * 4


def floor_for(case: Case, rates: Rates) -> tuple[float, str]:
    """(floor in ms, what it is) for ``case``."""
    dt = case.torch_dtype
    elem = torch.finfo(dt).bits // 8
    N, d, M, k = case.N, case.d, case.M, case.k
    bw = rates.bandwidth
    if case.op == "encode":
        return rates.gemm(N, d, M, dt).median_ms, "GEMM x@W_enc.T (measured)"
    if case.op == "decode":
        return decode_bytes(N, d, k, elem) / bw * 1e3, "gathered bytes at copy bandwidth"
    if case.op == "backward":
        return backward_bytes(N, d, M, k, elem) / bw * 1e3, "bytes at copy bandwidth (est.)"
    # step: encode GEMM + decode + backward bytes + optimizer (20 B/param: read p, g, m; write p, m)
    ms = rates.gemm(N, d, M, dt).median_ms
    n_params = 2 * M * d
    if case.coder == "btc":  # x @ W_skip forward and its weight gradient: two N x d x d GEMMs
        n_params += d * d
        ms += 2 * (2 * N * d * d) / rates.gemm_flops(N, d, M, dt) * 1e3
    nbytes = decode_bytes(N, d, k, elem) + backward_bytes(N, d, M, k, elem) + 20 * n_params
    return ms + nbytes / bw * 1e3, "encode GEMM + bytes at copy bandwidth (est.)"


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


def default_impls(device: torch.device) -> list[str]:
    """Every backend that runs natively on ``device`` plus every baseline.

    Triton under its CPU interpreter (``TRITON_INTERPRET=1``) is left out: it checks correctness,
    its speed means nothing. Name it in ``impls`` to time it anyway.
    """
    names = [n for n in bk.available_backends()
             if not (n == "triton" and device.type == "cpu") and not (n == "cuda" and device.type != "cuda")
             and not (n == "cpu" and device.type != "cpu")]
    return names + list(baselines.BASELINES)


@dataclass
class Options:
    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 100
    min_time_s: float = 1.0
    memory: bool = True
    check: bool = True
    value_checks: bool = False


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
    say = log or (lambda _msg: None)
    rotate = 2 * l2_bytes(device)
    with _value_checks(options.value_checks):
        bandwidth = copy_bandwidth(device)
        rates = Rates(device, bandwidth, rotate, gemm_min_time_s=min(0.5, options.min_time_s))
        meta = environment(device)
        meta.update(preset=preset, impls=impls, copy_bandwidth_gbs=round(bandwidth / 1e9, 2),
                    rotate_bytes=rotate, options=vars(options),
                    memory_note=("peak_mb/extra_mb: torch.cuda.max_memory_allocated" if device.type == "cuda"
                                 else "peak memory not measured on CPU (no allocator statistics)"),
                    value_checks_note=("data-dependent input checks of the ops "
                                       + ("on" if options.value_checks else "off (BINSPARSE_CHECK_VALUES=0)")))
        say(f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit'][:10]}"
            f" | copy {bandwidth / 1e9:.1f} GB/s | impls {', '.join(impls)}")
        rows = []
        for n_case, case in enumerate(cases, 1):
            say(f"[{n_case}/{len(cases)}] {case.name}")
            rows += _run_case(case, impls, device, rates, options, say)
        meta["gemm_tflops"] = {f"N={k[0]} d={k[1]} M={k[2]} {str(k[3]).replace('torch.', '')}":
                               round(2 * k[0] * k[1] * k[2] / (t.median_ms / 1e3) / 1e12, 3)
                               for k, t in rates.gemms.items()}
    return Results(meta, rows)


def _run_case(case: Case, impls: list[str], device: torch.device, rates: Rates, options: Options, say) -> list:
    base = {"case": case.name, **case.to_dict()}
    try:
        inputs = make_inputs(case, device, rates.rotate_bytes)
        floor_ms, floor_kind = floor_for(case, rates)
    except Exception as exc:  # e.g. the inputs alone do not fit
        _free(device)
        status = "oom" if _is_oom(exc) else f"error: {type(exc).__name__}: {exc}"
        return [{**base, "impl": name, "kind": _kind(name), "status": status} for name in impls]
    ref_name = _check_reference(impls) if options.check and case.op in ("encode", "decode") else None
    order = sorted(impls, key=lambda n: n != ref_name)  # the check's reference runs first
    ref_key = None
    results = {}
    for name in order:
        row = {**base, "impl": name, "kind": _kind(name), "floor_ms": floor_ms, "floor": floor_kind,
               "copies": inputs.copies}
        runner = None
        try:
            impl = baselines.make_impl(name)
            runner = build(case, impl, inputs, device)
            first = []
            t = measure(runner.prepare, runner.run, device, warmup=options.warmup, min_repeats=options.min_repeats,
                        max_repeats=options.max_repeats, min_time_s=options.min_time_s, first_output=first)
            row.update(status="ok", median_ms=t.median_ms, min_ms=t.min_ms, q1_ms=t.q1_ms, q3_ms=t.q3_ms,
                       repeats=t.repeats, x_floor=t.median_ms / floor_ms if floor_ms > 0 else None)
            if runner.key is not None and ref_name is not None:
                key = runner.key(first[0])
                if name == ref_name:
                    ref_key = key
                elif ref_key is not None:
                    scale = ref_key.abs().max().clamp_min(1e-12)
                    row.update(check_vs=ref_name, max_rel_diff=float((key - ref_key).abs().max() / scale))
            del first
            if options.memory:
                peak, extra = measure_memory(runner.prepare, runner.run, device)
                row.update(peak_mb=peak, extra_mb=extra)
        except Exception as exc:
            row["status"] = "oom" if _is_oom(exc) else f"error: {type(exc).__name__}: {exc}"[:300]
        finally:
            del runner
            _free(device)
        results[name] = row
        say("    " + _short(row))
    del ref_key, inputs
    _free(device)
    rows = [results[name] for name in impls]
    for row in rows:
        for ref in ("eager", "sparsify"):
            other = results.get(ref)
            if row.get("status") == "ok" and other and other.get("status") == "ok":
                row[f"speedup_vs_{ref}"] = other["median_ms"] / row["median_ms"]
    return rows


def _kind(name: str) -> str:
    return "baseline" if name in baselines.BASELINES else "backend"


def _short(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row['impl']:<10} {row.get('status')}"
    mem = f"  peak {row['peak_mb']:.0f} MiB" if row.get("peak_mb") is not None else ""
    return (f"{row['impl']:<10} {row['median_ms']:10.3f} ms  x{row['x_floor']:.2f} floor"
            f"  ({row['repeats']} runs){mem}")


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

CSV_FIELDS = ("case", "op", "variant", "coder", "model", "N", "d", "M", "k", "dtype", "impl", "kind", "status",
              "median_ms", "min_ms", "q1_ms", "q3_ms", "repeats", "floor_ms", "floor", "x_floor",
              "speedup_vs_eager", "speedup_vs_sparsify", "peak_mb", "extra_mb", "check_vs", "max_rel_diff",
              "copies", "device", "torch", "triton", "commit")


def format_table(results: Results) -> str:
    """A markdown table: one row per (case, impl)."""
    head = ("| case | impl | median ms | IQR ms | floor ms | x floor | vs eager | vs sparsify | peak MiB | status |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in results.rows:
        ok = r.get("status") == "ok"
        lines.append("| " + " | ".join([
            r["case"], r["impl"], f(r.get("median_ms"), ".3f"),
            f"{r['q1_ms']:.3f}-{r['q3_ms']:.3f}" if ok else "",
            f(r.get("floor_ms"), ".3f"), f(r.get("x_floor"), ".2f"),
            f(r.get("speedup_vs_eager"), ".2f"), f(r.get("speedup_vs_sparsify"), ".2f"),
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
    raw = f"{tag}-{preset or 'custom'}-{stamp}".lower()
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in raw)
