"""binsparse ops inside EleutherAI's sparsify (PyPI ``eai-sparsify``, tested with 1.3.3).

Three things:

1. Drop-in replacements with sparsify's call signatures, backed by the package's ops::

       fused_encoder(x, W, b, k, activation) -> EncoderOutput(top_acts, top_indices, pre_acts)
       decoder_impl(top_indices, top_acts, W_dec.mT) -> x_hat (without b_dec)

   and ``patch_sparsify(backend=None)`` (undo: ``unpatch_sparsify()``, or ``with sparsify_patched():``),
   which installs them where ``sparsify.SparseCoder`` looks them up, so existing sparsify code and
   sparsify's ``Trainer`` run on the fused kernels unchanged.

2. ``BinarySparseCoder``: sparsify's ``SparseCoder`` plus the binary TopK activation
   (``activation="topk_binary"``, a ``log_threshold`` parameter), which the PyPI release lacks. It
   saves and loads in sparsify's layout (``cfg.json`` + ``sae.safetensors``). Other activations
   behave exactly as in sparsify. ``patch_sparsify()`` also makes sparsify's ``Trainer`` build it,
   so ``TrainConfig(sae=BinarySparseCoderConfig(...))`` trains binary coders.

3. Converters between our ``binsparse_kernels.coder.SparseCoder`` and sparsify's modules:
   ``to_sparsify``, ``from_sparsify`` and ``load_sparsify(path)``.

Dense pre-activations: sparsify's encoder returns ``pre_acts``, the dense ``[N, num_latents]``
ReLU pre-activations, which its ``forward`` reads only for AuxK (``dead_mask`` with dead latents)
and Multi-TopK. The fused encoder never forms that matrix. The patched ``forward`` tells the
adapter whether this call needs it; when it does, the adapter computes it separately, without
gradient. That matches sparsify, whose encoder backward ignores any gradient reaching
``pre_acts``. Called outside ``forward`` (``sae.encode(x)``), the adapter returns the dense matrix
as sparsify does.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sparsify
import sparsify.fused_encoder as _sparsify_fused_encoder
import sparsify.sparse_coder as _sparsify_sparse_coder
import sparsify.trainer as _sparsify_trainer
import sparsify.utils as _sparsify_utils
from sparsify.config import SparseCoderConfig
from sparsify.fused_encoder import EncoderOutput
from sparsify.sparse_coder import ForwardOutput
from sparsify.sparse_coder import SparseCoder as SparsifySparseCoder

from .. import coder as _bk_coder
from ..ops import sparse_decode, topk_binary_encode, topk_encode

__all__ = [
    "BinarySparseCoder",
    "BinarySparseCoderConfig",
    "decoder_impl",
    "from_sparsify",
    "fused_encoder",
    "is_patched",
    "load_sparsify",
    "patch_sparsify",
    "sparsify_patched",
    "to_sparsify",
    "unpatch_sparsify",
]

# sparsify's own implementations, captured before any patching (for "groupmax" and for unpatching).
_STOCK_FUSED_ENCODER = _sparsify_fused_encoder.fused_encoder

# Set by the patched SparseCoder.forward: does this forward read the dense pre_acts? Outside a
# patched forward the answer is "yes", so a direct ``encode`` returns what sparsify's does.
_NEED_DENSE_PRE_ACTS = contextvars.ContextVar("binsparse_sparsify_need_dense_pre_acts", default=True)


# ------------------------------------------------------------------------------------------------
# Drop-in functions
# ------------------------------------------------------------------------------------------------


def fused_encoder(input: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, activation: str, *,
                  backend: Optional[str] = None) -> EncoderOutput:
    """``sparsify.fused_encoder.fused_encoder`` on the fused TopK encoder.

    ``input`` [N, D], ``weight`` [M, D], ``bias`` [M] or None. Returns sparsify's
    ``EncoderOutput(top_acts [N,k], top_indices [N,k], pre_acts)``, where ``pre_acts`` is the dense
    ``ReLU(input @ weight.T + bias)`` [N, M] (no gradient flows through it, as in sparsify), or None
    inside a patched ``SparseCoder.forward`` that does not read it.
    ``activation="groupmax"`` runs sparsify's own implementation.
    """
    if activation == "groupmax":
        return _STOCK_FUSED_ENCODER(input, weight, bias, k, activation)
    if activation != "topk":
        hint = " (binary coders need BinarySparseCoder, which has the log_threshold)" if "binary" in str(
            activation) else ""
        raise ValueError(f"Unknown activation: {activation!r}; the fused encoder runs 'topk' and 'groupmax'{hint}")
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    out = topk_encode(input, weight, bias, k, backend=backend)
    pre_acts = None
    if _NEED_DENSE_PRE_ACTS.get():
        with torch.no_grad():
            pre_acts = F.relu(F.linear(input, weight, bias))
    return EncoderOutput(out.acts, out.indices, pre_acts)


def decoder_impl(top_indices: Tensor, top_acts: Tensor, W_dec: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """``sparsify.utils.decoder_impl`` on the sparse decode.

    As in sparsify, ``W_dec`` is the *transposed* decoder ``[D, M]`` (callers pass ``W_dec.mT``);
    returns ``sum_j top_acts[:, j] * W_dec.mT[top_indices[:, j]]`` without the decoder bias.
    """
    return sparse_decode(top_indices, top_acts, W_dec.mT, backend=backend)


# ------------------------------------------------------------------------------------------------
# Binary coder for sparsify
# ------------------------------------------------------------------------------------------------


@dataclass
class BinarySparseCoderConfig(SparseCoderConfig):
    """sparsify's ``SparseCoderConfig`` plus the binary coder's options (names as in
    ``binsparse_kernels.coder.SparseCoderConfig``, so cfg.json files are interchangeable)."""

    activation: Literal["groupmax", "topk", "topk_binary"] = "topk_binary"
    """"topk_binary" for binary codes; "topk"/"groupmax" behave exactly as in sparsify."""

    ste: Literal["sigmoid", "rectangle", "identity"] = "sigmoid"
    """Straight-through estimator of the binary step's gradient."""

    ste_temperature: float = 2.0

    init_threshold: float = 0.004
    """theta at initialisation: log_threshold starts at log(init_threshold)."""

    def __post_init__(self):
        _bk_coder.refuse_dense_binary(self.activation)
        if self.activation not in ("groupmax", "topk", "topk_binary"):
            raise ValueError(f"activation must be 'topk_binary', 'topk' or 'groupmax', got {self.activation!r}")
        if self.ste not in ("sigmoid", "rectangle", "identity"):
            raise ValueError(f"ste must be 'sigmoid', 'rectangle' or 'identity', got {self.ste!r}")
        if not self.ste_temperature > 0 or not self.init_threshold > 0:
            raise ValueError("ste_temperature and init_threshold must be positive")


