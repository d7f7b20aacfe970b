"""SparseCoder: the model built on the ops (binary, TopK and hybrid; SAE and skip transcoder)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from binsparse_kernels.coder import SparseCoder, SparseCoderConfig, fvu

VARIANTS = {
    "BAE": dict(activation="topk_binary"),
    "TopK-SAE": dict(activation="topk"),
    "BTC-skip": dict(activation="topk_binary", transcode=True, skip_connection=True),
    "TopK-skip": dict(activation="topk", transcode=True, skip_connection=True),
    "hybrid-SAE": dict(activation="topk_hybrid", hybrid_binary_fraction=0.25),
}


def coder(variant, d=12, M=40, k=6, **kw):
    return SparseCoder(d, SparseCoderConfig(num_latents=M, k=k, **VARIANTS[variant], **kw))


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_codes_and_fvu(variant):
    c = coder(variant)
    x, y = torch.randn(30, 12), torch.randn(30, 12)
    c.init_from_batch(x, y if c.cfg.transcode else None)
    out = c(x, y if c.cfg.transcode else None)
    assert out.latent_acts.shape == (30, 6) and out.latent_indices.shape == (30, 6)
    assert torch.equal(out.latent_indices.sort(1).values.unique(dim=1).sort(1).values,
                       out.latent_indices.sort(1).values)  # distinct latents per token
    target = y if c.cfg.transcode else x
    torch.testing.assert_close(out.fvu, ((target - out.sae_out) ** 2).sum() / ((target - target.mean(0)) ** 2).sum())
    kb = c.binary_k(6)
    if c.cfg.activation != "topk":
        assert set(out.latent_acts[:, :kb].unique().tolist()) <= {0.0, 1.0}
    if c.cfg.activation != "topk_binary":
        assert (out.latent_acts[:, kb:] >= 0).all()


def test_hybrid_splits_latents_and_k():
    c = coder("hybrid-SAE", M=40, k=8)
    assert c.binary_latents == 10 and c.binary_k(8) == 2
    out = c(torch.randn(50, 12))
    assert (out.latent_indices[:, :2] < 10).all() and (out.latent_indices[:, 2:] >= 10).all()
    # the decode is the sum of the binary rows and the weighted continuous rows
    dense = torch.zeros(50, 40).scatter_(1, out.latent_indices, out.latent_acts.detach())
    torch.testing.assert_close(out.sae_out.detach(), dense @ c.W_dec.detach() + c.b_dec.detach())


def test_transcoder_init_centres_preactivations():
    c = coder("BTC-skip")
    x = torch.randn(64, 12) + 3.0
    c.init_from_batch(x, torch.randn(64, 12) * 2 + 1)
    pre = x @ c.encoder.weight.T + c.encoder.bias
    torch.testing.assert_close(pre.mean(0), torch.zeros(40), atol=1e-5, rtol=0)
    assert torch.equal(c.W_dec, torch.zeros_like(c.W_dec)) and torch.equal(c.W_skip, torch.zeros_like(c.W_skip))


def test_sae_decoder_unit_norm_and_parallel_gradient_removed():
    c = coder("BAE")
    torch.testing.assert_close(c.W_dec.norm(dim=1), torch.ones(40))
    c(torch.randn(20, 12)).fvu.backward()
    c.remove_gradient_parallel_to_decoder_directions()
    assert (c.W_dec.grad * c.W_dec).sum(1).abs().max() < 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_roundtrip(variant, tmp_path):
    c = coder(variant)
    with torch.no_grad():
        for p in c.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    c.save_to_disk(tmp_path / "layers.3.mlp")
    loaded = SparseCoder.load(tmp_path / "layers.3.mlp")
    for (n1, p1), (n2, p2) in zip(c.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.randn(9, 12)
    y = x if not c.cfg.transcode else torch.randn(9, 12)
    assert torch.equal(c(x, y).sae_out, loaded(x, y).sae_out)
    names = set(load_file(str(tmp_path / "layers.3.mlp" / "sae.safetensors")))
    assert {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} <= names
    assert ("log_threshold" in names) == (c.cfg.activation != "topk")
    cfg = json.loads((tmp_path / "layers.3.mlp" / "cfg.json").read_text())
    assert cfg["d_in"] == 12 and cfg["activation"] == VARIANTS[variant]["activation"]


def test_binary_checkpoint_refused_by_a_loader_that_does_not_know_thresholds(tmp_path):
    coder("BAE").save_to_disk(tmp_path)
    plain = torch.nn.Module()
    plain.encoder = torch.nn.Linear(12, 40)
    plain.W_dec = torch.nn.Parameter(torch.zeros(40, 12))
    plain.b_dec = torch.nn.Parameter(torch.zeros(12))
    with pytest.raises(RuntimeError, match="log_threshold"):
        plain.load_state_dict(load_file(str(tmp_path / "sae.safetensors")), strict=True)


def test_load_many_natural_order_and_missing(tmp_path):
    for layer in (10, 2, 1):
        coder("TopK-SAE").save_to_disk(tmp_path / f"layers.{layer}")
    assert list(SparseCoder.load_many(tmp_path)) == ["layers.1", "layers.2", "layers.10"]
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        SparseCoder.load(tmp_path / "nothing")


def test_auxk_loss_trains_dead_latents_only():
    c = coder("TopK-SAE", M=40, k=4)
    x = torch.randn(32, 12)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[30:] = True
    out = c(x, dead_mask=dead, auxk_alpha=1.0)
    assert out.auxk_loss > 0
    c.zero_grad()
    out.auxk_loss.backward()
    assert c.encoder.weight.grad[:30].abs().sum() == 0 and c.encoder.weight.grad[30:].abs().sum() > 0


def test_bad_config():
    with pytest.raises(ValueError, match="activation"):
        SparseCoderConfig(activation="relu")
    with pytest.raises(ValueError, match="k=50 is larger"):
        SparseCoder(4, SparseCoderConfig(num_latents=20, k=50))
    with pytest.raises(ValueError, match="skip_connection needs transcode"):
        SparseCoderConfig(skip_connection=True)
    with pytest.raises(ValueError, match="needs its target"):
        coder("BTC-skip")(torch.randn(3, 12))


def test_fvu_definition():
    y = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert fvu(y, y) == 0
    torch.testing.assert_close(fvu(y, y.mean(0).expand_as(y)), torch.tensor(1.0))
