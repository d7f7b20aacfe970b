"""Our sparse coders behind SAEBench's custom-SAE interface (SAEBench itself is not imported).

SAEBench evaluates any module that looks like its ``BaseSAE``: ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]`` with unit-norm rows, ``b_enc [d_sae]``, ``b_dec [d_in]``; ``encode(x)`` from
``[..., d_in]`` to dense ``[..., d_sae]`` activations, ``decode`` back, ``forward = decode(encode(x))``;
``device`` / ``dtype`` attributes; and a ``cfg`` with ``model_name, d_in, d_sae, hook_name,
hook_layer, dtype, device`` and a few more fields that its core evaluation reads.

    sae = SAEBenchSAE.from_disk("ckpt/layers.9", model_name="EleutherAI/pythia-70m-deduped", hook_layer=9)
    # pass it to SAEBench's evals as a custom SAE: [("my-bae", sae)]

The encode runs the coder's fused op (binary, TopK and hybrid coders alike), so the wrapper holds
the coder itself. ``W_enc`` etc. are views of its parameters in SAEBench's layout, not copies.
SAEBench evaluates autoencoders, so transcoders are refused.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..coder import SparseCoder
from ..ops import sparse_decode


@dataclass(frozen=True)
class SAEBenchMetadata:
    """The metadata fields SAEBench's config carries."""

    context_size: Optional[int]
    hook_name: str
    hook_head_index: Optional[int]
    seqpos_slice: tuple
    prepend_bos: bool


@dataclass
class SAEBenchConfig:
    """The fields of SAEBench's ``CustomSAEConfig`` (its evals read them; most are informational)."""

    model_name: str
    d_in: int
    d_sae: int
    hook_layer: int
    hook_name: str
    context_size: Optional[int] = None
    hook_head_index: Optional[int] = None
    metadata: Optional[SAEBenchMetadata] = None
    architecture: str = ""
    apply_b_dec_to_input: bool = True
    finetuning_scaling_factor: bool = False
    activation_fn_str: str = ""
    activation_fn_kwargs: dict = field(default_factory=dict)
    prepend_bos: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    model_from_pretrained_kwargs: dict = field(default_factory=dict)
    dataset_path: str = ""
    dataset_trust_remote_code: bool = True
    seqpos_slice: tuple = (None,)
    training_tokens: int = -100_000
    sae_lens_training_version: Optional[str] = None
    neuronpedia_id: Optional[str] = None


def _decoder_is_unit_norm(W_dec: Tensor) -> bool:
    norms = W_dec.detach().float().norm(dim=1)
    tolerance = 1e-2 if W_dec.dtype in (torch.bfloat16, torch.float16) else 1e-5  # SAEBench's tolerances
    return bool(torch.allclose(norms, torch.ones_like(norms), atol=tolerance))