_cuda_bf16_autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_bf16_supported())


class BinarySparseCoder(SparsifySparseCoder):
    """sparsify's ``SparseCoder`` with the binary TopK activation (``cfg.activation == "topk_binary"``).

    Binary codes: ``z = (x - b_dec) @ W_enc.T + b_enc - exp(log_threshold)`` (transcoders encode ``x``),
    the top-k of z per token, ``acts = 1[z > 0]``; the decode is a gather-sum of decoder rows. The
    ``encode``/``decode``/``forward`` signatures and outputs are sparsify's; ``encode``'s third output
    holds z at the selected latents ([N, k]), not a dense [N, M] matrix.

    With any other activation every method is sparsify's own (running on our ops once
    ``patch_sparsify()`` is active). ``backend`` picks the op implementation for the binary path
    (None: the one given to ``patch_sparsify``, else the fastest available).
    """

    def __init__(self, d_in: int, cfg: SparseCoderConfig, device: str | torch.device = "cpu",
                 dtype: Optional[torch.dtype] = None, *, decoder: bool = True, backend: Optional[str] = None):
        super().__init__(d_in, cfg, device, dtype, decoder=decoder)
        self.backend = backend
        self.log_threshold = None
        if self.binary:
            init = math.log(getattr(cfg, "init_threshold", 0.004))
            self.log_threshold = nn.Parameter(torch.full((self.num_latents,), init, device=device, dtype=dtype))

    @property
    def binary(self) -> bool:
        return self.cfg.activation == "topk_binary"

    def _backend(self) -> Optional[str]:
        return self.backend if self.backend is not None else _state.backend

    def _binary_codes(self, x: Tensor, k: int, rows: Optional[Tensor] = None):
        """Binary top-k codes of ``x`` over all latents, or over the latents in ``rows`` only."""
        if not self.cfg.transcode:
            x = x - self.b_dec
        W, b, t = self.encoder.weight, self.encoder.bias, self.log_threshold
        if rows is not None:
            W, b, t = W[rows], b[rows], t[rows]
        return topk_binary_encode(x, W, b, t, k, ste=getattr(self.cfg, "ste", "sigmoid"),
                                  temperature=getattr(self.cfg, "ste_temperature", 2.0), backend=self._backend())

    def encode(self, x: Tensor) -> EncoderOutput:
        if not self.binary:
            return super().encode(x)
        out = self._binary_codes(x, self.cfg.k)
        return EncoderOutput(out.acts, out.indices, out.values)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        if not self.binary:
            return super().decode(top_acts, top_indices)
        if self.W_dec is None:
            raise RuntimeError("Decoder weight was not initialized (loaded with decoder=False).")
        return sparse_decode(top_indices, top_acts.to(self.dtype), self.W_dec, self.b_dec, binary=True,
                             backend=self._backend())

    @_cuda_bf16_autocast
    def forward(self, x: Tensor, y: Optional[Tensor] = None, *, dead_mask: Optional[Tensor] = None,
                total_variance: Optional[Tensor] = None) -> ForwardOutput:
        if not self.binary:
            return super().forward(x, y, dead_mask=dead_mask, total_variance=total_variance)
        top_acts, top_indices, _ = self.encode(x)
        if y is None:
            y = x
        sae_out = self.decode(top_acts, top_indices)
        if self.W_skip is not None:
            sae_out = sae_out + x.to(self.dtype) @ self.W_skip.mT  # sparsify's skip layout: [d_out, d_in]
        e = y - sae_out
        if total_variance is None:
            total_variance = (y - y.mean(0)).pow(2).sum()

        auxk_loss = sae_out.new_tensor(0.0)
        if dead_mask is not None and (num_dead := int(dead_mask.sum())) > 0 and y.shape[-1] // 2 > 0:
            # sparsify's AuxK (same k_aux, scale and normalisation), with the dead latents' binary codes;
            # their gradient reaches the encoder through the STE.
            k_aux = y.shape[-1] // 2
            scale = min(num_dead / k_aux, 1.0)
            k_aux = min(k_aux, num_dead)
            dead = dead_mask.nonzero().squeeze(1)
            aux = self._binary_codes(x, k_aux, rows=dead)
            e_hat = sparse_decode(aux.indices, aux.acts.to(self.dtype), self.W_dec[dead], binary=True,
                                  backend=self._backend())
            auxk_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_variance

        fvu = e.pow(2).sum() / total_variance
        multi_topk_fvu = sae_out.new_tensor(0.0)
        if self.cfg.multi_topk:
            multi = self._binary_codes(x, min(4 * self.cfg.k, self.num_latents))
            out4 = self.decode(multi.acts, multi.indices)
            if self.W_skip is not None:
                out4 = out4 + x.to(self.dtype) @ self.W_skip.mT
            multi_topk_fvu = (out4 - y).pow(2).sum() / total_variance
        return ForwardOutput(sae_out, top_acts, top_indices, fvu, auxk_loss, multi_topk_fvu)

    @staticmethod
    def load_from_disk(path: Path | str, device: str | torch.device = "cpu", *, decoder: bool = True,
                       backend: Optional[str] = None) -> "BinarySparseCoder":
        """Load a sparsify-layout folder (``cfg.json`` + ``sae.safetensors``), binary or not."""
        from safetensors import safe_open
        from safetensors.torch import load_model

        path = Path(path)
        cfg_dict = json.loads((path / "cfg.json").read_text())
        d_in = cfg_dict.pop("d_in")
        if cfg_dict.get("activation") == "topk_hybrid":
            raise ValueError(f"{path} holds a hybrid coder, which sparsify cannot run; load it with "
                             "binsparse_kernels.coder.SparseCoder.load_from_disk")
        cfg = BinarySparseCoderConfig.from_dict(cfg_dict, drop_extra_fields=True)
        weights = str(path / "sae.safetensors")
        with safe_open(weights, framework="pt", device="cpu") as f:
            dtype = f.get_tensor(next(iter(f.keys()))).dtype
        sae = BinarySparseCoder(d_in, cfg, device=device, dtype=dtype, decoder=decoder, backend=backend)
        load_model(sae, weights, device=str(device), strict=decoder)
        return sae


