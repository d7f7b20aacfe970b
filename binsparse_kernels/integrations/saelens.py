"""binsparse ops inside SAELens (PyPI ``sae-lens``, tested with 6.54).

1. ``BinsparseTopKSAE`` / ``BinsparseTopKTrainingSAE``: SAELens's ``TopKSAE`` / ``TopKTrainingSAE``
   with the encode and decode on the fused ops (``rescale_acts_by_decoder_norm`` included, AuxK
   included). ``patch_saelens()`` (undo: ``unpatch_saelens()``, or ``with saelens_patched():``) puts
   them in SAELens's registry under ``"topk"``, so ``SAE.load_from_disk``/``from_pretrained``, the
   training runner and ``SAETrainer`` use them without code changes.

2. ``binsparse_disk_loader``: a SAELens converter for our checkpoints (``SparseCoder.save_to_disk``)::

       sae = SAE.load_from_disk("ckpt/layers.9", converter=binsparse_disk_loader)

   Continuous TopK SAEs become SAELens's own ``TopKSAE`` (``apply_b_dec_to_input=True``); TopK
   transcoders without a skip connection become a ``TopKSAE`` with ``apply_b_dec_to_input=False``;
   binary coders and skip transcoders become ``BinsparseSAE``, registered as architecture
   ``"binsparse"``. ``W_enc`` is transposed to SAELens's ``[d_in, d_sae]``.

SAELens's API is dense: ``encode`` returns ``[..., d_sae]`` activations and ``decode`` takes them.
These classes keep that contract. The fused encoder's top-k codes are scattered into a dense tensor,
and ``decode`` reads the nonzeros back out of whatever tensor it gets, so hooks that edit activations
still work. What cannot be kept: the dense pre-activations are never formed, so
``hook_sae_acts_pre`` does not fire, ``encode_with_hidden_pre`` returns ``hidden_pre=None``, and the
gradient of ``decode`` reaches only the nonzero activations (the dense decode also gives one to the
zero ones, which attribution at inactive latents needs).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import sae_lens
from sae_lens import registry as _registry
from sae_lens.saes.sae import SAE, SAEConfig, TrainStepInput
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.util import dtype_to_str

from ..coder import refuse_dense_binary
from ..ops import EncoderOutput, sparse_decode, topk_binary_encode, topk_encode

__all__ = [
    "BinsparseSAE",
    "BinsparseSAEConfig",
    "BinsparseTopKSAE",
    "BinsparseTopKTrainingSAE",
    "binsparse_disk_loader",
    "is_patched",
    "patch_saelens",
    "saelens_patched",
    "unpatch_saelens",
]


class _State:
    def __init__(self):
        self.saved: list[tuple[dict, str, Any]] = []
        self.backend: Optional[str] = None


_state = _State()


# ------------------------------------------------------------------------------------------------
# Dense <-> sparse codes
# ------------------------------------------------------------------------------------------------


def _flatten(t: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    return t.reshape(-1, t.shape[-1]), tuple(t.shape[:-1])


def _scatter(values: Tensor, indices: Tensor, width: int, lead: tuple[int, ...]) -> Tensor:
    """Dense ``[..., width]`` activations holding ``values`` at ``indices`` (differentiable in values)."""
    dense = values.new_zeros(values.shape[0], width).scatter(1, indices, values)
    return dense.reshape(*lead, width)


def _sparse_coo(values: Tensor, indices: Tensor, width: int, lead: tuple[int, ...]) -> Tensor:
    """A sparse COO ``[N, width]`` tensor (``use_sparse_activations``); dense for inputs with more dims."""
    if len(lead) != 1:
        return _scatter(values, indices, width, lead)
    rows = torch.arange(values.shape[0], device=values.device).repeat_interleave(values.shape[1])
    return torch.sparse_coo_tensor(torch.stack([rows, indices.reshape(-1)]), values.reshape(-1),
                                   (values.shape[0], width))


def _nonzeros(feature_acts: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """``(values, indices)`` holding every nonzero of each row of ``feature_acts`` (exact for any input,
    also after hooks edited it); rows with fewer nonzeros are padded with zeros."""
    if feature_acts.is_sparse:
        feature_acts = feature_acts.to_dense()
    flat, lead = _flatten(feature_acts)
    width = int((flat != 0).sum(1).max()) if flat.numel() else 0
    indices = flat.abs().topk(max(width, 1), dim=1, sorted=False).indices
    return flat.gather(1, indices), indices, lead


def _backend(module) -> Optional[str]:
    own = getattr(module, "backend", None)
    return own if own is not None else _state.backend


# ------------------------------------------------------------------------------------------------
# SAELens's TopK SAEs on the ops
# ------------------------------------------------------------------------------------------------


class _FusedTopKMixin:
    """encode/decode of SAELens's TopK SAEs on the fused ops. ``backend`` picks the implementation."""

    backend: Optional[str] = None

    def _encoder_rows(self) -> tuple[Tensor, Tensor]:
        """Encoder as ``[d_sae, d_in]`` rows and bias, rescaled by the decoder norms if configured."""
        W, b = self.W_enc.T, self.b_enc
        if self.cfg.rescale_acts_by_decoder_norm:
            norms = self.W_dec.norm(dim=-1)
            W, b = W * norms[:, None], b * norms
        return W, b

    def _codes(self, x: Tensor) -> tuple[EncoderOutput, tuple[int, ...]]:
        flat, lead = _flatten(self.process_sae_in(x))
        W, b = self._encoder_rows()
        return topk_encode(flat, W, b, self.cfg.k, backend=_backend(self)), lead

    def decode(self, feature_acts: Tensor) -> Tensor:
        values, indices, lead = _nonzeros(feature_acts)
        if self.cfg.rescale_acts_by_decoder_norm:
            values = values / self.W_dec.norm(dim=-1)[indices]
        out = sparse_decode(indices, values, self.W_dec, self.b_dec, backend=_backend(self))
        out = self.hook_sae_recons(out.reshape(*lead, out.shape[-1]))
        out = self.run_time_activation_norm_fn_out(out)
        return self.reshape_fn_out(out, self.d_head)


