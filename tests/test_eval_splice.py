"""Splicing coders into a tiny, randomly initialised Llama (no download): identity splices change
nothing, real coders match a hand-written hook, zero ablation and the SAELens scores are consistent.

Also holds the tiny LM / tokenizer builders the other evaluation tests import.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from binsparse_kernels.coder import SparseCoder, SparseCoderConfig
from binsparse_kernels.evaluation.splice import evaluate, reconstruct, splice
from binsparse_kernels.models import capture, resolve_hookpoint

WORDS = ("the cat dog sat ran on a mat log red blue big small and then it was very happy sad . , "
         "house tree bird sang flew over under green old new day night").split()


def tiny_lm(vocab_size: int = 64, hidden: int = 16, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # activations of a realistic size (the default init gives norms ~0.1) and MLPs that matter
        model.model.embed_tokens.weight.mul_(50)
        model.lm_head.weight.mul_(20)
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.mul_(15)
            layer.mlp.up_proj.weight.mul_(15)
            layer.mlp.down_proj.weight.mul_(15)
    return model


def word_tokenizer():
    """A word-level fast tokenizer built in memory (eos = </s>, id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def synthetic_text(n_sentences: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]
    out = []
    for _ in range(n_sentences):
        out.append(f"the {pick(['big', 'small', 'red', 'old'])} {pick(['cat', 'dog', 'bird'])} "
                   f"{pick(['sat', 'ran', 'sang'])} {pick(['on', 'over', 'under'])} a {pick(['mat', 'log', 'tree'])} .")
    return " ".join(out)


def identity_sae(d: int) -> SparseCoder:
    """An exact identity SAE: continuous TopK with latents +e_i and -e_i and k = 2d, so
    relu(x) - relu(-x) = x reconstructs every activation exactly."""
    coder = SparseCoder(d, SparseCoderConfig(activation="topk", num_latents=2 * d, k=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.cat([eye, -eye]))
        coder.encoder.bias.zero_()
        coder.W_dec.copy_(torch.cat([eye, -eye]))
        coder.b_dec.zero_()
    return coder


def random_coder(d, activation, *, transcode=False, M=64, k=4, seed=0):
    torch.manual_seed(seed)
    coder = SparseCoder(d, SparseCoderConfig(activation=activation, num_latents=M, k=k, transcode=transcode,
                                             skip_connection=transcode))
    with torch.no_grad():
        if transcode:
            coder.W_dec.normal_(0, 0.3)
            coder.W_skip.normal_(0, 0.1)
        coder.log_threshold.data.fill_(math.log(0.01)) if coder.log_threshold is not None else None
    return coder


def manual_ce(model, batches, replace=None):
    """Mean next-token CE with an independent hand-written hook (``replace(module, inp, out)``)."""
    total, n = 0.0, 0
    handle = None
    for batch in batches:
        if replace is not None:
            module, fn = replace
            handle = module.register_forward_hook(lambda m, args, out: fn(args[0], out))
        with torch.no_grad():
            logits = model(input_ids=batch).logits
        if handle is not None:
            handle.remove()
        total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="sum"))
        n += batch[:, 1:].numel()
    return total / n


@pytest.fixture(scope="module")
def lm_and_batches():
    model = tiny_lm()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (3, 24), generator=g) for _ in range(2)]
    return model, batches


def test_identity_splice_changes_nothing(lm_and_batches):
    model, batches = lm_and_batches
    sets = {"identity": {"layers.0.mlp": identity_sae(16), "layers.1": identity_sae(16)}}
    res = evaluate(model, sets, batches).results
    for h, m in res["variants"]["identity"]["hookpoints"].items():
        assert abs(m["ce_increase"]) < 1e-5, h
        assert m["kl_div"] < 1e-6, h
        assert m["accuracy_drop"] == 0
        assert m["fvu"] < 1e-10
        assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
        assert m["kl_div_score"] == pytest.approx(1.0, abs=1e-5)
    together = res["variants"]["identity"]["all_hookpoints"]
    assert abs(together["ce_increase"]) < 1e-5 and together["kl_div"] < 1e-6
    assert res["clean"]["ce_loss"] == pytest.approx(manual_ce(model, batches), rel=1e-5)