# ------------------------------------------------------------------------------------------------
# Patching
# ------------------------------------------------------------------------------------------------


class _Patch:
    """Attribute assignments that remember the previous values, undone in reverse order."""

    def __init__(self, backend: Optional[str]):
        self.backend = backend
        self._saved: list[tuple[object, str, object]] = []

    def set(self, obj, name: str, value) -> None:
        self._saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self) -> None:
        while self._saved:
            obj, name, old = self._saved.pop()
            setattr(obj, name, old)


class _State:
    def __init__(self):
        self.active: list[_Patch] = []

    @property
    def backend(self) -> Optional[str]:
        return self.active[-1].backend if self.active else None


_state = _State()


def _patched_forward(original):
    @functools.wraps(original)
    def forward(self, x, y=None, *, dead_mask=None, **kwargs):
        # sparsify's forward reads the dense pre_acts only for AuxK (some latent dead) and Multi-TopK.
        need = bool(self.cfg.multi_topk) or (dead_mask is not None and bool(dead_mask.any()))
        token = _NEED_DENSE_PRE_ACTS.set(need)
        try:
            return original(self, x, y, dead_mask=dead_mask, **kwargs)
        finally:
            _NEED_DENSE_PRE_ACTS.reset(token)

    forward.__binsparse_patched__ = True
    return forward


