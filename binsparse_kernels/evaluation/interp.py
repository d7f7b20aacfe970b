"""Interpretability: an offline token-set proxy, top activating contexts, and a delphi cache export.

The proxy (``token_proxy``) is NOT the paper's metric. The paper explains each latent with an LLM
and scores the explanation with delphi's detection/fuzzing F1. Offline, with no LLM, we use the
simplest explanation that can be checked mechanically:

1. Split the evaluated sequences in two halves: A (to explain) and B (to score).
2. Explanation of latent i = a set of at most ``max_tokens`` token ids. Candidates are the tokens on
   which i fires in its top ``n_examples`` activating contexts on A (the highest activations; for
   binary latents every firing has activation 1, so the examples are a seeded random sample of the
   firings). Candidates are ranked by how over-represented they are among i's firings, i.e. by
   P(i fires | token) on A (the firing-frequency ratio against the token's base rate), and the set
   is the prefix of that ranking with the best F1 on A.
3. Score on B: predict "fires" at a token iff the token is in the set; compare with the real
   firings. F1 is computed as in delphi's detection scoring on *balanced* data (as many firing as
   non-firing examples): recall = TPR, precision = TPR / (TPR + FPR). The natural-frequency F1
   (precision = TP / predicted positives on B) is reported too.

Latents are scored when they fire at least ``min_examples`` times on A and at least once on B. We
report the plain mean F1 and the frequency-weighted mean ``sum_i F1_i c_i / sum_i c_i`` (c_i = the
latent's firing count on all evaluated tokens), as the paper does, per hookpoint. The proxy only
measures how *token-specific* a latent is: a latent that tracks a concept spread over many tokens,
or one that depends on context, scores low even if an LLM could explain it.

For the real metric, ``export_delphi_cache`` writes the codes in delphi's latent-cache format; see
its docstring for how to run delphi on it.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import Tensor

from .metrics import frequency_weighted_mean


def _fired_pairs(indices: Tensor, acts: Tensor):
    """(row, latent, activation) of every firing (non-zero code) in codes [N, k]."""
    fired = acts != 0
    rows = torch.arange(indices.shape[0])[:, None].expand_as(indices)[fired]
    return rows, indices[fired].long(), acts[fired].float()


def _segment_ranks(groups: Tensor) -> Tensor:
    """Rank of each element within its run of equal values in the sorted ``groups``."""
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(groups.numel()) - torch.repeat_interleave(starts, counts)


def _segment_cumsum(values: Tensor, groups: Tensor) -> Tensor:
    """Cumulative sum of ``values`` restarting at each run of equal values in the sorted ``groups``."""
    c = torch.cumsum(values, 0)
    _, counts = torch.unique_consecutive(groups, return_counts=True)
    ends = torch.cumsum(counts, 0)
    offsets = torch.cat([c.new_zeros(1), c[ends[:-1] - 1]])
    return c - torch.repeat_interleave(offsets, counts)


def _balanced_f1(tp: Tensor, fp: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """F1 on balanced data: recall = TPR, precision = TPR / (TPR + FPR). 0 where nothing is right."""
    tpr = tp / pos.clamp_min(1)
    fpr = fp / neg.clamp_min(1)
    prec = tpr / (tpr + fpr).clamp_min(1e-30)
    return torch.where(tp > 0, 2 * tpr * prec / (tpr + prec).clamp_min(1e-30), torch.zeros_like(tpr))


@dataclass
class ProxyResult:
    latents: Tensor  # [n_scored] latent ids
    f1: Tensor  # [n_scored] balanced F1 on split B
    f1_natural: Tensor  # [n_scored] F1 at the natural firing frequency on split B
    weights: Tensor  # [n_scored] firing counts on all evaluated tokens
    explanation_latents: Tensor  # explanation (latent, token) pairs, for every scored latent
    explanation_tokens: Tensor

    def explanation(self, latent: int) -> list[int]:
        return self.explanation_tokens[self.explanation_latents == latent].tolist()

    def summary(self) -> dict:
        n = self.latents.numel()
        return {
            "n_scored": n,
            "f1_mean": float(self.f1.double().mean()) if n else float("nan"),
            "f1_weighted": frequency_weighted_mean(self.f1, self.weights) if n else float("nan"),
            "f1_natural_mean": float(self.f1_natural.double().mean()) if n else float("nan"),
            "f1_natural_weighted": frequency_weighted_mean(self.f1_natural, self.weights) if n else float("nan"),
        }


@torch.no_grad()
def token_proxy(tokens: Tensor, indices: Tensor, acts: Tensor, num_latents: int, *, max_tokens: int = 10,
                n_examples: int = 100, min_examples: int = 10, seed: int = 0) -> ProxyResult:
    """The token-set interpretability proxy (see the module docstring) for one coder at one hookpoint.

    ``tokens`` [S, T] are the evaluated sequences; ``indices``/``acts`` [S*T, k] their codes in
    row-major token order. The first S // 2 sequences explain, the rest score.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [sequences, seq_len], got shape {tuple(tokens.shape)}")
    S, T = tokens.shape
    if S < 2:
        raise ValueError("the proxy needs at least 2 sequences (one half explains, the other scores)")
    if indices.shape != acts.shape or indices.shape[0] != S * T:
        raise ValueError(f"codes must be [{S * T}, k] like the {S}x{T} tokens, got {tuple(indices.shape)} and "
                         f"{tuple(acts.shape)}")
    flat = tokens.reshape(-1).long().cpu()
    indices, acts = indices.cpu(), acts.cpu()
    V = int(flat.max()) + 1
    n_a = (S // 2) * T
    split = {"A": slice(0, n_a), "B": slice(n_a, S * T)}
    rows_all, lat_all, act_all = _fired_pairs(indices, acts)
    weights_all = torch.bincount(lat_all, minlength=num_latents)

    def split_stats(name):
        s = split[name]
        in_split = (rows_all >= s.start) & (rows_all < s.stop)
        rows, lat, act = rows_all[in_split], lat_all[in_split], act_all[in_split]
        tok = flat[rows]
        occ = torch.bincount(flat[s], minlength=V)
        pos = torch.bincount(lat, minlength=num_latents)
        keys, pair_counts = torch.unique(lat * V + tok, return_counts=True)  # sorted
        return dict(n=s.stop - s.start, rows=rows, lat=lat, act=act, tok=tok, occ=occ, pos=pos, keys=keys,
                    pair_counts=pair_counts)

    A, B = split_stats("A"), split_stats("B")

    def lookup(stats, keys):
        """Firing counts of (latent, token) pairs ``keys`` = latent * V + token in a split."""
        if stats["keys"].numel() == 0:
            return torch.zeros_like(keys)
        at = torch.searchsorted(stats["keys"], keys).clamp_max(stats["keys"].numel() - 1)
        return torch.where(stats["keys"][at] == keys, stats["pair_counts"][at], torch.zeros_like(keys))

    eligible = (A["pos"] >= min_examples) & (B["pos"] >= 1)
    # Top activating examples per latent on A: sort by (latent, -activation), random among ties.
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(A["lat"].numel(), generator=g)
    order = order[torch.argsort(-A["act"][order], stable=True)]
    order = order[torch.argsort(A["lat"][order], stable=True)]
    lat_s, tok_s = A["lat"][order], A["tok"][order]
    keep = (_segment_ranks(lat_s) < n_examples) & eligible[lat_s] if lat_s.numel() else lat_s.bool()
    cand = torch.unique(lat_s[keep] * V + tok_s[keep])
    c_lat, c_tok = cand // V, cand % V
    f = lookup(A, cand).double()
    o = A["occ"][c_tok].double()
    # Rank each latent's candidates by P(fires | token) on A, keep at most max_tokens.
    order = torch.argsort(-(f / o), stable=True)
    order = order[torch.argsort(c_lat[order], stable=True)]
    c_lat, c_tok, f, o = c_lat[order], c_tok[order], f[order], o[order]
    top = _segment_ranks(c_lat) < max_tokens if c_lat.numel() else c_lat.bool()
    c_lat, c_tok, f, o = c_lat[top], c_tok[top], f[top], o[top]
    rank = _segment_ranks(c_lat) if c_lat.numel() else c_lat
    if c_lat.numel():
        pos = A["pos"][c_lat].double()
        f1_prefix = _balanced_f1(_segment_cumsum(f, c_lat), _segment_cumsum(o - f, c_lat), pos, A["n"] - pos)
        best = torch.full((num_latents,), -1.0, dtype=torch.float64).scatter_reduce(0, c_lat, f1_prefix, "amax")
        # The shortest prefix reaching the best F1 on A.
        at_best = torch.where(f1_prefix >= best[c_lat] - 1e-12, rank, torch.full_like(rank, max_tokens))
        best_len = torch.full((num_latents,), max_tokens, dtype=rank.dtype).scatter_reduce(0, c_lat, at_best, "amin")
        chosen = rank <= best_len[c_lat]
        e_lat, e_tok = c_lat[chosen], c_tok[chosen]
    else:
        e_lat, e_tok = c_lat, c_tok

    scored = eligible.nonzero().squeeze(1)
    e_keys = e_lat * V + e_tok
    tp = torch.zeros(num_latents, dtype=torch.float64).index_add_(0, e_lat, lookup(B, e_keys).double())
    predicted = torch.zeros(num_latents, dtype=torch.float64).index_add_(0, e_lat, B["occ"][e_tok].double())
    pos_b = B["pos"].double()
    f1 = _balanced_f1(tp, predicted - tp, pos_b, B["n"] - pos_b)
    f1_nat = torch.where(tp > 0, 2 * tp / (predicted + pos_b).clamp_min(1), torch.zeros_like(tp))
    keep_e = eligible[e_lat]
    return ProxyResult(latents=scored, f1=f1[scored].float(), f1_natural=f1_nat[scored].float(),
                       weights=weights_all[scored], explanation_latents=e_lat[keep_e],
                       explanation_tokens=e_tok[keep_e])


# -- top activating contexts ----------------------------------------------------------------------


def top_contexts(tokens: Tensor, indices: Tensor, acts: Tensor, latent: int, *, n: int = 3, seed: int = 0
                 ) -> list[tuple[int, int, float]]:
    """Up to ``n`` (sequence, position, activation) of the latent's highest activations (ties, e.g.
    every firing of a binary latent, broken by a seeded random draw)."""
    T = tokens.shape[1]
    rows, lat, act = _fired_pairs(indices.cpu(), acts.cpu())
    mine = lat == latent
    rows, act = rows[mine], act[mine]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(rows.numel(), generator=g)
    order = order[torch.argsort(-act[order], stable=True)][:n]
    return [(int(r) // T, int(r) % T, float(a)) for r, a in zip(rows[order], act[order])]


def render_context(tokens: Tensor, seq: int, pos: int, decode, *, before: int = 12, after: int = 3) -> str:
    """Text around ``tokens[seq, pos]`` with that token marked as [[token]]; ``decode(list[int]) -> str``.

    Decodes growing prefixes of the window, so tokenizers that put spaces between tokens (or inside
    them) keep their spacing; falls back to decoding the three parts separately.
    """
    row = tokens[seq].tolist()
    window = row[max(0, pos - before):pos + 1 + after]
    n_left = min(pos, before)
    left, upto, full = decode(window[:n_left]), decode(window[:n_left + 1]), decode(window)
    if upto.startswith(left) and full.startswith(upto):
        mid, right = upto[len(left):], full[len(upto):]
    else:
        mid, right = decode(window[n_left:n_left + 1]), decode(window[n_left + 1:])
    lead = mid[:len(mid) - len(mid.lstrip())]  # keep the token's leading space outside the marker
    marked = mid.strip()
    if not marked:  # a whitespace-only (or empty) token stays visible inside the marker
        marked = mid.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣") or "∅"
        lead = ""
    text = f"{left}{lead}[[{marked}]]{right}"
    return " ".join(text.split())  # one line: newlines and runs of spaces collapse


# -- delphi cache export ----------------------------------------------------------------------------

DELPHI_README = """\
# Latent cache for EleutherAI delphi

Written by `binsparse eval --delphi_cache`. Layout (delphi's `LatentCache.save_splits` format):

    latents/<hookpoint>/<first>_<last>.safetensors   locations [n, 3] (sequence, position, latent - first),
                                                     uint16 (uint32 when too large); activations [n] float16;
                                                     tokens [sequences, seq_len]
    latents/<hookpoint>/config.json                  delphi's cache config + model_name
    log/hookpoint_firing_counts.pt                   {hookpoint: int64 firing count per latent}

Transcoders' latents were computed from the hooked module's *input*, SAEs' from its output.

How to score it: use delphi's Python API on `latents/` (`LatentDataset(raw_dir=".../latents",
modules=[hookpoint], sampler_cfg=..., constructor_cfg=..., tokenizer=...)`, then an explainer and a
detection/fuzzing scorer with a client of your choice); see docs/EVALUATION.md of binsparse_kernels
for a sketch. delphi's command line (`python -m delphi MODEL SPARSE_MODEL --name NAME`) skips its
own caching stage when `results/NAME/latents` is not empty, but it loads SPARSE_MODEL through
sparsify first, and stock sparsify refuses binary checkpoints (the extra `log_threshold`), so the
CLI route only works for continuous TopK coders. `model_name` in config.json must name a tokenizer
delphi can load (edit it if the model was a local GGUF file). delphi scores each latent; weight the
scores by `hookpoint_firing_counts.pt` for the frequency-weighted F1, and count the latents whose
explanation or score failed to parse.

WARNING for binary coders: every activation is exactly 1. delphi samples explanation and scoring
examples by activation *quantiles*; with all activations equal the quantile bins are arbitrary
slices of the firings (every example has the same activation, so "top" and "quantile" examples
are just random firings) and the explainer sees no activation strengths. Use the random sampler
for explanations (`SamplerConfig(train_type="random")`; the choices depend on the delphi version)
and compare coders under the same sampler settings. Mind `min_examples` (default 200): latents
with fewer firings in the cache are skipped, so cache enough tokens.
"""


def export_delphi_cache(out_dir: str | os.PathLike, tokens: Tensor, codes: Mapping[str, tuple[Tensor, Tensor]],
                        num_latents: Mapping[str, int], *, n_splits: int = 5, model_name: str = "",
                        dataset: Optional[dict] = None) -> Path:
    """Write codes ({hookpoint: (indices [S*T, k], acts [S*T, k])}) as a delphi latent cache.

    Latents are split into ``n_splits`` contiguous ranges (delphi's ``save_splits``); locations are
    stored relative to the range's first latent, as uint16 when they fit, else uint32.
    """
    out = Path(out_dir)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [sequences, seq_len], got shape {tuple(tokens.shape)}")
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    S, T = tokens.shape
    tokens_np = tokens.cpu().numpy().astype(np.int64)
    firing_counts = {}
    for hookpoint, (indices, acts) in codes.items():
        M = num_latents[hookpoint]
        if indices.shape[0] != S * T:
            raise ValueError(f"{hookpoint}: codes cover {indices.shape[0]} tokens, tokens hold {S * T}")
        rows, lat, act = _fired_pairs(indices.cpu(), acts.cpu())
        order = torch.argsort(rows * M + lat)  # delphi's cache order: by (sequence, position, latent)
        rows, lat, act = rows[order], lat[order], act[order]
        firing_counts[hookpoint] = torch.bincount(lat, minlength=M)
        if bool((act.abs() <= 1e-5).any()):
            warnings.warn(f"{hookpoint}: some activations are <= 1e-5; delphi's own cache would drop them")
        locations = torch.stack([rows // T, rows % T, lat], 1)
        hook_dir = out / "latents" / hookpoint
        hook_dir.mkdir(parents=True, exist_ok=True)
        bounds = torch.linspace(0, M, n_splits + 1).long()
        for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            if stop <= start:
                continue
            mask = (lat >= start) & (lat < stop)
            loc = locations[mask].clone()
            loc[:, 2] -= start
            fits16 = loc.numel() == 0 or (int(loc[:, 2].max()) < 2**16 and int(loc[:, 0].max()) < 2**16
                                          and int(loc[:, 1].max()) < 2**16)
            save_file({"locations": loc.numpy().astype(np.uint16 if fits16 else np.uint32),
                       "activations": act[mask].half().numpy(),
                       "tokens": tokens_np},
                      str(hook_dir / f"{start}_{stop - 1}.safetensors"))
        cfg = {"model_name": model_name, "n_tokens": S * T, "ctx_len": T, "cache_ctx_len": T, "n_splits": n_splits,
               "batch_size": S, "dataset_repo": "", "dataset_split": "", "dataset_name": "", "dataset_column": "text",
               "dataset_row": "text"}
        cfg |= dataset or {}
        (hook_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "log").mkdir(parents=True, exist_ok=True)
    torch.save(firing_counts, out / "log" / "hookpoint_firing_counts.pt")
    (out / "README.md").write_text(DELPHI_README)
    return out


def load_delphi_cache(out_dir: str | os.PathLike, hookpoint: str) -> tuple[Tensor, Tensor, Tensor]:
    """Read one hookpoint back: (locations [n, 3] int64 with absolute latent ids, activations float32,
    tokens [S, T] int64), locations sorted by (sequence, position, latent)."""
    hook_dir = Path(out_dir) / "latents" / hookpoint
    files = sorted(hook_dir.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[0]))
    if not files:
        raise FileNotFoundError(f"no cache shards in {hook_dir}")
    locs, acts, tokens = [], [], None
    for f in files:
        data = load_file(str(f))
        loc = torch.from_numpy(data["locations"].astype(np.int64))
        loc[:, 2] += int(f.stem.split("_")[0])
        locs.append(loc)
        acts.append(torch.from_numpy(data["activations"].astype(np.float32)))
        tokens = torch.from_numpy(data["tokens"].astype(np.int64))
    loc, act = torch.cat(locs), torch.cat(acts)
    T = tokens.shape[1]
    order = torch.argsort((loc[:, 0] * T + loc[:, 1]) * (int(loc[:, 2].max()) + 1 if loc.numel() else 1) + loc[:, 2])
    return loc[order], act[order], tokens
