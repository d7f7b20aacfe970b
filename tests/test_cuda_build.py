"""The CUDA extension as built, checked without a GPU (well under 10 s).

* When the package was built with CUDA (``binsparse_kernels/_C_cuda*.so`` next to the package):
  the library carries sm_80 and sm_90a machine code (``cuobjdump --list-elf`` when the toolkit has
  it, otherwise the fatbin headers of the ``.nv_fatbin`` section are read), it imports on this
  machine (no GPU needed to load it) and registers the four ``binsparse::cuda_*`` ops, and their
  fake implementations give the shapes and dtypes the kernels produce, on fake CUDA tensors.
* The machine code of the built library (cubins extracted with cuobjdump from the nvidia-cuda-cuobjdump
  wheel, read with benchmarks/sass.py): the Hopper encode kernel runs on wgmma (``HGMMA``) fed by TMA
  (``UTMALDG``) with warpgroup register reallocation (``USETMAXREG``); the sm_80 encode kernel loads
  its bf16 and fp16 fragments with ``ldmatrix`` (``LDSM``) and no generic ``LD``; no kernel of either
  target uses local memory (no spills, no stack); sm_80 PTX is embedded, so newer GPUs can JIT it.
* Always: without the extension, ``backends.cuda`` raises an ImportError that says how to build it,
  and without a GPU the registry reports the backend unavailable instead of failing.

Without the library (or the toolkit) the build checks skip, except in CI (``CI`` set): ``.ci/run``
builds the extension with ``BINSPARSE_BUILD_CUDA=1``, so there a missing library is a failure.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

import binsparse_kernels
from binsparse_kernels import doctor

PKG = os.path.dirname(os.path.abspath(binsparse_kernels.__file__))
ROOT = os.path.dirname(PKG)
SO = sorted(glob.glob(os.path.join(PKG, "_C_cuda*.so")))


def cuda_home():
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def _skip_unless(ok: bool, reason: str):
    """Skip if not ``ok``; in CI, which must build the CUDA extension, fail instead."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, but CI builds it (.ci/run sets BINSPARSE_BUILD_CUDA=1)")
    pytest.skip(reason)


@pytest.fixture
def built():
    _skip_unless(bool(SO), "the package was not built with CUDA (no binsparse_kernels/_C_cuda*.so)")


@pytest.fixture
def toolkit():
    _skip_unless(cuda_home() is not None, "no CUDA toolkit")


