"""The copyable examples in python/examples run end to end (small settings) and do what they say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "python" / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_sae_example_learns():
    result = load("own_sae").main(["--steps", "60", "--batch", "128"])
    assert result["last_fvu"] < 0.75 * result["first_fvu"]


@pytest.mark.parametrize("binary", [False, True], ids=["topk", "binary"])
def test_sparsify_example(binary, tmp_path):
    from binsparse_kernels.integrations.sparsify import unpatch_sparsify

    try:
        args = ["--examples", "24", "--ctx_len", "32", "--save_dir", str(tmp_path)] + (["--binary"] if binary else [])
        fvu = load("sparsify_dropin").main(args)["layers.1"]
    finally:
        unpatch_sparsify()
    assert 0 < fvu < 1
    assert (tmp_path / "run" / "layers.1" / "sae.safetensors").is_file()


def test_saelens_example(tmp_path):
    from binsparse_kernels.integrations.saelens import unpatch_saelens

    try:
        result = load("saelens_dropin").main(["--steps", "30", "--out", str(tmp_path)])
    finally:
        unpatch_saelens()
    assert result["binary_matches"] and result["saelens_topk_fvu"] < 1
