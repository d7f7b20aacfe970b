"""Compiled CPU backend: the C++ kernels of ``csrc/cpu`` (``binsparse_kernels._C``).

Same signatures and semantics as ``backends/reference.py``. The kernels are torch custom ops
``torch.ops.binsparse.cpu_*`` (registered when ``_C`` is imported); this module adds their fake
implementations, so they trace under ``torch.compile``, and maps their empty "not computed"
outputs back to ``None``.

What the kernels do differently from the reference (same results up to fp32 summation order):

* encode: the GEMM runs over chunks of 4096 latents into a bounded fp32 scratch, and each chunk is
  merged into a running exact top-k per row, so the N x M pre-activations never exist. Among equal
  scores the lowest latent index wins; each row comes back sorted by decreasing value.
* backward and decode: gathers with fp32 accumulators, parallel over tokens; weight gradients
  through a stable counting sort of the indices by latent, one latent row per task, no atomics, so
  the results are bitwise reproducible.
"""

from __future__ import annotations

from ._compiled import bind

from .. import _C  # noqa: F401  (loads the shared library, which registers the ops)

_backend = bind("cpu")
encode_forward = _backend.encode_forward
encode_backward = _backend.encode_backward
decode_forward = _backend.decode_forward
decode_backward = _backend.decode_backward
coder_backward = _backend.coder_backward