class BinsparseTopKSAE(_FusedTopKMixin, TopKSAE):
    """SAELens's inference ``TopKSAE`` with the fused encode and sparse decode (same config, same weights)."""

    def encode(self, x: Tensor) -> Tensor:
        codes, lead = self._codes(x)
        return self.hook_sae_acts_post(_scatter(codes.acts, codes.indices, self.cfg.d_sae, lead))


class BinsparseTopKTrainingSAE(_FusedTopKMixin, TopKTrainingSAE):
    """SAELens's ``TopKTrainingSAE`` on the fused ops: sparse encoder and decoder gradients, and the
    AuxK loss computed from the dead latents' rows only (SAELens forms all N x d_sae pre-activations)."""

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, None]:
        codes, lead = self._codes(x)
        build = _sparse_coo if self.cfg.use_sparse_activations else _scatter
        return self.hook_sae_acts_post(build(codes.acts, codes.indices, self.cfg.d_sae, lead)), None

    def calculate_aux_loss(self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Optional[Tensor],
                           sae_out: Tensor) -> dict[str, Tensor]:
        return {"auxiliary_reconstruction_loss": self._aux_loss(step_input.sae_in, sae_out,
                                                                step_input.dead_neuron_mask)}

    def _aux_loss(self, sae_in: Tensor, sae_out: Tensor, dead_mask: Optional[Tensor]) -> Tensor:
        # SAELens's TopK AuxK (same k_aux, scale and loss), on the dead latents' pre-activations only.
        if dead_mask is None or (num_dead := int(dead_mask.sum())) == 0:
            return sae_out.new_tensor(0.0)
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise ValueError("TopK auxiliary loss does not support activation normalization "
                             f"(normalize_activations={self.cfg.normalize_activations!r})")
        residual = (sae_in - sae_out).detach()
        k_aux = sae_in.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        dead = dead_mask.nonzero().squeeze(1)
        flat, lead = _flatten(self.process_sae_in(sae_in))
        W, b = self._encoder_rows()
        pre = flat @ W[dead].T.to(flat.dtype) + b[dead].to(flat.dtype)  # [N, num_dead], no ReLU (as SAELens)
        values, indices = pre.topk(k_aux, dim=-1, sorted=False)
        if self.cfg.rescale_acts_by_decoder_norm:
            values = values / self.W_dec.norm(dim=-1)[dead][indices]
        recons = sparse_decode(indices, values, self.W_dec[dead], backend=_backend(self))
        recons = self.reshape_fn_out(recons.reshape(*lead, recons.shape[-1]), self.d_head)
        return self.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()


# ------------------------------------------------------------------------------------------------
# Patching SAELens's registry
# ------------------------------------------------------------------------------------------------


def _set(table: dict, key: str, value) -> None:
    _state.saved.append((table, key, table.get(key)))
    table[key] = value