def _apply(patch: _Patch, trainer: bool) -> None:
    enc = functools.partial(fused_encoder, backend=patch.backend)
    dec = functools.partial(decoder_impl, backend=patch.backend)
    # SparseCoder.encode/decode/forward look these names up in sparsify.sparse_coder at call time.
    patch.set(_sparsify_sparse_coder, "fused_encoder", enc)
    patch.set(_sparsify_sparse_coder, "decoder_impl", dec)
    patch.set(_sparsify_fused_encoder, "fused_encoder", enc)
    patch.set(_sparsify_utils, "decoder_impl", dec)
    patch.set(SparsifySparseCoder, "forward", _patched_forward(SparsifySparseCoder.forward))
    if trainer:
        # The Trainer builds its coders with this name: BinarySparseCoder is sparsify's SparseCoder
        # for every other activation, and adds "topk_binary".
        patch.set(_sparsify_trainer, "SparseCoder", BinarySparseCoder)


def patch_sparsify(backend: Optional[str] = None, *, trainer: bool = True) -> None:
    """Run sparsify's ``SparseCoder`` (and its ``Trainer``) on the package's ops until ``unpatch_sparsify()``.

    ``backend``: the op implementation (None: the fastest for the tensors' device).
    ``trainer``: also let sparsify's ``Trainer`` build ``BinarySparseCoder``s, so a
    ``BinarySparseCoderConfig(activation="topk_binary")`` trains binary coders.
    Calling it again replaces the previous patch.
    """
    unpatch_sparsify()
    patch = _Patch(backend)
    _apply(patch, trainer)
    _state.active.append(patch)


def unpatch_sparsify() -> None:
    """Restore sparsify's own implementations (no-op if not patched)."""
    while _state.active:
        _state.active.pop().undo()


def is_patched() -> bool:
    return bool(_state.active)


@contextlib.contextmanager
def sparsify_patched(backend: Optional[str] = None, *, trainer: bool = True):
    """``with sparsify_patched(): ...`` runs sparsify on the package's ops inside the block only."""
    patch = _Patch(backend)
    _apply(patch, trainer)
    _state.active.append(patch)
    try:
        yield
    finally:
        patch.undo()
        if patch in _state.active:
            _state.active.remove(patch)


