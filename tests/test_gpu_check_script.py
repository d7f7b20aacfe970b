"""scripts/gpu_check.sh rehearsed on the CPU, so that on the GPU machine (minutes of it, rarely lent)
the script itself is never what fails: every step runs its own command line, the GPU parts replaced
by their own skips, and writes its outputs and the summary; a step that hangs costs only its time box,
and the total is kept."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from binsparse_kernels import self_check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ("install", "build", "doctor", "tests", "sanitizer", "bench", "bench-compile")


def run_script(out: Path, timeout: float, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    environ.update({"OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_REHEARSAL": "1", **env})
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=timeout, env=environ,
                          cwd=ROOT)


def statuses(summary: str) -> dict[str, str]:
    """Step -> status from the summary's step lines ("<step> <status> <N>s <note>")."""
    found = {}
    for line in summary.splitlines():
        m = re.match(r"^(\S+)\s+(.+?)\s+(\d+)s  ", line)
        if m and m.group(1) in STEPS:
            found[m.group(1)] = m.group(2)
    return found


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, standing in for the carried ones."""
    folder.mkdir()
    path = folder / "gpu_check_probe-0.1-py3-none-any.whl"
    info = "gpu_check_probe-0.1.dist-info"
    files = {"gpu_check_probe/__init__.py": "VALUE = 1\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


def test_rehearsal_runs_every_step_and_writes_its_outputs(tmp_path):
    out = tmp_path / "out"
    probe_wheel(tmp_path / "wheels")
    proc = run_script(out, 900, GPU_CHECK_WHEELS=str(tmp_path / "wheels"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert summary in proc.stdout and "REHEARSAL" in summary
    assert statuses(summary) == {"install": "ok", "build": "skipped (rehearsal)", "doctor": "ok", "tests": "ok",
                                 "sanitizer": "ok", "bench": "ok", "bench-compile": "ok"}, summary
    assert "setup.py build_ext --inplace" in summary  # what the build would run

    steps_log = (out / "steps.log").read_text()
    assert "gpu_check_probe-0.1.dist-info" in steps_log  # installed into the --target folder
    doctor = (out / "doctor.txt").read_text()
    assert "== environment" in doctor and re.search(r"== \d+ of \d+ checks passed", doctor)
    assert "checks passed" in summary
    tests = (out / "tests.log").read_text()
    assert re.search(r"\d+ skipped.* in [\d.]+s", tests) and "failed" not in tests  # the GPU tests skip themselves
    assert "-m gpu" in tests and "test_bench.py::test_gpu_suite_bf16" in tests
    # the cpu backend stands in for the GPU ones: every op of the self-check ran on it and passed
    n_ops = len(self_check.OPS)
    assert "== sanitizer" in steps_log and "--backends cpu" in steps_log
    assert f"{n_ops} of {n_ops} checks passed" in steps_log

    results = sorted(out.glob("*.json"))
    assert [p.name.split("-2")[0] for p in results] == ["rehearsal-cpu", "rehearsal-cpu-compile"]
    for path in results:
        data = json.loads(path.read_text())
        assert data["rows"] and all(r["status"] == "ok" for r in data["rows"])
        assert path.with_suffix(".csv").exists()
        assert f"{path.name}: {len(data['rows'])} rows, 0 not ok" in summary
    # what the device tool brings back: 8 files at most, plain names
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files


def test_a_hanging_step_costs_its_time_box_and_the_total_is_kept(tmp_path):
    # A Python that hangs whenever it is asked to run the doctor (the doctor and sanitizer steps).
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\ncase " $* " in *" doctor "*) exec sleep 300 ;; esac\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = run_script(out, 120, PYTHON=str(fake), GPU_CHECK_STEPS="doctor sanitizer bench",
                      GPU_CHECK_TOTAL_S="25", GPU_CHECK_DOCTOR_S="4")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    found = statuses(summary)
    assert found["doctor"] == "TIMEOUT" and found["sanitizer"] == "TIMEOUT", summary
    assert found["bench"] == "skipped: no time left", summary
    assert found["install"] == found["tests"] == "skipped", summary  # not in GPU_CHECK_STEPS
    seconds = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+)\s+.+?\s+(\d+)s  ", summary, re.M)}
    assert 4 <= seconds["doctor"] <= 8, summary  # its own box
    assert seconds["doctor"] + seconds["sanitizer"] <= 25 - 10 + 3, summary  # the deadline leaves the summary 10 s
    assert "killed at its" in summary
