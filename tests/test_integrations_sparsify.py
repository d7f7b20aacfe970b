"""sparsify bridge: our ops behind sparsify's fused_encoder / decoder_impl, the binary coder, converters.

"Stock" below is sparsify's own implementation: its FusedEncoder and its eager (embedding_bag)
decoder. Its Triton decoder cannot run on CPU tensors, so the stock runs here use the eager one.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import sparsify
import sparsify.sparse_coder as sparsify_sc
from sparsify import SparseCoderConfig, TrainConfig, Trainer
from sparsify.fused_encoder import fused_encoder as stock_fused_encoder
from sparsify.utils import eager_decode

from binsparse_kernels.coder import SparseCoder as BkCoder, SparseCoderConfig as BkConfig
from binsparse_kernels.integrations import sparsify as bsp


@pytest.fixture(autouse=True)
def _stock_eager_decoder(monkeypatch):
    """Unpatched sparsify uses its eager decoder here; every test leaves sparsify unpatched."""
    monkeypatch.setattr(sparsify_sc, "decoder_impl", eager_decode)
    yield
    bsp.unpatch_sparsify()


def dense(acts, indices, M):
    return torch.zeros(acts.shape[0], M, dtype=acts.dtype).scatter(1, indices, acts)


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_fused_encoder_matches_sparsify():
    N, D, M, k = 40, 24, 96, 8
    x = torch.randn(N, D, requires_grad=True)
    W = (torch.randn(M, D) / D ** 0.5).requires_grad_()
    b = (torch.randn(M) * 0.1).requires_grad_()
    R = torch.randn(N, M)  # a loss that weighs every (token, latent) differently
    results = []
    for fn in (stock_fused_encoder, bsp.fused_encoder):
        out = fn(x, W, b, k, "topk")
        (dense(out.top_acts, out.top_indices, M) * R).sum().backward()
        results.append((dense(out.top_acts, out.top_indices, M).detach(), out.pre_acts.detach(),
                        x.grad.clone(), W.grad.clone(), b.grad.clone()))
        x.grad = W.grad = b.grad = None
    for stock, ours in zip(*results):
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="BinarySparseCoder"):
        bsp.fused_encoder(x, W, b, k, "topk_binary")


def test_decoder_impl_matches_sparsify():
    N, D, M, k = 30, 20, 80, 6
    W_dec = torch.randn(M, D, requires_grad=True)
    acts = torch.rand(N, k, requires_grad=True)
    idx = torch.stack([torch.randperm(M)[:k] for _ in range(N)])
    G = torch.randn(N, D)
    results = []
    for fn in (eager_decode, bsp.decoder_impl):
        y = fn(idx, acts, W_dec.mT)
        (y * G).sum().backward()
        results.append((y.detach(), W_dec.grad.clone(), acts.grad.clone()))
        W_dec.grad = acts.grad = None
    for stock, ours in zip(*results):
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)


CONFIGS = {
    "sae": dict(num_latents=96, k=8),
    "sae-auxk-multitopk": dict(num_latents=96, k=6, multi_topk=True),
    "skip-transcoder": dict(num_latents=96, k=8, transcode=True, skip_connection=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_patched_sparse_coder_matches_stock(name):
    cfg = SparseCoderConfig(**CONFIGS[name])
    sae = sparsify.SparseCoder(24, cfg)
    with torch.no_grad():  # non-trivial biases and skip weights
        sae.b_dec.normal_(0, 0.1)
        sae.encoder.bias.normal_(0, 0.1)
        if sae.W_skip is not None:
            sae.W_skip.normal_(0, 0.1)
        if cfg.transcode:
            sae.W_dec.normal_(0, 0.2)
    x, y = torch.randn(50, 24), torch.randn(50, 24)
    dead = (torch.arange(96) % 3 == 0) if name == "sae-auxk-multitopk" else None
    target = y if cfg.transcode else None
    runs = []
    for patched in (False, True):
        ctx = bsp.sparsify_patched() if patched else torch.enable_grad()
        with ctx:
            out = sae(x, target, dead_mask=dead)
            (out.fvu + out.auxk_loss + out.multi_topk_fvu / 8).backward()
        runs.append((out, grads(sae)))
        sae.zero_grad()
    (stock, g_stock), (ours, g_ours) = runs
    M = sae.num_latents
    torch.testing.assert_close(ours.sae_out, stock.sae_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense(ours.latent_acts, ours.latent_indices, M),
                               dense(stock.latent_acts, stock.latent_indices, M), rtol=1e-5, atol=1e-5)
    for field in ("fvu", "auxk_loss", "multi_topk_fvu"):
        torch.testing.assert_close(getattr(ours, field), getattr(stock, field), rtol=1e-5, atol=1e-6)
    if dead is not None:
        assert stock.auxk_loss > 0 and stock.multi_topk_fvu > 0
    assert g_ours.keys() == g_stock.keys()
    for n in g_stock:
        torch.testing.assert_close(g_ours[n], g_stock[n], rtol=1e-4, atol=1e-6, msg=n)


def test_forward_skips_dense_pre_acts_unless_needed(monkeypatch):
    """Inside forward the N x M pre-activations are formed only for AuxK / Multi-TopK."""
    calls = []

    def linear(*args):
        calls.append(1)
        return F.linear(*args)

    monkeypatch.setattr(bsp, "F", SimpleNamespace(relu=F.relu, linear=linear))
    sae = sparsify.SparseCoder(16, SparseCoderConfig(num_latents=64, k=4))
    x = torch.randn(20, 16)
    with bsp.sparsify_patched():
        sae(x)
        assert calls == []
        sae(x, dead_mask=torch.zeros(64, dtype=torch.bool))  # nothing dead: no AuxK
        assert calls == []
        sae(x, dead_mask=torch.ones(64, dtype=torch.bool))
        assert len(calls) == 1
        top_acts, top_indices, pre_acts = sae.encode(x)  # direct encode: sparsify's dense pre_acts
        assert pre_acts.shape == (20, 64)
        torch.testing.assert_close(pre_acts.gather(1, top_indices), top_acts)


def test_patch_and_unpatch_restore_sparsify():
    original = (sparsify_sc.fused_encoder, sparsify_sc.decoder_impl, sparsify.SparseCoder.forward,
                sparsify.trainer.SparseCoder)
    bsp.patch_sparsify(backend="reference")
    assert bsp.is_patched() and sparsify.trainer.SparseCoder is bsp.BinarySparseCoder
    assert sparsify_sc.fused_encoder.keywords == {"backend": "reference"}
    bsp.patch_sparsify()  # re-patching replaces, never stacks
    assert sparsify_sc.fused_encoder.keywords == {"backend": None}
    bsp.unpatch_sparsify()
    assert not bsp.is_patched()
    assert (sparsify_sc.fused_encoder, sparsify_sc.decoder_impl, sparsify.SparseCoder.forward,
            sparsify.trainer.SparseCoder) == original


# -- the binary coder ------------------------------------------------------------------------------


def binary_pair(transcode=False, **kw):
    cfg = bsp.BinarySparseCoderConfig(num_latents=80, k=6, transcode=transcode, skip_connection=transcode, **kw)
    sae = bsp.BinarySparseCoder(20, cfg)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.1)
        sae.log_threshold.add_(torch.randn(80) * 0.1)
        if transcode:
            sae.W_dec.normal_(0, 0.2)
            sae.W_skip.normal_(0, 0.1)
    return sae, bsp.from_sparsify(sae)


@pytest.mark.parametrize("transcode", [False, True], ids=["BAE", "BTC-skip"])
def test_binary_sparse_coder_matches_our_coder(transcode):
    sae, ours = binary_pair(transcode)
    x, y = torch.randn(60, 20), torch.randn(60, 20)
    target = y if transcode else None
    a = sae(x, target)
    b = ours(x, target)
    assert set(a.latent_acts.unique().tolist()) <= {0.0, 1.0} and a.latent_acts.sum() > 0
    torch.testing.assert_close(dense(a.latent_acts, a.latent_indices, 80), dense(b.latent_acts, b.latent_indices, 80))
    torch.testing.assert_close(a.sae_out, b.sae_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.fvu, b.fvu, rtol=1e-5, atol=1e-6)
    a.fvu.backward()
    b.fvu.backward()
    ga, gb = grads(sae), grads(ours)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)
    assert ga["log_threshold"].abs().sum() > 0  # the STE reaches the threshold


def test_binary_auxk_and_multi_topk_train_dead_latents():
    sae, _ = binary_pair(multi_topk=True)
    dead = torch.zeros(80, dtype=torch.bool)
    dead[40:] = True
    out = sae(torch.randn(60, 20), dead_mask=dead)
    assert out.auxk_loss > 0 and out.multi_topk_fvu > 0
    out.auxk_loss.backward()
    g = sae.encoder.weight.grad
    assert g[~dead].abs().sum() == 0 and g[dead].abs().sum() > 0  # AuxK reaches dead encoder rows only


def test_binary_coder_save_load_in_sparsify_layout(tmp_path):
    sae, ours = binary_pair()
    sae.save_to_disk(tmp_path / "bae")
    cfg = json.loads((tmp_path / "bae" / "cfg.json").read_text())
    assert cfg["activation"] == "topk_binary" and cfg["d_in"] == 20
    x = torch.randn(30, 20)
    again = bsp.BinarySparseCoder.load_from_disk(tmp_path / "bae")
    ours_loaded = BkCoder.load_from_disk(tmp_path / "bae")  # same layout, read by our own loader
    for other in (again(x).sae_out, ours_loaded(x).sae_out):
        torch.testing.assert_close(other, sae(x).sae_out)
    # stock sparsify refuses it loudly instead of running it as a continuous coder
    with pytest.raises(TypeError, match="topk_binary"):
        sparsify.SparseCoder.load_from_disk(tmp_path / "bae")
    from safetensors.torch import load_model

    stock = sparsify.SparseCoder(20, SparseCoderConfig(num_latents=80, k=6))
    with pytest.raises(RuntimeError, match="log_threshold"):  # e.g. Trainer.load_state / finetune
        load_model(stock, str(tmp_path / "bae" / "sae.safetensors"))


# -- our checkpoints in sparsify ------------------------------------------------------------------


VARIANTS = {
    "TopK-SAE": dict(activation="topk"),
    "BAE": dict(activation="topk_binary"),
    "TopK-skip": dict(activation="topk", transcode=True, skip_connection=True),
    "BTC-skip": dict(activation="topk_binary", transcode=True, skip_connection=True),
}


def our_coder(variant):
    c = BkCoder(20, BkConfig(num_latents=80, k=6, **VARIANTS[variant]))
    with torch.no_grad():
        for p in c.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return c


@pytest.mark.parametrize("variant", VARIANTS)
def test_our_checkpoints_load_into_sparsify(variant, tmp_path):
    c = our_coder(variant)
    c.save_to_disk(tmp_path / "layers.3")
    x, y = torch.randn(40, 20), torch.randn(40, 20)
    target = y if c.cfg.transcode else None
    expected = c(x, target)
    with bsp.sparsify_patched():
        loaded = bsp.load_sparsify(tmp_path / "layers.3")
        assert isinstance(loaded, bsp.BinarySparseCoder) == c.cfg.binary
        got = loaded(x, target)
    torch.testing.assert_close(got.sae_out, expected.sae_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.fvu, expected.fvu, rtol=1e-5, atol=1e-6)
    back = bsp.from_sparsify(loaded)
    torch.testing.assert_close(back(x, target).sae_out, expected.sae_out, rtol=1e-5, atol=1e-5)
    if not c.cfg.binary:  # plain sparsify reads our continuous checkpoints as they are, W_skip included
        stock = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.3")
        assert (stock.W_skip is not None) == c.cfg.skip_connection
        torch.testing.assert_close(stock(x, target).sae_out, expected.sae_out, rtol=1e-5, atol=1e-5)
    elif c.cfg.binary:
        with pytest.raises(TypeError, match="topk_binary"):
            sparsify.SparseCoder.load_from_disk(tmp_path / "layers.3")


@pytest.mark.parametrize("n_dead", [3, 50], ids=["few-dead", "many-dead"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_our_auxk_is_sparsifys(variant, n_dead):
    """Our AuxK equals sparsify 1.3.3's (stock SparseCoder for TopK, BinarySparseCoder for binary):
    k_aux = d_out // 2 = 10, scale min(n_dead / k_aux, 1), residual detached, b_dec excluded, divided by
    the target's total variance. Binary coders: gradients too (stock TopK sends none to the encoder)."""
    c = our_coder(variant)
    dead = torch.zeros(80, dtype=torch.bool)
    dead[torch.randperm(80)[:n_dead]] = True
    x, y = torch.randn(40, 20), torch.randn(40, 20)
    target = y if c.cfg.transcode else None
    ours = c(x, target, dead_mask=dead, auxk_alpha=1.0).auxk_loss
    sae = bsp.to_sparsify(c)
    stock = sae(x, target, dead_mask=dead).auxk_loss
    assert stock > 0
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-7)
    stock.backward()
    ours.backward()
    for (name, p), q in zip(sae.named_parameters(), c.parameters()):
        if p.grad is not None and (c.cfg.binary or name == "W_dec"):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", ["TopK-SAE", "TopK-skip"])
