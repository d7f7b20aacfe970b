"""``binsparse doctor``: the report, the per-op self-check lines and exit status, and reading which GPU
code a library carries (checked against cuobjdump on libraries built here when nvcc is present)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest
import torch

import binsparse_kernels as bk
from binsparse_kernels import cli, doctor, self_check
from binsparse_kernels.doctor import GpuCode

needs_cpu_backend = pytest.mark.skipif("cpu" not in bk.available_backends(), reason="CPU extension not built")


def check_lines(out: str) -> list[str]:
    """The self-check's result lines: "<backend> <op> <device> <dtypes> PASS|FAIL ..."."""
    return [line.strip() for line in out.splitlines() if len(line.split()) > 4 and line.split()[1] in self_check.OPS]


@needs_cpu_backend
def test_report_and_a_passing_self_check(capsys):
    assert cli.main(["doctor", "--backends", "reference,cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    for heading in ("== environment", "== backends", "== CUDA extension", "== self-check"):
        assert heading in out
    assert f"torch {torch.__version__}" in out and "triton " in out and "driver " in out and "python " in out
    assert "  cuda      " in out  # every backend is listed, available or with the reason it is not
    if not torch.cuda.is_available():
        assert "UNAVAILABLE: backend 'cuda' needs a CUDA GPU" in out
    lines = check_lines(out)
    pairs = doctor.check_targets(["reference", "cpu"])  # on a GPU machine the reference runs on both devices
    assert len(lines) == len(self_check.OPS) * len(pairs) >= 8, out  # one per backend, device and op
    for backend, device in pairs:
        for op in self_check.OPS:
            line = next(ln for ln in lines if ln.split()[:3] == [backend, op, device.type])
            assert " PASS " in line and "float32,float16,bfloat16" in line and "worst error" in line
            assert f"{len(self_check.QUICK) * 3} cases" in line
    assert f"{len(lines)} of {len(lines)} checks passed" in out


@needs_cpu_backend
def test_the_full_problems_pass_on_a_correct_backend():
    """The doctor's problems (k = 1, k above the fused limit, odd sizes, 16-bit weights) are valid ones."""
    results = self_check.check_backend("cpu", torch.device("cpu"), (torch.float32, torch.bfloat16), self_check.FULL)
    assert [r.op for r in results] == list(self_check.OPS)
    for r in results:
        assert r.passed and r.cases == 2 * len(self_check.FULL), r.line()


@needs_cpu_backend
def test_a_failing_op_fails_the_doctor(capsys, monkeypatch):
    from binsparse_kernels.backends import cpu

    real = cpu.decode_backward

    def grad_acts_off_by_a_bit(*args):
        ga, gW = real(*args)
        return (None if ga is None else ga * 1.01), gW

    monkeypatch.setattr(cpu, "decode_backward", grad_acts_off_by_a_bit)
    assert cli.main(["doctor", "--backends", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out
    lines = check_lines(out)
    decode = next(ln for ln in lines if " decode " in ln)
    assert " FAIL " in decode and "grad_acts" in decode
    assert all(" PASS " in ln for ln in lines if ln is not decode) and len(lines) == len(self_check.OPS)
    assert "grad_acts (continuous): error" in out and "self-check FAILED" in out


def test_a_failing_coder_backward_fails_the_doctor(capsys, monkeypatch):
    # the one backward SparseCoder runs is checked on its own: the separate backwards can be right
    from binsparse_kernels.backends import cpu

    real = cpu.coder_backward

    def grad_W_dec_off_by_a_bit(*args):
        gx, gW, gb, gWd = real(*args)
        return gx, gW, gb, gWd * 1.01

    monkeypatch.setattr(cpu, "coder_backward", grad_W_dec_off_by_a_bit)
    assert cli.main(["doctor", "--backends", "cpu", "--quick"]) == 1
    lines = check_lines(capsys.readouterr().out)
    coder = next(ln for ln in lines if " coder_backward " in ln)
    assert " FAIL " in coder and "grad_W_dec" in coder
    assert all(" PASS " in ln for ln in lines if ln is not coder)


def test_bad_arguments_and_environment_only(capsys):
    assert cli.main(["doctor", "--backends", "cuda,warp-drive"]) == 2
    assert "warp-drive" in capsys.readouterr().err
    assert cli.main(["doctor", "--no-check"]) == 0
    out = capsys.readouterr().out
    assert "== CUDA extension" in out and "== self-check" not in out


def test_dtypes_per_backend_and_device():
    cpu = torch.device("cpu")
    assert self_check.dtypes_for("cpu", cpu) == (torch.float32, torch.float16, torch.bfloat16)
    assert self_check.dtypes_for("triton", cpu) == (torch.float32, torch.float16)  # interpreter: no bf16
    if torch.cuda.is_available():
        cuda = self_check.dtypes_for("triton", torch.device("cuda"))
        assert cuda[:2] == (torch.float32, torch.float16)
        assert (torch.bfloat16 in cuda) == torch.cuda.is_bf16_supported(including_emulation=False)


def test_which_gpu_can_run_which_code():
    code = GpuCode(sass=["sm_80", "sm_90a"], ptx=[], source="")
    assert doctor.runnable_on(code, (8, 0)) == (["sm_80"], [])
    assert doctor.runnable_on(code, (8, 9)) == (["sm_80"], [])  # same major, later minor
    assert doctor.runnable_on(code, (9, 0)) == (["sm_90a"], [])  # not sm_80: another major version
    assert doctor.runnable_on(code, (10, 0)) == ([], [])  # a B200 runs none of it
    assert doctor.runnable_on(code, (7, 5)) == ([], [])
    ptx = GpuCode(sass=["sm_86"], ptx=["sm_80", "sm_90a"], source="")
    assert doctor.runnable_on(ptx, (8, 0)) == ([], ["sm_80"])
    assert doctor.runnable_on(ptx, (12, 0)) == ([], ["sm_80"])  # "a" PTX only on its own GPU
    assert doctor.runnable_on(ptx, (9, 0)) == ([], ["sm_80", "sm_90a"])


def _cuobjdump_or_skip():
    cuobjdump = doctor.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump to compare with")
    return cuobjdump


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_fatbin_headers_read_like_cuobjdump(tmp_path):
    cuobjdump = _cuobjdump_or_skip()
    src = tmp_path / "k.cu"
    src.write_text("__global__ void k(float* x) { x[threadIdx.x] += 1.f; }\n"
                   "void launch(float* x) { k<<<1, 32>>>(x); }\n")
    lib = tmp_path / "k.so"
    gencode = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
               "-gencode", "arch=compute_80,code=compute_80", "-gencode", "arch=compute_90a,code=compute_90a"]
    proc = subprocess.run(["nvcc", "-shared", "-Xcompiler", "-fPIC", *gencode, "-o", str(lib), str(src)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"nvcc could not build a test library: {proc.stderr[-500:]}")
    from_headers = doctor.fatbin_code(str(lib))
    listed = doctor.cuobjdump_code(str(lib), cuobjdump)
    assert (from_headers.sass, from_headers.ptx) == (["sm_80", "sm_90a"], ["sm_80", "sm_90a"])
    assert (listed.sass, listed.ptx) == (from_headers.sass, from_headers.ptx)
    assert "cuobjdump" in listed.source and "headers" in from_headers.source


def test_the_built_extension_is_listed(capsys):
    pkg = os.path.dirname(os.path.abspath(bk.__file__))
    libraries = sorted(glob.glob(os.path.join(pkg, "_C_cuda*.so")))
    assert cli.main(["doctor", "--no-check"]) == 0
    out = capsys.readouterr().out
    if not libraries:
        assert "not built" in out
        return
    line = next(ln for ln in out.splitlines() if os.path.basename(libraries[0]) in ln)
    code = doctor.fatbin_code(libraries[0])
    assert f"machine code {' '.join(code.sass)};" in line and code.sass
    if torch.cuda.is_available():
        assert "GPU 0 (sm_" in out
