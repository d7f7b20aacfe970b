"""SAEBench wrapper: the BaseSAE interface contract, checked against our own SparseCoder."""

from __future__ import annotations

import pytest
import torch

from binsparse_kernels.coder import SparseCoder, SparseCoderConfig
from binsparse_kernels.integrations.saebench import SAEBenchSAE

D, M, K = 16, 64, 6


def coder(activation, **kw):
    c = SparseCoder(D, SparseCoderConfig(activation=activation, num_latents=M, k=K, **kw))
    with torch.no_grad():
        c.encoder.bias.normal_(0, 0.1)
        c.b_dec.normal_(0, 0.1)
    return c


@pytest.mark.parametrize("activation", ["topk", "topk_binary", "topk_hybrid"])
def test_interface_contract(activation):
    c = coder(activation)
    sae = SAEBenchSAE(c, model_name="pythia-70m-deduped", hook_layer=3, context_size=128)
    # parameters in SAEBench's layout, shared with the coder (no copies)
    assert sae.W_enc.shape == (D, M) and sae.W_dec.shape == (M, D)
    assert sae.b_enc.shape == (M,) and sae.b_dec.shape == (D,)
    assert sae.W_enc.data_ptr() == c.encoder.weight.data_ptr() and sae.W_dec is c.W_dec
    assert sae.check_decoder_norms()
    cfg = sae.cfg
    assert (cfg.d_in, cfg.d_sae, cfg.hook_layer, cfg.model_name) == (D, M, 3, "pythia-70m-deduped")
    assert cfg.hook_name == "blocks.3.hook_resid_post" == cfg.metadata.hook_name
    assert (cfg.dtype, cfg.device, sae.dtype, sae.device) == ("float32", "cpu", torch.float32, torch.device("cpu"))
    # encode/decode/forward on [batch, seq, d] and [N, d], against the coder's own forward
    x = torch.randn(2, 9, D)
    acts = sae.encode(x)
    assert acts.shape == (2, 9, M) and ((acts != 0).sum(-1) <= K).all()
    if activation == "topk_binary":
        assert set(acts.unique().tolist()) <= {0.0, 1.0}
    out = c(x.reshape(-1, D))
    dense = torch.zeros(18, M).scatter(1, out.latent_indices, out.latent_acts.detach())
    torch.testing.assert_close(acts.reshape(18, M), dense)
    torch.testing.assert_close(sae(x).reshape(18, D), out.sae_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(acts), sae(x))
    torch.testing.assert_close(sae(x.reshape(18, D)), out.sae_out, rtol=1e-5, atol=1e-5)


def test_decode_of_edited_activations_matches_dense_matmul():
    sae = SAEBenchSAE(coder("topk_binary"), model_name="m", hook_layer=0)
    acts = sae.encode(torch.randn(10, D))
    acts[:, 7] = 3.0  # steering / ablation edits
    acts[2] = 0.0
    torch.testing.assert_close(sae.decode(acts), acts @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-5)


def test_unit_norm_decoder_and_refusals(tmp_path):
    c = coder("topk_binary")
    with torch.no_grad():
        c.W_dec.mul_(1.01)
    before = c.W_dec.detach().clone()
    with pytest.raises(ValueError, match="unit-norm"):
        SAEBenchSAE(c, model_name="m", hook_layer=0, normalize_decoder=False)
    sae = SAEBenchSAE(c, model_name="m", hook_layer=0)
    assert sae.check_decoder_norms() and torch.equal(c.W_dec, before)  # a renormalised copy
    torch.testing.assert_close(sae.W_dec, before / before.norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="autoencoders"):
        SAEBenchSAE(coder("topk", transcode=True), model_name="m", hook_layer=0)
    c.save_to_disk(tmp_path / "layers.2")
    loaded = SAEBenchSAE.from_disk(tmp_path / "layers.2", model_name="m", hook_layer=2, hook_name="blocks.2.hook_mlp_out")
    assert loaded.cfg.hook_name == "blocks.2.hook_mlp_out" and loaded.check_decoder_norms()
    loaded.to(dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.cfg.dtype == "bfloat16" and loaded.W_enc.dtype == torch.bfloat16
    assert loaded.encode(torch.randn(4, D, dtype=torch.bfloat16)).dtype == torch.bfloat16
