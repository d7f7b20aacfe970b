"""SparseCoder: the model built on the ops (binary, TopK and hybrid; SAE and skip transcoder)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import binsparse_kernels as bk
from binsparse_kernels.coder import SparseCoder, SparseCoderConfig, fvu
from helpers import device_for, surrogate

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
    s = out.latent_indices.sort(1).values
    assert (s[:, 1:] != s[:, :-1]).all()  # distinct latents per token
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


def dense_auxk(c, x, y, dead):
    """AuxK written from its definition with dense [N, M] matrices (Gao et al. 2024, App. B.1, with
    sparsify 1.3.3's constants): the top k_aux = min(d_out // 2, n_dead) dead latents by score (binary:
    z = pre - theta, continuous: ReLU(pre)) reconstruct the detached residual without b_dec;
    loss = min(n_dead / (d_out // 2), 1) * ||e_hat - e||^2 / sum ||y - mean(y)||^2."""
    y = x if y is None else y
    xe = x if c.cfg.transcode else x - c.b_dec
    pre = xe @ c.encoder.weight.T + c.encoder.bias
    Mb = c.binary_latents
    z = pre[:, :Mb] - (c.log_threshold.exp() if Mb else 0)
    s = surrogate(z, c.cfg.ste, c.cfg.ste_temperature)
    acts = torch.cat([(z > 0).float() + s - s.detach(), torch.relu(pre[:, Mb:])], 1)
    scores = torch.cat([z, torch.relu(pre[:, Mb:])], 1).detach().masked_fill(~dead, -torch.inf)
    n_dead, half = int(dead.sum()), c.d_out // 2
    selected = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, scores.topk(min(half, n_dead), 1).indices, True)
    e_hat = torch.where(selected, acts, 0.0) @ c.W_dec
    sae_out = (torch.where(torch.zeros_like(pre, dtype=torch.bool).scatter_(1, c.encode(x).indices, True),
                           acts, 0.0) @ c.W_dec + c.b_dec).detach()
    if c.W_skip is not None:
        sae_out = sae_out + x @ c.W_skip.detach().T
    e = y - sae_out
    return min(n_dead / half, 1.0) * (e_hat - e).square().sum() / (y - y.mean(0)).square().sum()


def assert_same_gradients(c, loss, expected):
    """The gradients of two scalars for every parameter of c (zero where one does not reach it), fp32
    tolerance; returns {name: gradient of loss}."""
    names, params = zip(*c.named_parameters())
    got = torch.autograd.grad(loss, params, allow_unused=True)
    want = torch.autograd.grad(expected, params, allow_unused=True)
    out = {}
    for name, p, a, b in zip(names, params, got, want):
        out[name] = torch.zeros_like(p) if a is None else a
        torch.testing.assert_close(out[name], torch.zeros_like(p) if b is None else b, rtol=1e-4, atol=1e-6,
                                   msg=name)
    return out


def dense_multi_topk_fvu(c, x, y):
    """The FVU of the coder's whole prediction with 4k latents, from dense [N, M] matrices: per token the
    top binary_k(4k) binary latents by z = pre - theta (act 1[z > 0], sigmoid STE) and the top rest of the
    continuous ones by ReLU(pre), decoded with b_dec and the skip path."""
    y = x if y is None else y
    xe = x if c.cfg.transcode else x - c.b_dec
    pre = xe @ c.encoder.weight.T + c.encoder.bias
    Mb, K = c.binary_latents, min(4 * c.cfg.k, c.num_latents)
    kb = c.binary_k(K)
    z = pre[:, :Mb] - (c.log_threshold.exp() if Mb else 0)
    s = surrogate(z, c.cfg.ste, c.cfg.ste_temperature)
    acts = torch.cat([(z > 0).float() + s - s.detach(), torch.relu(pre[:, Mb:])], 1)
    selected = torch.zeros_like(pre, dtype=torch.bool)
    if kb:
        selected[:, :Mb].scatter_(1, z.detach().topk(kb, 1).indices, True)
    if K - kb:
        selected[:, Mb:].scatter_(1, torch.relu(pre[:, Mb:]).detach().topk(K - kb, 1).indices, True)
    out = torch.where(selected, acts, 0.0) @ c.W_dec + c.b_dec
    if c.W_skip is not None:
        out = out + x @ c.W_skip.T
    return (y - out).square().sum() / (y - y.mean(0)).square().sum()


@pytest.mark.parametrize("backend", bk.available_backends())
@pytest.mark.parametrize("variant", ["BAE", "BTC-skip", "hybrid-SAE", "TopK-SAE"])
def test_multi_topk_fvu_matches_its_dense_definition(variant, backend):
    device = device_for(backend)
    c = randomised(variant, multi_topk=True).to(device)
    c.backend = backend
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(30, 12, generator=g).to(device), torch.randn(30, 12, generator=g).to(device)
    target = y if c.cfg.transcode else None
    ours = c(x, target).multi_topk_fvu
    expected = dense_multi_topk_fvu(c, x, target)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    assert_same_gradients(c, ours, expected)


def randomised(variant, **kw):
    torch.manual_seed(3)
    c = coder(variant, **kw)
    with torch.no_grad():
        for p in c.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return c


AUXK_CASES = {  # variant, extra config, dead latents (of 40 unless M is given; d = 12, so d_out // 2 = 6)
    "BAE-few": ("BAE", {}, [3, 17]),
    "BAE-many": ("BAE", {}, list(range(0, 40, 2))),
    "BAE-identity-ste-few": ("BAE", {"ste": "identity"}, [5, 6, 30]),
    "TopK-SAE-few": ("TopK-SAE", {}, [1, 2, 39]),
    "TopK-SAE-many": ("TopK-SAE", {}, list(range(10, 40))),
    "BTC-skip-many": ("BTC-skip", {}, list(range(7, 40, 3))),
    "TopK-skip-few": ("TopK-skip", {}, [0]),
    "hybrid-few-both-parts": ("hybrid-SAE", {}, [2, 25]),
    "hybrid-few-binary-part": ("hybrid-SAE", {}, [0, 4, 9]),
    "hybrid-many": ("hybrid-SAE", {}, list(range(1, 40, 2))),
    "TopK-SAE-fewer-latents-than-half-d": ("TopK-SAE", {"M": 4, "k": 2}, [1, 3]),
}


@pytest.mark.parametrize("backend", bk.available_backends())
@pytest.mark.parametrize("case", AUXK_CASES)
def test_auxk_matches_its_dense_definition(case, backend):
    variant, kw, dead_list = AUXK_CASES[case]
    device = device_for(backend)
    c = randomised(variant, **kw).to(device)
    c.backend = backend
    dead = torch.zeros(c.num_latents, dtype=torch.bool, device=device)
    dead[dead_list] = True
    x, y = torch.randn(30, 12, device=device), torch.randn(30, 12, device=device)
    target = y if c.cfg.transcode else None
    ours = c(x, target, dead_mask=dead, auxk_alpha=1.0).auxk_loss
    expected = dense_auxk(c, x, target, dead)
    assert expected > 0
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    g = assert_same_gradients(c, ours, expected)
    # AuxK trains the dead latents' encoder and decoder rows, never a live latent's
    for name in ("encoder.weight", "W_dec"):
        assert g[name][~dead].abs().sum() == 0 and g[name][dead].abs().sum() > 0, name


@pytest.mark.parametrize("backend", [b for b in bk.available_backends() if b != "reference"])
@pytest.mark.parametrize("variant", ["BAE", "BTC-skip", "TopK-skip", "hybrid-SAE"])
def test_forward_and_gradients_on_every_backend_match_the_reference_coder(variant, backend):
    """The whole coder (hybrid offset views, skip path, fvu) on each backend against the same coder on
    the reference backend (itself tested against the dense model): codes, output, fvu and the fvu's
    gradient for every parameter, float32."""
    device = device_for(backend)
    ref = randomised(variant)
    ref.backend = "reference"
    ours = copy.deepcopy(ref).to(device)
    ours.backend = backend
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(30, 12, generator=g), torch.randn(30, 12, generator=g)
    target = y if ref.cfg.transcode else None
    want = ref(x, target)
    got = ours(x.to(device), None if target is None else target.to(device))
    # random fp32 scores with gaps far above fp32 rounding: the same latents per token (the order within
    # a token's k is each backend's own), with the same acts
    def by_latent(out):
        indices, order = out.latent_indices.cpu().sort(dim=1)
        return indices, out.latent_acts.detach().cpu().gather(1, order)

    (i_got, a_got), (i_want, a_want) = by_latent(got), by_latent(want)
    assert torch.equal(i_got, i_want)
    torch.testing.assert_close(a_got, a_want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sae_out.detach().cpu(), want.sae_out.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.fvu.detach().cpu(), want.fvu.detach(), rtol=1e-5, atol=1e-7)
    names, params = zip(*ref.named_parameters())
    g_want = torch.autograd.grad(want.fvu, params)
    g_got = torch.autograd.grad(got.fvu, list(ours.parameters()))
    for name, a, b in zip(names, g_got, g_want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", ["BAE", "TopK-SAE", "hybrid-SAE", "BTC-skip"])
def test_auxk_with_nothing_dead_is_exactly_zero_without_host_reads(variant, monkeypatch):
    """No dead latent: AuxK contributes exactly 0 (value and gradients), and neither the forward nor the
    backward reads tensor data on the host (the ops' own value checks are switched off here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class DataDependentOps(TorchDispatchMode):
        NAMES = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "tolist")

        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(name in str(func) for name in self.NAMES):
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv("BINSPARSE_CHECK_VALUES", "0")
    c = randomised(variant)
    x, y = torch.randn(30, 12), torch.randn(30, 12)
    target = y if c.cfg.transcode else None
    for dead in (torch.zeros(40, dtype=torch.bool), torch.arange(40) % 4 == 0):
        with DataDependentOps() as mode:
            out = c(x, target, dead_mask=dead, auxk_alpha=1.0)
            grads = torch.autograd.grad(out.auxk_loss, list(c.parameters()), allow_unused=True)
        assert mode.seen == []
        if not dead.any():
            assert out.auxk_loss.item() == 0.0
            assert all(g is None or not g.any() for g in grads)
        else:
            assert out.auxk_loss.item() > 0


def test_skip_connection_layout_is_d_out_by_d_in():
    """W_skip is [d_out, d_in] and applied as x @ W_skip.T (sparsify's layout, also on the paper's
    branch; method.md writes [d_in, d_out] with x @ W_skip): pinned with d_out != d_in."""
    c = SparseCoder(12, SparseCoderConfig(activation="topk", num_latents=40, k=4, transcode=True,
                                          skip_connection=True), d_out=7)
    assert c.W_skip.shape == (7, 12)
    with torch.no_grad():
        c.W_skip.normal_()
        c.W_dec.normal_()
    x = torch.randn(9, 12)
    out = c(x, torch.randn(9, 7))
    codes = c.encode(x)
    dense_codes = torch.zeros(9, 40).scatter_(1, codes.indices, codes.acts.detach())
    expected = dense_codes @ c.W_dec.detach() + c.b_dec.detach() + torch.einsum("ni,oi->no", x, c.W_skip.detach())
    torch.testing.assert_close(out.sae_out.detach(), expected)


def test_bad_config():
    with pytest.raises(ValueError, match="activation"):
        SparseCoderConfig(activation="relu")
    # "binary" on the paper's sparsify branch is a dense binary coder (no top-k): not an alias
    with pytest.raises(ValueError, match="dense binary coder.*topk_binary"):
        SparseCoderConfig(activation="binary")
    assert SparseCoderConfig(activation="hybrid").activation == "topk_hybrid"
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
