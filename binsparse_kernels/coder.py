"""``SparseCoder``: binary / TopK / hybrid sparse autoencoders and (skip) transcoders on the package's ops.

Parameter names, checkpoint layout and the ``encode``/``decode``/``forward`` signatures follow
EleutherAI's sparsify, so code written for it carries over:

    encoder.weight [M, d_in], encoder.bias [M], W_dec [M, d_out], b_dec [d_out],
    W_skip [d_out, d_in] (skip transcoders: + x @ W_skip.T, sparsify's layout), log_threshold [M_binary] (binary and hybrid coders).

A binary coder's checkpoint is marked by ``activation = "topk_binary"`` in cfg.json *and* the extra
``log_threshold`` tensor, so a loader that does not know binary coders refuses it (strict load:
unexpected key) instead of silently running it as a continuous one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ._io import atomic_write
from .ops import (EncoderOutput, sparse_decode, topk_binary_encode, topk_binary_encode_decode, topk_encode,
                  topk_encode_decode)

ACTIVATIONS = ("topk", "topk_binary", "topk_hybrid")
_ALIASES = {"hybrid": "topk_hybrid"}


def refuse_dense_binary(activation: str, where: str = "activation") -> None:
    """"binary" is not an alias of "topk_binary": on the paper's sparsify branch it is a dense binary
    coder (every latent above its threshold fires, no top-k), a different function. Loading such a
    checkpoint as a top-k coder would silently cap it at k firings per token."""
    if activation == "binary":
        raise ValueError(f"{where} 'binary' (the paper branch's dense binary coder, no top-k) is not "
                         "supported; the binary TopK coder is 'topk_binary'")


@dataclass
class SparseCoderConfig:
    """Architecture of one sparse coder (sparsify's field names, plus the binary/hybrid options)."""

    activation: str = "topk_binary"
    """"topk" (continuous, ReLU values), "topk_binary" (acts in {0,1}) or "topk_hybrid" (both)."""
    expansion_factor: int = 32
    num_latents: int = 0
    """Number of latents; 0 means d_in * expansion_factor."""
    k: int = 32
    normalize_decoder: bool = True
    """Keep unit-norm decoder rows (SAEs only; transcoders are never normalised)."""
    transcode: bool = False
    skip_connection: bool = False
    multi_topk: bool = False
    ste: str = "sigmoid"
    ste_temperature: float = 2.0
    init_threshold: float = 0.004
    """theta at initialisation: log_threshold starts at log(init_threshold)."""
    hybrid_binary_fraction: float = 0.5
    """Hybrid coders: this fraction of the latents and of k is binary, the rest continuous."""

    def __post_init__(self):
        self.activation = _ALIASES.get(self.activation, self.activation)
        refuse_dense_binary(self.activation)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.ste not in ("sigmoid", "rectangle", "identity"):
            raise ValueError(f"ste must be 'sigmoid', 'rectangle' or 'identity', got {self.ste!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0.0 < self.hybrid_binary_fraction < 1.0:
            raise ValueError(f"hybrid_binary_fraction must be in (0, 1), got {self.hybrid_binary_fraction}")
        if self.skip_connection and not self.transcode:
            raise ValueError("skip_connection needs transcode=True (a skip connection maps input to output)")

    @property
    def binary(self) -> bool:
        return self.activation == "topk_binary"

    @property
    def hybrid(self) -> bool:
        return self.activation == "topk_hybrid"

    def latents(self, d_in: int) -> int:
        return self.num_latents or d_in * self.expansion_factor

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, drop_extra: bool = True) -> "SparseCoderConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown and not drop_extra:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**{key: value for key, value in d.items() if key in names})


class ForwardOutput(NamedTuple):
    sae_out: Tensor
    latent_acts: Tensor
    latent_indices: Tensor
    fvu: Tensor
    auxk_loss: Tensor
    multi_topk_fvu: Tensor


def _squared_error(y: Tensor, y_hat: Tensor) -> Tensor:
    return (y.float() - y_hat.float()).square().sum()


def _total_variance(y: Tensor) -> Tensor:
    """sum ||y - mean(y)||^2 in float32, clamped away from 0."""
    y = y.float()
    return (y - y.mean(0)).square().sum().clamp_min(torch.finfo(torch.float32).tiny)


def fvu(y: Tensor, y_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 (float32)."""
    return _squared_error(y, y_hat) / _total_variance(y)


@torch.no_grad()
def _score_bound(x: Tensor, W: Tensor, b: Tensor, theta: Optional[Tensor]) -> Tensor:
    """B >= |x_t . W_i + b_i| (+ theta_i) for every token and latent (Cauchy-Schwarz), float32, on device."""
    bound = x.float().norm(dim=1).max() * W.float().norm(dim=1).max() + b.float().abs().max()
    return bound + theta.float().max() if theta is not None else bound


def _atomic_save_file(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class SparseCoder(nn.Module):
    """A sparse autoencoder (``transcode=False``) or transcoder, binary / TopK / hybrid.

    ``backend`` picks the op implementation (None: the fastest available for the tensors' device).
    """

    def __init__(self, d_in: int, cfg: SparseCoderConfig, device=None, dtype=None, *, decoder: bool = True,
                 d_out: Optional[int] = None, backend: Optional[str] = None):
        super().__init__()
        if d_in < 1:
            raise ValueError(f"d_in must be >= 1, got {d_in}")
        self.cfg = cfg
        self.d_in = d_in
        self.d_out = d_out or d_in
        self.backend = backend
        M = cfg.latents(d_in)
        if cfg.k > M:
            raise ValueError(f"k={cfg.k} is larger than the number of latents ({M})")
        self.num_latents = M
        self.encoder = nn.Linear(d_in, M, device=device, dtype=dtype)  # uniform +-1/sqrt(d_in)
        self.encoder.bias.data.zero_()
        self.W_dec = None
        if decoder:
            if cfg.transcode:
                self.W_dec = nn.Parameter(torch.zeros(M, self.d_out, device=device, dtype=dtype))
            else:
                if self.d_out != d_in:
                    raise ValueError("an autoencoder (transcode=False) needs d_out == d_in")
                self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
                self.set_decoder_norm_to_unit_norm()
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, device=device, dtype=dtype))
        self.W_skip = (nn.Parameter(torch.zeros(self.d_out, d_in, device=device, dtype=dtype))
                       if cfg.skip_connection else None)
        n_threshold = self.binary_latents
        self.log_threshold = (nn.Parameter(torch.full((n_threshold,), math.log(cfg.init_threshold), device=device,
                                                       dtype=dtype)) if n_threshold else None)

    # -- shapes of the binary / continuous parts -------------------------------------------------

    @property
    def binary_latents(self) -> int:
        """Latents [0, binary_latents) are binary, the rest continuous."""
        if self.cfg.binary:
            return self.num_latents
        if self.cfg.hybrid:
            return min(self.num_latents - 1, max(1, round(self.cfg.hybrid_binary_fraction * self.num_latents)))
        return 0

    def binary_k(self, k: int) -> int:
        """How many of a token's k slots go to binary latents (they come first in the codes)."""
        if self.cfg.binary:
            return k
        if self.cfg.hybrid:
            Mb = self.binary_latents
            kb = min(k - 1, max(1, round(self.cfg.hybrid_binary_fraction * k)))
            return max(k - (self.num_latents - Mb), min(kb, Mb))
        return 0

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.weight.dtype

    # -- encode / decode -------------------------------------------------------------------------

    def _encode_input(self, x: Tensor) -> Tensor:
        # Autoencoders encode x - b_dec; transcoders encode their input as is.
        return x if self.cfg.transcode else x - self.b_dec

    def encode(self, x: Tensor, k: Optional[int] = None) -> EncoderOutput:
        """Top-k codes of ``x`` [N, d_in]: (top_acts, top_indices, pre_acts at the selected latents)."""
        k = k or self.cfg.k
        x = self._encode_input(x)
        W, b = self.encoder.weight, self.encoder.bias
        Mb, kb = self.binary_latents, self.binary_k(k)
        parts = []
        if kb:
            parts.append((topk_binary_encode(x, W[:Mb], b[:Mb], self.log_threshold, kb, ste=self.cfg.ste,
                                             temperature=self.cfg.ste_temperature, backend=self.backend), 0))
        if k - kb:
            parts.append((topk_encode(x, W[Mb:], b[Mb:], k - kb, backend=self.backend), Mb))
        if len(parts) == 1:
            return parts[0][0]
        return EncoderOutput(torch.cat([p.acts for p, _ in parts], 1),
                             torch.cat([p.indices + offset for p, offset in parts], 1),
                             torch.cat([p.values for p, _ in parts], 1))

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """``b_dec + sum of W_dec rows weighted by the codes`` (binary slots: a plain gather-sum)."""
        if self.W_dec is None:
            raise RuntimeError("this coder was loaded with decoder=False")
        kb = self.binary_k(top_acts.shape[1])
        if kb == top_acts.shape[1]:
            return sparse_decode(top_indices, top_acts, self.W_dec, self.b_dec, binary=True, backend=self.backend)
        if kb == 0:
            return sparse_decode(top_indices, top_acts, self.W_dec, self.b_dec, backend=self.backend)
        Mb = self.binary_latents
        y = sparse_decode(top_indices[:, :kb], top_acts[:, :kb], self.W_dec[:Mb], self.b_dec, binary=True,
                          backend=self.backend)
        return y + sparse_decode(top_indices[:, kb:] - Mb, top_acts[:, kb:], self.W_dec[Mb:], backend=self.backend)

    def _encode_decode(self, x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(decode(codes), codes.acts, codes.indices)`` for ``codes = encode(x, k)``, on the fused
        encode + decode ops: one backward op per part, which builds the index transpose once."""
        if self.W_dec is None:
            raise RuntimeError("this coder was loaded with decoder=False")
        xe = self._encode_input(x)
        W, b = self.encoder.weight, self.encoder.bias
        Mb, kb = self.binary_latents, self.binary_k(k)
        parts = []
        if kb:
            parts.append(topk_binary_encode_decode(xe, W[:Mb], b[:Mb], self.log_threshold, self.W_dec[:Mb], self.b_dec,
                                                   kb, ste=self.cfg.ste, temperature=self.cfg.ste_temperature,
                                                   backend=self.backend))
        if k - kb:
            parts.append(topk_encode_decode(xe, W[Mb:], b[Mb:], self.W_dec[Mb:], None if kb else self.b_dec, k - kb,
                                            backend=self.backend))
        if len(parts) == 1:
            return parts[0].y, parts[0].acts, parts[0].indices
        binary, continuous = parts
        return (binary.y + continuous.y, torch.cat([binary.acts, continuous.acts], 1),
                torch.cat([binary.indices, continuous.indices + Mb], 1))

    def forward(self, x: Tensor, y: Optional[Tensor] = None, *, dead_mask: Optional[Tensor] = None,
                auxk_alpha: float = 0.0) -> ForwardOutput:
        """Encode, decode and score. ``y`` is the target (defaults to ``x`` for autoencoders).

        AuxK runs when ``dead_mask`` is given and ``auxk_alpha > 0`` (see ``_auxk_loss``); nothing here
        reads tensor data on the host, so a step is free of device syncs (the ops' value checks aside).
        """
        if y is None:
            if self.cfg.transcode:
                raise ValueError("a transcoder needs its target y")
            y = x
        sae_out, top_acts, top_indices = self._encode_decode(x, self.cfg.k)
        sae_out = self._with_skip(x, sae_out)
        total_variance = _total_variance(y)
        zero = sae_out.new_zeros((), dtype=torch.float32)
        auxk_loss = zero
        if dead_mask is not None and auxk_alpha > 0:
            auxk_loss = self._auxk_loss(x, (y.float() - sae_out.float()).detach(), dead_mask, total_variance)
        multi_topk_fvu = zero
        if self.cfg.multi_topk:
            # The coder's whole prediction with 4k latents, skip path included (sparsify 1.3.3 leaves
            # W_skip out of its 4k reconstruction; see docs/TRAINING.md).
            out4, _, _ = self._encode_decode(x, min(4 * self.cfg.k, self.num_latents))
            out4 = self._with_skip(x, out4)
            multi_topk_fvu = _squared_error(y, out4) / total_variance
        fvu = _squared_error(y, sae_out) / total_variance
        return ForwardOutput(sae_out, top_acts, top_indices, fvu, auxk_loss, multi_topk_fvu)

    def _with_skip(self, x: Tensor, out: Tensor) -> Tensor:
        """``out + x @ W_skip.T`` for skip transcoders (sparsify's [d_out, d_in] layout)."""
        if self.W_skip is None:
            return out
        return out + x.to(out.dtype) @ self.W_skip.to(out.dtype).T

    def _auxk_loss(self, x: Tensor, residual: Tensor, dead_mask: Tensor, total_variance: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024, App. B.1), with sparsify 1.3.3's constants:

        the ``k_aux = d_out // 2`` dead latents with the highest scores reconstruct the detached
        residual ``y - y_hat`` without ``b_dec``, and
        ``loss = min(n_dead / k_aux, 1) * ||e_hat - residual||^2 / sum ||y - mean(y)||^2``.

        Each dead latent codes as what it is: a binary latent ``1[z > 0]`` (STE gradient, score z), a
        continuous one ``ReLU(pre)`` (score ReLU(pre)); a hybrid coder ranks its two parts together by
        score. No host reads and no data-dependent shapes: the live latents' biases are shifted below
        every dead latent's score and their slots zeroed, instead of selecting the dead rows with
        ``nonzero``. So the loss is exactly 0 (with zero gradients) when nothing is dead, and the
        extra memory is O(N * k_aux), never N x M.
        """
        half = self.d_out // 2  # sparsify's k_aux; the scale uses it even when M is smaller
        k_aux = min(half, self.num_latents)
        if k_aux < 1 or x.shape[0] == 0:
            return residual.new_zeros(())
        dead_mask = dead_mask.to(device=self.device, dtype=torch.bool)
        if dead_mask.shape != (self.num_latents,):
            raise ValueError(f"dead_mask must have shape ({self.num_latents},), got {tuple(dead_mask.shape)}")
        xe = self._encode_input(x)
        W, b = self.encoder.weight, self.encoder.bias
        theta = self.log_threshold.exp() if self.log_threshold is not None else None
        live_shift = _score_bound(xe, W, b, theta) * 2 + 1
        b_aux = b + torch.where(dead_mask, 0.0, -live_shift).to(b.dtype)
        Mb = self.binary_latents
        parts = []
        if Mb:
            out = topk_binary_encode(xe, W[:Mb], b_aux[:Mb], self.log_threshold, min(k_aux, Mb), ste=self.cfg.ste,
                                     temperature=self.cfg.ste_temperature, backend=self.backend)
            parts.append((out, 0))
        if self.num_latents - Mb:
            parts.append((topk_encode(xe, W[Mb:], b_aux[Mb:], min(k_aux, self.num_latents - Mb),
                                      backend=self.backend), Mb))
        acts = torch.cat([p.acts for p, _ in parts], 1)
        indices = torch.cat([p.indices + offset for p, offset in parts], 1)
        is_dead = dead_mask[indices]
        if len(parts) > 1:  # hybrid: the best k_aux of both parts' candidates, dead ones first
            scores = torch.cat([p.values for p, _ in parts], 1).float().masked_fill(~is_dead, -math.inf)
            keep = scores.topk(k_aux, dim=1, sorted=False).indices
            acts, indices, is_dead = acts.gather(1, keep), indices.gather(1, keep), is_dead.gather(1, keep)
        # A live latent never contributes, whatever the STE would give it.
        acts = acts * is_dead.to(acts.dtype)
        e_hat = sparse_decode(indices, acts, self.W_dec, binary=Mb == self.num_latents, backend=self.backend)
        scale = (dead_mask.sum() / half).clamp(max=1.0)
        return scale * _squared_error(residual, e_hat) / total_variance

    @torch.no_grad()
    def init_from_batch(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        """First-batch initialisation: ``b_dec = mean(y)``; transcoders also centre the
        pre-activations with ``b_enc = -mean(x) @ W_enc.T``."""
        y = x if y is None else y
        self.b_dec.data.copy_(y.float().mean(0).to(self.b_dec.dtype))
        if self.cfg.transcode:
            self.encoder.bias.data.copy_(-(x.float().mean(0) @ self.encoder.weight.float().T).to(self.dtype))

    # -- decoder norm (SAEs) ---------------------------------------------------------------------

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        if self.W_dec is None:
            return
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        if self.W_dec is None or self.W_dec.grad is None:
            return
        direction = self.W_dec.data / self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-12)
        parallel = (self.W_dec.grad * direction).sum(1, keepdim=True)
        self.W_dec.grad -= parallel * direction

    # -- checkpoints -------------------------------------------------------------------------------

    def save_to_disk(self, path: str | os.PathLike) -> None:
        """Write ``cfg.json`` and ``sae.safetensors`` into ``path``, each file atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous() for name, p in self.state_dict().items()}
        _atomic_save_file(tensors, path / "sae.safetensors", metadata={"format": "pt"})
        cfg = {**self.cfg.to_dict(), "d_in": self.d_in, "d_out": self.d_out}
        _atomic_write_text(json.dumps(cfg, indent=2), path / "cfg.json")

    @classmethod
    def load_from_disk(cls, path: str | os.PathLike, device="cpu", *, decoder: bool = True,
                       backend: Optional[str] = None) -> "SparseCoder":
        """Load a checkpoint folder written by ``save_to_disk`` (dtype taken from the file)."""
        path = Path(path)
        cfg_file, weights_file = path / "cfg.json", path / "sae.safetensors"
        for f in (cfg_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(f"not a sparse coder checkpoint: {f} is missing")
        raw = json.loads(cfg_file.read_text())
        d_in, d_out = raw.pop("d_in"), raw.pop("d_out", None)
        state = load_file(str(weights_file), device=str(device))
        if not decoder:
            state = {name: t for name, t in state.items() if name not in ("W_dec",)}
        dtype = state["encoder.weight"].dtype
        coder = cls(d_in, SparseCoderConfig.from_dict(raw), device=device, dtype=dtype, decoder=decoder,
                    d_out=d_out, backend=backend)
        coder.load_state_dict(state, strict=True)
        return coder

    load = load_from_disk

    @classmethod
    def load_many(cls, root: str | os.PathLike, device="cpu", **kwargs) -> dict[str, "SparseCoder"]:
        """Every checkpoint under ``root`` (``root/<hookpoint>/cfg.json``), keyed by hookpoint, natural order."""
        root = Path(root)
        found = sorted((p.parent for p in root.glob("**/cfg.json")), key=_natural_key)
        if not found:
            raise FileNotFoundError(f"no sparse coder checkpoints (cfg.json) under {root}")
        return {str(p.relative_to(root)): cls.load_from_disk(p, device, **kwargs) for p in found}

    # -- the Hugging Face Hub (binsparse_kernels.hub finds and fetches the files) -------------------

    @classmethod
    def load_from_hub(cls, repo_id: str, hookpoint: Optional[str] = None, *, revision: Optional[str] = None,
                      device="cpu", decoder: bool = True) -> "SparseCoder":
        """The coder at ``<hookpoint>/`` of a hub repo (sparsify's layout; stock sparsify TopK checkpoints too)."""
        from .hub import download_coder

        return cls.load_from_disk(download_coder(repo_id, hookpoint, revision=revision), device, decoder=decoder)

    @classmethod
    def load_many_from_hub(cls, repo_id: str, *, revision: Optional[str] = None, device="cpu",
                           pattern: Optional[str] = None, decoder: bool = True) -> dict[str, "SparseCoder"]:
        """Every coder of a hub repo whose folder matches the fnmatch ``pattern``, keyed by folder."""
        from .hub import download_coders

        return {folder: cls.load_from_disk(path, device, decoder=decoder)
                for folder, path in download_coders(repo_id, revision=revision, pattern=pattern).items()}

    def push_to_hub(self, repo_id: str, hookpoint: str, *, private: bool = False, dry_run: bool = False,
                    token=None) -> list[str]:
        """Upload this coder as ``<hookpoint>/`` of ``repo_id`` with a model card; returns the repo paths."""
        import tempfile

        from .hub import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            self.save_to_disk(Path(tmp) / hookpoint)
            return push_to_hub(Path(tmp) / hookpoint, repo_id, private=private, dry_run=dry_run, token=token)


def _natural_key(path: Path):
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


# sparsify's names, so existing code keeps working.
Sae = SparseCoder
SaeConfig = SparseCoderConfig
