"""SAELens (``pip install sae-lens``) on binsparse's kernels, and our checkpoints in SAELens.

Part 1: ``patch_saelens()`` makes SAELens build its TopK SAEs on the fused ops. Whatever builds a
"topk" SAE through SAELens's registry (``TrainingSAE.from_dict``, the training runner,
``SAE.load_from_disk`` / ``from_pretrained``) gets them, and SAELens's own ``SAETrainer`` trains
them unchanged.

Part 2: ``binsparse_disk_loader`` is a SAELens converter. With it, checkpoints written by
``binsparse_kernels.coder.SparseCoder`` (binary ones included) load as SAELens modules::

    sae = SAE.load_from_disk("ckpt/layers.9", converter=binsparse_disk_loader)

Offline by default: activations come from a tiny randomly initialised Llama.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from sae_lens import SAE, SAETrainer, TopKTrainingSAEConfig, TrainingSAE
from sae_lens.config import SAETrainerConfig

from binsparse_kernels.coder import SparseCoder, SparseCoderConfig
from binsparse_kernels.integrations.saelens import binsparse_disk_loader, patch_saelens


def activation_batches(d_model: int, batch_tokens: int, n_batches: int, seed: int = 0):
    """Residual-stream activations of a tiny random Llama (stand-in for a real model's hook)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=batch_tokens)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1)
    for _ in range(n_batches):
        ids = torch.randint(0, 256, (1, batch_tokens))
        with torch.no_grad():  # never yield inside no_grad: the caller would inherit it
            acts = model(ids, output_hidden_states=True).hidden_states[1][0]
        yield acts


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d_model", type=int, default=32)
    p.add_argument("--d_sae", type=int, default=256)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batch_tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="saelens-binsparse-"))
    results = {}

    # -- Part 1: SAELens's TopK SAE and trainer on binsparse ops --------------------------------
    patch_saelens()
    cfg = TopKTrainingSAEConfig(d_in=args.d_model, d_sae=args.d_sae, k=args.k)
    sae = TrainingSAE.from_dict(cfg.to_dict())  # the registry now hands out the fused class
    print(f"SAELens built {type(sae).__name__}")
    trainer_cfg = SAETrainerConfig(total_training_samples=args.steps * args.batch_tokens,
                                   train_batch_size_samples=args.batch_tokens, lr=3e-3, lr_end=3e-3,
                                   dead_feature_window=5)
    data = activation_batches(args.d_model, args.batch_tokens, args.steps)
    SAETrainer(trainer_cfg, sae, data).fit()
    sae.save_inference_model(out / "saelens_topk")
    inference = SAE.load_from_disk(out / "saelens_topk")
    x = next(activation_batches(args.d_model, args.batch_tokens, 1, seed=1))
    with torch.no_grad():
        fvu = ((inference(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    results["saelens_topk_fvu"] = fvu
    print(f"trained with SAETrainer, reloaded as {type(inference).__name__}: FVU on fresh tokens {fvu:.3f}")

    # -- Part 2: a binsparse checkpoint (here a binary coder) loaded into SAELens ----------------
    coder = SparseCoder(args.d_model, SparseCoderConfig(activation="topk_binary", num_latents=args.d_sae, k=args.k))
    coder.init_from_batch(x)
    coder.save_to_disk(out / "layers.1")
    bae = SAE.load_from_disk(out / "layers.1", converter=binsparse_disk_loader)
    with torch.no_grad():
        same = torch.allclose(bae(x), coder(x).sae_out, atol=1e-5)
        l0 = float((bae.encode(x) != 0).sum(-1).float().mean())
    results["binary_matches"] = same
    print(f"our binary coder in SAELens: {type(bae).__name__} (architecture {bae.cfg.architecture()!r}), "
          f"same output as our SparseCoder: {same}, mean L0 {l0:.1f}")
    return results


if __name__ == "__main__":
    main()
