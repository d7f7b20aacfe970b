"""SAELens bridge: TopK SAEs on our ops vs SAELens's own, the registry patch, and the converter."""

from __future__ import annotations

import pytest
import torch

from sae_lens import SAE, SAETrainer, TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens import TrainingSAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput

from binsparse_kernels.coder import SparseCoder as BkCoder, SparseCoderConfig as BkConfig
from binsparse_kernels.integrations import saelens as bsl

D, M, K = 16, 64, 6


def perturb(sae):
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(M, 1) + 0.5)  # decoder rows of different norms


def param_grads(sae):
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


def run_pair(stock, ours, fn):
    """``fn(module)`` -> (outputs tuple, loss) on both; returns outputs and gradients of each."""
    results = []
    for m in (stock, ours):
        outs, loss = fn(m)
        loss.backward()
        results.append((tuple(o.detach() for o in outs), param_grads(m)))
        m.zero_grad()
    return results


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescale-by-decoder-norm"])
@pytest.mark.parametrize("apply_b_dec", [True, False], ids=["sae", "no-b_dec-in"])
def test_topk_sae_matches_saelens(rescale, apply_b_dec):
    cfg = dict(d_in=D, d_sae=M, k=K, rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=apply_b_dec)
    stock = TopKSAE(TopKSAEConfig(**cfg))
    perturb(stock)
    ours = bsl.BinsparseTopKSAE(TopKSAEConfig(**cfg))
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(3, 10, D)  # SAELens takes [..., d_in]
    R = torch.randn(3, 10, D)

    def fn(m):
        acts = m.encode(x)
        out = m(x)
        return (acts, m.decode(acts), out), (out * R).sum()

    (outs_s, g_s), (outs_o, g_o) = run_pair(stock, ours, fn)
    assert (outs_o[0] != 0).sum(-1).max() <= K
    for a, b in zip(outs_o, outs_s):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert g_o.keys() == g_s.keys()
    for n in g_s:
        torch.testing.assert_close(g_o[n], g_s[n], rtol=1e-4, atol=1e-5, msg=n)


def test_decode_reads_any_dense_activations():
    """decode takes whatever a hook left in the activations, not only the encoder's top-k."""
    stock = TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=K))
    perturb(stock)
    ours = bsl.BinsparseTopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=K))
    ours.load_state_dict(stock.state_dict())
    acts = ours.encode(torch.randn(12, D))
    acts[:, 5] = -2.0  # steer one latent on every token (negative values too)
    acts[3] = 0.0  # an empty row
    torch.testing.assert_close(ours.decode(acts), stock.decode(acts), rtol=1e-5, atol=1e-5)


def training_pair(**kw):
    cfg = dict(d_in=D, d_sae=M, k=K, aux_loss_coefficient=0.5)
    torch.manual_seed(1)
    # The stock side always uses dense activations: SAELens 6.54's own sparse-activation backward
    # fails on CPU ("aten::view" on SparseCPU); the function computed is the same.
    stock = TopKTrainingSAE(TopKTrainingSAEConfig(**cfg))
    perturb(stock)
    ours = bsl.BinsparseTopKTrainingSAE(TopKTrainingSAEConfig(**cfg, **kw))
    ours.load_state_dict(stock.state_dict())
    return stock, ours


@pytest.mark.parametrize("sparse_acts", [False, True], ids=["dense-acts", "sparse-acts"])
def test_training_forward_pass_matches_saelens(sparse_acts):
    stock, ours = training_pair(use_sparse_activations=sparse_acts)
    assert stock.cfg.rescale_acts_by_decoder_norm  # SAELens's training default
    dead = torch.arange(M) % 4 == 0
    step = TrainStepInput(sae_in=torch.randn(40, D), coefficients={}, dead_neuron_mask=dead,
                          n_training_steps=0, is_logging_step=False)

    def fn(m):
        out = m.training_forward_pass(step)
        acts = out.feature_acts.to_dense() if out.feature_acts.is_sparse else out.feature_acts
        return (out.sae_out, acts, out.losses["mse_loss"], out.losses["auxiliary_reconstruction_loss"]), out.loss

    (outs_s, g_s), (outs_o, g_o) = run_pair(stock, ours, fn)
    assert outs_s[3] > 0  # the AuxK term is active
    for a, b in zip(outs_o, outs_s):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for n in g_s:
        torch.testing.assert_close(g_o[n], g_s[n], rtol=1e-4, atol=1e-5, msg=n)


