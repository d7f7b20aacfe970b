"""Triton backend: fused encode + top-k (``encode.py``) and the sparse decode and backward kernels
(``sparse.py``).

Same signatures and semantics as ``backends/reference.py`` (see ``backends/__init__.py``). Runs on
CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests the kernels without a GPU).
"""

from __future__ import annotations

from .encode import encode_forward
from .sparse import coder_backward, decode_backward, decode_forward, encode_backward

__all__ = ["encode_forward", "encode_backward", "decode_forward", "decode_backward", "coder_backward"]
