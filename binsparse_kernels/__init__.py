"""binsparse-kernels: fused kernels for binary (and continuous) TopK sparse autoencoders and transcoders.

    import binsparse_kernels as bk
    out = bk.topk_binary_encode(x, W_enc, b_enc, log_threshold, k)     # acts in {0,1}
    y = bk.sparse_decode(out.indices, out.acts, W_dec, b_dec, binary=True)

    # both in one op (one backward), and the value checks without host syncs:
    with bk.deferred_checks():
        y, acts, indices, values = bk.topk_binary_encode_decode(x, W_enc, b_enc, log_threshold, W_dec, b_dec, k)
"""

from ._checks import deferred_checks, raise_deferred
from .backends import available_backends
from .ops import (
    CoderOutput,
    EncoderOutput,
    SparseDecode,
    TopKBinaryEncode,
    TopKBinaryEncodeDecode,
    TopKEncode,
    TopKEncodeDecode,
    sparse_decode,
    topk_binary_encode,
    topk_binary_encode_decode,
    topk_encode,
    topk_encode_decode,
)

__version__ = "0.1.0"

__all__ = [
    "CoderOutput",
    "EncoderOutput",
    "SparseDecode",
    "TopKBinaryEncode",
    "TopKBinaryEncodeDecode",
    "TopKEncode",
    "TopKEncodeDecode",
    "available_backends",
    "deferred_checks",
    "raise_deferred",
    "sparse_decode",
    "topk_binary_encode",
    "topk_binary_encode_decode",
    "topk_encode",
    "topk_encode_decode",
]