def patch_saelens(backend: Optional[str] = None) -> None:
    """Make SAELens build ``BinsparseTopKSAE`` / ``BinsparseTopKTrainingSAE`` for architecture "topk"
    (loading, ``from_pretrained``, the training runner) until ``unpatch_saelens()``.

    ``backend``: the op implementation (None: the fastest for the tensors' device). Classes built
    directly (``TopKSAE(cfg)``) are not affected: build ``BinsparseTopKSAE(cfg)`` instead.
    """
    unpatch_saelens()
    _state.backend = backend
    _set(_registry.SAE_CLASS_REGISTRY, "topk", (BinsparseTopKSAE, TopKSAEConfig))
    _set(_registry.SAE_TRAINING_CLASS_REGISTRY, "topk", (BinsparseTopKTrainingSAE, TopKTrainingSAEConfig))


def unpatch_saelens() -> None:
    while _state.saved:
        table, key, old = _state.saved.pop()
        table[key] = old
    _state.backend = None


def is_patched() -> bool:
    return bool(_state.saved)


@contextlib.contextmanager
def saelens_patched(backend: Optional[str] = None):
    patch_saelens(backend)
    try:
        yield
    finally:
        unpatch_saelens()


# ------------------------------------------------------------------------------------------------
# Binary coders and skip transcoders: a registered architecture
# ------------------------------------------------------------------------------------------------


@dataclass
class BinsparseSAEConfig(SAEConfig):
    """A binsparse coder in SAELens: binary or continuous TopK, autoencoder or (skip) transcoder.

    ``apply_b_dec_to_input`` is True for autoencoders (they encode ``x - b_dec``) and False for
    transcoders. ``d_out = 0`` means ``d_in``.
    """

    k: int = 32
    activation: str = "topk_binary"
    d_out: int = 0
    skip_connection: bool = False
    ste: str = "sigmoid"
    ste_temperature: float = 2.0

    @classmethod
    def architecture(cls) -> str:
        return "binsparse"

    def __post_init__(self):
        super().__post_init__()
        if not self.d_out:
            self.d_out = self.d_in
        if self.activation not in ("topk", "topk_binary"):
            raise ValueError(f"activation must be 'topk' or 'topk_binary', got {self.activation!r}")
        if not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.apply_b_dec_to_input and self.d_out != self.d_in:
            raise ValueError("apply_b_dec_to_input needs d_out == d_in (only autoencoders subtract b_dec)")


class BinsparseSAE(SAE[BinsparseSAEConfig]):
    """Inference module for binsparse coders in SAELens (weights in SAELens's layout:
    ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``W_skip [d_out, d_in]``, ``log_threshold [d_sae]``)."""

    backend: Optional[str] = None

    @property
    def binary(self) -> bool:
        return self.cfg.activation == "topk_binary"

    def initialize_weights(self) -> None:
        cfg, like = self.cfg, dict(dtype=self.dtype, device=self.device)
        bound = 1 / math.sqrt(cfg.d_in)
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, **like).uniform_(-bound, bound))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **like))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_out, **like))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, **like))
        self.log_threshold = (nn.Parameter(torch.full((cfg.d_sae,), math.log(0.004), **like))
                              if self.binary else None)
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, **like)) if cfg.skip_connection else None

    def process_sae_in(self, sae_in: Tensor) -> Tensor:
        sae_in = self.hook_sae_input(self.reshape_fn_in(sae_in.to(self.dtype)))
        sae_in = self.run_time_activation_norm_fn_in(sae_in)
        return sae_in - self.b_dec if self.cfg.apply_b_dec_to_input else sae_in

    def encode(self, x: Tensor) -> Tensor:
        flat, lead = _flatten(self.process_sae_in(x))
        if self.binary:
            codes = topk_binary_encode(flat, self.W_enc.T, self.b_enc, self.log_threshold, self.cfg.k,
                                       ste=self.cfg.ste, temperature=self.cfg.ste_temperature, backend=_backend(self))
        else:
            codes = topk_encode(flat, self.W_enc.T, self.b_enc, self.cfg.k, backend=_backend(self))
        return self.hook_sae_acts_post(_scatter(codes.acts, codes.indices, self.cfg.d_sae, lead))

    def decode(self, feature_acts: Tensor) -> Tensor:
        values, indices, lead = _nonzeros(feature_acts)
        # A gather-sum when the codes are still 0/1 (a hook may have changed them).
        binary = self.binary and bool(((values == 0) | (values == 1)).all())
        out = sparse_decode(indices, values, self.W_dec, self.b_dec, binary=binary, backend=_backend(self))
        out = self.hook_sae_recons(out.reshape(*lead, out.shape[-1]))
        if self.cfg.d_out == self.cfg.d_in:
            out = self.run_time_activation_norm_fn_out(out)
        return self.reshape_fn_out(out, self.d_head)

    def forward(self, x: Tensor) -> Tensor:
        if self.W_skip is None:
            return super().forward(x)
        # Skip transcoders, as SAELens's SkipTranscoder: output = decode(encode(x)) + x @ W_skip.T
        out = self.decode(self.encode(x)) + x.to(self.dtype) @ self.W_skip.T
        return self.hook_sae_output(out)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError("folding decoder norms changes which latents a TopK/binary coder selects")


