"""Triton backend: fused encode + top-k (``encode.py``) and the sparse decode and backward kernels
(``sparse.py``).

Same signatures and semantics as ``backends/reference.py`` (see ``backends/__init__.py``). Runs on
CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests the kernels without a GPU).
On CPU tensors it refuses bfloat16: the interpreter's bf16 ``tl.dot`` is wrong (a 16x16 product is
off by ~3e10 with triton 3.8; fp16 and fp32 are exact), so bf16 runs on a GPU only.
"""

from __future__ import annotations

import functools

import torch

from . import encode as _encode
from . import sparse as _sparse


def _no_bf16_on_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for t in (*args, *kwargs.values()):
            if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and t.device.type == "cpu":
                raise TypeError(
                    "the triton backend runs CPU tensors under the Triton interpreter (TRITON_INTERPRET=1), "
                    "whose bfloat16 tl.dot gives wrong results: use float16 or float32 on the CPU, or "
                    "bfloat16 on a CUDA GPU")
        return fn(*args, **kwargs)

    return wrapper


encode_forward = _no_bf16_on_cpu(_encode.encode_forward)
encode_backward = _no_bf16_on_cpu(_sparse.encode_backward)
decode_forward = _no_bf16_on_cpu(_sparse.decode_forward)
decode_backward = _no_bf16_on_cpu(_sparse.decode_backward)
coder_backward = _no_bf16_on_cpu(_sparse.coder_backward)

__all__ = ["encode_forward", "encode_backward", "decode_forward", "decode_backward", "coder_backward"]
