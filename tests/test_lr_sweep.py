"""The LR law (scaled to the batch size), the coders of a sweep, held-out scoring and the choice of LR."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from binsparse_kernels.coder import SparseCoder, SparseCoderConfig
from binsparse_kernels.train import cli as train_cli
from binsparse_kernels.train import sweep
from binsparse_kernels.train.trainer import REFERENCE_BATCH_TOKENS, TrainConfig, Trainer, default_lr


def test_lr_law_is_method_md_at_the_reference_batch_and_scales_with_its_square_root():
    M = 4608
    # method.md, written out independently: binary 3e-3 / sqrt(M / 2^15), continuous 5e-3 / sqrt(M / 2^14),
    # Adam 2e-4 / sqrt(M / 2^14), for the reference trainer's 32 x 2048 = 65,536-token batches
    assert REFERENCE_BATCH_TOKENS == 32 * 2048
    assert default_lr("signum", "topk_binary", M, 65_536) == pytest.approx(3e-3 * math.sqrt(32768 / 4608), rel=1e-12)
    assert default_lr("signum", "topk_hybrid", M, 65_536) == pytest.approx(3e-3 * math.sqrt(32768 / 4608), rel=1e-12)
    assert default_lr("signum", "topk", M, 65_536) == pytest.approx(5e-3 * math.sqrt(16384 / 4608), rel=1e-12)
    assert default_lr("adam", "topk_binary", M, 65_536) == pytest.approx(2e-4 * math.sqrt(16384 / 4608), rel=1e-12)
    assert default_lr("signum", "topk", M) == default_lr("signum", "topk", M, 65_536)
    # our default run's 8 x 256 = 2,048-token steps: 1/sqrt(32) of it; 4x the batch, 2x the LR
    for opt, act in (("signum", "topk_binary"), ("signum", "topk"), ("adam", "topk")):
        ref = default_lr(opt, act, M, 65_536)
        assert default_lr(opt, act, M, 2048) == pytest.approx(ref / math.sqrt(32), rel=1e-12)
        assert default_lr(opt, act, M, 4 * 2048) == pytest.approx(2 * default_lr(opt, act, M, 2048), rel=1e-12)


def test_the_trainer_uses_the_scaled_law_for_its_tokens_per_step(tmp_path):
    from test_eval_splice import tiny_lm

    chunks = torch.randint(0, 64, (40, 16))
    cfg = TrainConfig(model="tiny", hookpoints=["layers.1.mlp"], variants=["binary", "topk"], k=4, num_latents=64,
                      batch_size=4, ctx_len=16, grad_acc_steps=2, save_dir=str(tmp_path), device="cpu")
    trainer = Trainer(cfg, tiny_lm(), None, chunks=chunks, log=lambda *_: None)
    assert trainer.tokens_per_step == 4 * 16 * 2
    assert trainer.lrs["binary/layers.1.mlp"] == pytest.approx(3e-3 / math.sqrt(64 / 2**15) * math.sqrt(128 / 2**16))
    assert trainer.lrs["topk/layers.1.mlp"] == pytest.approx(5e-3 / math.sqrt(64 / 2**14) * math.sqrt(128 / 2**16))
    swept = Trainer(TrainConfig(**{**cfg.__dict__, "lr_sweep": [0.5, 2]}), tiny_lm(), None, chunks=chunks,
                    log=lambda *_: None)
    assert swept.lrs["lr_sweep/binary@2x/layers.1.mlp"] == pytest.approx(4 * swept.lrs["lr_sweep/binary@0.5x/layers.1.mlp"])
    assert swept.lrs["lr_sweep/binary@2x/layers.1.mlp"] == pytest.approx(2 * trainer.lrs["binary/layers.1.mlp"])


def law(variant, k):
    return {"binary": 1e-3, "topk": 2e-3}[variant] * k


def test_coder_specs():
    plain = sweep.coder_specs(["binary", "topk"], [32], law)
    assert [(s.name, s.family, s.lr, s.label) for s in plain] == [("binary", "binary", 0.032, ""),
                                                                 ("topk", "topk", 0.064, "")]
    grid = sweep.coder_specs(["binary"], [16, 32], law, multipliers=[3, 0.3, 1])
    assert [s.name for s in grid] == ["lr_sweep/binary-k16@0.3x", "lr_sweep/binary-k16@1x", "lr_sweep/binary-k16@3x",
                                      "lr_sweep/binary-k32@0.3x", "lr_sweep/binary-k32@1x", "lr_sweep/binary-k32@3x"]
    assert [s.family for s in grid] == ["binary-k16"] * 3 + ["binary-k32"] * 3
    assert [s.lr for s in grid[:3]] == pytest.approx([0.3 * 0.016, 0.016, 3 * 0.016])
    on_lr = sweep.coder_specs(["topk"], [8], law, lr=0.01, multipliers=[1, 10])
    assert [s.lr for s in on_lr] == pytest.approx([0.01, 0.1])
    values = sweep.coder_specs(["topk"], [8], law, values=[2e-3, 1e-3])
    assert [(s.name, s.lr, s.multiplier) for s in values] == [("lr_sweep/topk@lr0.001", 1e-3, None),
                                                               ("lr_sweep/topk@lr0.002", 2e-3, None)]


def test_held_out_score_matches_a_direct_computation():
    torch.manual_seed(1)
    coder = SparseCoder(8, SparseCoderConfig(activation="topk_binary", num_latents=24, k=3, transcode=True,
                                             skip_connection=True))
    with torch.no_grad():
        coder.W_dec.normal_(0, 0.5)
        coder.log_threshold.fill_(math.log(0.3))  # many selected latents stay below threshold: not fired
    xs, ys = [torch.randn(n, 8) for n in (5, 9, 4)], [torch.randn(n, 8) + 2 for n in (5, 9, 4)]
    score = sweep.HeldOutScore(coder.num_latents)
    acts_all, idx_all, yhat_all = [], [], []
    with torch.no_grad():
        for x, y in zip(xs, ys):
            out = coder(x, y)
            score.update(y, out.sae_out, out.latent_acts, out.latent_indices)
            acts_all.append(out.latent_acts), idx_all.append(out.latent_indices), yhat_all.append(out.sae_out)
    y, y_hat = torch.cat(ys).double(), torch.cat(yhat_all).double()
    acts, idx = torch.cat(acts_all), torch.cat(idx_all)
    res = score.result()
    assert res["fvu"] == pytest.approx(float((y - y_hat).square().sum() / (y - y.mean(0)).square().sum()), rel=1e-9)
    fired = set(idx[acts == 1].tolist())
    assert (acts == 0).any() and res["dead_fraction"] == pytest.approx(1 - len(fired) / 24)
    assert res["l0"] == pytest.approx(float((acts == 1).sum()) / 18) and res["tokens"] == 18


def test_choose_lowest_fvu_and_never_nan():
    specs = sweep.coder_specs(["binary", "topk"], [32], law, multipliers=[1, 3, 10])
    fvu = {"lr_sweep/binary@1x": 0.5, "lr_sweep/binary@3x": 0.3, "lr_sweep/binary@10x": float("nan"),
           "lr_sweep/topk@1x": 0.2, "lr_sweep/topk@3x": 0.2, "lr_sweep/topk@10x": 0.25}
    scores = {name: {"h1": {"fvu": v, "dead_fraction": 0.1, "l0": 3.0}, "h2": {"fvu": v, "dead_fraction": 0.3, "l0": 1.0}}
              for name, v in fvu.items()}
    chosen = sweep.choose(specs, scores)
    assert chosen["binary"].name == "lr_sweep/binary@3x"
    assert chosen["topk"].name == "lr_sweep/topk@1x"  # a tie goes to the smaller LR
    table = sweep.summary(specs, scores, chosen, selection="held-out sequences 16..31")
    assert table["chosen"]["binary"]["dead_fraction"] == pytest.approx(0.2)
    assert table["chosen"]["topk"]["at_edge_of_grid"] and not table["chosen"]["binary"]["at_edge_of_grid"]
    assert len(table["candidates"]) == 6 and table["criterion"] == sweep.CRITERION


def test_command_line_lr_grid_and_config_checks():
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    default = train_cli.config_from_args(parser.parse_args([]))
    assert default.lr_sweep == train_cli.DEFAULT_LR_SWEEP and not default.lr_sweep_values
    assert train_cli.config_from_args(parser.parse_args(["--lr", "0.01"])).lr_sweep == []
    assert train_cli.config_from_args(parser.parse_args(["--lr", "0.01", "--lr_sweep", "1,2"])).lr_sweep == [1, 2]
    assert train_cli.config_from_args(parser.parse_args(["--lr_sweep", "none"])).lr_sweep == []
    assert train_cli.config_from_args(parser.parse_args(["--lr_sweep_values", "1e-3,2e-3"])).lr_sweep_values == [1e-3, 2e-3]
    assert train_cli.config_from_args(parser.parse_args(["--k", "16", "32"])).k_values == [16, 32]
    with pytest.raises(SystemExit):
        train_cli.config_from_args(parser.parse_args(["--lr_sweep", "1", "--lr_sweep_values", "1e-3"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr_sweep", "1,x"])
    with pytest.raises(ValueError, match="> 0"):
        TrainConfig(lr_sweep=[1, -2])
    with pytest.raises(ValueError, match="distinct"):
        TrainConfig(k=[16, 16])
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(lr_sweep=[1], lr_sweep_values=[1e-3])
