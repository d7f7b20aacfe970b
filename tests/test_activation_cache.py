"""The activation cache (``binsparse cache``) and training from it (``binsparse train --activations``).

A tiny random Llama saved to disk, a word-level tokenizer and synthetic text stand in for the real
model and corpus, so every path (the commands included) runs in seconds.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from binsparse_kernels import data, models
from binsparse_kernels.activation_cache import ActivationCache, CacheConfig, build_cache, read_manifest
from binsparse_kernels.cli import main as binsparse_main
from binsparse_kernels.coder import SparseCoder
from binsparse_kernels.train import TrainConfig, Trainer
from test_eval_splice import synthetic_text, tiny_lm, word_tokenizer

HOOKS = ["layers.0.mlp", "layers.1.mlp"]
CTX = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    model, tokenizer = tiny_lm(), word_tokenizer()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "text.txt").write_text(synthetic_text(800, seed=3))  # 20 held-out chunks of 16 tokens
    return {"root": root, "model_dir": str(root / "model"), "data": str(root / "text.txt"), "model": model,
            "tokenizer": tokenizer}


def cache_cfg(setup, **kw):
    base = dict(model=setup["model_dir"], dataset=setup["data"], hookpoints=["layers.*.mlp"], max_tokens=40 * CTX,
                held_out_tokens=6 * CTX, ctx_len=CTX, batch_size=4, dtype="float32")
    base.update(kw)
    return CacheConfig(**base)


@pytest.fixture(scope="module")
def fp32_cache(setup):
    return build_cache(cache_cfg(setup), setup["root"] / "fp32", log=lambda *_: None)


def test_cache_holds_the_trainers_sequences_and_their_activations(setup, fp32_cache):
    manifest = read_manifest(fp32_cache)
    train, held = data.load_chunks(setup["tokenizer"], setup["data"], ctx_len=CTX, seed=0)
    assert manifest["complete"] and manifest["hookpoints"] == HOOKS and manifest["ctx_len"] == CTX
    assert manifest["model"] == setup["model_dir"] and manifest["config"]["dataset"] == setup["data"]
    assert manifest["tokens"] == {"train": 40 * CTX, "held_out": 6 * CTX}
    assert manifest["held_out"]["every"] == data.HELD_OUT_EVERY
    assert [s["sequences"] for s in manifest["shards"]["train"]] == [4] * 10
    assert [s["sequences"] for s in manifest["shards"]["held_out"]] == [4, 2]
    cache = ActivationCache(fp32_cache)
    for split, chunks in (("train", train[:40]), ("held_out", held[:6])):
        idx = torch.arange(cache.sequences(split))
        acts, token_ids = cache.read(split, idx, HOOKS)
        assert torch.equal(token_ids, chunks)
        with models.capture(setup["model"], HOOKS) as store:
            setup["model"](input_ids=chunks)
        for h in HOOKS:
            for side in range(2):  # one LM forward over everything vs 4 sequences at a time: equal to rounding
                torch.testing.assert_close(acts[h][side], store[h][side].reshape(-1, 16), rtol=1e-5, atol=1e-5)
    # statistics of the training activations
    acts, _ = cache.read("train", torch.arange(40), HOOKS)
    for h in HOOKS:
        x = acts[h][1].double()
        st = manifest["stats"][h]["output"]
        assert st["tokens"] == 40 * CTX
        assert st["mean_norm"] == pytest.approx(float(x.mean(0).norm()), rel=1e-9)
        assert st["rms_norm"] == pytest.approx(float(x.square().sum(1).mean().sqrt()), rel=1e-9)
    # reads in any order and across shard boundaries
    some = torch.tensor([7, 2, 3, 4, 39, 0])
    acts_some, ids_some = cache.read("train", some, ["layers.1.mlp"])
    assert torch.equal(ids_some, train[some])
    full = acts[HOOKS[1]][0].view(40, CTX, 16)
    assert torch.equal(acts_some["layers.1.mlp"][0], full[some].reshape(-1, 16))


def crash_on_shard(monkeypatch, n):
    """The cache's n-th shard write raises KeyboardInterrupt (a killed process); returns the real
    save_file, to put back."""
    import binsparse_kernels.activation_cache as ac

    real, calls = ac.save_file, []

    def crash(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == n:
            raise KeyboardInterrupt("killed")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ac, "save_file", crash)
    return real


def test_cache_resumes_after_a_crash_and_refuses_to_mix(setup, fp32_cache, tmp_path, monkeypatch, capsys):
    import binsparse_kernels.activation_cache as ac

    real = crash_on_shard(monkeypatch, 3)
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        build_cache(cache_cfg(setup), out, log=lambda *_: None)
    assert read_manifest(out)["sequences_written"]["train"] == 8
    with pytest.raises(ValueError, match="incomplete"):
        ActivationCache(out)
    monkeypatch.setattr(ac, "save_file", real)
    monkeypatch.setenv("BINSPARSE_PROGRESS_SECONDS", "0")
    build_cache(cache_cfg(setup), out, log=lambda *_: None)
    assert "tok/s" in capsys.readouterr().err  # a plain progress line (no terminal here)
    assert not list(out.rglob("*.tmp"))
    for shard in read_manifest(fp32_cache)["shards"]["train"] + read_manifest(fp32_cache)["shards"]["held_out"]:
        a, b = load_file(fp32_cache / shard["file"]), load_file(out / shard["file"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), shard["file"]

    with pytest.raises(ValueError, match=r"another configuration \(ctx_len: 16 there, 32 here"):
        build_cache(cache_cfg(setup, ctx_len=32), out)
    with pytest.raises(ValueError, match="hookpoints"):
        build_cache(cache_cfg(setup, hookpoints=["layers.0.mlp"]), out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty and holds no activation cache"):
        build_cache(cache_cfg(setup), tmp_path / "other")


def train_cfg(setup, tmp_path, **kw):
    base = dict(model=setup["model_dir"], dataset=setup["data"], hookpoints=["layers.1.mlp"], variants=["binary", "topk"],
                k=4, expansion_factor=2, batch_size=4, ctx_len=CTX, max_tokens=4 * CTX * 6, save_dir=str(tmp_path),
                save_every=1000, log_every=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_training_from_the_cache_equals_training_from_the_model(setup, fp32_cache, tmp_path):
    """Same batches in the same order: an fp32 cache made with the step's batch size gives the very same run."""
    train, held = data.load_chunks(setup["tokenizer"], setup["data"], ctx_len=CTX, seed=0)
    from_lm = Trainer(train_cfg(setup, tmp_path, run_name="lm"), setup["model"], setup["tokenizer"], chunks=train[:40],
                      held_out=held, log=lambda *_: None)
    from_lm.train()
    from_cache = Trainer(train_cfg(setup, tmp_path, run_name="cache", activations=str(fp32_cache)), log=lambda *_: None)
    assert from_cache.model is None  # no LM loaded
    from_cache.train()
    for key, coder in from_lm._all_coders:
        other = dict(from_cache._all_coders)[key]
        for name, p in coder.state_dict().items():
            torch.testing.assert_close(other.state_dict()[name], p, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
    lm_lines = (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()
    cache_lines = (tmp_path / "cache" / "metrics.jsonl").read_text().splitlines()
    for a, b in zip(lm_lines, cache_lines):
        a, b = json.loads(a), json.loads(b)
        assert a["fvu/binary/layers.1.mlp"] == pytest.approx(b["fvu/binary/layers.1.mlp"], rel=1e-4)


def test_resume_from_the_cache_is_exact(setup, fp32_cache, tmp_path):
    cfg = dict(activations=str(fp32_cache), save_every=3, max_tokens=4 * CTX * 12)  # 12 steps over 40 sequences: wraps
    straight = Trainer(train_cfg(setup, tmp_path, run_name="straight", **cfg), log=lambda *_: None)
    straight.train()
    first = Trainer(train_cfg(setup, tmp_path, run_name="resumed", **cfg), log=lambda *_: None)
    real_step = first._train_step

    def step_then_sigterm(autocast):
        record = real_step(autocast)
        if first.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    first._train_step = step_then_sigterm
    first.train()
    assert first.step == 5
    second = Trainer(train_cfg(setup, tmp_path, run_name="resumed", resume=True, **cfg), log=lambda *_: None)
    second.train()
    for key, coder in straight._all_coders:
        for name, p in coder.state_dict().items():
            assert torch.equal(p, dict(second._all_coders)[key].state_dict()[name]), (key, name)


def test_bad_caches_and_mismatched_runs_fail_clearly(setup, fp32_cache, tmp_path):
    with pytest.raises(ValueError, match=r"does not hold the data this run asks for \(model: the cache has .*model"):
        Trainer(train_cfg(setup, tmp_path, model="other/model", activations=str(fp32_cache)))
    with pytest.raises(ValueError, match="ctx_len: the cache has 16, the run asks for 32"):
        Trainer(train_cfg(setup, tmp_path, ctx_len=32, activations=str(fp32_cache)))
    with pytest.raises(ValueError, match="no hookpoint 'layers.5.mlp'; it has layers.0.mlp, layers.1.mlp"):
        Trainer(train_cfg(setup, tmp_path, hookpoints=["layers.5.mlp"], activations=str(fp32_cache)))
    with pytest.raises(FileNotFoundError, match="no activation cache"):
        Trainer(train_cfg(setup, tmp_path, activations=str(tmp_path / "nothing")))

    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(fp32_cache, truncated)
    shard = truncated / "train" / "00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="00003.safetensors is truncated"):
        Trainer(train_cfg(setup, tmp_path, activations=str(truncated)))

    wrong_dtype = tmp_path / "wrong_dtype"
    shutil.copytree(fp32_cache, wrong_dtype)
    shard = wrong_dtype / "train" / "00000.safetensors"
    tensors = load_file(shard)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, shard)
    manifest = read_manifest(wrong_dtype)
    manifest["shards"]["train"][0]["bytes"] = shard.stat().st_size  # the size check passes; the dtype check must not
    (wrong_dtype / "manifest.json").write_text(json.dumps(manifest))
    trainer = Trainer(train_cfg(setup, tmp_path, run_name="dtype", activations=str(wrong_dtype)), log=lambda *_: None)
    with pytest.raises(ValueError, match="layers.1.mlp/input is F16, the manifest says float32"):
        trainer.train()
    assert not (tmp_path / "dtype" / "binary" / "layers.1.mlp").exists()  # nothing trained on wrong data


def test_command_line_cache_then_k_list_and_lr_sweep(setup, tmp_path, capsys):
    out = tmp_path / "cache"
    assert binsparse_main(["cache", setup["model_dir"], setup["data"], "--hookpoints", "layers.1.mlp", "--max_tokens",
                           str(40 * CTX), "--held_out_tokens", str(30 * CTX), "--ctx_len", str(CTX), "--batch_size", "4",
                           "--out", str(out)]) == 0
    manifest = read_manifest(out)
    assert manifest["dtype"] == "bfloat16" and manifest["hookpoints"] == ["layers.1.mlp"]
    assert manifest["tokens"]["held_out"] == 20 * CTX  # all the held-out chunks there are (fewer than asked)
    args = ["train", "--activations", str(out), "--variants", "binary", "topk", "--k", "2", "4", "--lr_sweep", "1,10",
            "--expansion_factor", "2", "--batch_size", "4", "--max_tokens", str(4 * CTX * 5), "--save_dir",
            str(tmp_path), "--run_name", "sweep", "--no_report"]
    assert binsparse_main(args) == 0
    run = tmp_path / "sweep"
    sweep = json.loads((run / "lr_sweep.json").read_text())
    assert sweep["criterion"].startswith("lowest held-out FVU")
    assert "held-out sequences 16..19" in sweep["selection"]
    families = ["binary-k2", "binary-k4", "topk-k2", "topk-k4"]
    assert sorted(sweep["chosen"]) == families
    for family in families:
        candidates = [c for c in sweep["candidates"] if c["family"] == family]
        assert [c["label"] for c in candidates] == ["1x", "10x"]
        assert candidates[1]["lr"] == pytest.approx(10 * candidates[0]["lr"])
        best = min(candidates, key=lambda c: c["fvu"])
        assert sweep["chosen"][family]["name"] == best["name"]
        chosen = SparseCoder.load(run / family / "layers.1.mlp")
        member = SparseCoder.load(run / best["name"] / "layers.1.mlp")
        assert chosen.cfg.k == int(family[-1]) and chosen.state_dict().keys() == member.state_dict().keys()
        assert all(torch.equal(t, member.state_dict()[n]) for n, t in chosen.state_dict().items())
        assert 0 <= best["dead_fraction"] <= 1 and best["fvu"] < 1.5
    out_text = capsys.readouterr().out
    assert "LR sweep:" in out_text
    # the flags must agree with the cache
    with pytest.raises(ValueError, match="dataset: the cache has"):
        binsparse_main(args[:3] + [setup["model_dir"], str(tmp_path / "other.txt")] + args[3:])


def test_an_unfinished_cache_is_not_continued_on_changed_data(setup, tmp_path, monkeypatch):
    import binsparse_kernels.activation_cache as ac

    text = tmp_path / "text.txt"
    text.write_text(synthetic_text(800, seed=3))
    real = crash_on_shard(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cache_cfg(setup, dataset=str(text)), tmp_path / "c", log=lambda *_: None)
    monkeypatch.setattr(ac, "save_file", real)
    text.write_text(synthetic_text(800, seed=4))  # the same path, other text of the same length
    with pytest.raises(ValueError, match="changed since this cache was begun"):
        build_cache(cache_cfg(setup, dataset=str(text)), tmp_path / "c", log=lambda *_: None)
