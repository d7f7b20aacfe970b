"""What a CI run must have, so that nothing the suite should test turns into a skip.

Active when the environment variable ``CI`` is set (``.ci/run`` sets it, and ``BINSPARSE_BUILD_CUDA=1``
so that a failed CUDA build fails the set-up). Elsewhere these checks skip: a developer's machine may
lack the CUDA toolkit. Without them, an extension that builds but does not load, or an integration
library that does not import, would only drop backends from the parametrised tests.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import binsparse_kernels as bk
from binsparse_kernels import backends

pytestmark = pytest.mark.skipif(not os.environ.get("CI"), reason="checks a CI machine (CI is set by .ci/run)")


def test_the_backends_ci_tests_are_available():
    names = bk.available_backends()
    missing = {"reference", "cpu", "triton"} - set(names)
    assert not missing, {name: backends.unavailable_reason(name) for name in sorted(missing)}
    if not torch.cuda.is_available():  # the Triton kernels run under the interpreter
        assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("module", ["binsparse_kernels._C", "binsparse_kernels._C_cuda"])
def test_both_compiled_extensions_import(module):
    importlib.import_module(module)  # _C_cuda loads without a GPU


@pytest.mark.parametrize("module", ["sparsify", "sae_lens"])
def test_the_libraries_requirements_txt_installs_import(module):
    importlib.import_module(module)