def test_transcoder_splice_reads_the_mlp_input(lm_and_batches):
    model, batches = lm_and_batches
    tc = random_coder(16, "topk_binary", transcode=True)
    sae = random_coder(16, "topk", seed=1)
    res = evaluate(model, {"v": {"layers.0.mlp": tc, "layers.1": sae}}, batches).results["variants"]["v"]
    mlp = resolve_hookpoint(model, "layers.0.mlp")
    layer1 = resolve_hookpoint(model, "layers.1")

    def tc_out(inp, out):  # the transcoder computes the MLP output from the MLP input, skip included
        x = inp.reshape(-1, 16)
        return tc(x, out.reshape(-1, 16)).sae_out.reshape(out.shape)

    def sae_out(inp, out):
        o = out[0] if isinstance(out, tuple) else out
        new = sae(o.reshape(-1, 16)).sae_out.reshape(o.shape)
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    clean = manual_ce(model, batches)
    ce_tc = manual_ce(model, batches, (mlp, tc_out))
    ce_zero = manual_ce(model, batches, (mlp, lambda inp, out: torch.zeros_like(out)))
    m = res["hookpoints"]["layers.0.mlp"]
    assert m["ce_loss_spliced"] == pytest.approx(ce_tc, rel=1e-5)
    assert m["ce_loss_zero_ablation"] == pytest.approx(ce_zero, rel=1e-5)
    assert m["ce_loss_clean"] == pytest.approx(clean, rel=1e-5)
    # (The difference CE_zero - CE_clean is small in this random model, so the score is checked on the
    # reported values rather than on independently rounded ones.)
    assert m["ce_loss_score"] == pytest.approx((m["ce_loss_zero_ablation"] - m["ce_loss_spliced"])
                                               / (m["ce_loss_zero_ablation"] - m["ce_loss_clean"]), rel=1e-9)
    assert m["kl_div"] > 0
    assert res["hookpoints"]["layers.1"]["ce_loss_spliced"] == pytest.approx(
        manual_ce(model, batches, (layer1, sae_out)), rel=1e-5)
    # The FVU of a transcoder is against the MLP output.
    with capture(model, ["layers.0.mlp"]) as cap:
        model(input_ids=batches[0])
    inp, out = cap["layers.0.mlp"]
    assert torch.allclose(reconstruct(tc, inp)[0], tc_out(inp, out), atol=1e-6)


def test_binary_l0_counts_ones(lm_and_batches):
    model, batches = lm_and_batches
    coder = random_coder(16, "topk_binary", k=8)
    with capture(model, ["layers.1"]) as cap, torch.no_grad():
        model(input_ids=batches[0])
        x = cap["layers.1"][1].reshape(-1, 16)
        pre = (x - coder.b_dec) @ coder.encoder.weight.T + coder.encoder.bias
        # theta = the median 8th-largest pre-activation: many selected latents stay below threshold
        coder.log_threshold.data.fill_(math.log(float(pre.topk(8).values[:, -1].median())))
    res = evaluate(model, {"b": {"layers.1": coder}}, batches)
    m = res.results["variants"]["b"]["hookpoints"]["layers.1"]
    indices, acts = res.codes["b"]["layers.1"]
    assert m["l0"] == pytest.approx(float((acts == 1).sum(1).float().mean()))
    assert m["l0"] < 8
    fired = torch.zeros(coder.num_latents, dtype=torch.int64).index_add_(0, indices[acts == 1].long(),
                                                                          torch.ones(int((acts == 1).sum()), dtype=torch.int64))
    assert m["dead_count"] == int((fired == 0).sum())


def test_splice_restores_the_model_and_checks_inputs(lm_and_batches):
    model, batches = lm_and_batches
    with pytest.raises(ValueError, match="names no module"):
        evaluate(model, {"v": {"layers.7.mlp": identity_sae(16)}}, batches)
    with pytest.raises(ValueError, match="variant 'v', hookpoint 'layers.0.mlp'.*width 8"):
        evaluate(model, {"v": {"layers.0.mlp": identity_sae(8)}}, batches)
    with pytest.raises(ValueError, match="at least one"):
        evaluate(model, {}, batches)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        evaluate(model, {"v": {"layers.1": identity_sae(16)}}, [torch.zeros(5, dtype=torch.long)])
    with pytest.raises(ValueError, match="same sequence length"):
        evaluate(model, {"v": {"layers.1": identity_sae(16)}}, [batches[0], batches[0][:, :10]])
    # Hooks are removed after an error and after a splice.
    with splice(model, {"layers.1": lambda inp, out: torch.zeros_like(out)}):
        pass
    assert not resolve_hookpoint(model, "layers.1")._forward_hooks
    assert not resolve_hookpoint(model, "layers.0.mlp")._forward_hooks


def manual_logits(model, batches, replace=None):
    """Next-token logits [n, V] and targets [n] of all batches, with an optional hand-written hook."""
    outs, targets = [], []
    for batch in batches:
        handle = None
        if replace is not None:
            module, fn = replace
            handle = module.register_forward_hook(lambda m, args, out: fn(args[0], out))
        with torch.no_grad():
            logits = model(input_ids=batch).logits
        if handle is not None:
            handle.remove()
        outs.append(logits[:, :-1].reshape(-1, logits.shape[-1]))
        targets.append(batch[:, 1:].reshape(-1))
    return torch.cat(outs), torch.cat(targets)


