"""What users would run without this package, and the package's own backends, behind one interface.

Every implementation ("impl") offers

    encode(x, W_enc, b_enc, log_threshold, k, binary, temperature) -> (acts, indices, values)
    decode(indices, acts, W_dec, b_dec, binary)                     -> y
    wrap(fn)                                                         -> fn, or fn compiled
    supports(case) / exact(case)                                     -> which cases it runs, and
                                                                        whether it computes the case's own math

with the semantics of ``binsparse_kernels.topk_binary_encode`` / ``topk_encode`` / ``sparse_decode``
(binary: ``acts = 1[z > 0]`` at the top-k of ``z = x W_enc^T + b_enc - exp(log_threshold)`` with the
sigmoid straight-through estimator, no 1/T factor; continuous: top-k of ReLU). Weights may be float32
masters while ``x`` is bfloat16: every impl computes in the dtype of ``x`` (weights rounded to it),
as autocast would.

The baselines:

* ``eager``: ``F.linear`` + ``torch.topk`` + ``F.embedding_bag``, gradients by plain autograd (the
  top-k backward scatters into a dense N x M gradient and ``F.linear``'s backward is a dense GEMM).
* ``compile``: the same code under ``torch.compile`` (``dynamic=False``, a fresh compile per case).
* ``sparsify``: the installed EleutherAI ``sparsify`` library itself (``eai-sparsify`` on PyPI): its
  fused encoder (``sparsify.fused_encoder``: ``F.linear`` + ReLU + ``torch.topk`` forward, a sparse
  ``index_add_`` backward), its decoder (its Triton ``embedding_bag`` on a GPU; on a CPU its own
  eager fallback, ``F.embedding_bag``, which the library picks wherever its Triton kernel cannot
  run) and, for steps, its ``SparseCoder`` module. The library has TopK coders only: on ``binary``
  cases it runs its TopK coder at the same shape (what a user of the library would train instead),
  so its rows there are not the case's math (no output check).
* ``saelens``: SAELens' TopK SAE (``TopKTrainingSAE``, ``training_forward_pass``: a dense N x M
  activation matrix and a dense decode GEMM) and the gradient clipping its trainer does every
  step; training steps of SAEs (``bae``) only, TopK on ``binary`` cases as above.
* ``binary-reference-formulation``: the binary coder's reference trainer (the paper's code, which is
  not on PyPI), re-implemented here from its description, binary cases only: ``F.linear`` +
  ``torch.topk`` forward (subtract the threshold in float32, binarize), decode by gathering the
  selected rows, and a hand-written backward that builds an ``[N*k, d]`` product of per-slot
  gradients and gathered rows and ``index_add_``s it into the dense weight gradient, in chunks of tokens.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import binsparse_kernels as bk

BASELINES = ("eager", "compile", "sparsify", "saelens", "binary-reference-formulation")
FORMULATION = "binary-reference-formulation"

# Tokens per chunk of the binary reference formulation's [chunk*k, d] products (bounds their memory).
CONTRIB_CHUNK = 4096


def _sigmoid_ste(values: Tensor, temperature: float) -> Tensor:
    """0/1 forward; backward d/dv = s(1-s) with s = sigmoid(v/T), the reference's convention (no 1/T)."""
    soft = torch.sigmoid(values / temperature) * temperature  # d/dv (T * sigmoid(v/T)) = s(1-s)
    hard = (values > 0).to(values.dtype)
    return hard + (soft - soft.detach())


# ----------------------------------------------------------------------------------------------
# eager / compile: plain PyTorch, autograd does the backward
# ----------------------------------------------------------------------------------------------


def eager_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, log_threshold: Tensor | None, k: int, binary: bool,
                 temperature: float = 2.0):
    pre = F.linear(x, W_enc.to(x.dtype), b_enc.to(x.dtype))
    if binary:
        z = pre - log_threshold.exp()  # float32 threshold: z (and its top-k) in float32, as in the trainer
        values, indices = z.topk(k, dim=1, sorted=False)
        acts = _sigmoid_ste(values, temperature).to(x.dtype)
        return acts, indices, values.to(x.dtype)
    values, indices = torch.relu(pre).topk(k, dim=1, sorted=False)
    return values, indices, values


def eager_decode(indices: Tensor, acts: Tensor, W_dec: Tensor, b_dec: Tensor | None, binary: bool) -> Tensor:
    y = F.embedding_bag(indices, W_dec.to(acts.dtype), per_sample_weights=acts, mode="sum")
    return y if b_dec is None else y + b_dec.to(y.dtype)


# ----------------------------------------------------------------------------------------------
# binary-reference-formulation: hand-written autograd.Functions, gathers and [N*k, d] index_add_ products
# ----------------------------------------------------------------------------------------------


