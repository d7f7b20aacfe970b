"""Zero host syncs per training step.

On CPU a ``TorchDispatchMode`` counts the ops that read tensor data on the host or have a
data-dependent output shape (each one a device sync on a GPU): ``aten._local_scalar_dense``
(``.item()``, ``bool()``, ``float()``, ``int()`` of a tensor), ``aten.nonzero``,
``aten.masked_select``, ``aten.unique*``, ``aten.repeat_interleave`` without an output size, and
indexing with a boolean mask; ``Tensor.tolist`` (which bypasses the dispatcher) is counted too.
Over a whole ``SparseCoder`` step inside ``deferred_checks()`` and over the ``Trainer``'s steps
between two logging steps the count must be 0. On a GPU (skipped here): the same step under
``torch.cuda.set_sync_debug_mode("error")``, and one coder step captured in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import binsparse_kernels as bk
from binsparse_kernels.coder import SparseCoder, SparseCoderConfig
from helpers import require_backend

_DATA_DEPENDENT = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique",
                   "aten._unique")


class HostSyncs(TorchDispatchMode):
    """Counts host reads of tensor data (see the module docstring); ``seen`` names them."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        kwargs = kwargs or {}
        if name.startswith(_DATA_DEPENDENT):
            self.seen.append(name)
        elif name.startswith("aten.repeat_interleave.Tensor") and kwargs.get("output_size") is None:
            self.seen.append(name)
        elif name.startswith(("aten.index.", "aten.index_put")) and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.seen.append(name + " (boolean mask)")
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t, *a, **kw):
            counter.seen.append("Tensor.tolist")
            return counter._tolist(t, *a, **kw)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def coder_and_optimizer(activation, device="cpu"):
    torch.manual_seed(0)
    cfg = SparseCoderConfig(activation=activation, num_latents=1024, k=16, transcode=True, skip_connection=True)
    coder = SparseCoder(64, cfg, device=device)
    opt = torch.optim.Adam(coder.parameters(), lr=1e-3, fused=True)
    return coder, opt


def coder_step(coder, opt, x, y, dead, auxk_alpha):
    """One step as the trainer runs it (SparseCoder.forward with AuxK, backward, the decoder-norm
    steps, the optimizer)."""
    out = coder(x, y, dead_mask=dead, auxk_alpha=auxk_alpha)
    (out.fvu + auxk_alpha * out.auxk_loss).backward()
    coder.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad(set_to_none=True)
    coder.set_decoder_norm_to_unit_norm()
    return out


@pytest.mark.parametrize("auxk", [False, True], ids=["no-auxk", "auxk"])
@pytest.mark.parametrize("activation", ["topk_binary", "topk", "topk_hybrid"])
def test_sparse_coder_step_has_no_host_syncs(activation, auxk):
    coder, opt = coder_and_optimizer(activation)
    x, y = torch.randn(256, 64), torch.randn(256, 64)
    dead = torch.zeros(1024, dtype=torch.bool)
    dead[::3] = True  # binary and continuous latents among the dead ones (hybrid)
    with bk.deferred_checks():
        coder_step(coder, opt, x, y, dead, 1 / 32 if auxk else 0.0)  # warm-up (optimizer state)
        with HostSyncs() as syncs:
            for _ in range(2):
                out = coder_step(coder, opt, x, y, dead, 1 / 32 if auxk else 0.0)
        assert syncs.seen == [], syncs.seen
        assert torch.isfinite(out.fvu) and (not auxk or out.auxk_loss > 0)


def test_the_counter_sees_what_it_should():
    """The counter is not blind: eager value checks, .item(), masks and tolist all count."""
    coder, opt = coder_and_optimizer("topk_binary")
    x, y = torch.randn(32, 64), torch.randn(32, 64)
    with HostSyncs() as syncs:
        coder(x, y)  # eager checks outside deferred_checks(): host reads
    assert syncs.seen and all("_local_scalar_dense" in s for s in syncs.seen)
    t = torch.arange(5)
    with HostSyncs() as syncs:
        t[t > 2]
        t.tolist()
        t.sum().item()
        torch.nonzero(t)
        t.repeat_interleave(t)
    assert len(syncs.seen) == 5, syncs.seen


