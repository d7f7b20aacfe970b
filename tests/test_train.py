"""Short real trainings on the offline SmolLM2-135M's activations (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from binsparse_kernels.coder import SparseCoder
from binsparse_kernels.train import TrainConfig, Trainer
from binsparse_kernels import data as data_mod
from binsparse_kernels import models

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def lm():
    try:
        model, tok, _ = models.load_model(None)
    except FileNotFoundError as exc:
        pytest.fail(f"the offline model must be installed for these tests: {exc}")
    return model, tok


@pytest.fixture(scope="module")
def chunks(lm):
    import json as json_module
    import re

    texts = [json_module.__doc__, re.__doc__, torch.nn.Module.__doc__, data_mod.__doc__] * 3
    return data_mod.chunk_tokens(lm[1], texts, 64)


def config(tmp_path, **kw):
    base = dict(hookpoints=["layers.1.mlp"], variants=["binary", "topk"], k=8, expansion_factor=2, batch_size=4,
                ctx_len=64, max_tokens=4 * 64 * 40, save_dir=str(tmp_path), run_name="run", save_every=1000,
                log_every=5, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_training_learns_and_codes_are_binary(lm, chunks, tmp_path):
    # 256-token steps: the batch-scaled LR law would give 1/16 of the law; at the law's own value
    # (for M = 1152, binary 0.016, TopK 0.019) both coders learn within these 40 steps
    trainer = Trainer(config(tmp_path, lr=0.015), *lm, chunks=chunks, log=lambda *_: None)
    run_dir = trainer.train()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for variant in ("binary", "topk"):
        first, last = lines[0][f"fvu/{variant}/layers.1.mlp"], lines[-1][f"fvu/{variant}/layers.1.mlp"]
        assert last < 0.75 * first and last < 0.7, (variant, first, last)
    coder = SparseCoder.load(run_dir / "binary" / "layers.1.mlp")
    acts = trainer._activations(chunks[:2])["layers.1.mlp"][0]
    out = coder.encode(acts)
    assert set(out.acts.unique().tolist()) <= {0.0, 1.0}
    assert ((out.acts == 1).sum(1) <= 8).all()
    assert coder.cfg.transcode and coder.W_skip is not None
    # the saved weights are the schedule-free averaged ones (eval mode), not the train-mode ones
    live = trainer.coders["binary"]["layers.1.mlp"]
    assert not torch.allclose(live.encoder.weight, coder.encoder.weight, rtol=0, atol=1e-6)
    trainer.optimizers["binary/layers.1.mlp"][0].eval()  # the eval/train round trip may move the last bit
    for name, p in live.state_dict().items():
        torch.testing.assert_close(p, coder.state_dict()[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("optimizer", ["signum", "adam"])
def test_resume_continues_exactly(lm, chunks, tmp_path, optimizer):
    """Stopped by SIGTERM at step 3 and resumed to step 6 == six uninterrupted steps, bit for bit."""
    import os
    import signal

    steps = dict(max_tokens=4 * 64 * 6, save_every=3, log_every=1, optimizer=optimizer, lr_warmup_steps=2)
    straight = Trainer(config(tmp_path, run_name="straight", **steps), *lm, chunks=chunks, log=lambda *_: None)
    straight.train()

    first = Trainer(config(tmp_path, run_name="resumed", **steps), *lm, chunks=chunks, log=lambda *_: None)
    real_step = first._train_step

    def step_then_sigterm(autocast):
        record = real_step(autocast)
        if first.step == 2:  # the handler asks to stop after this (the third) step
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    first._train_step = step_then_sigterm
    first.train()
    assert first.step == 3
    second = Trainer(config(tmp_path, run_name="resumed", resume=True, **steps), *lm, chunks=chunks,
                     log=lambda *_: None)
    assert (second.step, second.tokens_seen) == (3, 3 * 4 * 64)
    second.train()
    assert second.step == 6
    for key, coder in straight._all_coders:
        resumed = dict(second._all_coders)[key]
        for name, p in coder.state_dict().items():
            assert torch.equal(p, resumed.state_dict()[name]), (key, name)
        assert torch.equal(straight.since_fired[key], second.since_fired[key])
    for variant in ("binary", "topk"):
        saved = SparseCoder.load(tmp_path / "resumed" / variant / "layers.1.mlp")
        ref = SparseCoder.load(tmp_path / "straight" / variant / "layers.1.mlp")
        for name, p in ref.state_dict().items():
            assert torch.equal(p, saved.state_dict()[name]), (variant, name)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_different_configuration(lm, chunks, tmp_path):
    Trainer(config(tmp_path, max_tokens=4 * 64), *lm, chunks=chunks, log=lambda *_: None).train()
    with pytest.raises(ValueError, match="has coders"):
        Trainer(config(tmp_path, variants=["binary", "hybrid"], resume=True), *lm, chunks=chunks)
    with pytest.raises(FileNotFoundError, match="no saved run"):
        Trainer(config(tmp_path, run_name="never", resume=True), *lm, chunks=chunks)


def test_crash_mid_save_keeps_last_checkpoint(lm, chunks, tmp_path, monkeypatch):
    trainer = Trainer(config(tmp_path, max_tokens=4 * 64 * 3), *lm, chunks=chunks, log=lambda *_: None)
    trainer.train()
    path = tmp_path / "run" / "topk" / "layers.1.mlp"
    before = SparseCoder.load(path).state_dict()

    import safetensors.torch as st

    real_save = st.save_file

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")  # half-written file, then the process "dies"
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr("binsparse_kernels.coder.save_file", crash)
    with torch.no_grad():
        for p in trainer.coders["topk"]["layers.1.mlp"].parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.setattr("binsparse_kernels.coder.save_file", real_save)
    after = SparseCoder.load(path).state_dict()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert not list(path.glob("*.tmp"))

    # the same for the resume state, written with torch.save
    real_torch_save = torch.save

    def crash_torch_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", crash_torch_save)
    trainer.step = 99
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.setattr(torch, "save", real_torch_save)
    resumed = Trainer(config(tmp_path, max_tokens=4 * 64 * 3, resume=True), *lm, chunks=chunks, log=lambda *_: None)
    assert resumed.step == 3
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_sae_variant_keeps_unit_norm_decoder(lm, chunks, tmp_path):
    cfg = config(tmp_path, variants=["binary"], transcode=False, skip_connection=False, max_tokens=4 * 64 * 4)
    trainer = Trainer(cfg, *lm, chunks=chunks, log=lambda *_: None)
    trainer.train()
    coder = trainer.coders["binary"]["layers.1.mlp"]
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(coder.num_latents), atol=1e-4, rtol=0)


def test_bad_configuration(lm, chunks, tmp_path):
    with pytest.raises(ValueError, match="nonexistent"):
        Trainer(config(tmp_path, hookpoints=["layers.nonexistent"]), *lm, chunks=chunks)
    with pytest.raises(ValueError, match="k=5000 is larger"):
        Trainer(config(tmp_path, k=5000), *lm, chunks=chunks)
    with pytest.raises(ValueError, match="unknown variants"):
        config(tmp_path, variants=["relu"])
    with pytest.raises(ValueError, match="fewer than 2 chunks"):
        data_mod.split_chunks(torch.zeros(1, 8, dtype=torch.long), 0)


def test_held_out_split_is_disjoint_and_seeded():
    tokens = torch.arange(100 * 4).view(100, 4)
    train_a, held = data_mod.split_chunks(tokens, seed=3)
    train_b, _ = data_mod.split_chunks(tokens, seed=3)
    assert torch.equal(train_a, train_b) and held.shape[0] == 5 and train_a.shape[0] == 95
    assert not set(held[:, 0].tolist()) & set(train_a[:, 0].tolist())


def test_command_line_run_without_report(tmp_path, capsys):
    from binsparse_kernels.cli import main

    args = ["train", "--layers", "1", "--variants", "binary", "hybrid", "--k", "4", "--expansion_factor", "1",
            "--batch_size", "2", "--ctx_len", "32", "--max_tokens", "128", "--save_dir", str(tmp_path),
            "--run_name", "cli", "--no_report", "--selection_tokens", "256"]  # the default LR sweep, chosen on 8 chunks
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"metrics:     {tmp_path / 'cli' / 'metrics.jsonl'}" in out
    assert "optimizer signum (schedule-free sign-SGD, momentum 0.95)" in out
    assert "LR sweep, chosen by lowest held-out FVU" in out and "held-out sequences 16..23 (256 tokens)" in out
    for variant, activation in (("binary", "topk_binary"), ("hybrid", "topk_hybrid")):
        coder = SparseCoder.load(tmp_path / "cli" / variant / "layers.1.mlp")
        assert coder.cfg.activation == activation and coder.cfg.skip_connection and coder.num_latents == 576
    with pytest.raises(SystemExit):
        main(["train", "--layers", "1", "--hookpoints", "layers.1.mlp"])