def _token_chunks(N: int):
    for start in range(0, N, CONTRIB_CHUNK):
        yield start, min(N, start + CONTRIB_CHUNK)


def _index_add_rows(M: int, indices: Tensor, weights: Tensor, rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``out[indices[t, j]] += weights[t, j] * rows[t]`` as chunked ``[n*k, d]`` products, fp32 out."""
    N, k = indices.shape
    out = torch.zeros(M, rows.shape[1], dtype=torch.float32, device=rows.device)
    for a, b in _token_chunks(N):
        contributions = weights[a:b, :, None].to(dtype) * rows[a:b, None, :].to(dtype)  # [n, k, d]
        out.index_add_(0, indices[a:b].reshape(-1), contributions.reshape(-1, rows.shape[1]).float())
    return out


def _gather_dot(indices: Tensor, W: Tensor, rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``out[t, j] = W[indices[t, j]] . rows[t]`` by gathering the rows (fp32 out)."""
    out = []
    for a, b in _token_chunks(indices.shape[0]):
        gathered = W.to(dtype)[indices[a:b]].float()  # [n, k, d]
        out.append(torch.einsum("nkd,nd->nk", gathered, rows[a:b].float()))
    return torch.cat(out)


def _gather_sum(indices: Tensor, weights: Tensor, W: Tensor, dtype: torch.dtype) -> Tensor:
    """``out[t] = sum_j weights[t, j] * W[indices[t, j]]`` by gathering the rows (fp32 out)."""
    out = []
    for a, b in _token_chunks(indices.shape[0]):
        gathered = W.to(dtype)[indices[a:b]].float()
        out.append(torch.einsum("nk,nkd->nd", weights[a:b].float(), gathered))
    return torch.cat(out)


class FormulationEncode(torch.autograd.Function):
    """Encode with a sparse hand-written backward (only the selected latents get gradients)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, log_threshold, k: int, binary: bool, temperature: float):
        pre = F.linear(x, W_enc.to(x.dtype), b_enc.to(x.dtype))
        if binary:
            theta = log_threshold.exp()
            values, indices = (pre - theta).topk(k, dim=1, sorted=False)  # float32
            acts = (values > 0).to(x.dtype)
        else:
            theta = None
            values, indices = torch.relu(pre).topk(k, dim=1, sorted=False)
            acts = values
        ctx.save_for_backward(x, W_enc, indices, values, theta if binary else values.new_empty(0))
        ctx.binary, ctx.temperature = binary, temperature
        ctx.mark_non_differentiable(indices)
        return acts, indices, values.to(x.dtype, copy=True)  # a separate output tensor from acts

    @staticmethod
    def backward(ctx, grad_acts, _grad_indices, grad_values):
        x, W_enc, indices, values, theta = ctx.saved_tensors
        values = values.float()
        if ctx.binary:
            s = torch.sigmoid(values / ctx.temperature)
            grad_z = grad_acts.float() * s * (1 - s) + grad_values.float()
        else:
            grad_z = (grad_acts.float() + grad_values.float()) * (values > 0)
        M = W_enc.shape[0]
        flat_idx = indices.reshape(-1)
        grad_x = grad_W = grad_b = grad_t = None
        if ctx.needs_input_grad[0]:
            grad_x = _gather_sum(indices, grad_z, W_enc, x.dtype).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = _index_add_rows(M, indices, grad_z, x, x.dtype).to(W_enc.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_b = torch.zeros(M, dtype=torch.float32, device=x.device).index_add_(0, flat_idx, grad_z.reshape(-1))
            if ctx.binary and ctx.needs_input_grad[3]:
                grad_t = -grad_b * theta  # z = pre - exp(log_threshold)
        return grad_x, grad_W, grad_b, grad_t, None, None, None


class FormulationDecode(torch.autograd.Function):
    """Decode by gathering the selected rows; backward via [N*k, d] products + ``index_add_``."""

    @staticmethod
    def forward(ctx, indices, acts, W_dec):
        ctx.save_for_backward(indices, acts, W_dec)
        return _gather_sum(indices, acts, W_dec, acts.dtype).to(acts.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        indices, acts, W_dec = ctx.saved_tensors
        grad_acts = grad_W = None
        if ctx.needs_input_grad[1]:
            grad_acts = _gather_dot(indices, W_dec, grad_y, acts.dtype).to(acts.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = _index_add_rows(W_dec.shape[0], indices, acts, grad_y, acts.dtype).to(W_dec.dtype)
        return None, grad_acts, grad_W


def formulation_encode(x, W_enc, b_enc, log_threshold, k, binary, temperature=2.0):
    if not binary:
        log_threshold = None
    return FormulationEncode.apply(x, W_enc, b_enc, log_threshold, k, binary, float(temperature))


def formulation_decode(indices, acts, W_dec, b_dec, binary):
    y = FormulationDecode.apply(indices, acts, W_dec)
    return y if b_dec is None else y + b_dec.to(y.dtype)


# ----------------------------------------------------------------------------------------------
# sparsify (the installed library) and SAELens
# ----------------------------------------------------------------------------------------------


def _autocast_to(x: Tensor):
    """Autocast to x's dtype (a no-op for float32): how sparsify's SparseCoder runs its encoder."""
    return torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype != torch.float32)


def _sparsify_decoder(device: torch.device):
    """The library's decoder for ``device``: its Triton embedding_bag on a GPU, its eager fallback elsewhere."""
    from sparsify import utils

    return utils.triton_decode if device.type == "cuda" else utils.eager_decode


class _SparsifyDecoder:
    """Within the block, ``sparsify.SparseCoder`` decodes with ``_sparsify_decoder(device)`` (the
    library binds its decoder once at import: the Triton one whenever Triton is installed)."""

    def __init__(self, device: torch.device):
        self.decoder = _sparsify_decoder(device)

    def __enter__(self):
        from sparsify import sparse_coder

        self.saved = sparse_coder.decoder_impl
        sparse_coder.decoder_impl = self.decoder

    def __exit__(self, *exc):
        from sparsify import sparse_coder

        sparse_coder.decoder_impl = self.saved


def sparsify_encode(x, W_enc, b_enc, log_threshold, k, binary, temperature=2.0):
    """sparsify's fused encoder (TopK: ``binary`` cannot be honoured, see the module docstring)."""
    from sparsify.fused_encoder import fused_encoder

    with _autocast_to(x):
        acts, indices, _pre_acts = fused_encoder(x, W_enc, b_enc, k, "topk")
    return acts, indices, acts


def sparsify_decode(indices, acts, W_dec, b_dec, binary):
    """sparsify's ``SparseCoder.decode``: acts cast to the weights' dtype, the library's decoder, + b_dec."""
    y = _sparsify_decoder(acts.device)(indices, acts.to(W_dec.dtype), W_dec.mT)
    return y if b_dec is None else y + b_dec


def sparsify_step(case, inputs, device):
    """The library's own ``SparseCoder`` with the case's weights: (module, loss, before, after)."""
    from sparsify import SparseCoder as LibCoder
    from sparsify import SparseCoderConfig as LibConfig

    btc = case.coder == "btc"
    cfg = LibConfig(activation="topk", num_latents=case.M, k=case.k, transcode=btc, skip_connection=btc,
                    normalize_decoder=not btc)
    coder = LibCoder(case.d, cfg, device=device, dtype=torch.float32)
    with torch.no_grad():
        coder.encoder.weight.copy_(inputs.W_enc)
        coder.encoder.bias.copy_(inputs.b_enc)
        coder.W_dec.copy_(inputs.W_dec if not btc else inputs.W_dec * 0.1)
        coder.b_dec.copy_(inputs.b_dec)
        if coder.W_skip is not None:
            coder.W_skip.normal_(0, 0.01 / case.d**0.5, generator=torch.Generator(device).manual_seed(1))
    decoder = _SparsifyDecoder(device)

    def loss(x, y):
        with decoder:
            return coder(x, y if btc else None).fvu

    if btc:
        return coder, loss, None, None
    return coder, loss, coder.set_decoder_norm_to_unit_norm, coder.remove_gradient_parallel_to_decoder_directions


def saelens_step(case, inputs, device):
    """SAELens' TopK training SAE with the case's weights: (module, loss, before, after); ``after``
    clips the gradient norm to 1 as ``SAETrainer._train_step`` does."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    if case.coder != "bae":
        raise ValueError("the saelens baseline covers SAE steps (bae) only")
    cfg = TopKTrainingSAEConfig(d_in=case.d, d_sae=case.M, k=case.k, dtype="float32", device=str(device))
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(inputs.W_enc.T)
        sae.b_enc.copy_(inputs.b_enc)
        sae.W_dec.copy_(inputs.W_dec)
        sae.b_dec.copy_(inputs.b_dec)
    sae.train()

    def loss(x, y):
        step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0,
                              is_logging_step=False)
        return sae.training_forward_pass(step).loss

    return sae, loss, None, lambda: torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)


# ----------------------------------------------------------------------------------------------
# The uniform interface
# ----------------------------------------------------------------------------------------------


class Impl:
    """One implementation under test: a package backend or a baseline.

    ``variants``: the variants it computes exactly; ``topk_stand_in``: it also runs ``binary``
    cases, with its TopK coder; ``ops`` / ``coders``: the ops and step coders it runs;
    ``make_step(case, inputs, device) -> (module, loss(x, y), before, after)``: a library's own
    training module for steps (``before``: runs before the forward, e.g. the decoder renorm;
    ``after``: between the backward and the optimizer step), instead of ``coder_fvu``.
    """

    def __init__(self, name: str, kind: str, encode: Callable, decode: Callable, compiled: bool = False, *,
                 variants=("binary", "topk"), topk_stand_in: bool = False, ops=("encode", "decode", "backward", "step"),
                 coders=("bae", "btc"), make_step: Optional[Callable] = None):
        self.name, self.kind, self.compiled = name, kind, compiled
        self.encode, self.decode = encode, decode
        self.variants, self.topk_stand_in, self.ops, self.coders = variants, topk_stand_in, ops, coders
        self.make_step = make_step

    def supports(self, case) -> bool:
        if case.op not in self.ops or (case.op == "step" and case.coder not in self.coders):
            return False
        return case.variant in self.variants or (case.variant == "binary" and self.topk_stand_in)

    def exact(self, case) -> bool:
        """Whether it computes the case's own math (False: its TopK coder stands in for a binary one)."""
        return case.variant in self.variants

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` as this impl runs it: compiled (afresh, static shapes) for the compile baseline."""
        if not self.compiled:
            return fn
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no automatic dynamic shapes
        return torch.compile(fn, dynamic=False)

    def __repr__(self) -> str:
        return f"Impl({self.name!r}, {self.kind})"


def backend_impl(name: str) -> Impl:
    """A package backend through the public ops (what ``SparseCoder(backend=name)`` calls)."""

    def encode(x, W_enc, b_enc, log_threshold, k, binary, temperature=2.0):
        if binary:
            return bk.topk_binary_encode(x, W_enc, b_enc, log_threshold, k, ste="sigmoid", temperature=temperature,
                                         backend=name)
        return bk.topk_encode(x, W_enc, b_enc, k, backend=name)

    def decode(indices, acts, W_dec, b_dec, binary):
        return bk.sparse_decode(indices, acts, W_dec, b_dec, binary=binary, backend=name)

    return Impl(name, "backend", encode, decode)


def _unavailable(*args, **kwargs):
    raise RuntimeError("this baseline runs whole training steps only")


def baseline_impl(name: str) -> Impl:
    if name == "eager":
        return Impl(name, "baseline", eager_encode, eager_decode)
    if name == "compile":
        return Impl(name, "baseline", eager_encode, eager_decode, compiled=True)
    if name == "sparsify":
        return Impl(name, "baseline", sparsify_encode, sparsify_decode, variants=("topk",), topk_stand_in=True,
                    make_step=sparsify_step)
    if name == "saelens":
        return Impl(name, "baseline", _unavailable, _unavailable, variants=("topk",), topk_stand_in=True,
                    ops=("step",), coders=("bae",), make_step=saelens_step)
    if name == FORMULATION:
        return Impl(name, "baseline", formulation_encode, formulation_decode, variants=("binary",))
    raise ValueError(f"unknown baseline {name!r}; choose from {list(BASELINES)}")


def make_impl(name: str) -> Impl:
    if name in BASELINES:
        return baseline_impl(name)
    if name in bk.backends.NAMES:
        reason = bk.backends.unavailable_reason(name)
        if reason is not None:
            raise RuntimeError(reason)
        return backend_impl(name)
    raise ValueError(f"unknown implementation {name!r}; choose from {list(bk.backends.NAMES) + list(BASELINES)}")


# ----------------------------------------------------------------------------------------------
# A sparse coder's forward with any impl (mirrors SparseCoder.forward for binary/TopK coders)
# ----------------------------------------------------------------------------------------------


def coder_fvu(coder, impl: Impl, x: Tensor, y: Tensor | None) -> Tensor:
    """FVU of ``coder`` on (x, y), encoding and decoding with ``impl``; same maths as ``coder(x, y).fvu``."""
    from binsparse_kernels.coder import fvu

    cfg = coder.cfg
    if cfg.hybrid or cfg.multi_topk or cfg.ste != "sigmoid":
        raise ValueError("baseline coders cover binary/TopK coders with the sigmoid STE, no multi-TopK")
    y = x if y is None else y
    xe = x if cfg.transcode else x - coder.b_dec
    if xe.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(xe.device.type):
        xe = xe.to(torch.get_autocast_dtype(xe.device.type))
    acts, indices, _ = impl.encode(xe, coder.encoder.weight, coder.encoder.bias, coder.log_threshold, cfg.k,
                                   cfg.binary, cfg.ste_temperature)
    out = impl.decode(indices, acts, coder.W_dec, coder.b_dec, cfg.binary)
    if coder.W_skip is not None:
        out = out + (x.to(out.dtype) @ coder.W_skip.to(out.dtype).T)
    return fvu(y, out)
