"""How csrc/cuda is compiled: GPU targets, CUTLASS headers and nvcc flags.

One place for ``setup.py`` (which loads this file by path, before the package is importable) and for
the JIT build in ``backends/cuda.py``. Imports nothing from the package and nothing heavy.

* Targets: ``TORCH_CUDA_ARCH_LIST`` when set, else ``DEFAULT_ARCH_LIST``: sm_80 machine code plus its
  PTX (every GPU newer than Ampere can JIT that, so no GPU is left with "no kernel image") and
  sm_90a (Hopper's wgmma/TMA encode kernel). The flags are passed explicitly as ``-gencode``, so
  torch adds none of its own and the environment is never changed.
* CUTLASS/CuTe (the Hopper kernel's wgmma, TMA and mbarrier primitives) are header-only; they come
  from the ``nvidia-cutlass`` wheel on PyPI, which ships them under
  ``cutlass_library/source/include`` (a build requirement: requirements.txt, pyproject.toml).
"""

from __future__ import annotations

import importlib.util
import os
import re

DEFAULT_ARCH_LIST = "8.0+PTX;9.0a"
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST


def gencode_flags(archs: str) -> list[str]:
    """``-gencode`` flags for a list like ``8.0+PTX;9.0a`` (``;`` or spaces between entries)."""
    flags = []
    for entry in re.split(r"[;\s]+", archs.strip()):
        if not entry:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if match is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not like 8.0, 9.0a or 8.0+PTX")
        sm = f"{match[1]}{match[2]}{match[3]}"
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        if match[4]:
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
    if not flags:
        raise ValueError("TORCH_CUDA_ARCH_LIST names no GPU target")
    return flags


def has_sm90a(archs: str) -> bool:
    return any(entry.startswith("9.0a") for entry in re.split(r"[;\s]+", archs.strip()))


def cutlass_include() -> str:
    """The include directory of the nvidia-cutlass wheel (found without importing it)."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the CUDA extension needs the CUTLASS headers of the nvidia-cutlass package: pip install nvidia-cutlass"
        )
    include = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    if not os.path.isfile(os.path.join(include, "cute", "tensor.hpp")):
        raise RuntimeError(f"nvidia-cutlass is installed but has no CuTe headers under {include}")
    return include


def nvcc_flags(archs: str | None = None) -> list[str]:
    """Everything nvcc needs for csrc/cuda besides include directories."""
    archs = archs or arch_list()
    defines = ["-DBINSPARSE_SM90A"] if has_sm90a(archs) else []
    return NVCC_FLAGS + defines + gencode_flags(archs)