def test_multi_topk_fvu_against_sparsify(variant):
    """Multi-TopK FVU: sparsify's for SAEs. For skip transcoders ours keeps the skip path in the 4k
    reconstruction (the coder's whole prediction with 4k latents); sparsify 1.3.3 leaves it out."""
    c = our_coder(variant)
    c.cfg.multi_topk = True
    x, y = torch.randn(40, 20), torch.randn(40, 20)
    target = y if c.cfg.transcode else None
    ours = c(x, target).multi_topk_fvu
    sae = bsp.to_sparsify(c)
    stock = sae(x, target).multi_topk_fvu
    if c.W_skip is None:
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-7)
        return
    codes = c.encode(x, 4 * c.cfg.k)
    out4 = dense(codes.acts, codes.indices, 80).detach() @ c.W_dec.detach() + c.b_dec.detach()
    skip = x @ c.W_skip.detach().T
    total = (y - y.mean(0)).square().sum()
    torch.testing.assert_close(ours, (out4 + skip - y).square().sum() / total, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stock, (out4 - y).square().sum() / total, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["sae", "skip-transcoder"])
def test_stock_sparsify_checkpoints_load_into_our_coder(name, tmp_path):
    """Checkpoints written by plain sparsify (no d_out in cfg.json) read by our loader compute the same
    function; a non-symmetric W_skip pins its orientation ([d_out, d_in], x @ W_skip.T)."""
    cfg = SparseCoderConfig(**CONFIGS[name])
    stock = sparsify.SparseCoder(24, cfg)
    with torch.no_grad():
        stock.b_dec.normal_(0, 0.1)
        stock.encoder.bias.normal_(0, 0.1)
        if cfg.transcode:
            stock.W_dec.normal_(0, 0.2)
            stock.W_skip.normal_(0, 0.3)
            assert (stock.W_skip - stock.W_skip.T).abs().max() > 0.1
    stock.save_to_disk(tmp_path / "layers.1")
    ours = BkCoder.load(tmp_path / "layers.1")
    assert ours.cfg.activation == "topk" and (ours.W_skip is not None) == cfg.skip_connection
    x, y = torch.randn(30, 24), torch.randn(30, 24)
    target = y if cfg.transcode else None
    torch.testing.assert_close(ours(x, target).sae_out, stock(x, target).sae_out, rtol=1e-5, atol=1e-5)