def test_zero_coder_scores_zero_and_spliced_metrics_match_definitions(lm_and_batches):
    """A coder whose output is always 0 *is* the zero ablation: ce_loss_score = kl_div_score = 0, and
    its FVU is sum ||y||^2 / sum ||y - mean y||^2. KL and accuracy drop checked against torch."""
    model, batches = lm_and_batches
    zero = SparseCoder(16, SparseCoderConfig(activation="topk", num_latents=32, k=4))
    with torch.no_grad():
        zero.W_dec.zero_()
        zero.b_dec.zero_()
    res = evaluate(model, {"z": {"layers.0.mlp": zero}}, batches).results
    m = res["variants"]["z"]["hookpoints"]["layers.0.mlp"]
    assert m["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert m["kl_div_score"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_loss_spliced"] == pytest.approx(m["ce_loss_zero_ablation"], rel=1e-7)
    assert "all_hookpoints" not in res["variants"]["z"]  # one hookpoint: nothing more to splice together

    mlp = resolve_hookpoint(model, "layers.0.mlp")
    ys = []
    for batch in batches:
        with capture(model, ["layers.0.mlp"]) as cap, torch.no_grad():
            model(input_ids=batch)
        ys.append(cap["layers.0.mlp"][1].reshape(-1, 16).double())
    y = torch.cat(ys)
    assert m["fvu"] == pytest.approx(float(y.square().sum() / (y - y.mean(0)).square().sum()), rel=1e-6)
    assert m["explained_variance"] == pytest.approx(1 - m["fvu"], rel=1e-12)

    clean_logits, targets = manual_logits(model, batches)
    zero_logits, _ = manual_logits(model, batches, (mlp, lambda inp, out: torch.zeros_like(out)))
    kl = F.kl_div(torch.log_softmax(zero_logits, -1), torch.log_softmax(clean_logits, -1), log_target=True,
                  reduction="none").sum(-1).mean()
    assert m["kl_div"] == pytest.approx(float(kl), rel=1e-4)
    acc_clean = float((clean_logits.argmax(-1) == targets).float().mean())
    acc_zero = float((zero_logits.argmax(-1) == targets).float().mean())
    assert m["accuracy_clean"] == pytest.approx(acc_clean) and m["accuracy_drop"] == pytest.approx(acc_clean - acc_zero)
    assert m["ce_increase"] == pytest.approx(float(F.cross_entropy(zero_logits, targets) - F.cross_entropy(clean_logits, targets)),
                                             rel=1e-4, abs=1e-6)


def test_all_at_once_matches_a_manual_double_splice(lm_and_batches):
    model, batches = lm_and_batches
    tc = random_coder(16, "topk_binary", transcode=True)
    sae = random_coder(16, "topk", seed=1)
    res = evaluate(model, {"v": {"layers.0.mlp": tc, "layers.1": sae}}, batches, zero_ablation=False).results
    together = res["variants"]["v"]["all_hookpoints"]
    mlp, layer1 = resolve_hookpoint(model, "layers.0.mlp"), resolve_hookpoint(model, "layers.1")
    h1 = mlp.register_forward_hook(lambda m, args, out: reconstruct(tc, args[0])[0])

    def sae_hook(m, args, out):
        o = out[0] if isinstance(out, tuple) else out
        new = reconstruct(sae, o)[0]
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    h2 = layer1.register_forward_hook(sae_hook)
    try:
        ce = manual_ce(model, batches)
    finally:
        h1.remove()
        h2.remove()
    assert together["ce_loss_spliced"] == pytest.approx(ce, rel=1e-5)
    # Splicing both is not the same as either alone (the test would be vacuous otherwise).
    singles = [res["variants"]["v"]["hookpoints"][h]["ce_loss_spliced"] for h in ("layers.0.mlp", "layers.1")]
    assert all(abs(s - ce) > 1e-6 for s in singles)


def test_bf16_model_with_fp32_coders():
    """The LM in bf16, the coders in their fp32 checkpoint dtype: an exact identity still changes nothing."""
    model = tiny_lm(seed=1).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 16), generator=g)]
    res = evaluate(model, {"id": {"layers.0.mlp": identity_sae(16)}}, batches).results
    m = res["variants"]["id"]["hookpoints"]["layers.0.mlp"]
    assert m["fvu"] == 0 and abs(m["ce_increase"]) < 1e-5 and m["kl_div"] < 1e-6


def test_hybrid_parts_partition_the_firing_statistics(lm_and_batches):
    model, batches = lm_and_batches
    coder = random_coder(16, "topk_hybrid", M=40, k=6, seed=2)
    res = evaluate(model, {"h": {"layers.1": coder}}, batches)
    m = res.results["variants"]["h"]["hookpoints"]["layers.1"]
    parts = m["hybrid_parts"]
    Mb = coder.binary_latents
    assert parts["binary"]["num_latents"] == Mb and parts["continuous"]["num_latents"] == 40 - Mb
    assert parts["binary"]["l0"] + parts["continuous"]["l0"] == pytest.approx(m["l0"])
    for key in ("dead_count", "count_over_10pct", "count_over_50pct"):
        assert parts["binary"][key] + parts["continuous"][key] == m[key], key
    indices, acts = res.codes["h"]["layers.1"]
    kb = coder.binary_k(6)
    assert set(acts[:, :kb].unique().tolist()) <= {0.0, 1.0} and bool((indices[:, :kb] < Mb).all())
    fired_b = indices[:, :kb][acts[:, :kb] == 1]
    assert parts["binary"]["dead_count"] == Mb - fired_b.unique().numel()
