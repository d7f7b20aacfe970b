"""Run a language model with sparse coders spliced in, and evaluate them on held-out tokens.

Splicing replaces the output of the hooked module (``layers.9.mlp``: the MLP block; ``layers.9``: a
decoder layer) during the forward pass:

* an SAE (``transcode=False``) encodes the module's *output* and its reconstruction replaces it;
* a transcoder (``transcode=True``) encodes the module's *input* (for an MLP hookpoint: what the MLP
  reads) and its prediction replaces the module's output, so the MLP is computed by the coder.

``evaluate`` runs, per batch: one clean forward (capturing every hooked module's input and output),
one zero-ablation forward per hookpoint (the module's output set to 0, the baseline of the
SAELens/SAEBench scores), one spliced forward per (coder set, hookpoint), and, for coder sets with
several hookpoints, one forward with all of them spliced at once. Reconstruction and firing
statistics come from the clean forward's activations (the same activations a single-hookpoint
splice sees, since the modules upstream of the splice are unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..coder import SparseCoder
from ..models import Replacement, capture, replace_outputs, resolve_hookpoint
from .metrics import (FiringStats, ReconstructionStats, TokenLossStats, next_token_stats, part_summary,
                      splice_scores)


@torch.no_grad()
def reconstruct(coder: SparseCoder, x: Tensor, *, out_dtype: Optional[torch.dtype] = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """The coder's output for ``x`` [..., d_in]: (y_hat [..., d_out], acts [N, k], indices [N, k]).

    The coder runs in its own (checkpoint) dtype, whatever the LM's dtype; ``y_hat`` is returned in
    ``out_dtype`` (default: x's dtype, what a splice needs).
    """
    if x.shape[-1] != coder.d_in:
        raise ValueError(f"the coder expects width {coder.d_in}, the hooked activation has width {x.shape[-1]}")
    flat = x.reshape(-1, x.shape[-1]).to(coder.dtype)
    acts, indices, _ = coder.encode(flat)
    y = coder.decode(acts, indices)
    if coder.W_skip is not None:
        y = y + flat.to(y.dtype) @ coder.W_skip.to(y.dtype).T
    return y.reshape(*x.shape[:-1], coder.d_out).to(out_dtype or x.dtype), acts, indices


def coder_replacement(coder: SparseCoder) -> Replacement:
    """Transcoders read the module's input, SAEs its output."""
    if coder.cfg.transcode:
        return lambda inp, out: reconstruct(coder, inp)[0]
    return lambda inp, out: reconstruct(coder, out)[0]


def zero_replacement(inp: Tensor, out: Tensor) -> Tensor:
    return torch.zeros_like(out)


def splice(model: nn.Module, replacements: Mapping[str, Union[SparseCoder, Replacement]]):
    """Within the block (a context manager), each hookpoint's module output is replaced by its coder's
    output or by ``fn(input, output)``."""
    return replace_outputs(model, {h: coder_replacement(r) if isinstance(r, SparseCoder) else r
                                   for h, r in replacements.items()})


def _logits(model: nn.Module, batch: Tensor) -> Tensor:
    out = model(input_ids=batch, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, :-1].reshape(-1, logits.shape[-1])  # position t predicts token t + 1


def coder_info(coder: SparseCoder) -> dict:
    cfg = coder.cfg
    return {"activation": cfg.activation, "transcode": cfg.transcode, "skip_connection": cfg.skip_connection,
            "k": cfg.k, "num_latents": coder.num_latents, "d_in": coder.d_in, "d_out": coder.d_out}


@dataclass
class EvalResult:
    """What ``evaluate`` returns: JSON-ready ``results`` and the raw codes for the interpretability proxy."""

    results: dict
    tokens: Tensor  # [n_sequences, ctx_len] int64, the evaluated tokens
    # codes[variant][hookpoint] = (indices int32 [n_tokens, k], acts float32 [n_tokens, k]), tokens in
    # row-major order of ``tokens``; only kept with keep_codes=True.
    codes: dict = field(default_factory=dict)
    firing_counts: dict = field(default_factory=dict)  # [variant][hookpoint] = int64 [num_latents]
    proxies: dict = field(default_factory=dict)  # [variant][hookpoint] = interp.ProxyResult (filled by the CLI)


@torch.no_grad()
def evaluate(model: nn.Module, coder_sets: Mapping[str, Mapping[str, SparseCoder]], batches: Iterable[Tensor], *,
             zero_ablation: bool = True, all_at_once: bool = True, keep_codes: bool = True,
             progress: Optional[Callable[[int], None]] = None) -> EvalResult:
    """Evaluate coder sets ({variant: {hookpoint: coder}}) on token batches ([B, T] int64 each).

    Returns per variant and hookpoint: reconstruction metrics (FVU, explained variance, MSE,
    cossim, l2 ratio, relative reconstruction bias), firing statistics (L0, L1, dead, high-frequency
    counts, log10 histogram) and spliced-LM metrics (CE increase, KL(clean || spliced), accuracy drop,
    ce_loss_score, kl_div_score); per variant also the all-hookpoints-at-once splice.
    """
    if not coder_sets or not all(coder_sets.values()):
        raise ValueError("evaluate needs at least one coder set with at least one hookpoint")
    device = next(model.parameters()).device
    hookpoints = sorted({h for coders in coder_sets.values() for h in coders})
    for h in hookpoints:
        resolve_hookpoint(model, h)  # fail early on a bad name
    was_training = model.training
    model.eval()

    clean = TokenLossStats()
    zero = {h: TokenLossStats() for h in hookpoints} if zero_ablation else {}
    single = {v: {h: TokenLossStats() for h in cs} for v, cs in coder_sets.items()}
    together = {v: TokenLossStats() for v, cs in coder_sets.items() if all_at_once and len(cs) > 1}
    recon = {v: {h: ReconstructionStats() for h in cs} for v, cs in coder_sets.items()}
    firing = {v: {h: FiringStats(c.num_latents) for h, c in cs.items()} for v, cs in coder_sets.items()}
    codes = {v: {h: [] for h in cs} for v, cs in coder_sets.items()}
    all_tokens = []

    def run(batch, targets, clean_logp, stats, replacements):
        with splice(model, replacements):
            ce, kl, ok = next_token_stats(_logits(model, batch), targets, clean_logp)
        stats.update(ce, kl, ok)

    try:
        for batch in batches:
            if batch.dim() != 2:
                raise ValueError(f"token batches must be [batch, seq], got shape {tuple(batch.shape)}")
            if batch.shape[1] < 2:
                raise ValueError("sequences need at least 2 tokens to score next-token predictions")
            if all_tokens and batch.shape[1] != all_tokens[0].shape[1]:
                raise ValueError(f"all token batches must have the same sequence length "
                                 f"({all_tokens[0].shape[1]} then {batch.shape[1]})")
            batch = batch.to(device)
            all_tokens.append(batch.cpu())
            targets = batch[:, 1:].reshape(-1)
            with capture(model, hookpoints) as captured:
                logits = _logits(model, batch)
            clean_logp = torch.log_softmax(logits.float(), dim=-1)
            del logits
            ce, kl, ok = next_token_stats(clean_logp, targets, None)
            clean.update(ce, kl, ok)
            for h in zero:
                run(batch, targets, clean_logp, zero[h], {h: zero_replacement})
            for v, coders in coder_sets.items():
                for h, coder in coders.items():
                    inp, out = captured[h]
                    x = inp if coder.cfg.transcode else out
                    try:
                        y_hat, acts, indices = reconstruct(coder, x, out_dtype=torch.float32)
                    except ValueError as exc:
                        raise ValueError(f"variant {v!r}, hookpoint {h!r}: {exc}") from None
                    recon[v][h].update(out.reshape(-1, out.shape[-1]), y_hat.reshape(-1, y_hat.shape[-1]))
                    firing[v][h].update(acts, indices)
                    if keep_codes:
                        codes[v][h].append((indices.to(torch.int32).cpu(), acts.float().cpu()))
                    run(batch, targets, clean_logp, single[v][h], {h: coder})
                if v in together:
                    run(batch, targets, clean_logp, together[v], dict(coders))
            del clean_logp, captured
            if progress is not None:
                progress(batch.numel())
    finally:
        model.train(was_training)

    if not all_tokens:
        raise ValueError("no token batches to evaluate")
    clean_res = clean.result()
    n_tokens = sum(t.numel() for t in all_tokens)
    results = {
        "n_sequences": sum(t.shape[0] for t in all_tokens),
        "ctx_len": all_tokens[0].shape[1],
        "n_tokens": n_tokens,
        "n_predicted_tokens": clean.n,
        "clean": {"ce_loss": clean_res["ce_loss"], "accuracy": clean_res["accuracy"]},
        "variants": {},
    }
    zero_res = {h: s.result() for h, s in zero.items()}
    for v, coders in coder_sets.items():
        per_hook = {}
        for h, coder in coders.items():
            per_hook[h] = {**coder_info(coder), **recon[v][h].result(), **firing[v][h].result(),
                           **splice_scores(clean_res, single[v][h].result(), zero_res.get(h))}
            if coder.cfg.hybrid:  # latents [0, Mb) are binary, the rest continuous
                f, Mb = firing[v][h], coder.binary_latents
                per_hook[h]["hybrid_parts"] = {
                    "binary": part_summary(f.counts, f.n_tokens, 0, Mb),
                    "continuous": part_summary(f.counts, f.n_tokens, Mb, coder.num_latents)}
        entry = {"hookpoints": per_hook}
        if v in together:
            entry["all_hookpoints"] = splice_scores(clean_res, together[v].result(), None)
        results["variants"][v] = entry

    tokens = torch.cat(all_tokens)
    merged = {v: {h: (torch.cat([c[0] for c in parts]), torch.cat([c[1] for c in parts]))
                  for h, parts in hooks.items()} for v, hooks in codes.items()} if keep_codes else {}
    counts = {v: {h: firing[v][h].counts.clone() for h in cs} for v, cs in coder_sets.items()}
    return EvalResult(results=results, tokens=tokens, codes=merged, firing_counts=counts)