def tiny_llama():
    import transformers
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("optimizer", ["signum", "adam"])
def test_trainer_steps_between_logging_steps_have_no_host_syncs(tmp_path, optimizer):
    from binsparse_kernels.train import TrainConfig, Trainer

    cfg = TrainConfig(hookpoints=["layers.1.mlp"], variants=["binary", "topk", "hybrid"], k=4, expansion_factor=4,
                      batch_size=2, ctx_len=16, max_tokens=2 * 16 * 8, save_dir=str(tmp_path), run_name="run",
                      save_every=1000, log_every=4, device="cpu", optimizer=optimizer, lr_warmup_steps=2)
    chunks = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    trainer = Trainer(cfg, tiny_llama(), None, chunks=chunks, log=lambda *_: None)
    seen = []
    real_step = trainer._train_step

    def counted_step(autocast):  # every step's own work; train() reads the metrics after a logging step's
        with HostSyncs() as syncs:
            record = real_step(autocast)
        seen.append(syncs.seen)
        return record

    trainer._train_step = counted_step
    run_dir = trainer.train()
    assert len(seen) == 8 and all(s == [] for s in seen), seen
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 2


def test_trainer_raises_bad_input_at_the_next_logging_step(tmp_path):
    from binsparse_kernels.train import TrainConfig, Trainer

    cfg = TrainConfig(hookpoints=["layers.1.mlp"], variants=["topk"], k=4, expansion_factor=4, batch_size=2,
                      ctx_len=16, max_tokens=2 * 16 * 8, save_dir=str(tmp_path), run_name="run", save_every=1000,
                      log_every=4, device="cpu")
    chunks = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    trainer = Trainer(cfg, tiny_llama(), None, chunks=chunks, log=lambda *_: None)
    real_step = trainer._train_step

    def poisoned_step(autocast):
        if trainer.step == 1:
            with torch.no_grad():
                trainer.coders["topk"]["layers.1.mlp"].W_dec[0, 0] = float("nan")
        return real_step(autocast)

    trainer._train_step = poisoned_step
    with pytest.raises(ValueError, match="W_dec contains NaN or infinite values"):
        trainer.train()
    assert trainer.step == cfg.log_every  # raised at the first logging step after the bad one


# ---------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("activation", ["topk_binary", "topk", "topk_hybrid"])
def test_gpu_coder_step_runs_under_sync_debug_mode_error(activation, backend):
    require_backend(backend)
    coder, opt = coder_and_optimizer(activation, "cuda")
    coder.backend = backend
    x, y = torch.randn(256, 64, device="cuda"), torch.randn(256, 64, device="cuda")
    with bk.deferred_checks():
        coder_step(coder, opt, x, y, None, 0.0)  # warm-up: compiles, optimizer state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = coder_step(coder, opt, x, y, None, 0.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.fvu)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("activation", ["topk_binary", "topk"])
def test_gpu_one_coder_step_captures_in_a_cuda_graph(activation, backend):
    require_backend(backend)
    coder, _ = coder_and_optimizer(activation, "cuda")
    coder.backend = backend
    opt = torch.optim.Adam(coder.parameters(), lr=1e-3, capturable=True)
    x, y = torch.randn(256, 64, device="cuda"), torch.randn(256, 64, device="cuda")
    with bk.deferred_checks():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA graph capture asks
            for _ in range(2):
                coder_step(coder, opt, x, y, None, 0.0)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients from the graph's pool
        with torch.cuda.graph(graph):
            out = coder(x, y)
            out.fvu.backward()
            opt.step()
        before = coder.encoder.weight.detach().clone()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out.fvu) and not torch.equal(before, coder.encoder.weight)
