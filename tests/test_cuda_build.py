"""The CUDA extension as built, checked without a GPU (well under 10 s).

* When the package was built with CUDA (``binsparse_kernels/_C_cuda*.so`` next to the package):
  the library carries sm_80 and sm_90a machine code (``cuobjdump --list-elf`` when the toolkit has
  it, otherwise the fatbin headers of the ``.nv_fatbin`` section are read), it imports on this
  machine (no GPU needed to load it) and registers the four ``binsparse::cuda_*`` ops, and their
  fake implementations give the shapes and dtypes the kernels produce, on fake CUDA tensors.
* Always: without the extension, ``backends.cuda`` raises an ImportError that says how to build it,
  and without a GPU the registry reports the backend unavailable instead of failing.

Without the library (or the toolkit) the build checks skip, except in CI (``CI`` set): ``.ci/run``
builds the extension with ``BINSPARSE_BUILD_CUDA=1``, so there a missing library is a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

import binsparse_kernels

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

FATBIN_MAGIC = 0xBA55ED50
FATBIN_ELF = 2  # entry kind: cubin (1 is PTX)
ARCH_SPECIFIC = 0x100000  # entry flag of the "a" targets (sm_90a): nvcc 12.x/13.0 fatbin layout


def section(path: str, wanted: str) -> bytes:
    """The bytes of one section of a 64-bit little-endian ELF file."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, f"{path} is not a 64-bit ELF file"
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    for name, _type, _flags, _addr, offset, size in headers:
        if data[names + name:data.index(b"\0", names + name)].decode() == wanted:
            return data[offset:offset + size]
    return b""


def fatbin_targets(path: str) -> set[str]:
    """``sm_XX`` / ``sm_XXa`` of every cubin in the library's fatbins (one fatbin per .cu file)."""
    fb, targets, pos = section(path, ".nv_fatbin"), set(), 0
    while pos + 16 <= len(fb):
        magic, _version, header, size = struct.unpack_from("<IHHQ", fb, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fatbins are 8-byte aligned
            continue
        entry, end = pos + header, pos + header + size
        while entry < end:
            kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", fb, entry)
            sm, flags = struct.unpack_from("<I", fb, entry + 28)[0], struct.unpack_from("<I", fb, entry + 40)[0]
            if kind == FATBIN_ELF:
                targets.add(f"sm_{sm}" + ("a" if flags & ARCH_SPECIFIC else ""))
            entry += entry_header + payload
        pos = end
    return targets


def test_library_has_sm80_and_sm90a_code(built, toolkit):
    cuobjdump = shutil.which("cuobjdump") or os.path.join(cuda_home(), "bin", "cuobjdump")
    for so in SO:
        if os.path.exists(cuobjdump):  # lines like "ELF file 2: _C_cuda.2.sm_90a.cubin"
            listing = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, timeout=60).stdout
            assert ".sm_80." in listing and ".sm_90a." in listing, listing
        else:
            targets = fatbin_targets(so)
            assert {"sm_80", "sm_90a"} <= targets, f"{os.path.basename(so)} carries {sorted(targets)}"


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