def test_sae_trainer_steps_match_saelens():
    """SAELens's own SAETrainer (Adam, AuxK on, grad clipping) takes the same steps with our ops."""
    stock, ours = training_pair()
    data = torch.randn(6, 32, D)
    cfg = dict(total_training_samples=6 * 32, train_batch_size_samples=32, lr=1e-3, lr_end=1e-3,
               dead_feature_window=2)
    for sae in (stock, ours):
        SAETrainer(SAETrainerConfig(**cfg), sae, iter(data)).fit()
    for (n, p), q in zip(stock.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=n)
    assert not torch.equal(stock.W_enc, training_pair()[0].W_enc)  # it did train


def test_patch_registers_our_classes(tmp_path):
    stock = TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=K))
    stock.save_model(tmp_path / "topk")
    training_cfg = TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K).to_dict()
    with bsl.saelens_patched(backend="reference"):
        loaded = SAE.load_from_disk(tmp_path / "topk")
        assert type(loaded) is bsl.BinsparseTopKSAE
        assert type(TrainingSAE.from_dict(training_cfg)) is bsl.BinsparseTopKTrainingSAE
        x = torch.randn(5, D)
        torch.testing.assert_close(loaded(x), stock(x), rtol=1e-5, atol=1e-5)
    assert not bsl.is_patched()
    assert type(SAE.load_from_disk(tmp_path / "topk")) is TopKSAE
    assert type(TrainingSAE.from_dict(training_cfg)) is TopKTrainingSAE


VARIANTS = {
    "TopK-SAE": (dict(activation="topk"), TopKSAE, True),
    "TopK-transcoder": (dict(activation="topk", transcode=True), TopKSAE, False),
    "BAE": (dict(activation="topk_binary"), bsl.BinsparseSAE, True),
    "BTC-skip": (dict(activation="topk_binary", transcode=True, skip_connection=True), bsl.BinsparseSAE, False),
    "TopK-skip": (dict(activation="topk", transcode=True, skip_connection=True), bsl.BinsparseSAE, False),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_converter_loads_our_checkpoints(variant, tmp_path):
    kw, cls, apply_b_dec = VARIANTS[variant]
    c = BkCoder(D, BkConfig(num_latents=M, k=K, **kw))
    with torch.no_grad():
        for p in c.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    c.save_to_disk(tmp_path / "layers.7.mlp")
    sae = SAE.load_from_disk(tmp_path / "layers.7.mlp", converter=bsl.binsparse_disk_loader)
    assert type(sae) is cls and sae.cfg.apply_b_dec_to_input is apply_b_dec
    assert sae.W_enc.shape == (D, M) and sae.cfg.metadata.hook_name == "layers.7.mlp"
    x = torch.randn(30, D)
    ours = c(x, torch.randn(30, D) if c.cfg.transcode else None)
    torch.testing.assert_close(sae(x), ours.sae_out, rtol=1e-5, atol=1e-5)
    dense = torch.zeros(30, M).scatter(1, ours.latent_indices, ours.latent_acts.detach())
    torch.testing.assert_close(sae.encode(x), dense, rtol=1e-5, atol=1e-5)
    if cls is bsl.BinsparseSAE:  # saved by SAELens and loaded back through its registry
        sae.save_model(tmp_path / "saelens")
        again = SAE.load_from_disk(tmp_path / "saelens")
        assert type(again) is bsl.BinsparseSAE
        torch.testing.assert_close(again(x), ours.sae_out, rtol=1e-5, atol=1e-5)


def test_converter_options_and_refusals(tmp_path):
    c = BkCoder(D, BkConfig(num_latents=M, k=K, activation="topk"))
    c.save_to_disk(tmp_path / "c")
    import functools

    loader = functools.partial(bsl.binsparse_disk_loader, hook_name="blocks.3.hook_resid_post", model_name="m")
    sae = SAE.load_from_disk(tmp_path / "c", converter=loader, dtype="bfloat16")
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post" and sae.cfg.metadata.model_name == "m"
    assert sae.W_enc.dtype == torch.bfloat16
    BkCoder(D, BkConfig(num_latents=M, k=K, activation="topk_hybrid")).save_to_disk(tmp_path / "h")
    with pytest.raises(ValueError, match="hybrid"):
        SAE.load_from_disk(tmp_path / "h", converter=bsl.binsparse_disk_loader)
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        bsl.BinsparseSAEConfig(d_in=D, d_sae=M, k=K, d_out=8, apply_b_dec_to_input=True)
    # the paper branch's activation "binary" is a dense coder (no top-k), not a TopK binary one
    BkCoder(D, BkConfig(num_latents=M, k=K, activation="topk_binary")).save_to_disk(tmp_path / "dense")
    cfg_path = tmp_path / "dense" / "cfg.json"
    cfg_path.write_text(cfg_path.read_text().replace('"topk_binary"', '"binary"'))
    with pytest.raises(ValueError, match="dense binary coder.*topk_binary"):
        SAE.load_from_disk(tmp_path / "dense", converter=bsl.binsparse_disk_loader)
