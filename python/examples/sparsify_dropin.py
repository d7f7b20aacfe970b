"""Train sparse coders with EleutherAI's sparsify (``pip install eai-sparsify``) on binsparse's kernels.

One line makes sparsify's SparseCoder and Trainer run on the fused ops::

    from binsparse_kernels.integrations.sparsify import patch_sparsify
    patch_sparsify()

and ``BinarySparseCoderConfig`` gives sparsify the binary TopK coder its PyPI release lacks.

By default this script runs offline in seconds: a tiny randomly initialised Llama and random tokens.
For a real run pass a model and a tokenised dataset, e.g.::

    python python/examples/sparsify_dropin.py --model HuggingFaceTB/SmolLM2-135M \\
        --dataset EleutherAI/SmolLM2-135M-10B --hookpoints layers.9.mlp --binary --k 32 --expansion 32

(the dataset is tokenised with sparsify's own ``chunk_and_tokenize``).
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch

from sparsify import SparseCoderConfig, TrainConfig, Trainer

from binsparse_kernels.integrations.sparsify import BinarySparseCoderConfig, load_sparsify, patch_sparsify


def tiny_model_and_tokens(n_seq: int, seq_len: int):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=seq_len)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # unit-scale embeddings, so activations have a real model's O(1) per-dim scale
        model.model.embed_tokens.weight.normal_(0, 1)
    tokens = torch.randint(0, cfg.vocab_size, (n_seq, seq_len))
    return model, Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")


def real_model_and_tokens(model_name: str, dataset: str, seq_len: int, max_examples: int):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsify.data import chunk_and_tokenize

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_name, torch_dtype=torch.bfloat16, device_map={"": device})
    data = load_dataset(dataset, split=f"train[:{max_examples}]")
    if "input_ids" not in data.column_names:
        data = chunk_and_tokenize(data, AutoTokenizer.from_pretrained(model_name), max_seq_len=seq_len)
    return model, data.with_format("torch")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Hugging Face model id (default: a tiny random Llama, offline)")
    p.add_argument("--dataset", default="EleutherAI/SmolLM2-135M-10B")
    p.add_argument("--hookpoints", nargs="+", default=["layers.1"])
    p.add_argument("--binary", action="store_true", help="train binary TopK coders (BAE)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=4, help="sequences per step")
    p.add_argument("--ctx_len", type=int, default=64)
    p.add_argument("--examples", type=int, default=64, help="sequences to train on")
    p.add_argument("--save_dir", default=None)
    p.add_argument("--backend", default=None, help="binsparse backend (default: fastest available)")
    args = p.parse_args(argv)

    patch_sparsify(backend=args.backend)  # sparsify now encodes and decodes with binsparse ops

    torch.manual_seed(0)
    if args.model is None:
        model, data = tiny_model_and_tokens(args.examples, args.ctx_len)
    else:
        model, data = real_model_and_tokens(args.model, args.dataset, args.ctx_len, args.examples)
    d_model = model.config.hidden_size
    num_latents = d_model * args.expansion
    if args.binary:
        sae_cfg = BinarySparseCoderConfig(k=args.k, expansion_factor=args.expansion)
        lr = 3e-3 / math.sqrt(num_latents / 2**15)  # the paper's Signum LR law for binary coders
    else:
        sae_cfg = SparseCoderConfig(k=args.k, expansion_factor=args.expansion)
        lr = None  # sparsify's own LR law
    save_dir = args.save_dir or tempfile.mkdtemp(prefix="sparsify-binsparse-")
    cfg = TrainConfig(sae_cfg, batch_size=args.batch_size, hookpoints=args.hookpoints, lr=lr,
                      log_to_wandb=False, save_dir=save_dir, run_name="run")
    trainer = Trainer(cfg, data, model)
    trainer.fit()

    # Reconstruction on fresh tokens, with the checkpoints sparsify saved.
    results = {}
    acts = {}
    hooks = [model.base_model.get_submodule(h).register_forward_hook(
        lambda mod, inp, out, h=h: acts.__setitem__(h, (out[0] if isinstance(out, tuple) else out)))
        for h in cfg.hookpoints]
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (2, args.ctx_len), device=model.device))
    for handle in hooks:
        handle.remove()
    for hook in cfg.hookpoints:
        sae = load_sparsify(f"{save_dir}/run/{hook}", device=model.device)
        x = acts[hook].flatten(0, 1).float()
        with torch.no_grad():
            out = sae(x)
        results[hook] = float(out.fvu)
        print(f"{hook}: {type(sae).__name__} ({sae.cfg.activation}), FVU on fresh tokens {out.fvu:.3f}, "
              f"mean L0 {float((out.latent_acts != 0).sum(1).float().mean()):.1f}")
    print(f"checkpoints in {save_dir}/run")
    return results


if __name__ == "__main__":
    main()
