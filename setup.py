"""Builds binsparse_kernels with its compiled extensions.

* ``binsparse_kernels._C``: the CPU kernels (csrc/cpu), always built.
* ``binsparse_kernels._C_cuda``: the CUDA kernels (csrc/cuda), built when a CUDA toolkit and a CUDA
  build of torch are present. ``BINSPARSE_BUILD_CUDA=1`` forces it (and fails loudly if it cannot),
  ``BINSPARSE_BUILD_CUDA=0`` skips it. ``TORCH_CUDA_ARCH_LIST`` picks the GPU targets (default
  ``8.0+PTX;9.0a``: Ampere machine code and PTX, which newer GPUs compile at load time, and Hopper's
  wgmma/TMA encode kernel). Flags and targets: ``binsparse_kernels/_cuda_build.py``.
* The CUTLASS/CuTe headers of the Hopper kernel come from the ``nvidia-cutlass`` wheel on PyPI
  (``cutlass_library/source/include``, found with importlib at build time; it is listed in
  requirements.txt and in pyproject.toml's build requirements).

torch must be installed first; install with ``pip install --no-build-isolation .`` so the
extension is built against the torch you run.
"""

import glob
import importlib.util
import os

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def load_cuda_build():
    """binsparse_kernels/_cuda_build.py, loaded by path: the package itself is not importable yet."""
    spec = importlib.util.spec_from_file_location("_cuda_build", os.path.join(HERE, "binsparse_kernels", "_cuda_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def build_cuda() -> bool:
    flag = os.environ.get("BINSPARSE_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    missing = []
    if torch.version.cuda is None:
        missing.append("torch is not a CUDA build")
    if CUDA_HOME is None:
        missing.append("no CUDA toolkit found (set CUDA_HOME)")
    if not rel("csrc/cuda/*.cu"):
        missing.append("no CUDA sources in csrc/cuda")
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 8):
        # the k > 128 fallback uses at::mm_out with an fp32 out_dtype from 16-bit inputs (torch 2.8+)
        missing.append(f"torch {torch.__version__} is older than 2.8")
    if missing and flag in ("1", "true", "yes", "on"):
        raise RuntimeError("BINSPARSE_BUILD_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(missing))
    if missing:
        print("binsparse_kernels: not building the CUDA extension: " + "; ".join(missing))
    return not missing


cxx_flags = ["-O3", "-fopenmp"]  # torch adds the C++ standard its headers need
ext_modules = [
    CppExtension(
        "binsparse_kernels._C",
        rel("csrc/cpu/*.cpp"),
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
]
if build_cuda():
    cuda_build = load_cuda_build()
    ext_modules.append(
        CUDAExtension(
            "binsparse_kernels._C_cuda",
            rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu"),
            include_dirs=[cuda_build.cutlass_include()],
            extra_compile_args={"cxx": ["-O3"], "nvcc": cuda_build.nvcc_flags()},
        )
    )

setup(
    name="binsparse-kernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for binary and TopK sparse autoencoders and transcoders",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["binsparse_kernels", "binsparse_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "transformers>=4.45",
        "datasets",
        "safetensors",
        "schedulefree",
        "tqdm",
        "matplotlib",
        "gguf",
        "accelerate",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "expecttest"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["binsparse = binsparse_kernels.cli:main"]},
)