class SAEBenchSAE(nn.Module):
    """A ``binsparse_kernels.coder.SparseCoder`` (autoencoder) with SAEBench's ``BaseSAE`` interface.

    ``normalize_decoder``: SAEBench requires unit-norm decoder rows. Our training renormalises them
    before each forward, so a checkpoint saved after an optimizer step can be off by a step's worth;
    with True (default) the wrapper renormalises a *copy* of the coder (the caller's coder is left
    alone), as the next training forward would. With False a non-unit decoder raises ValueError.
    """

    def __init__(self, coder: SparseCoder, *, model_name: str, hook_layer: int, hook_name: Optional[str] = None,
                 context_size: Optional[int] = None, normalize_decoder: bool = True):
        super().__init__()
        if not isinstance(coder, SparseCoder):
            raise TypeError(f"expected a binsparse_kernels.coder.SparseCoder, got {type(coder).__name__}")
        if coder.cfg.transcode:
            raise ValueError("SAEBench evaluates autoencoders; a transcoder's output is not its input")
        if coder.W_dec is None:
            raise ValueError("the coder was loaded with decoder=False; SAEBench needs the decoder")
        if not _decoder_is_unit_norm(coder.W_dec):
            if not normalize_decoder:
                raise ValueError("SAEBench requires unit-norm decoder rows (W_dec); pass normalize_decoder=True "
                                 "to evaluate a renormalised copy")
            coder = copy.deepcopy(coder)
            coder.set_decoder_norm_to_unit_norm()
        self.coder = coder
        hook_name = hook_name or f"blocks.{hook_layer}.hook_resid_post"
        self.cfg = SAEBenchConfig(
            model_name=model_name, d_in=coder.d_in, d_sae=coder.num_latents, hook_layer=hook_layer,
            hook_name=hook_name, context_size=context_size, architecture=f"binsparse_{coder.cfg.activation}",
            activation_fn_str=coder.cfg.activation, activation_fn_kwargs={"k": coder.cfg.k},
            dtype=str(coder.dtype).removeprefix("torch."), device=str(coder.device))
        self.cfg.metadata = SAEBenchMetadata(context_size=context_size, hook_name=hook_name, hook_head_index=None,
                                             seqpos_slice=self.cfg.seqpos_slice, prepend_bos=self.cfg.prepend_bos)
        self.device: torch.device = coder.device
        self.dtype: torch.dtype = coder.dtype

    @classmethod
    def from_disk(cls, path: str | os.PathLike, *, model_name: str, hook_layer: int, hook_name: Optional[str] = None,
                  device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
                  backend: Optional[str] = None, **kwargs: Any) -> "SAEBenchSAE":
        coder = SparseCoder.load_from_disk(path, device, backend=backend)
        if dtype is not None:
            coder = coder.to(dtype)
        return cls(coder, model_name=model_name, hook_layer=hook_layer, hook_name=hook_name, **kwargs)

    # -- SAEBench's parameter layout: views of the coder's parameters ----------------------------

    @property
    def W_enc(self) -> Tensor:
        return self.coder.encoder.weight.T

    @property
    def b_enc(self) -> Tensor:
        return self.coder.encoder.bias

    @property
    def W_dec(self) -> Tensor:
        return self.coder.W_dec

    @property
    def b_dec(self) -> Tensor:
        return self.coder.b_dec

    # -- encode / decode ---------------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """``[..., d_in]`` -> dense ``[..., d_sae]`` activations (at most k nonzero per token)."""
        lead = x.shape[:-1]
        codes = self.coder.encode(x.reshape(-1, x.shape[-1]).to(self.dtype))
        dense = codes.acts.new_zeros(codes.acts.shape[0], self.cfg.d_sae).scatter(1, codes.indices, codes.acts)
        return dense.reshape(*lead, self.cfg.d_sae)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Dense ``[..., d_sae]`` activations -> ``[..., d_in]``; reads every nonzero, so edited
        activations (ablations, steering) decode exactly."""
        lead = feature_acts.shape[:-1]
        flat = feature_acts.reshape(-1, feature_acts.shape[-1])
        width = max(int((flat != 0).sum(1).max()) if flat.numel() else 0, 1)
        indices = flat.abs().topk(width, dim=1, sorted=False).indices
        values = flat.gather(1, indices)
        out = sparse_decode(indices, values, self.coder.W_dec, self.coder.b_dec, backend=self.coder.backend)
        return out.reshape(*lead, out.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # -- SAEBench's helpers --------------------------------------------------------------------------

    def to(self, *args, **kwargs) -> "SAEBenchSAE":
        super().to(*args, **kwargs)
        self.device, self.dtype = self.coder.device, self.coder.dtype
        self.cfg.device, self.cfg.dtype = str(self.device), str(self.dtype).removeprefix("torch.")
        return self

    @torch.no_grad()
    def check_decoder_norms(self) -> bool:
        """True if every decoder row has unit norm (SAEBench's check and tolerances)."""
        return _decoder_is_unit_norm(self.W_dec)