if "binsparse" not in _registry.SAE_CLASS_REGISTRY:
    sae_lens.register_sae_class("binsparse", BinsparseSAE, BinsparseSAEConfig)


# ------------------------------------------------------------------------------------------------
# Converter for our checkpoints
# ------------------------------------------------------------------------------------------------


def binsparse_disk_loader(path: str | Path, device: str = "cpu", cfg_overrides: Optional[dict[str, Any]] = None, *,
                          hook_name: Optional[str] = None, model_name: Optional[str] = None
                          ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """SAELens converter (``PretrainedSaeDiskLoader``) for a checkpoint folder written by
    ``binsparse_kernels.coder.SparseCoder.save_to_disk``::

        SAE.load_from_disk(path, converter=binsparse_disk_loader)

    ``hook_name`` / ``model_name`` fill SAELens's metadata (default hook name: the folder name, i.e.
    our hookpoint, which is a Hugging Face module path, not a TransformerLens hook name: pass
    ``functools.partial(binsparse_disk_loader, hook_name="blocks.9.hook_mlp_out")`` to splice into a
    HookedTransformer). ``cfg_overrides`` (e.g. ``{"dtype": "bfloat16"}``) override config fields;
    other keys go to the metadata.
    """
    path = Path(path)
    raw = json.loads((path / "cfg.json").read_text())
    activation = raw.get("activation", "topk")
    refuse_dense_binary(activation, where=f"{path}: activation")
    activation = {"hybrid": "topk_hybrid"}.get(activation, activation)
    if activation == "topk_hybrid":
        raise ValueError(f"{path} holds a hybrid coder, which this converter does not support; "
                         "use binsparse_kernels.coder.SparseCoder.load_from_disk")
    if activation not in ("topk", "topk_binary"):
        raise ValueError(f"{path}: unknown activation {activation!r}")
    state = load_file(str(path / "sae.safetensors"), device=str(device))
    d_in = raw["d_in"]
    d_out = raw.get("d_out") or d_in
    transcode = bool(raw.get("transcode", False))
    skip = "W_skip" in state
    d_sae = state["encoder.weight"].shape[0]
    dtype = state["encoder.weight"].dtype

    cfg: dict[str, Any] = {
        "d_in": d_in, "d_sae": d_sae, "k": raw["k"], "dtype": dtype_to_str(dtype), "device": str(device),
        "apply_b_dec_to_input": not transcode, "normalize_activations": "none",
    }
    weights = {"W_enc": state["encoder.weight"].T.contiguous(), "b_enc": state["encoder.bias"],
               "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    if activation == "topk" and not skip and d_out == d_in:
        cfg.update(architecture="topk", rescale_acts_by_decoder_norm=False)
        cfg_class = TopKSAEConfig
    else:
        cfg.update(architecture="binsparse", activation=activation, d_out=d_out, skip_connection=skip,
                   ste=raw.get("ste", "sigmoid"), ste_temperature=raw.get("ste_temperature", 2.0))
        cfg_class = BinsparseSAEConfig
        if activation == "topk_binary":
            weights["log_threshold"] = state["log_threshold"]
        if skip:  # both apply x @ W_skip.T with W_skip [d_out, d_in]
            weights["W_skip"] = state["W_skip"]

    metadata: dict[str, Any] = {
        "sae_lens_version": sae_lens.__version__, "hook_name": hook_name or path.name, "model_name": model_name,
        "binsparse_hookpoint": path.name, "binsparse_transcoder": transcode,
    }
    names = {f.name for f in fields(cfg_class)}
    for key, value in (cfg_overrides or {}).items():
        (cfg if key in names else metadata)[key] = value
    cfg["metadata"] = metadata
    if "dtype" in (cfg_overrides or {}):
        from sae_lens.util import str_to_dtype

        target = str_to_dtype(cfg["dtype"])
        weights = {n: t.to(target) for n, t in weights.items()}
    return cfg, weights
