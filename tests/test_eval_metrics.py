"""Evaluation metrics against independent computations on small synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from binsparse_kernels.evaluation.metrics import (HIST_LOG10_EDGES, FiringStats, ReconstructionStats, firing_summary,
                                                  frequency_weighted_mean, log10_histogram, next_token_stats,
                                                  splice_scores)


def test_reconstruction_stats_match_their_definitions_over_batches():
    y = torch.randn(300, 12) * torch.linspace(0.5, 3, 12) + 2.0  # non-zero mean: variance is about the mean
    y_hat = y + 0.3 * torch.randn(300, 12) - 0.1
    stats = ReconstructionStats()
    for s in range(0, 300, 70):  # uneven batches: the mean must be the global one
        stats.update(y[s:s + 70], y_hat[s:s + 70])
    r = stats.result()

    yn, hn = y.numpy().astype(np.float64), y_hat.numpy().astype(np.float64)
    fvu = ((yn - hn) ** 2).sum() / ((yn - yn.mean(0)) ** 2).sum()
    assert r["fvu"] == pytest.approx(fvu, rel=1e-9)
    # SAELens' explained variance: per-token residual and total sums of squares, averaged separately.
    rss = ((yn - hn) ** 2).sum(-1).mean()
    tss = ((yn - yn.mean(0)) ** 2).sum(-1).mean()
    assert r["explained_variance"] == pytest.approx(1 - rss / tss, rel=1e-9)
    assert r["mse"] == pytest.approx(((yn - hn) ** 2).mean(), rel=1e-9)
    cos = (yn * hn).sum(1) / (np.linalg.norm(yn, axis=1) * np.linalg.norm(hn, axis=1))
    assert r["cossim"] == pytest.approx(cos.mean(), rel=1e-9)
    assert r["l2_ratio"] == pytest.approx((np.linalg.norm(hn, axis=1) / np.linalg.norm(yn, axis=1)).mean(), rel=1e-9)
    assert r["relative_reconstruction_bias"] == pytest.approx((hn * hn).sum() / (hn * yn).sum(), rel=1e-9)


def test_reconstruction_stats_perfect_and_shrunk():
    y = torch.randn(64, 5)
    s = ReconstructionStats()
    s.update(y, y.clone())
    r = s.result()
    assert r["fvu"] == 0 and r["explained_variance"] == 1
    assert r["cossim"] == pytest.approx(1.0) and r["relative_reconstruction_bias"] == pytest.approx(1.0)
    s = ReconstructionStats()
    s.update(y, 0.5 * y)  # shrinkage: gamma = E[x_hat.x_hat] / E[x_hat.x] = 0.5
    assert s.result()["relative_reconstruction_bias"] == pytest.approx(0.5)


def test_reconstruction_stats_reject_bad_shapes():
    s = ReconstructionStats()
    with pytest.raises(ValueError, match="same shape"):
        s.update(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="no tokens"):
        s.result()


def test_firing_stats_binary_counts_ones_not_selection():
    M, N, k = 20, 50, 4
    g = torch.Generator().manual_seed(1)
    indices = torch.stack([torch.randperm(M, generator=g)[:k] for _ in range(N)])
    acts = (torch.rand(N, k, generator=g) > 0.4).float()  # selected but below threshold -> 0
    stats = FiringStats(M)
    stats.update(acts[:20], indices[:20])
    stats.update(acts[20:], indices[20:])
    r = stats.result()

    fired = np.zeros((N, M), dtype=bool)  # dense, independently
    for t in range(N):
        for j in range(k):
            if acts[t, j] == 1:
                fired[t, indices[t, j]] = True
    assert r["l0"] == pytest.approx(fired.sum(1).mean())
    counts = fired.sum(0)
    assert stats.counts.tolist() == counts.tolist()
    selected = np.zeros(M, dtype=bool)
    selected[indices.unique().numpy()] = True
    assert r["dead_count"] == int((counts == 0).sum())
    assert r["dead_count"] >= int((~selected).sum())  # selected-but-zero latents can still be dead
    assert r["dead_fraction"] == pytest.approx((counts == 0).mean())


def test_firing_stats_continuous_l0_l1():
    acts = torch.tensor([[0.5, 0.0, 2.0], [1.0, 3.0, 0.25]])
    indices = torch.tensor([[0, 1, 2], [2, 3, 4]])
    s = FiringStats(6)
    s.update(acts, indices)
    r = s.result()
    assert r["l0"] == pytest.approx(2.5)
    assert r["l1"] == pytest.approx((0.5 + 2.0 + 1.0 + 3.0 + 0.25) / 2)
    assert r["dead_count"] == 2  # latent 1 (selected with 0) and latent 5
    with pytest.raises(ValueError, match="out of range"):
        s.update(acts, indices + 4)


def test_high_frequency_counts_and_histogram():
    n = 1000
    counts = torch.tensor([0, 0, 1, 5, 99, 100, 101, 499, 500, 501, 999, 1000])
    r = firing_summary(counts, n)
    rates = counts.double() / n
    assert r["count_over_1pct"] == int((rates > 0.01).sum()) == 8
    assert r["count_over_10pct"] == int((rates > 0.1).sum()) == 6
    assert r["count_over_50pct"] == int((rates > 0.5).sum()) == 3
    assert r["frac_over_50pct"] == pytest.approx(3 / 12)
    assert r["dead_count"] == 2
    q = r["firing_rate_quantiles"]
    assert q["max"] == 1.0
    for name, level in (("p10", 10), ("p50", 50), ("p90", 90), ("p99", 99)):
        assert q[name] == pytest.approx(np.percentile(rates.numpy(), level)), name
    hist = r["firing_hist"]
    assert sum(hist["counts"]) == 10 and hist["dead"] == 2
    assert hist["log10_edges"] == HIST_LOG10_EDGES
    expected = np.histogram(np.clip(np.log10(rates[rates > 0].numpy()), -8, 0), bins=HIST_LOG10_EDGES)[0]
    assert hist["counts"] == expected.tolist()


def test_log10_histogram_clamps_tiny_rates_into_first_bin():
    h = log10_histogram(torch.tensor([1e-12, 0.0, 1.0]))
    assert h["counts"][0] == 1 and h["counts"][-1] == 1 and h["dead"] == 1


def test_next_token_stats_match_torch():
    logits = torch.randn(37, 11)
    clean = torch.randn(37, 11)
    targets = torch.randint(0, 11, (37,))
    clean_logp = torch.log_softmax(clean, -1)
    ce, kl, ok = next_token_stats(logits, targets, clean_logp, chunk=8)
    assert torch.allclose(ce, F.cross_entropy(logits, targets, reduction="none"), atol=1e-6)
    ref_kl = F.kl_div(torch.log_softmax(logits, -1), clean_logp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl, ref_kl, atol=1e-6)
    assert torch.equal(ok, logits.argmax(-1) == targets)
    _, kl_self, _ = next_token_stats(clean, targets, clean_logp)
    assert kl_self.abs().max() < 1e-6


def test_splice_scores_formulas():
    clean = {"ce_loss": 2.0, "kl_div": 0.0, "accuracy": 0.5}
    spliced = {"ce_loss": 2.5, "kl_div": 0.4, "accuracy": 0.45}
    zero = {"ce_loss": 7.0, "kl_div": 4.0, "accuracy": 0.1}
    s = splice_scores(clean, spliced, zero)
    assert s["ce_increase"] == pytest.approx(0.5)
    assert s["accuracy_drop"] == pytest.approx(0.05)
    assert s["ce_loss_score"] == pytest.approx((7.0 - 2.5) / (7.0 - 2.0))
    assert s["kl_div_score"] == pytest.approx((4.0 - 0.4) / 4.0)
    assert "ce_loss_score" not in splice_scores(clean, spliced, None)


def test_frequency_weighted_mean():
    f1 = torch.tensor([1.0, 0.0, 0.5])
    c = torch.tensor([1, 3, 4])
    assert frequency_weighted_mean(f1, c) == pytest.approx((1.0 + 0.0 + 2.0) / 8)
    assert math.isnan(frequency_weighted_mean(f1, torch.zeros(3)))


def test_high_frequency_and_dead_counts_use_firing_not_selection():
    """Constructed binary codes over 100 tokens, k = 3 slots always holding latents 0, 1, 2:
    latent 0 fires (act 1) on 60 tokens, latent 1 on 20, latent 2 is selected everywhere and never
    fires. Counting selections would call all three >50% and none dead."""
    N, M = 100, 8
    indices = torch.tensor([[0, 1, 2]] * N)
    acts = torch.zeros(N, 3)
    acts[:60, 0] = 1
    acts[:20, 1] = 1
    s = FiringStats(M)
    s.update(acts, indices)
    r = s.result()
    assert r["count_over_50pct"] == 1 and r["frac_over_50pct"] == pytest.approx(1 / M)
    assert r["count_over_10pct"] == 2 and r["frac_over_10pct"] == pytest.approx(2 / M)
    assert r["dead_count"] == M - 2 and r["dead_fraction"] == pytest.approx((M - 2) / M)
    assert r["l0"] == pytest.approx(0.8)  # (60 + 20) firings / 100 tokens
    assert s.firing_rates()[:3].tolist() == [0.6, 0.2, 0.0]
