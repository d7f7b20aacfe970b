"""The offline interpretability proxy on constructed cases, and the delphi cache round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from binsparse_kernels.evaluation.interp import (export_delphi_cache, load_delphi_cache, render_context,
                                                 top_contexts, token_proxy)


def _codes_from_dense(dense: torch.Tensor, k: int):
    """Top-k codes [N, k] (indices, acts) of a dense [N, M] activation matrix (zeros where fewer fire)."""
    acts, indices = dense.topk(k, dim=1)
    return indices, acts


def test_token_latent_gets_f1_one_and_its_token_as_explanation():
    S, T, V, M = 16, 50, 20, 6
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (S, T), generator=g)
    flat = tokens.reshape(-1)
    dense = torch.zeros(S * T, M)
    dense[:, 0] = (flat == 7).float()  # fires exactly on token 7: F1 = 1
    dense[:, 1] = ((flat == 3) | (flat == 11)).float() * 2.5  # two tokens, continuous
    dense[:, 2] = (torch.rand(S * T, generator=g) < 0.3).float()  # fires independently of the token
    dense[:, 3] = ((flat == 5) & (torch.rand(S * T, generator=g) < 0.5)).float()  # on half of the 5s
    indices, acts = _codes_from_dense(dense, 3)
    p = token_proxy(tokens, indices, acts, M, min_examples=5)
    f1 = dict(zip(p.latents.tolist(), p.f1.tolist()))
    assert set(f1) == {0, 1, 2, 3}  # latents 4, 5 never fire
    assert f1[0] == pytest.approx(1.0)
    assert p.explanation(0) == [7]
    assert f1[1] == pytest.approx(1.0)
    assert sorted(p.explanation(1)) == [3, 11]
    assert f1[2] < 0.75  # a token set cannot predict a token-independent latent well
    # Latent 3: the explanation {5} has TPR 1 and FPR = (5s where it does not fire) / (tokens where it does not fire).
    tb = tokens[S // 2:].reshape(-1)
    fb = dense[(S // 2) * T:, 3] > 0
    tpr = 1.0
    fpr = float(((tb == 5) & ~fb).sum()) / float((~fb).sum())
    prec = tpr / (tpr + fpr)
    assert p.explanation(3) == [5]
    assert f1[3] == pytest.approx(2 * tpr * prec / (tpr + prec), rel=1e-5)
    # Natural-frequency F1 of latent 3 on split B: precision = firings / occurrences of token 5.
    nat = dict(zip(p.latents.tolist(), p.f1_natural.tolist()))
    precision = float(fb.sum()) / float((tb == 5).sum())
    assert nat[3] == pytest.approx(2 * precision / (precision + 1), rel=1e-5)
    # Frequency-weighted mean: weights are firing counts over all tokens.
    s = p.summary()
    counts = (dense[:, :4] > 0).sum(0).double()
    f1v = torch.tensor([f1[i] for i in range(4)], dtype=torch.float64)
    assert s["f1_weighted"] == pytest.approx(float((f1v * counts).sum() / counts.sum()), rel=1e-5)
    assert s["f1_mean"] == pytest.approx(float(f1v.mean()), rel=1e-5)


def test_proxy_uses_top_activating_examples_for_continuous_latents():
    # Latent 0 fires strongly on token 4 and weakly on many others: with n_examples small enough,
    # the explanation comes from the strong firings only.
    S, T = 6, 40
    tokens = torch.arange(S * T).remainder(10).reshape(S, T)
    flat = tokens.reshape(-1)
    dense = torch.zeros(S * T, 2)
    dense[:, 0] = torch.where(flat == 4, 5.0, torch.where(flat % 2 == 1, 0.1, 0.0))
    indices, acts = _codes_from_dense(dense, 1)
    p = token_proxy(tokens, indices, acts, 2, n_examples=int((flat[: (S // 2) * T] == 4).sum()), min_examples=1)
    assert p.explanation(0) == [4]


def test_proxy_checks_shapes():
    with pytest.raises(ValueError, match="at least 2 sequences"):
        token_proxy(torch.zeros(1, 5, dtype=torch.long), torch.zeros(5, 1, dtype=torch.long), torch.zeros(5, 1), 3)
    with pytest.raises(ValueError, match="codes must be"):
        token_proxy(torch.zeros(2, 5, dtype=torch.long), torch.zeros(7, 1, dtype=torch.long), torch.zeros(7, 1), 3)


def test_top_contexts_and_rendering():
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    indices = torch.tensor([[0], [1], [0], [0], [1], [0], [0], [1]])
    acts = torch.tensor([[0.5], [1.0], [2.0], [0.0], [1.0], [0.1], [0.2], [3.0]])
    top = top_contexts(tokens, indices, acts, 0, n=2)
    assert [(s, p) for s, p, _ in top] == [(0, 2), (0, 0)]
    text = render_context(tokens, 0, 2, lambda ids: " ".join(f"w{i}" for i in ids), before=1, after=1)
    assert text == "w2 [[w3]] w4"
    text = render_context(tokens, 1, 0, lambda ids: "".join(f"<{i}>" for i in ids), before=4, after=2)
    assert text == "[[<5>]]<6><7>"
    # Whitespace-only and empty tokens stay visible inside the marker; leading spaces stay outside.
    pieces = {1: "a", 2: " b", 3: "\n\n  ", 4: " c"}
    decode = lambda ids: "".join(pieces[i] for i in ids)
    assert render_context(tokens, 0, 1, decode) == "a [[b]] c"  # the newline after b collapses to a space
    assert render_context(tokens, 0, 2, decode) == "a b[[\\n\\n\u2423\u2423]] c"
    pieces[3] = ""
    assert render_context(tokens, 0, 2, decode) == "a b[[\u2205]] c"


def test_delphi_export_round_trip(tmp_path):
    S, T, M, k = 5, 16, 300, 4
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 1000, (S, T), generator=g)
    idx_b = torch.stack([torch.randperm(M, generator=g)[:k] for _ in range(S * T)])
    act_b = (torch.rand(S * T, k, generator=g) > 0.3).float()  # binary codes with unfired slots
    idx_c = torch.stack([torch.randperm(M, generator=g)[:k] for _ in range(S * T)])
    act_c = torch.rand(S * T, k, generator=g) + 0.01
    codes = {"layers.0.mlp": (idx_b, act_b), "layers.1": (idx_c, act_c)}
    out = export_delphi_cache(tmp_path / "cache", tokens, codes, {"layers.0.mlp": M, "layers.1": M}, n_splits=3,
                              model_name="tiny")

    for hook, (indices, acts) in codes.items():
        loc, act, tok = load_delphi_cache(out, hook)
        assert torch.equal(tok, tokens)
        fired = acts != 0
        rows = torch.arange(S * T)[:, None].expand_as(indices)[fired]
        expect = torch.stack([rows // T, rows % T, indices[fired]], 1)
        expect_act = acts[fired]
        order = torch.argsort((expect[:, 0] * T + expect[:, 1]) * M + expect[:, 2])
        assert torch.equal(loc, expect[order])
        assert torch.allclose(act, expect_act[order].half().float())
        files = sorted((out / "latents" / hook).glob("*.safetensors"))
        assert [f.name for f in files] == ["0_99.safetensors", "100_199.safetensors", "200_299.safetensors"]
        shard = load_file(str(files[1]))
        assert shard["locations"].dtype == np.uint16 and shard["activations"].dtype == np.float16
        assert shard["locations"][:, 2].max() < 100  # stored relative to the shard's first latent
        cfg = json.loads((out / "latents" / hook / "config.json").read_text())
        assert cfg["model_name"] == "tiny" and cfg["n_splits"] == 3
    counts = torch.load(out / "log" / "hookpoint_firing_counts.pt", weights_only=True)
    assert torch.equal(counts["layers.0.mlp"], torch.bincount(idx_b[act_b != 0], minlength=M))
    assert set(load_delphi_cache(out, "layers.0.mlp")[1].tolist()) == {1.0}
    assert "quantile" in (out / "README.md").read_text()


def _brute_force_proxy(tokens, dense, max_tokens, n_examples, min_examples):
    """The proxy written plainly from its definition, latent by latent, with Python loops over a dense
    [N, M] activation matrix (distinct activations, so "top examples" need no tie-breaking)."""
    S, T = tokens.shape
    flat = tokens.reshape(-1).tolist()
    n_a = (S // 2) * T
    A, B = range(0, n_a), range(n_a, S * T)
    out = {}
    for i in range(dense.shape[1]):
        col = dense[:, i].tolist()
        fires_a = [t for t in A if col[t] != 0]
        fires_b = [t for t in B if col[t] != 0]
        if len(fires_a) < min_examples or not fires_b:
            continue
        top = sorted(fires_a, key=lambda t: -col[t])[:n_examples]
        cands = sorted({flat[t] for t in top})
        fired_with = lambda tok, rng: sum(1 for t in rng if flat[t] == tok and col[t] != 0)
        occ = lambda tok, rng: sum(1 for t in rng if flat[t] == tok)
        ranked = sorted(cands, key=lambda tok: -(fired_with(tok, A) / occ(tok, A)))[:max_tokens]

        def f1(expl, rng, fires):
            pos = len(fires)
            neg = len(rng) - pos
            tp = sum(fired_with(tok, rng) for tok in expl)
            fp = sum(occ(tok, rng) for tok in expl) - tp
            if tp == 0:
                return 0.0
            tpr, fpr = tp / pos, fp / max(neg, 1)
            prec = tpr / (tpr + fpr)
            return 2 * tpr * prec / (tpr + prec)

        scores = [f1(ranked[:j + 1], A, fires_a) for j in range(len(ranked))]
        best = max(scores)
        length = next(j for j, s in enumerate(scores) if s >= best - 1e-12) + 1
        expl = ranked[:length]
        out[i] = (sorted(expl), f1(expl, B, fires_b))
    return out


def test_proxy_matches_a_brute_force_implementation():
    S, T, V, M, k = 12, 30, 15, 24, 4
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (S, T), generator=g)
    flat = tokens.reshape(-1)
    # Latents that prefer a few tokens, with noise: firing depends on the token and on chance.
    pref = torch.rand(M, V, generator=g) ** 3
    scores = pref[:, flat].T + 0.3 * torch.rand(S * T, M, generator=g)
    acts, indices = scores.topk(k, dim=1)
    acts = torch.where(acts > 0.6, acts, torch.zeros_like(acts))  # selected but below threshold: 0
    dense = torch.zeros(S * T, M).scatter_(1, indices, acts)
    p = token_proxy(tokens, indices, acts, M, max_tokens=4, n_examples=8, min_examples=3)
    expect = _brute_force_proxy(tokens, dense, max_tokens=4, n_examples=8, min_examples=3)
    assert len(expect) >= 5  # enough latents scored for the comparison to mean something
    assert sorted(p.latents.tolist()) == sorted(expect)
    for latent, f1 in zip(p.latents.tolist(), p.f1.tolist()):
        assert sorted(p.explanation(latent)) == expect[latent][0], latent
        assert f1 == pytest.approx(expect[latent][1], abs=1e-6), latent
