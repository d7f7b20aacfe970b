"""Session-wide test set-up.

Without a GPU, Triton kernels run under the interpreter on CPU tensors (TRITON_INTERPRET=1).
The variable must be set before any Triton kernel is defined, i.e. before binsparse_kernels'
triton backend is imported, hence here at the top of the session.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The dense models the tests compare against are float32: no TF32 on a GPU, and no bf16 inside
# oneDNN's fp32 matmul on CPUs that have it (set_float32_matmul_precision("medium") turns both on).
torch.backends.cuda.matmul.allow_tf32 = False
torch.set_float32_matmul_precision("highest")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
