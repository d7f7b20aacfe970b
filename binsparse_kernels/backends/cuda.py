"""Compiled CUDA backend: the kernels of ``csrc/cuda`` (``binsparse_kernels._C_cuda``).

Same signatures and semantics as ``backends/reference.py``. The kernels are torch custom ops
``torch.ops.binsparse.cuda_*`` (registered when ``_C_cuda`` is imported); this module adds their
fake implementations, so they trace under ``torch.compile``, and maps their empty "not computed"
outputs back to ``None``.

What the kernels do (details in ``benchmarks/CUDA_NOTES.md``):

* encode: a GEMM tile loop whose epilogue adds the bias, subtracts theta or applies ReLU and keeps an
  exact running top-k per row, so the N x M pre-activations never reach global memory. On compute
  capability 9.0 with bf16/fp16 inputs: wgmma tiles fed by TMA, a producer and two ping-pong consumer
  warpgroups, threshold-gated insertion; elsewhere (and for fp32): ldmatrix + mma.sync tiles (fp32
  FMAs for fp32). ``BINSPARSE_CUDA_ENCODE=sm80|sm90`` forces one of the two. Latents are split
  across CTAs when the rows alone do not fill the GPU, and the partial lists are merged by a second
  kernel. Among equal scores the lowest latent index wins, NaN ranks first; each row comes back
  sorted by decreasing value. k > 128 uses chunked GEMMs and an exact top-k on packed keys.
* decode and backward: gathers with fp32 accumulators; grad_acts and the weight gradients through
  a stable sort of the indices by latent (built once per backward call; ``coder_backward`` serves
  the decoder and the encoder with one), with large buckets cut into fixed segments; no atomics,
  so the results are bitwise reproducible.

The extension is built by ``setup.py`` when a CUDA toolkit is present. From a source checkout
without an installed build, ``BINSPARSE_CUDA_JIT=1`` compiles ``csrc/cuda`` on first use with
``torch.utils.cpp_extension.load`` instead.
"""

from __future__ import annotations

import glob
import os

import torch

from .. import _checks
from ._compiled import bind


def _load_extension():
    try:
        from .. import _C_cuda  # noqa: F401  (loads the shared library, which registers the ops)
        return
    except ImportError as exc:
        missing = exc
    if os.environ.get("BINSPARSE_CUDA_JIT") == "1":
        from torch.utils.cpp_extension import load

        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc", "cuda")
        sources = sorted(glob.glob(os.path.join(root, "*.cpp")) + glob.glob(os.path.join(root, "*.cu")))
        if not sources:
            raise ImportError(f"BINSPARSE_CUDA_JIT=1 but no CUDA sources under {os.path.normpath(root)}") from missing
        from .. import _cuda_build

        # Explicit -gencode flags: TORCH_CUDA_ARCH_LIST is read, never set (it would change the
        # targets of every extension built later in this process).
        load(name="binsparse_cuda_jit", sources=sources, extra_cflags=["-O3"],
             extra_cuda_cflags=_cuda_build.nvcc_flags(), extra_include_paths=[_cuda_build.cutlass_include()])
        return
    raise ImportError(
        "the CUDA backend needs the compiled extension binsparse_kernels._C_cuda, which is not built "
        f"({missing}). Build the package with a CUDA toolkit present (CUDA_HOME set, "
        "`pip install --no-build-isolation .`), or set BINSPARSE_CUDA_JIT=1 to compile csrc/cuda on first use."
    ) from missing


_load_extension()
# Inside binsparse_kernels.deferred_checks() the extension's own index-range check (a host read)
# is skipped; its kernels never read outside W_dec / W_enc either way.
_checks.add_deferred_listener(torch.ops.binsparse.cuda_set_deferred_checks)
_backend = bind("cuda")
encode_forward = _backend.encode_forward
encode_backward = _backend.encode_backward
decode_forward = _backend.decode_forward
decode_backward = _backend.decode_backward
coder_backward = _backend.coder_backward

# Largest k of the fused encode kernel; larger k takes the chunked fallback (csrc/cuda/encode_forward.cu).
MAX_FUSED_K = 128