# ------------------------------------------------------------------------------------------------
# Converters
# ------------------------------------------------------------------------------------------------


def to_sparsify(coder: "_bk_coder.SparseCoder", *, backend: Optional[str] = None) -> SparsifySparseCoder:
    """The same coder as a sparsify module: sparsify's own ``SparseCoder`` for continuous TopK coders,
    ``BinarySparseCoder`` for binary ones. Hybrid coders and transcoders with ``d_out != d_in`` have
    no sparsify equivalent (ValueError)."""
    cfg = coder.cfg
    if cfg.hybrid:
        raise ValueError("sparsify has no hybrid (binary + continuous) coder; use binsparse_kernels.coder.SparseCoder")
    if coder.d_out != coder.d_in:
        raise ValueError(f"sparsify's SparseCoder needs d_out == d_in, got d_in={coder.d_in}, d_out={coder.d_out}")
    common = dict(expansion_factor=cfg.expansion_factor, normalize_decoder=cfg.normalize_decoder,
                  num_latents=coder.num_latents, k=cfg.k, multi_topk=cfg.multi_topk,
                  skip_connection=cfg.skip_connection, transcode=cfg.transcode)
    decoder = coder.W_dec is not None
    if cfg.binary:
        scfg = BinarySparseCoderConfig(activation="topk_binary", ste=cfg.ste, ste_temperature=cfg.ste_temperature,
                                       init_threshold=cfg.init_threshold, **common)
        sae = BinarySparseCoder(coder.d_in, scfg, coder.device, coder.dtype, decoder=decoder, backend=backend)
    else:
        sae = SparsifySparseCoder(coder.d_in, SparseCoderConfig(activation="topk", **common), coder.device,
                                  coder.dtype, decoder=decoder)
    # Same tensor names and layouts (W_skip [d_out, d_in] in both), so the state loads as is.
    state = {name: t.detach() for name, t in coder.state_dict().items()}
    sae.load_state_dict(state, strict=True)
    return sae


def from_sparsify(sae: SparsifySparseCoder, *, backend: Optional[str] = None) -> "_bk_coder.SparseCoder":
    """A sparsify coder (stock ``SparseCoder`` with "topk", or ``BinarySparseCoder``) as our SparseCoder."""
    cfg = sae.cfg
    activation = cfg.activation
    if activation not in ("topk", "topk_binary"):
        raise ValueError(f"no binsparse equivalent of sparsify activation {cfg.activation!r}")
    extra = {f.name: getattr(cfg, f.name) for f in fields(cfg)
             if f.name in ("ste", "ste_temperature", "init_threshold")}
    ours = _bk_coder.SparseCoderConfig(
        activation=activation, expansion_factor=cfg.expansion_factor, num_latents=sae.num_latents, k=cfg.k,
        normalize_decoder=cfg.normalize_decoder, transcode=cfg.transcode, skip_connection=cfg.skip_connection,
        multi_topk=cfg.multi_topk, **extra)
    coder = _bk_coder.SparseCoder(sae.d_in, ours, device=sae.device, dtype=sae.dtype,
                                  decoder=sae.W_dec is not None, backend=backend)
    state = {name: t.detach() for name, t in sae.state_dict().items()}
    coder.load_state_dict(state, strict=True)
    return coder


def load_sparsify(path: str | os.PathLike, device: str | torch.device = "cpu", *, decoder: bool = True,
                  backend: Optional[str] = None) -> SparsifySparseCoder:
    """Load one of our checkpoints (``SparseCoder.save_to_disk``) as a sparsify module.

    Continuous TopK coders without a skip connection also load with plain
    ``sparsify.SparseCoder.load_from_disk``; this function also handles binary coders and the
    skip connection's layout (see ``to_sparsify``).
    """
    coder = _bk_coder.SparseCoder.load_from_disk(path, device, decoder=decoder)
    return to_sparsify(coder, backend=backend)


# Keep a reference to the top-level package so ``sparsify.__version__`` is easy to report.
SPARSIFY_VERSION = getattr(sparsify, "__version__", "unknown")
