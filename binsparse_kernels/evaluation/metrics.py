"""Evaluation metrics for sparse coders, accumulated over batches of held-out tokens.

Definitions (all sums run over every evaluated token, not per batch):

* FVU = sum_t ||y_t - y_hat_t||^2 / sum_t ||y_t - mean(y)||^2, with ``mean(y)`` the mean over all
  evaluated tokens. Explained variance = 1 - FVU (SAELens/SAEBench "explained_variance": the
  variance about the mean, numerator and denominator averaged separately). For an SAE ``y`` is the
  hooked activation, for a transcoder the MLP output it predicts.
* MSE = sum ||y - y_hat||^2 / (N * d).
* cossim = mean_t cos(y_t, y_hat_t); l2_ratio = mean_t ||y_hat_t|| / ||y_t||.
* relative reconstruction bias = E[y_hat . y_hat] / E[y_hat . y] (Rajamanoharan et al., gated SAEs;
  SAEBench "relative_reconstruction_bias"): 1 when unbiased, < 1 when the reconstruction shrinks.
* L0 = mean number of latents *firing* per token. A latent fires when its code is non-zero: for
  binary latents that is ``acts == 1``; a latent that was among the top k but did not pass its
  threshold (act 0) does not count. L1 = mean sum |acts| per token.
* firing rate of a latent = tokens on which it fires / tokens evaluated. Dead = never fired on the
  evaluated tokens (an eval-window estimate, not the trainer's 10M-token counter).
* Ultra-high-frequency latents: count and fraction firing on > 10% and > 50% of tokens (> 1% too).
* Firing-rate distribution: the log10 histogram on fixed bins (below) and quantiles (p10, p50, p90,
  p99, max) of the per-latent firing rates, dead latents included.
* Spliced-LM metrics (see ``splice.py``): ce_loss_score = (CE_zero - CE_spliced) / (CE_zero - CE_clean),
  kl_div_score = (KL_zero - KL_spliced) / KL_zero, with KL = KL(clean || other) per predicted token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Fixed log10 bins for firing-rate histograms, so histograms of different coders overlay exactly.
HIST_LOG10_EDGES = [round(-8.0 + 0.25 * i, 2) for i in range(33)]  # -8 .. 0
HIGH_FREQUENCY_THRESHOLDS = {"1pct": 0.01, "10pct": 0.10, "50pct": 0.50}


def _safe_div(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")


class ReconstructionStats:
    """Streams reconstruction metrics over batches of (target, reconstruction) rows."""

    def __init__(self):
        self.n = 0
        self.d = None
        self.sum_y = None
        self.sum_y2 = 0.0
        self.sse = 0.0
        self.sum_cos = 0.0
        self.sum_l2_ratio = 0.0
        self.sum_hat_dot_y = 0.0
        self.sum_hat_sq = 0.0

    @torch.no_grad()
    def update(self, y: Tensor, y_hat: Tensor) -> None:
        if y.dim() != 2 or y.shape != y_hat.shape:
            raise ValueError(f"expected y and y_hat of the same shape [N, d], got {tuple(y.shape)} and "
                             f"{tuple(y_hat.shape)}")
        if self.d is None:
            self.d = y.shape[1]
            self.sum_y = torch.zeros(self.d, dtype=torch.float64)
        elif y.shape[1] != self.d:
            raise ValueError(f"width changed between batches: {self.d} then {y.shape[1]}")
        y, y_hat = y.double(), y_hat.double()
        self.n += y.shape[0]
        self.sum_y += y.sum(0).cpu()
        self.sum_y2 += float(y.square().sum())
        self.sse += float((y - y_hat).square().sum())
        ny, nh = y.norm(dim=1), y_hat.norm(dim=1)
        tiny = torch.finfo(torch.float64).tiny
        self.sum_cos += float(((y * y_hat).sum(1) / (ny * nh).clamp_min(tiny)).sum())
        self.sum_l2_ratio += float((nh / ny.clamp_min(tiny)).sum())
        self.sum_hat_dot_y += float((y_hat * y).sum())
        self.sum_hat_sq += float(y_hat.square().sum())

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("no tokens were evaluated")
        total = self.sum_y2 - float(self.sum_y.square().sum()) / self.n  # sum ||y - mean||^2
        fvu = _safe_div(self.sse, total)
        return {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.sse / (self.n * self.d),
            "cossim": self.sum_cos / self.n,
            "l2_ratio": self.sum_l2_ratio / self.n,
            "relative_reconstruction_bias": _safe_div(self.sum_hat_sq, self.sum_hat_dot_y),
        }


class FiringStats:
    """Streams per-latent firing counts and L0/L1 from top-k codes ``acts``/``indices`` [N, k]."""

    def __init__(self, num_latents: int):
        if num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {num_latents}")
        self.num_latents = num_latents
        self.counts = torch.zeros(num_latents, dtype=torch.int64)
        self.n_tokens = 0
        self.l0_sum = 0
        self.l1_sum = 0.0

    @torch.no_grad()
    def update(self, acts: Tensor, indices: Tensor) -> None:
        if acts.shape != indices.shape or acts.dim() != 2:
            raise ValueError(f"expected acts and indices of the same shape [N, k], got {tuple(acts.shape)} "
                             f"and {tuple(indices.shape)}")
        fired = acts != 0  # binary codes: acts == 1; selected-but-below-threshold slots hold 0
        idx = indices[fired].long().cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_latents):
            raise ValueError(f"latent index out of range [0, {self.num_latents})")
        self.counts += torch.bincount(idx, minlength=self.num_latents)
        self.n_tokens += acts.shape[0]
        self.l0_sum += int(fired.sum())
        self.l1_sum += float(acts.double().abs().sum())

    def firing_rates(self) -> Tensor:
        return self.counts.double() / max(self.n_tokens, 1)

    def result(self) -> dict:
        if self.n_tokens == 0:
            raise ValueError("no tokens were evaluated")
        return firing_summary(self.counts, self.n_tokens) | {
            "l0": self.l0_sum / self.n_tokens,
            "l1": self.l1_sum / self.n_tokens,
        }


def firing_summary(counts: Tensor, n_tokens: int) -> dict:
    """Dead / alive / high-frequency counts and the log10 firing-rate histogram from firing counts."""
    M = counts.numel()
    rates = counts.double() / n_tokens
    dead = int((counts == 0).sum())
    out = {
        "num_latents": M,
        "n_tokens": int(n_tokens),
        "dead_count": dead,
        "dead_fraction": dead / M,
        "frac_alive": 1.0 - dead / M,
    }
    for name, threshold in HIGH_FREQUENCY_THRESHOLDS.items():
        n = int((rates > threshold).sum())
        out[f"count_over_{name}"] = n
        out[f"frac_over_{name}"] = n / M
    qs = torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
    q = torch.quantile(rates, qs).tolist() if M else [float("nan")] * 4
    out["firing_rate_quantiles"] = {"p10": q[0], "p50": q[1], "p90": q[2], "p99": q[3],
                                    "max": float(rates.max()) if M else float("nan")}
    out["firing_hist"] = log10_histogram(rates)
    return out


def part_summary(counts: Tensor, n_tokens: int, start: int, stop: int) -> dict:
    """Firing summary of the latents [start, stop) only (a hybrid coder's binary or continuous part),
    with their share of L0: sum of their firing counts / tokens (each token fires a latent at most once)."""
    part = counts[start:stop]
    out = firing_summary(part, n_tokens)
    out.pop("firing_hist")
    out["l0"] = float(part.sum()) / n_tokens
    return out


def log10_histogram(rates: Tensor) -> dict:
    """Histogram of log10(firing rate) of the live latents on the fixed ``HIST_LOG10_EDGES`` bins.

    Rates below the first edge go into the first bin; dead latents (rate 0) are counted apart.
    """
    live = rates[rates > 0].double()
    edges = torch.tensor(HIST_LOG10_EDGES, dtype=torch.float64)
    logs = live.log10().clamp(edges[0].item(), edges[-1].item())
    # bucketize with right=True puts x into bin i when edges[i-1] <= x < edges[i]; the top edge (rate 1) joins the last bin.
    bins = (torch.bucketize(logs, edges, right=True) - 1).clamp(0, len(edges) - 2)
    counts = torch.bincount(bins, minlength=len(edges) - 1)
    return {"log10_edges": list(HIST_LOG10_EDGES), "counts": counts.tolist(), "dead": int((rates == 0).sum())}


# -- language-model metrics ---------------------------------------------------------------------


class TokenLossStats:
    """Sums of next-token CE, KL(clean || this run) and accuracy over predicted tokens."""

    def __init__(self):
        self.n = 0
        self.ce = 0.0
        self.kl = 0.0
        self.correct = 0

    def update(self, ce: Tensor, kl: Tensor, correct: Tensor) -> None:
        self.n += ce.numel()
        self.ce += float(ce.double().sum())
        self.kl += float(kl.double().sum())
        self.correct += int(correct.sum())

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("no tokens were evaluated")
        return {"ce_loss": self.ce / self.n, "kl_div": self.kl / self.n, "accuracy": self.correct / self.n}


def next_token_stats(logits: Tensor, targets: Tensor, clean_logp: Tensor | None, chunk: int = 1024):
    """Per-token CE, KL(clean || logits) and top-1 correctness, in token chunks to bound memory.

    ``logits`` [N, V] predict ``targets`` [N]; ``clean_logp`` [N, V] are the clean run's log-probs
    (None: KL is 0, used for the clean run itself). Returns float32 tensors (ce, kl) and bool correct.
    """
    ces, kls, oks = [], [], []
    for s in range(0, logits.shape[0], chunk):
        logp = torch.log_softmax(logits[s:s + chunk].float(), dim=-1)
        t = targets[s:s + chunk]
        ces.append(-logp.gather(1, t[:, None]).squeeze(1))
        oks.append(logp.argmax(-1) == t)
        if clean_logp is None:
            kls.append(torch.zeros_like(ces[-1]))
        else:
            c = clean_logp[s:s + chunk].float()
            kls.append((c.exp() * (c - logp)).sum(-1).clamp_min(0.0))  # clamp: rounding below 0
    return torch.cat(ces), torch.cat(kls), torch.cat(oks)


def splice_scores(clean: dict, spliced: dict, zero: dict | None) -> dict:
    """CE increase, KL, accuracy drop and the SAELens/SAEBench scores from TokenLossStats results."""
    out = {
        "ce_loss_clean": clean["ce_loss"],
        "ce_loss_spliced": spliced["ce_loss"],
        "ce_increase": spliced["ce_loss"] - clean["ce_loss"],
        "kl_div": spliced["kl_div"],
        "accuracy_clean": clean["accuracy"],
        "accuracy_spliced": spliced["accuracy"],
        "accuracy_drop": clean["accuracy"] - spliced["accuracy"],
    }
    if zero is not None:
        out |= {
            "ce_loss_zero_ablation": zero["ce_loss"],
            "kl_div_zero_ablation": zero["kl_div"],
            "ce_loss_score": _safe_div(zero["ce_loss"] - spliced["ce_loss"], zero["ce_loss"] - clean["ce_loss"]),
            "kl_div_score": _safe_div(zero["kl_div"] - spliced["kl_div"], zero["kl_div"]),
        }
    return out


def frequency_weighted_mean(values: Tensor, weights: Tensor) -> float:
    """sum_i v_i w_i / sum_i w_i (the paper's frequency-weighted F1 with w = firing counts)."""
    w = weights.double()
    total = float(w.sum())
    return float((values.double() * w).sum()) / total if total > 0 else float("nan")


def nan_to_none(obj):
    """JSON cannot hold NaN/inf: replace them by None, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj
