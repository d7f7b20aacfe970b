"""``binsparse doctor``: what a bug report needs, and a self-check of every backend on this machine.

Prints the versions (Python, torch, triton, the CUDA toolkit torch was built with, nvcc, the
driver), the GPUs and their compute capability, which backends load and why the others don't,
which GPU code the CUDA extension carries (machine code and PTX, and whether this GPU can run it),
then checks every available backend's ops (the encoders, the decode and the coder's one backward) against the float64 reference (``self_check.py``):
one line per backend, device and op, with the worst error. Exit status 1 if any check fails.

    binsparse doctor                       # everything (seconds on a GPU; the Triton JIT dominates)
    binsparse doctor --quick               # the first-use problem only
    binsparse doctor --backends cuda,triton --quick   # e.g. under compute-sanitizer
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from . import backends, self_check

ENV_VARS = ("TRITON_INTERPRET", "BINSPARSE_SELF_CHECK", "BINSPARSE_CUDA_JIT", "BINSPARSE_CHECK_VALUES",
            "TORCH_CUDA_ARCH_LIST", "CUDA_VISIBLE_DEVICES", "CUDA_HOME")


# ----------------------------------------------------------------------------------------------
# Versions and devices
# ----------------------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float = 20) -> Optional[str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:  # a broken install says why
        return f"not importable ({type(exc).__name__}: {exc})"
    return triton.__version__


def _driver() -> str:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if out:
        return out.strip().splitlines()[0]
    if torch.cuda.is_available():  # no nvidia-smi: the CUDA version the driver supports
        version = torch._C._cuda_getDriverVersion()
        return f"supports CUDA {version // 1000}.{version % 1000 // 10} (nvidia-smi not found)"
    return "none found (no nvidia-smi, no GPU visible to torch)"


def _nvcc() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    out = _run([nvcc, "--version"]) if nvcc and os.path.exists(nvcc) else None
    if not out:
        return "not found (the CUDA extension cannot be built here)"
    release = re.search(r"release ([\d.]+)", out)
    return f"{release.group(1) if release else '?'} ({nvcc})"


def environment_lines() -> list[str]:
    cuda = torch.version.cuda or "none (CPU build)"
    lines = [
        f"binsparse-kernels {_package_version('binsparse-kernels')} at {os.path.dirname(os.path.abspath(__file__))}",
        f"python {platform.python_version()} on {platform.platform()}, {os.cpu_count()} CPUs",
        f"torch {torch.__version__} (CUDA {cuda}; built for {' '.join(torch.cuda.get_arch_list()) or 'no GPU'})",
        f"triton {_triton_version()}",
        f"nvcc {_nvcc()}",
        f"driver {_driver()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, sm_{p.major}{p.minor} (compute capability {p.major}.{p.minor}), "
                         f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("GPU: none visible to torch")
    set_vars = [f"{v}={os.environ[v]}" for v in ENV_VARS if v in os.environ]
    lines.append("environment: " + (" ".join(set_vars) if set_vars else "none of " + ", ".join(ENV_VARS)))
    return lines


def backend_lines() -> list[str]:
    lines = []
    for name in backends.NAMES:
        reason = backends.unavailable_reason(name)
        devices = "/".join(backends._BACKENDS[name].devices())
        lines.append(f"  {name:<9} " + (f"available, runs on {devices} tensors" if reason is None
                                        else f"UNAVAILABLE: {reason}"))
    picks = []
    for device_type in ("cpu", "cuda"):
        if device_type == "cuda" and not torch.cuda.is_available():
            continue
        picks.append(f"{device_type} -> {backends.resolve_name(None, torch.device(device_type))}")
    lines.append("  backend=None picks: " + ", ".join(picks) + " (before the first-use self-check)")
    return lines


# ----------------------------------------------------------------------------------------------
# Which GPU code the CUDA extension carries
# ----------------------------------------------------------------------------------------------


@dataclass
class GpuCode:
    sass: list[str]  # e.g. ["sm_80", "sm_90a"]
    ptx: list[str]
    source: str  # how they were read


FATBIN_MAGIC = 0xBA55ED50
FATBIN_PTX, FATBIN_ELF = 1, 2  # fatbin entry kinds
ARCH_SPECIFIC = 0x100000  # entry flag of the "a" targets (sm_90a), nvcc 12.x/13.x layout


def _elf_section(data: bytes, wanted: str) -> bytes:
    """The bytes of one section of a 64-bit little-endian ELF image."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    for name, _type, _flags, _addr, offset, size in headers:
        if data[names + name:data.index(b"\0", names + name)].decode() == wanted:
            return data[offset:offset + size]
    return b""


