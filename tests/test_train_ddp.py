"""Data-parallel training through torchrun: two CPU processes on the gloo backend.

Two ranks x batch 4 must train exactly like one process taking the same 8 sequences per step as two
micro-batches of 4 (``grad_acc_steps=2``). The FVU is normalised per rank (per micro-batch), as in
sparsify, so the single-process twin of the data-parallel run is gradient accumulation, not one
batch of 8: the mean of two micro-batch FVUs is not the FVU of their union.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from binsparse_kernels.train import TrainConfig, Trainer

TESTS = Path(__file__).resolve().parent
N_CHUNKS, SEQ = 64, 16


def tiny_llama():
    torch.manual_seed(0)
    # initializer_range 0.3: MLP outputs of order 1, like a trained model's
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                        initializer_range=0.3))


def numbered_chunks():
    """Random token chunks whose first token is the chunk's index, so a batch shows which chunks it took."""
    chunks = torch.randint(0, 97, (N_CHUNKS, SEQ), generator=torch.Generator().manual_seed(1))
    chunks[:, 0] = torch.arange(N_CHUNKS)
    return chunks


def config(save_dir, run_name, **kw):
    base = dict(model="tiny", hookpoints=["layers.1.mlp"], variants=["binary", "topk", "hybrid"], k=4,
                expansion_factor=2, batch_size=4, ctx_len=SEQ, max_tokens=8 * SEQ * 4, optimizer="adam", lr=1e-3,
                lr_warmup_steps=1, auxk_alpha=1 / 32, dead_feature_threshold=8 * SEQ * 2, device="cpu",
                save_dir=str(save_dir), run_name=run_name, save_every=2, log_every=1)
    return TrainConfig(**{**base, **kw})


def recorded_run(cfg) -> dict:
    """Train, recording each (step, micro-batch)'s chunk indices and every coder's first-step gradients."""
    trainer = Trainer(cfg, tiny_llama(), None, chunks=numbered_chunks(), log=lambda *_: None)
    torch.manual_seed(1 + trainer.rank)  # rank-dependent randomness must not leak into the weights
    batches, first_grads = [], {}
    real_batch = trainer._batch

    def batch(micro):
        b = real_batch(micro)
        batches.append((trainer.step, micro, b[:, 0].tolist()))
        return b

    trainer._batch = batch
    for key, (opt, _, _) in trainer.optimizers.items():
        def before_step(opt, args, kwargs, key=key):
            if trainer.step == 0:
                first_grads[key] = [p.grad.clone() for group in opt.param_groups for p in group["params"]]
        opt.register_step_pre_hook(before_step)
    trainer.train()
    return {"rank": trainer.rank, "world": trainer.world, "steps": trainer.step, "tokens": trainer.tokens_seen,
            "batches": batches, "first_grads": first_grads, "since_fired": trainer.since_fired,
            "states": {key: coder.state_dict() for key, coder in trainer._all_coders}}


WORKER = textwrap.dedent(f'''
    import sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {str(TESTS)!r})
    from test_train_ddp import config, recorded_run

    result = recorded_run(config(sys.argv[1], "ddp"))
    torch.save(result, f"{{sys.argv[1]}}/rank{{result['rank']}}.pt")
    dist.destroy_process_group()
''')


def metric_lines(path):
    import json

    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_sec"}
            for line in path.read_text().splitlines()]


def test_two_ranks_train_like_one_process_with_two_micro_batches(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    single = recorded_run(config(tmp_path, "single", grad_acc_steps=2))
    assert ranks[0]["world"] == ranks[1]["world"] == 2 and single["world"] == 1
    assert ranks[0]["steps"] == ranks[1]["steps"] == single["steps"] == 4
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == single["tokens"] == 4 * 8 * SEQ

    # Data: per step the two ranks take disjoint halves of the same 8 chunks, rank r the chunks
    # of the single process's micro-batch r.
    for step in range(4):
        halves = [[ids for s, micro, ids in rank["batches"] if s == step] for rank in ranks]
        assert [len(h) for h in halves] == [1, 1]
        r0, r1 = halves[0][0], halves[1][0]
        assert not set(r0) & set(r1) and sorted(r0 + r1) == list(range(8 * step, 8 * step + 8))
        assert [ids for s, micro, ids in single["batches"] if s == step] == [r0, r1]

    # Gradients are averaged over ranks, as gradient accumulation averages over micro-batches: the
    # first step's gradients agree at fp32 rounding (a sum instead of a mean would be 2x off), and so
    # do the weights after four Adam steps.
    for key, grads in single["first_grads"].items():
        for rank in ranks:
            for g_ddp, g in zip(rank["first_grads"][key], grads):
                torch.testing.assert_close(g_ddp, g, rtol=1e-5, atol=1e-7, msg=key)
    for key, state in single["states"].items():
        for name, p in state.items():
            assert torch.equal(ranks[0]["states"][key][name], ranks[1]["states"][key][name]), (key, name)
            torch.testing.assert_close(ranks[0]["states"][key][name], p, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
        # a latent fired if it fired on any rank (MAX all-reduce), as on any micro-batch
        assert torch.equal(ranks[0]["since_fired"][key], single["since_fired"][key]), key
        assert torch.equal(ranks[1]["since_fired"][key], single["since_fired"][key]), key
    assert any(bool((s >= 8 * SEQ * 2).any()) for s in single["since_fired"].values())  # AuxK had dead latents

    # Only rank 0 wrote files; its metrics are the single process's (averaged over ranks).
    ddp_lines, single_lines = metric_lines(tmp_path / "ddp" / "metrics.jsonl"), metric_lines(
        tmp_path / "single" / "metrics.jsonl")
    assert [line["step"] for line in ddp_lines] == [1, 2, 3, 4]
    for a, b in zip(ddp_lines, single_lines):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-7), name
    for variant in ("binary", "topk", "hybrid"):
        assert (tmp_path / "ddp" / variant / "layers.1.mlp" / "sae.safetensors").is_file()

    # A run saved by 2 ranks does not resume on 1: its data order depends on the rank count.
    with pytest.raises(ValueError, match="saved with 2 ranks, now 1"):
        Trainer(config(tmp_path, "ddp", resume=True), tiny_llama(), None, chunks=numbered_chunks())
