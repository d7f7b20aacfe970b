"""Coders on the Hugging Face Hub, offline: a real hub cache built here, resolved by huggingface_hub itself.

The cache has the layout huggingface_hub writes (``models--user--repo/{refs/main, blobs/<sha256>,
snapshots/<commit>/<path> -> ../../blobs/<sha256>}``) and the hub is switched off
(``HF_HUB_OFFLINE=1``), so ``snapshot_download`` runs its real offline resolution: ref -> commit ->
snapshot folder. Uploads are checked through ``--dry-run`` and with the two HfApi calls recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from binsparse_kernels import hub
from binsparse_kernels.cli import main as binsparse_main
from binsparse_kernels.coder import SparseCoder, SparseCoderConfig

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read once at import time
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def add_repo(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str = COMMIT) -> None:
    """Put ``files`` ({repo path: local file or bytes}) into the cache as huggingface_hub stores a download."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for repo_path, content in files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / repo_path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def coder_files(coder: SparseCoder, folder: str, tmp: Path) -> dict[str, Path]:
    coder.save_to_disk(tmp / folder)
    return {f"{folder}/{name}": tmp / folder / name for name in ("cfg.json", "sae.safetensors")}


def trained_like(activation: str, transcode: bool, seed: int) -> SparseCoder:
    torch.manual_seed(seed)
    coder = SparseCoder(12, SparseCoderConfig(activation=activation, num_latents=40, k=5, transcode=transcode,
                                              skip_connection=transcode))
    with torch.no_grad():  # nonzero decoder, skip and biases, so a wrong load cannot pass unnoticed
        for p in coder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return coder


def assert_same(a: SparseCoder, b: SparseCoder) -> None:
    assert a.cfg == b.cfg
    assert a.state_dict().keys() == b.state_dict().keys()
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    x = torch.randn(7, 12)
    assert torch.equal(a(x, x).sae_out, b(x, x).sae_out)


def test_load_our_coders_from_the_hub_cache(hub_cache, tmp_path):
    binary = trained_like("topk_binary", True, 0)
    hybrid = trained_like("topk_hybrid", True, 1)
    add_repo(hub_cache, "user/coders", {**coder_files(binary, "layers.3.mlp", tmp_path),
                                        **coder_files(hybrid, "layers.10.mlp", tmp_path),
                                        "README.md": b"# coders\n"})
    assert_same(SparseCoder.load_from_hub("user/coders", "layers.3.mlp"), binary)
    assert_same(SparseCoder.load_from_hub("user/coders", "layers.10.mlp", revision=COMMIT), hybrid)
    encoder_only = SparseCoder.load_from_hub("user/coders", "layers.3.mlp", decoder=False)
    assert encoder_only.W_dec is None and torch.equal(encoder_only.log_threshold, binary.log_threshold)

    many = SparseCoder.load_many_from_hub("user/coders")
    assert list(many) == ["layers.3.mlp", "layers.10.mlp"]  # natural order
    assert_same(many["layers.10.mlp"], hybrid)
    assert list(SparseCoder.load_many_from_hub("user/coders", pattern="layers.1*")) == ["layers.10.mlp"]

    with pytest.raises(ValueError, match=r"no coder at 'layers.9.mlp': user/coders has coders at: layers.3.mlp, "
                                         r"layers.10.mlp"):
        SparseCoder.load_from_hub("user/coders", "layers.9.mlp")
    with pytest.raises(ValueError, match="pass hookpoint= to choose one"):
        SparseCoder.load_from_hub("user/coders")
    with pytest.raises(ValueError, match=r"no coder matches 'attn\*'.*layers.3.mlp, layers.10.mlp"):
        SparseCoder.load_many_from_hub("user/coders", pattern="attn*")


def test_repo_without_coders_or_not_cached(hub_cache):
    add_repo(hub_cache, "user/notes", {"README.md": b"nothing here", "data/table.csv": b"a,b\n"})
    with pytest.raises(ValueError, match=r"user/notes holds no sparse coder .*its files: README.md, data/table.csv"):
        SparseCoder.load_from_hub("user/notes", "layers.0")
    with pytest.raises(ValueError, match="holds no sparse coder"):
        SparseCoder.load_many_from_hub("user/notes")
    with pytest.raises(FileNotFoundError, match="user/absent .*not in the local Hugging Face cache"):
        SparseCoder.load_from_hub("user/absent", "layers.0")
    with pytest.raises(FileNotFoundError, match="revision v2"):
        SparseCoder.load_from_hub("user/notes", "layers.0", revision="v2")


def test_single_coder_at_the_repo_root(hub_cache, tmp_path):
    coder = trained_like("topk", False, 2)
    coder.save_to_disk(tmp_path / "root")
    add_repo(hub_cache, "user/one", {name: tmp_path / "root" / name for name in ("cfg.json", "sae.safetensors")})
    assert_same(SparseCoder.load_from_hub("user/one"), coder)