def fatbin_code(path: str, why: str = "no cuobjdump found") -> GpuCode:
    """The targets in the headers of the ``.nv_fatbin`` section (no CUDA tool needed)."""
    with open(path, "rb") as f:
        fatbins = _elf_section(f.read(), ".nv_fatbin")
    sass, ptx, pos = set(), set(), 0
    while pos + 16 <= len(fatbins):
        magic, _version, header, size = struct.unpack_from("<IHHQ", fatbins, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fatbins are 8-byte aligned
            continue
        entry, end = pos + header, pos + header + size
        while entry < end:
            kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", fatbins, entry)
            sm = struct.unpack_from("<I", fatbins, entry + 28)[0]
            flags = struct.unpack_from("<I", fatbins, entry + 40)[0]
            target = f"sm_{sm}" + ("a" if flags & ARCH_SPECIFIC else "")
            (sass if kind == FATBIN_ELF else ptx if kind == FATBIN_PTX else set()).add(target)
            entry += entry_header + payload
        pos = end
    return GpuCode(sorted(sass), sorted(ptx), f"read from the .nv_fatbin headers: {why}")


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from the nvidia-cuda-cuobjdump wheel, else the PATH / CUDA_HOME, else Triton's copy."""
    import importlib.util

    candidates = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(glob.glob(os.path.join(root, "*", "bin", "cuobjdump")))
    candidates.append(shutil.which("cuobjdump"))
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        candidates.append(os.path.join(CUDA_HOME, "bin", "cuobjdump"))
    triton_spec = importlib.util.find_spec("triton")
    if triton_spec and triton_spec.origin:
        candidates.append(os.path.join(os.path.dirname(triton_spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def cuobjdump_code(path: str, cuobjdump: str) -> Optional[GpuCode]:
    """``cuobjdump --list-elf --list-ptx``; None if it cannot read the library."""
    try:
        proc = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", path], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.findall(r"\.(sm_\d+[a-z]?)\.(cubin|ptx)\b", proc.stdout)
    if not found:  # an error, or a layout this cuobjdump does not know
        return None
    version = re.search(r"release ([\d.]+)", _run([cuobjdump, "--version"]) or "")
    return GpuCode(sorted({t for t, kind in found if kind == "cubin"}), sorted({t for t, kind in found if kind == "ptx"}),
                   f"listed by {cuobjdump} (release {version.group(1) if version else '?'})")


def extension_code(path: str) -> GpuCode:
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        return fatbin_code(path)
    return cuobjdump_code(path, cuobjdump) or fatbin_code(path, f"{cuobjdump} could not list it")


def _arch(target: str) -> tuple[int, int, str]:
    m = re.fullmatch(r"sm_(\d+)(\d)([a-z]?)", target)
    return int(m.group(1)), int(m.group(2)), m.group(3)


def runnable_on(code: GpuCode, capability: tuple[int, int]) -> tuple[list[str], list[str]]:
    """(the machine code, the PTX) in ``code`` that a GPU of ``capability`` can run.

    Machine code runs on its own major version at an equal or later minor one; "a" targets only on
    exactly their GPU. PTX is compiled by the driver for any later GPU ("a" PTX only for its own).
    """
    def fits(target: str, same_major: bool) -> bool:
        major, minor, suffix = _arch(target)
        if suffix == "a":
            return (major, minor) == capability
        if same_major:
            return major == capability[0] and minor <= capability[1]
        return (major, minor) <= capability

    return [t for t in code.sass if fits(t, True)], [t for t in code.ptx if fits(t, False)]


def extension_lines() -> list[str]:
    pkg = os.path.dirname(os.path.abspath(__file__))
    libraries = sorted(glob.glob(os.path.join(pkg, "_C_cuda*.so")))
    if not libraries:
        return ["  not built (no binsparse_kernels/_C_cuda*.so): the cuda backend needs it"]
    lines = []
    for path in libraries:
        code = extension_code(path)
        lines.append(f"  {os.path.basename(path)}: machine code {' '.join(code.sass) or 'none'}; "
                     f"PTX {' '.join(code.ptx) or 'none'} ({code.source})")
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            cap = torch.cuda.get_device_capability(i)
            sass, ptx = runnable_on(code, cap)
            target = f"sm_{cap[0]}{cap[1]}"
            if sass:
                lines.append(f"  GPU {i} ({target}) runs its machine code {' '.join(sass)}")
            elif ptx:
                lines.append(f"  GPU {i} ({target}) has no machine code of its own: the driver compiles PTX "
                             f"{' '.join(ptx)} at first use")
            else:
                lines.append(f"  GPU {i} ({target}): NO code it can run; the cuda backend fails here. Rebuild with "
                             f"TORCH_CUDA_ARCH_LIST=\"{cap[0]}.{cap[1]}\" (setup.py)")
    return lines


# ----------------------------------------------------------------------------------------------
# Self-check
# ----------------------------------------------------------------------------------------------


def check_targets(names: Optional[list[str]]) -> list[tuple[str, torch.device]]:
    """(backend, device) pairs to check: every available backend on every device type it runs on here."""
    pairs = []
    for name in names or backends.NAMES:
        if backends.unavailable_reason(name) is not None:
            continue
        for device_type in backends._BACKENDS[name].devices():
            if device_type == "cpu" or (device_type == "cuda" and torch.cuda.is_available()):
                pairs.append((name, torch.device(device_type)))
    return pairs


def run_checks(pairs, problems) -> list[self_check.OpResult]:
    results = []
    for name, device in pairs:
        for result in self_check.check_backend(name, device, self_check.dtypes_for(name, device), problems):
            print("  " + result.line(), flush=True)
            for failure in result.failures[:3]:
                print(f"      {failure}")
            results.append(result)
    return results


def first_use_timing_lines(pairs) -> list[str]:
    """How long the first-use check takes per GPU backend and dtype once the kernels are compiled."""
    lines = []
    for name, device in pairs:
        if name not in self_check.FIRST_USE_BACKENDS or device.type not in self_check.FIRST_USE_DEVICE_TYPES:
            continue
        for dtype in self_check.dtypes_for(name, device):
            t0 = time.perf_counter()
            failure = self_check._run_quick_check(name, device, dtype)
            ms = (time.perf_counter() - t0) * 1e3
            lines.append(f"  {name:<9} {device} {str(dtype).replace('torch.', ''):<9} {ms:7.1f} ms"
                         + ("" if failure is None else f"  FAILED: {failure}"))
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="check on the first-use problem only (fast)")
    parser.add_argument("--backends", type=lambda s: [n for n in s.split(",") if n], default=None,
                        help=f"check these backends only (comma-separated, of {','.join(backends.NAMES)})")
    parser.add_argument("--no-check", action="store_true", help="print the environment only")


def run(args: argparse.Namespace) -> int:
    unknown = [n for n in args.backends or [] if n not in backends.NAMES]
    if unknown:
        print(f"binsparse doctor: unknown backend(s) {unknown}; choose from {list(backends.NAMES)}", file=sys.stderr)
        return 2
    print("== environment")
    print("\n".join(environment_lines()))
    print("== backends")
    print("\n".join(backend_lines()))
    print("== CUDA extension (binsparse_kernels._C_cuda)")
    print("\n".join(extension_lines()))
    if args.no_check:
        return 0
    problems = self_check.QUICK if args.quick else self_check.FULL
    pairs = check_targets(args.backends)
    print(f"== self-check against the float64 reference on the CPU ({'quick' if args.quick else 'full'}: "
          f"{len(problems)} problem(s) per dtype; tolerance per output dtype, relative to 1 + |reference|)")
    t0 = time.perf_counter()
    results = run_checks(pairs, problems)
    failed = [r for r in results if not r.passed]
    timing = first_use_timing_lines(pairs)
    if timing:
        print("== first-use quick check, kernels already compiled (budget about 100 ms)")
        print("\n".join(timing))
    verdict = "FAILED" if failed else "passed"
    print(f"== {len(results) - len(failed)} of {len(results)} checks passed; self-check {verdict} "
          f"in {time.perf_counter() - t0:.1f} s")
    if not results:
        print("nothing was checked (no available backend selected)")
        return 1
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="binsparse doctor", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