def run_python(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------------------------
# Which GPU code the library carries
# ---------------------------------------------------------------------------------------------

def test_library_has_sm80_and_sm90a_code(built, toolkit):
    tool = shutil.which("cuobjdump") or os.path.join(cuda_home(), "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else cuobjdump()
    for so in SO:
        # binsparse doctor's own reading of the .nv_fatbin headers (what it reports without a CUDA tool)
        parsed = set(doctor.fatbin_code(so).sass)
        assert {"sm_80", "sm_90a"} <= parsed, f"{os.path.basename(so)} carries {sorted(parsed)}"
        if tool is not None:  # lines like "ELF file 2: _C_cuda.2.sm_90a.cubin": the independent reading
            listing = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, timeout=60).stdout
            assert set(re.findall(r"\.(sm_\d+a?)\.cubin", listing)) == parsed, listing


def test_extension_imports_and_registers_the_ops(built):
    code = (
        "import torch, binsparse_kernels._C_cuda as m\n"
        "names = ['cuda_encode_forward', 'cuda_encode_backward', 'cuda_decode_forward', 'cuda_decode_backward']\n"
        "print([str(getattr(torch.ops.binsparse, n).default._schema).split('(')[0] for n in names])\n"
    )
    proc = run_python(code)
    if proc.returncode != 0:  # allowed only with a message that says what is missing
        assert "Error" in proc.stderr and ("CUDA" in proc.stderr or "cuda" in proc.stderr), proc.stderr
        pytest.fail(f"the CUDA extension does not import here:\n{proc.stderr[-2000:]}")
    assert "binsparse::cuda_encode_forward" in proc.stdout and "binsparse::cuda_decode_backward" in proc.stdout


def test_fake_implementations_on_fake_cuda_tensors(built):
    # Fake CUDA tensors need no GPU: this checks the ops' schemas against their fake kernels.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from binsparse_kernels.backends import cuda as cuda_backend

    ops = torch.ops.binsparse
    with FakeTensorMode():
        c = dict(device="cuda")
        x, W, b = torch.empty(5, 8, dtype=torch.bfloat16, **c), torch.empty(20, 8, **c), torch.empty(20, **c)
        v, i = ops.cuda_encode_forward(x, W, b, b, 3, True)
        assert (v.shape, v.dtype, i.shape, i.dtype) == ((5, 3), torch.float32, (5, 3), torch.int64)
        g = torch.empty(5, 3, **c)
        gx, gW, gb = ops.cuda_encode_backward(g, g, v, x, W, i, 1, 2.0, True, False, True)
        assert gx.shape == (5, 8) and gW.shape == (0,) and gb.shape == (20,)
        assert gx.dtype == gW.dtype == gb.dtype == torch.float32
        y = ops.cuda_decode_forward(i, x[:, :3], torch.empty(20, 6, **c), None, True)
        assert y.shape == (5, 6) and y.dtype == torch.bfloat16
        ga, gWd = ops.cuda_decode_backward(torch.empty(5, 6, **c), i, g, torch.empty(20, 6, **c), False, True, True)
        assert ga.shape == (5, 3) and gWd.shape == (20, 6)
        ga, gWd = cuda_backend.decode_backward(torch.empty(5, 6, **c), i, g, torch.empty(20, 6, **c), False, False,
                                               True)
        assert ga is None and gWd.shape == (20, 6)


# ---------------------------------------------------------------------------------------------
# The machine code
# ---------------------------------------------------------------------------------------------


def cuobjdump() -> str | None:
    try:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        import sass

        return sass._tool("cuobjdump")
    except (ImportError, FileNotFoundError):
        return None
    finally:
        sys.path.pop(0)


@pytest.fixture(scope="module")
def machine_code_tools():
    """The built library and cuobjdump (requirements.txt installs the nvidia-cuda-cuobjdump wheel)."""
    _skip_unless(bool(SO), "the package was not built with CUDA (no binsparse_kernels/_C_cuda*.so)")
    _skip_unless(cuobjdump() is not None, "no cuobjdump (pip install nvidia-cuda-cuobjdump)")


@pytest.fixture(scope="module")
def kernels(machine_code_tools):
    """{arch: {kernel name: (instructions, resources)}} of every cubin in the built library."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import sass

    sys.path.pop(0)
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([cuobjdump(), "-xelf", "all", SO[0]], cwd=tmp, check=True, capture_output=True, timeout=120)
        for name in sorted(os.listdir(tmp)):
            arch = name.split(".")[-2]  # <library>.<n>.sm_90a.cubin
            cubin = open(os.path.join(tmp, name), "rb").read()
            res = sass.resources(cubin)
            for kernel, instrs in sass.parse(sass.disassemble(cubin)).items():
                found.setdefault(arch, {})[kernel] = (instrs, res.get(kernel))
    return found


def opcodes(instrs, base: str) -> list[str]:
    return [i.opcode for i in instrs if i.base == base]


def test_sm90_encode_kernel_runs_on_wgmma_fed_by_tma(kernels):
    sm90 = {name: v for name, v in kernels["sm_90a"].items() if "encode_sm90_kernel" in name}
    assert len(sm90) == 2, f"expected the bf16 and fp16 Hopper encode kernels, found {sorted(sm90)}"
    for name, (instrs, _) in sm90.items():
        wgmma = [i.opcode + i.operands for i in instrs if i.base == "HGMMA"]  # the parser stops at "x"
        assert wgmma and all(op.startswith("HGMMA.64x256x16.F32") for op in wgmma), (name[:80], wgmma[:2])
        assert opcodes(instrs, "UTMALDG"), f"{name[:80]}: no TMA loads"
        assert opcodes(instrs, "USETMAXREG"), f"{name[:80]}: no warpgroup register reallocation"
        assert not opcodes(instrs, "HMMA"), f"{name[:80]}: mma.sync on the Hopper path"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_sm80_encode_main_loop_loads_fragments_with_ldmatrix(kernels, arch):
    for dtype, mma in [("nv_bfloat16", "HMMA.16816.F32.BF16"), ("half", "HMMA.16816.F32")]:
        [instrs] = [v[0] for name, v in kernels[arch].items() if "encode_topk_kernel" in name and dtype in name]
        assert opcodes(instrs, "HMMA").count(mma) >= 16, (dtype, opcodes(instrs, "HMMA")[:4])
        assert len(opcodes(instrs, "LDSM")) >= 8, f"{dtype}: fragments not loaded with ldmatrix"
        assert not opcodes(instrs, "LD"), f"{dtype}: generic loads {opcodes(instrs, 'LD')[:4]}"


def test_no_kernel_uses_local_memory(kernels):
    for arch, found in kernels.items():
        assert found, arch
        for name, (instrs, res) in found.items():
            assert res is not None and res["local"] == 0 and res["stack"] == 0, (arch, name[:80], res)
            assert not opcodes(instrs, "LDL") and not opcodes(instrs, "STL"), (arch, name[:80])


def test_library_embeds_ptx_for_newer_gpus(machine_code_tools):
    listing = subprocess.run([cuobjdump(), "--list-ptx", SO[0]], capture_output=True, text=True, timeout=60).stdout
    assert ".sm_80.ptx" in listing, listing


# ---------------------------------------------------------------------------------------------
# Build configuration (binsparse_kernels/_cuda_build.py, used by setup.py and the JIT path)
# ---------------------------------------------------------------------------------------------


def test_default_targets_are_sm80_with_ptx_and_sm90a(monkeypatch):
    from binsparse_kernels import _cuda_build

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    before = dict(os.environ)
    flags = _cuda_build.nvcc_flags()
    assert dict(os.environ) == before, "building must not change the environment"
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_80,code=compute_80" in flags
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags and "-DBINSPARSE_SM90A" in flags
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6;9.0+PTX")  # no 9.0a: no Hopper kernel
    flags = _cuda_build.nvcc_flags()
    assert "-DBINSPARSE_SM90A" not in flags and "-gencode=arch=compute_90,code=compute_90" in flags
    with pytest.raises(ValueError, match="sm_90"):
        _cuda_build.gencode_flags("sm_90")


def test_cutlass_headers_come_from_the_nvidia_cutlass_wheel():
    from binsparse_kernels import _cuda_build

    include = _cuda_build.cutlass_include()
    assert os.path.isfile(os.path.join(include, "cute", "tensor.hpp"))
    assert os.path.isfile(os.path.join(include, "cutlass", "arch", "barrier.h"))


# ---------------------------------------------------------------------------------------------
# Without the extension or without a GPU
# ---------------------------------------------------------------------------------------------


def test_missing_extension_raises_a_clear_import_error():
    code = (
        "import sys\n"
        "sys.modules['binsparse_kernels._C_cuda'] = None  # as if it was never built\n"
        "try:\n"
        "    import binsparse_kernels.backends.cuda\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    proc = run_python(code, env={"BINSPARSE_CUDA_JIT": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "ImportError:" in proc.stdout and "binsparse_kernels._C_cuda" in proc.stdout, proc.stdout
    assert "BINSPARSE_CUDA_JIT=1" in proc.stdout and "CUDA_HOME" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_registry_reports_cuda_unavailable_without_a_gpu():
    from binsparse_kernels import backends

    assert "cuda" not in binsparse_kernels.available_backends()
    assert "GPU" in backends.unavailable_reason("cuda")
    x, W, b = torch.randn(3, 4), torch.randn(6, 4), torch.zeros(6)
    with pytest.raises(RuntimeError, match="GPU"):
        binsparse_kernels.topk_encode(x, W, b, 2, backend="cuda")