def test_hybrid_and_wide_transcoders_are_refused(tmp_path):
    hybrid = BkCoder(20, BkConfig(num_latents=80, k=6, activation="topk_hybrid"))
    with pytest.raises(ValueError, match="hybrid"):
        bsp.to_sparsify(hybrid)
    hybrid.save_to_disk(tmp_path / "h")
    with pytest.raises(ValueError, match="hybrid"):
        bsp.BinarySparseCoder.load_from_disk(tmp_path / "h")
    with pytest.raises(TypeError):
        sparsify.SparseCoder.load_from_disk(tmp_path / "h")
    # the paper branch's activation "binary" is a dense coder (no top-k), not a TopK binary one
    with pytest.raises(ValueError, match="dense binary coder.*topk_binary"):
        bsp.BinarySparseCoderConfig(num_latents=80, k=6, activation="binary")
    wide = BkCoder(20, BkConfig(num_latents=80, k=6, activation="topk", transcode=True), d_out=12)
    with pytest.raises(ValueError, match="d_out"):
        bsp.to_sparsify(wide)


# -- sparsify's own Trainer -----------------------------------------------------------------------


def tiny_lm_and_data(n_seq=8, seq_len=16):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=seq_len)
    model = LlamaForCausalLM(cfg).eval()
    data = Dataset.from_dict({"input_ids": torch.randint(0, 64, (n_seq, seq_len)).tolist()}).with_format("torch")
    return model, data


