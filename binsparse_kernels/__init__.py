"""binsparse-kernels: fused kernels for binary (and continuous) TopK sparse autoencoders and transcoders.

    import binsparse_kernels as bk
    out = bk.topk_binary_encode(x, W_enc, b_enc, log_threshold, k)     # acts in {0,1}
    y = bk.sparse_decode(out.indices, out.acts, W_dec, b_dec, binary=True)
"""

from .backends import available_backends
from .ops import (
    EncoderOutput,
    SparseDecode,
    TopKBinaryEncode,
    TopKEncode,
    sparse_decode,
    topk_binary_encode,
    topk_encode,
)

__version__ = "0.1.0"

__all__ = [
    "EncoderOutput",
    "SparseDecode",
    "TopKBinaryEncode",
    "TopKEncode",
    "available_backends",
    "sparse_decode",
    "topk_binary_encode",
    "topk_encode",
]
