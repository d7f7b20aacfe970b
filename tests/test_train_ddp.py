"""Data-parallel training through torchrun: two CPU processes on the gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    from binsparse_kernels.train import TrainConfig, Trainer

    out_dir, world_tag = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)  # the same tiny LM and data on every rank
    # initializer_range 0.3: MLP outputs of order 1, like a trained model's, so the LR law's value at the
    # reference batch (M = 64: binary 0.068, TopK 0.08) fits; 128-token steps would scale it to 1/23
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                      initializer_range=0.3))
    chunks = torch.randint(0, 97, (64, 16))
    cfg = TrainConfig(model="tiny", hookpoints=["layers.1.mlp"], variants=["binary", "topk"], k=4,
                      expansion_factor=2, batch_size=4, ctx_len=16, max_tokens=4 * 16 * 2 * 12, device="cpu",
                      save_dir=out_dir, run_name=world_tag, save_every=5, log_every=1, lr=0.05)
    trainer = Trainer(cfg, lm, None, chunks=chunks, log=lambda *_: None)
    torch.manual_seed(1 + trainer.rank)  # rank-dependent randomness must not leak into the weights
    trainer.train()
    params = {key: [p.detach().double().sum().item() for p in coder.parameters()]
              for key, coder in trainer._all_coders}
    with open(os.path.join(out_dir, f"{world_tag}-rank{trainer.rank}.json"), "w") as f:
        json.dump({"params": params, "tokens": trainer.tokens_seen, "steps": trainer.step,
                   "world": trainer.world}, f)
    if dist.is_initialized():
        dist.destroy_process_group()
''')


def test_two_ranks_on_gloo_stay_in_sync_and_learn(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path), "ddp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"ddp-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    # identical weights on both ranks after 12 steps: gradients were averaged, init broadcast
    assert ranks[0]["params"] == ranks[1]["params"]
    # each step consumed both ranks' batches: 12 steps x 2 ranks x 4 sequences x 16 tokens
    assert ranks[0]["tokens"] == ranks[1]["tokens"] == 12 * 2 * 4 * 16
    # only rank 0 wrote files: metrics with one line per step, and the checkpoints
    lines = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 13))
    for variant in ("binary", "topk"):
        assert (tmp_path / "ddp" / variant / "layers.1.mlp" / "sae.safetensors").is_file()
        fvus = [line[f"fvu/{variant}/layers.1.mlp"] for line in lines]
        assert min(fvus[-3:]) < fvus[0], (variant, fvus)