def train(sae_cfg, tmp_path, name, first_grads=None, **kw):
    """sparsify's Trainer, 4 steps of 2 sequences; ``first_grads`` (a dict) receives each parameter's
    gradient at the first optimizer step."""
    model, data = tiny_lm_and_data()
    cfg = TrainConfig(sae=sae_cfg, batch_size=2, hookpoints=["layers.1"], log_to_wandb=False,
                      save_dir=str(tmp_path), run_name=name, lr=1e-3, **kw)
    trainer = Trainer(cfg, data, model)
    if first_grads is not None:
        def record(opt, args, kwargs):
            if not first_grads:
                first_grads.update({n: p.grad.clone() for n, p in trainer.saes["layers.1"].named_parameters()
                                    if p.grad is not None})
        trainer.optimizers[0].register_step_pre_hook(record)
    trainer.fit()
    return trainer


def test_sparsify_trainer_runs_on_our_ops(tmp_path):
    """4 steps of sparsify's Trainer (Adam, AuxK on) with and without the patch agree: the first
    step's gradients at fp32 rounding, the trained weights to 1e-5."""
    sae_cfg = dict(num_latents=64, k=4)
    run = dict(auxk_alpha=1 / 32, dead_feature_threshold=0, optimizer="adam", lr_warmup_steps=1)
    g_stock, g_ours = {}, {}
    stock = train(SparseCoderConfig(**sae_cfg), tmp_path, "stock", g_stock, **run)
    with bsp.sparsify_patched():
        ours = train(SparseCoderConfig(**sae_cfg), tmp_path, "ours", g_ours, **run)
    a, b = stock.saes["layers.1"], ours.saes["layers.1"]
    assert type(b) is bsp.BinarySparseCoder and not b.binary  # the patched Trainer's class, continuous
    assert g_stock.keys() == g_ours.keys() == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    for n in g_stock:
        assert g_stock[n].abs().max() > 0, n
        torch.testing.assert_close(g_ours[n], g_stock[n], rtol=1e-5, atol=1e-7, msg=n)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=n)
    torch.manual_seed(0)  # the Trainer seeds each coder's init with its init_seed (0)
    fresh = sparsify.SparseCoder(16, SparseCoderConfig(**sae_cfg))
    assert (b.encoder.weight - fresh.encoder.weight).abs().max() > 1e-4  # it did train
    assert (tmp_path / "ours" / "layers.1" / "sae.safetensors").is_file()


def test_sparsify_trainer_trains_binary_coders(tmp_path):
    with bsp.sparsify_patched():
        trainer = train(bsp.BinarySparseCoderConfig(num_latents=64, k=4), tmp_path, "bae",
                        auxk_alpha=1 / 32, dead_feature_threshold=0)
    sae = trainer.saes["layers.1"]
    assert sae.binary and sae.log_threshold.shape == (64,)
    assert not torch.allclose(sae.log_threshold, torch.full((64,), torch.tensor(0.004).log().item()))
    saved = tmp_path / "bae" / "layers.1"
    x = torch.randn(10, 16)
    loaded = bsp.BinarySparseCoder.load_from_disk(saved)
    torch.testing.assert_close(loaded(x).sae_out, BkCoder.load_from_disk(saved)(x).sae_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="topk_binary"):
        sparsify.SparseCoder.load_from_disk(saved)
