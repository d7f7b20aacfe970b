"""Short real trainings on the offline SmolLM2-135M's activations (CPU), and the trainer's
bookkeeping (resume, crashes, dead latents, options, CLI) on a tiny random Llama."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from binsparse_kernels.coder import SparseCoder
from binsparse_kernels.train import TrainConfig, Trainer
from binsparse_kernels import data as data_mod
from binsparse_kernels import models
from test_eval_splice import synthetic_text, tiny_lm, word_tokenizer

TESTS = Path(__file__).resolve().parent


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


# -- the trainer's bookkeeping, on a tiny random Llama (hidden size 16) ------------------------------


def tiny_chunks(n=64, seq=16):
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(2))


def tiny_config(tmp_path, **kw):
    base = dict(model="tiny", hookpoints=["layers.1.mlp"], variants=["binary", "topk"], k=4, num_latents=32,
                batch_size=2, ctx_len=16, max_tokens=2 * 16 * 6, save_dir=str(tmp_path), run_name="run",
                save_every=2, log_every=1, device="cpu", optimizer="adam", lr=1e-3, lr_warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def tiny_trainer(cfg):
    return Trainer(cfg, tiny_lm(), None, chunks=tiny_chunks(), log=lambda *_: None)


def metric_lines(path):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"}
            for line in Path(path).read_text().splitlines()]


def test_resume_after_a_crash_logs_each_step_once(tmp_path):
    """Steps logged after the last save are repeated by the resumed run: metrics.jsonl keeps each once.
    The resume is exact, here with a hybrid coder, grad_acc_steps=2, exclude_tokens and Adam's
    warm-up ending after the resumed step."""
    options = dict(variants=["binary", "topk", "hybrid"], grad_acc_steps=2, exclude_tokens=[3, 5], lr_warmup_steps=3,
                   batch_size=1)
    straight = tiny_trainer(tiny_config(tmp_path, run_name="straight", **options))
    straight.train()
    crashing = tiny_trainer(tiny_config(tmp_path, **options))
    real_step = crashing._train_step

    def crash_at_step_4(autocast):
        if crashing.step == 3:  # steps 1-3 logged, the last save at step 2
            raise RuntimeError("crash")
        return real_step(autocast)

    crashing._train_step = crash_at_step_4
    with pytest.raises(RuntimeError, match="crash"):
        crashing.train()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "fvu/bin')  # a line cut short by the crash
    resumed = tiny_trainer(tiny_config(tmp_path, resume=True, **options))
    assert resumed.step == 2
    resumed.train()
    lines = metric_lines(tmp_path / "run" / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert lines == metric_lines(tmp_path / "straight" / "metrics.jsonl")  # resume is exact
    assert resumed.tokens_seen == straight.tokens_seen < 6 * 2 * 16  # excluded tokens are not counted
    for key, coder in straight._all_coders:
        for name, p in coder.state_dict().items():
            assert torch.equal(dict(resumed._all_coders)[key].state_dict()[name], p), (key, name)
    # a fresh (not resumed) run in the same folder starts a fresh metrics file
    tiny_trainer(tiny_config(tmp_path, max_tokens=2 * 16 * 2)).train()
    assert [line["step"] for line in metric_lines(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


CRASHING_CHILD = textwrap.dedent(f'''
    import json, os, sys, time
    import torch
    sys.path.insert(0, {str(TESTS)!r})
    from test_train import tiny_config, tiny_trainer

    save_dir, paused_flag, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    trainer = tiny_trainer(tiny_config(save_dir))
    real_save = torch.save

    def save_then_pause_at_step_4(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if trainer.step == 4:  # the resume state of step 4: half written, then this process hangs
            with open(f, "r+b") as out:
                out.truncate(os.path.getsize(f) // 2)
            open(paused_flag, "w").close()
            time.sleep(600)

    torch.save = save_then_pause_at_step_4  # what atomic_write's callback calls for trainer_state.pt
    trainer.train()
''')


def test_sigkill_in_the_middle_of_a_save_then_resume(tmp_path):
    """A real crash: the process is killed (SIGKILL, no cleanup runs) while trainer_state.pt's
    temporary file is half written. Every checkpoint still loads, --resume continues from the last
    complete save, the leftover temporary file is removed and each step is logged once."""
    script, flag = tmp_path / "child.py", tmp_path / "paused"
    script.write_text(CRASHING_CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(flag), str(torch.get_num_threads())],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():
            assert child.poll() is None, f"the child ended before pausing: {child.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the child never reached the save"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    run = tmp_path / "run"
    leftovers = list(run.glob("trainer_state.pt*.tmp"))
    assert len(leftovers) == 1  # the half-written temporary file of the killed save
    assert torch.load(run / "trainer_state.pt", weights_only=False)["step"] == 2  # the last complete save
    for variant in ("binary", "topk"):
        SparseCoder.load(run / variant / "layers.1.mlp")  # complete files (written at step 4)
    assert [line["step"] for line in metric_lines(run / "metrics.jsonl")] == [1, 2, 3, 4]

    resumed = tiny_trainer(tiny_config(tmp_path, resume=True))
    assert resumed.step == 2
    resumed.train()
    assert not list(run.rglob("*.tmp"))
    assert [line["step"] for line in metric_lines(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    straight = tiny_trainer(tiny_config(tmp_path, run_name="straight"))
    straight.train()
    for key, coder in straight._all_coders:
        for name, p in coder.state_dict().items():
            torch.testing.assert_close(dict(resumed._all_coders)[key].state_dict()[name], p, rtol=1e-6, atol=1e-7)


def test_dead_latents_count_firings_not_selections(tmp_path):
    """method.md: a latent fires when its act is nonzero; a binary latent selected with act 0 has not
    fired. since_fired, the dead mask given to AuxK and dead_pct follow that, checked step by step
    against the codes each coder produced; AuxK (auxk_alpha > 0) runs once latents are dead."""
    threshold = 2 * 16 * 2  # tokens: latents can be dead from the third step on
    cfg = tiny_config(tmp_path, variants=["binary", "topk", "hybrid"], k=12, num_latents=16, auxk_alpha=0.5,
                      dead_feature_threshold=threshold, max_tokens=2 * 16 * 8, lr=1e-4, save_every=1000)
    trainer = tiny_trainer(cfg)
    with torch.no_grad():  # six binary latents sit far above reach: selected (k = 12 of 16), never firing
        trainer.coders["binary"]["layers.1.mlp"].log_threshold[:6] = 14.0
        trainer.coders["hybrid"]["layers.1.mlp"].log_threshold[:3] = 14.0
    calls = {key: [] for key in trainer.since_fired}
    for key, coder in trainer._all_coders:
        def forward(*args, _real=coder.forward, _key=key, **kwargs):
            out = _real(*args, **kwargs)
            calls[_key].append((out.latent_acts.detach(), out.latent_indices, kwargs["dead_mask"], out.auxk_loss))
            return out
        coder.forward = forward
    trainer.train()
    lines = metric_lines(tmp_path / "run" / "metrics.jsonl")
    for key, steps in calls.items():
        assert len(steps) == 8
        since = torch.zeros(16, dtype=torch.long)
        selected_not_fired = saw_dead = False
        for line, (acts, indices, dead_mask, auxk_loss) in zip(lines, steps):
            dead = since >= threshold
            if dead_mask is None:  # before any latent can be dead
                assert line["step"] * 2 * 16 <= threshold and not dead.any()
            else:
                assert torch.equal(dead_mask, dead), key
            assert line[f"dead_pct/{key}"] == pytest.approx(dead.float().mean().item()), key
            assert (line[f"auxk/{key}"] > 0) == bool(dead.any()), key
            fired = torch.zeros(16, dtype=torch.bool)
            fired[indices[acts != 0]] = True
            selected = torch.zeros(16, dtype=torch.bool)
            selected[indices] = True
            selected_not_fired |= bool((selected & ~fired).any())
            saw_dead |= bool(dead.any())
            since += 2 * 16
            since[fired] = 0
        assert torch.equal(trainer.since_fired[key], since), key
        if not key.startswith("topk"):
            assert selected_not_fired and saw_dead, key  # the case that tells firing from selection


def test_exclude_tokens_drops_their_positions(tmp_path):
    trainer = tiny_trainer(tiny_config(tmp_path, exclude_tokens=[3, 5]))
    batch = tiny_chunks()[:2]
    batch[0, :4] = 3
    batch[1, 7] = 5
    keep = ~torch.isin(batch.reshape(-1), torch.tensor([3, 5]))
    plain = tiny_trainer(tiny_config(tmp_path, run_name="plain"))
    x, y = trainer._activations(batch)["layers.1.mlp"]
    x_all, y_all = plain._activations(batch)["layers.1.mlp"]
    assert x.shape[0] == int(keep.sum()) < batch.numel()
    assert torch.equal(x, x_all[keep]) and torch.equal(y, y_all[keep])
    trainer.train()
    assert trainer.tokens_seen == 6 * 2 * 16 - sum(int(torch.isin(trainer.chunks[i], torch.tensor([3, 5])).sum())
                                                  for i in range(12))


def test_command_line_layer_stride_keeps_every_nth_layer(tmp_path):
    """--layer_stride 2 with neither --layers nor --hookpoints: the MLPs of layers 0, 2, 4 of a 5-layer model."""
    from binsparse_kernels.cli import main

    model_dir, text = tmp_path / "model", tmp_path / "text.txt"
    tiny_lm(layers=5).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    text.write_text(synthetic_text(200, seed=5))
    assert main(["train", str(model_dir), str(text), "--layer_stride", "2", "--variants", "topk", "--k", "4",
                 "--num_latents", "32", "--batch_size", "2", "--ctx_len", "16", "--max_tokens", str(2 * 16),
                 "--lr", "0.01", "--save_dir", str(tmp_path), "--run_name", "s", "--device", "cpu", "--no_report"]) == 0
    assert sorted(p.name for p in (tmp_path / "s" / "topk").iterdir()) == ["layers.0.mlp", "layers.2.mlp", "layers.4.mlp"]
    with pytest.raises(ValueError, match="layer_stride=9 keeps none"):
        main(["train", str(model_dir), str(text), "--hookpoints", "layers.3.mlp", "--layer_stride", "9",
              "--variants", "topk", "--k", "4", "--num_latents", "32", "--batch_size", "2", "--ctx_len", "16",
              "--max_tokens", str(2 * 16), "--lr", "0.01", "--save_dir", str(tmp_path), "--run_name", "t",
              "--device", "cpu", "--no_report"])


def test_command_line_sae_no_skip_and_resume(tmp_path, capsys):
    """--sae, --no_skip_connection and --resume through `binsparse train`, on a tiny model on disk."""
    from binsparse_kernels.cli import main

    model_dir, text = tmp_path / "model", tmp_path / "text.txt"
    tiny_lm().save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    text.write_text(synthetic_text(400, seed=4))
    common = [str(model_dir), str(text), "--layers", "1", "--variants", "binary", "topk", "--k", "4",
              "--num_latents", "32", "--batch_size", "2", "--ctx_len", "16", "--save_dir", str(tmp_path),
              "--log_every", "1", "--save_every", "2", "--device", "cpu", "--no_report"]
    assert main(["train", *common, "--sae", "--run_name", "sae", "--max_tokens", str(2 * 16 * 2)]) == 0
    for variant in ("binary", "topk"):
        coder = SparseCoder.load(tmp_path / "sae" / variant / "layers.1")  # --sae: the layer's output
        assert not coder.cfg.transcode and coder.W_skip is None
    assert main(["train", *common, "--no_skip_connection", "--run_name", "tc", "--max_tokens", str(2 * 16 * 2)]) == 0
    coder = SparseCoder.load(tmp_path / "tc" / "binary" / "layers.1.mlp")
    assert coder.cfg.transcode and coder.W_skip is None
    capsys.readouterr()
    assert main(["train", *common, "--no_skip_connection", "--run_name", "tc", "--max_tokens", str(2 * 16 * 4),
                 "--resume"]) == 0
    assert "resumed" in capsys.readouterr().out
    state = torch.load(tmp_path / "tc" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4 and state["config"]["resume"] is True
    assert [line["step"] for line in metric_lines(tmp_path / "tc" / "metrics.jsonl")] == [1, 2, 3, 4]