def test_stock_sparsify_topk_checkpoints_load(hub_cache, tmp_path, monkeypatch):
    import sparsify
    import sparsify.sparse_coder as sparsify_sc
    from sparsify.utils import eager_decode

    monkeypatch.setattr(sparsify_sc, "decoder_impl", eager_decode)  # its Triton decoder needs a GPU
    files = {}
    stock = {}
    for hook, transcode in (("layers.0", False), ("layers.1.mlp", True)):
        torch.manual_seed(3)
        sae = sparsify.SparseCoder(12, sparsify.SparseCoderConfig(num_latents=40, k=5, transcode=transcode,
                                                                  skip_connection=transcode))
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        sae.save_to_disk(tmp_path / "stock" / hook)
        files.update({f"{hook}/{n}": tmp_path / "stock" / hook / n for n in ("cfg.json", "sae.safetensors")})
        stock[hook] = sae
    add_repo(hub_cache, "eleuther/stock", files)
    loaded = SparseCoder.load_many_from_hub("eleuther/stock")
    assert list(loaded) == ["layers.0", "layers.1.mlp"]
    x = torch.randn(9, 12)
    for hook, sae in stock.items():
        ours = loaded[hook]
        assert ours.cfg.activation == "topk" and ours.log_threshold is None
        assert ours.cfg.transcode == sae.cfg.transcode
        with torch.no_grad():
            torch.testing.assert_close(ours(x, x).sae_out, sae(x, x).sae_out, rtol=1e-5, atol=1e-5)


# -- upload ------------------------------------------------------------------------------------------


@pytest.fixture
def finished_run(tmp_path):
    """A run folder as the trainer leaves it: coders, the state (config, tokens), an LR sweep and a report."""
    run = tmp_path / "runs" / "demo"
    coders = {"binary": trained_like("topk_binary", True, 4), "topk": trained_like("topk", True, 5)}
    for variant, coder in coders.items():
        coder.save_to_disk(run / variant / "layers.1.mlp")
        coder.save_to_disk(run / "lr_sweep" / f"{variant}@lr=0.01" / "layers.1.mlp")  # not uploaded
    torch.save({"config": {"model": None, "dataset": None, "ctx_len": 256, "optimizer": "signum"},
                "step": 12, "tokens_seen": 24_576}, run / "trainer_state.pt")
    (run / "lr_sweep.json").write_text(json.dumps({"criterion": "held-out FVU",
                                                   "chosen": {"binary": {"lr": 0.0123}, "topk": {"lr": 0.0045}}}))
    (run / "report").mkdir()
    (run / "report" / "results.json").write_text(json.dumps({"n_tokens": 4096, "clean": {"ce_loss": 3.0243},
        "variants": {"binary": {"hookpoints": {"layers.1.mlp": {"fvu": 0.5432, "ce_increase": 0.0885, "kl_div": 0.1664,
                                                                 "l0": 32.0, "dead_fraction": 0.073}}}}}))
    return run, coders


EXPECTED_FILES = ["binary/layers.1.mlp/cfg.json", "binary/layers.1.mlp/sae.safetensors",
                  "topk/layers.1.mlp/cfg.json", "topk/layers.1.mlp/sae.safetensors", "README.md"]


def test_push_dry_run_lists_files_and_card(finished_run, capsys, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("a dry run must not reach the hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", no_network)
    run, _ = finished_run
    assert binsparse_main(["push", str(run), "me/demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("    ")]
    assert listed == EXPECTED_FILES
    assert "would upload 5 files to me/demo (public)" in out
    card = "\n".join(line[4:] for line in out.splitlines() if line.startswith("    "))
    assert card.startswith("---\nlibrary_name: binsparse-kernels")
    assert "| `binary/layers.1.mlp` | topk_binary | skip transcoder | 12 | 12 | 40 | 5 |" in card
    assert "| `topk/layers.1.mlp` | topk | skip transcoder | 12 | 12 | 40 | 5 |" in card
    assert "Hookpoints (module names relative to the model's `base_model`): layers.1.mlp." in card
    assert "- training tokens: 24,576 (12 steps)" in card
    assert "held-out FVU): binary 0.0123, topk 0.0045" in card
    assert "| binary | layers.1.mlp | 0.543 | 0.0885 | 0.1664 | 32.0 | 7.3% |" in card
    assert "SparseCoder.load_from_hub('me/demo', 'binary/layers.1.mlp')" in card
    assert "stock sparsify refuses to load them" in card
    assert binsparse_main(["push", str(run / "topk"), "me/topk", "--dry-run", "--private"]) == 0
    out = capsys.readouterr().out
    assert "(private)" in out and "  layers.1.mlp/cfg.json " in out


def test_push_uploads_what_the_dry_run_lists_and_loads_back(finished_run, hub_cache, monkeypatch):
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.setdefault("repo", (repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit",
                        lambda self, repo_id, operations, **kw: calls.setdefault("ops", operations))
    run, coders = finished_run
    paths = hub.push_to_hub(run, "me/demo", private=True, log=lambda *_: None)
    assert paths == EXPECTED_FILES
    assert calls["repo"] == ("me/demo", {"private": True, "exist_ok": True})
    uploaded = {op.path_in_repo: op.path_or_fileobj for op in calls["ops"]}
    assert list(uploaded) == EXPECTED_FILES
    # what was uploaded, put in the cache as a download of it would be, loads back as the same coders
    add_repo(hub_cache, "me/demo", {p: src if isinstance(src, bytes) else Path(src) for p, src in uploaded.items()})
    for variant, coder in coders.items():
        assert_same(SparseCoder.load_from_hub("me/demo", f"{variant}/layers.1.mlp"), coder)


def test_push_one_coder_and_bad_folders(tmp_path):
    coder = trained_like("topk_binary", False, 6)
    assert coder.push_to_hub("me/one", "layers.4", dry_run=True) == ["layers.4/cfg.json", "layers.4/sae.safetensors",
                                                                     "README.md"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no sparse coder"):
        hub.push_to_hub(tmp_path / "empty", "me/x", dry_run=True)
    (tmp_path / "half" / "layers.0").mkdir(parents=True)
    (tmp_path / "half" / "layers.0" / "cfg.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="sae.safetensors is missing"):
        hub.push_to_hub(tmp_path / "half", "me/x", dry_run=True)
