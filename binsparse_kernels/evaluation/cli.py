"""``binsparse eval CHECKPOINT...``: evaluate sparse coders on held-out tokens, JSON out and a table.

A CHECKPOINT is a run folder (``<run>/<variant>/<hookpoint>/cfg.json``), a variant folder
(``<variant>/<hookpoint>/cfg.json``) or one hookpoint folder (``<hookpoint>/cfg.json``). Each variant
(e.g. binary, topk, hybrid) is evaluated with all its hookpoints, one at a time and all at once.

Metrics (see ``metrics.py`` for the exact definitions): FVU and explained variance, MSE, cosine
similarity, l2 ratio, relative reconstruction bias; CE increase, KL(clean || spliced), next-token
accuracy drop, ce_loss_score and kl_div_score with the coder spliced into the LM; L0 (firing
latents: for binary codes acts == 1), L1, dead latents (never fired on the evaluated tokens),
latents firing on > 1%, > 10%, > 50% of tokens, the log10 firing-rate histogram; and the offline
token-set interpretability *proxy* (``interp.py``; not the paper's LLM-scored F1).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import models, runs
from ..coder import SparseCoder
from ..data import held_out_tokens, iter_batches
from .interp import export_delphi_cache, token_proxy
from .metrics import nan_to_none
from .splice import EvalResult, evaluate

# -- checkpoints -----------------------------------------------------------------------------------


def discover_checkpoints(paths) -> dict[str, dict[str, Path]]:
    """{variant: {hookpoint: checkpoint folder}} from run, variant or hookpoint folders.

    A variant is named after its folder; when the same variant name comes from several runs, every
    one of them is named ``<run>/<variant>``. Folders deeper than <run>/<variant>/<hookpoint> (e.g.
    copies under ``best/``) are not picked up from a run folder; pass them explicitly.
    """
    entries = []  # (variant folder, variant name, hookpoint, checkpoint folder)
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint path does not exist: {p}")
        if (p / "cfg.json").is_file():
            found = [(p.parent, p.parent.name or "coder", p.name, p)]
        else:
            # A variant folder holds <hookpoint>/cfg.json; otherwise a run folder, <variant>/<hookpoint>/cfg.json.
            found = [(p, p.name, cfg.parent.name, cfg.parent) for cfg in sorted(p.glob("*/cfg.json"))]
            if not found:
                found = [(cfg.parent.parent, cfg.parent.parent.name, cfg.parent.name, cfg.parent)
                         for cfg in sorted(p.glob("*/*/cfg.json"))]
            if not found:
                raise FileNotFoundError(f"no sparse coder checkpoints (<hookpoint>/cfg.json) in {p} or its "
                                        f"variant folders")
        for variant_dir, variant, hookpoint, folder in found:
            if not (folder / "sae.safetensors").is_file():
                raise FileNotFoundError(f"incomplete checkpoint: {folder} has cfg.json but no sae.safetensors")
            entries.append((variant_dir.resolve(), variant, hookpoint, folder))
    dirs_by_name: dict[str, set] = {}
    for variant_dir, variant, _, _ in entries:
        dirs_by_name.setdefault(variant, set()).add(variant_dir)
    out: dict[str, dict[str, Path]] = {}
    for variant_dir, variant, hookpoint, folder in entries:
        key = variant if len(dirs_by_name[variant]) == 1 else f"{variant_dir.parent.name}/{variant}"
        hooks = out.setdefault(key, {})
        if hookpoint in hooks and hooks[hookpoint].resolve() != folder.resolve():
            raise ValueError(f"two checkpoints for variant {key!r}, hookpoint {hookpoint!r}: {hooks[hookpoint]} "
                             f"and {folder}")
        hooks[hookpoint] = folder
    return out


def load_coders(checkpoints: dict[str, dict[str, Path]], device) -> dict[str, dict[str, SparseCoder]]:
    return {v: {h: SparseCoder.load_from_disk(path, device=device) for h, path in hooks.items()}
            for v, hooks in checkpoints.items()}


# -- evaluation driver (shared with the report) ----------------------------------------------------


@dataclass
class EvalOptions:
    batch_size: int = 8
    interp: bool = True
    proxy_max_tokens: int = 10
    proxy_min_examples: int = 10
    proxy_examples: int = 100
    seed: int = 0


def run_evaluation(model, coder_sets: dict[str, dict[str, SparseCoder]], tokens: torch.Tensor,
                   opts: EvalOptions = EvalOptions(), *, keep_codes: bool = False, log=None) -> EvalResult:
    """Evaluate the coder sets on ``tokens`` [n, T]; adds the interpretability proxy to the results."""
    total = tokens.numel()
    done = [0]
    start = time.time()

    def progress(n):
        done[0] += n
        if log is not None:
            rate = done[0] / max(time.time() - start, 1e-9)
            log(f"  evaluated {done[0]:,}/{total:,} tokens ({rate:,.0f} tokens/s, all passes of a batch together)")

    res = evaluate(model, coder_sets, iter_batches(tokens, opts.batch_size),
                   keep_codes=opts.interp or keep_codes, progress=progress)
    for v, coders in coder_sets.items():
        entry = res.results["variants"][v]
        summaries = []
        res.proxies[v] = {}
        for h, coder in coders.items():
            if not opts.interp:
                continue
            if tokens.shape[0] < 2:
                entry["hookpoints"][h]["interp_proxy"] = None
                continue
            indices, acts = res.codes[v][h]
            proxy = token_proxy(res.tokens, indices, acts, coder.num_latents, max_tokens=opts.proxy_max_tokens,
                                n_examples=opts.proxy_examples, min_examples=opts.proxy_min_examples, seed=opts.seed)
            res.proxies[v][h] = proxy
            summary = proxy.summary()
            entry["hookpoints"][h]["interp_proxy"] = summary
            summaries.append(summary)
        scored = [s for s in summaries if s["n_scored"]]
        if scored:  # per hookpoint, then averaged over hookpoints (as the paper does)
            entry["interp_proxy"] = {key: sum(s[key] for s in scored) / len(scored)
                                     for key in ("f1_mean", "f1_weighted", "f1_natural_mean", "f1_natural_weighted")}
    return res


# -- table -----------------------------------------------------------------------------------------

TABLE_COLUMNS = [
    ("variant", None), ("hookpoint", None), ("FVU", "fvu"), ("CE incr", "ce_increase"), ("KL", "kl_div"),
    ("acc drop", "accuracy_drop"), ("CE score", "ce_loss_score"), ("L0", "l0"), ("dead %", "dead_fraction"),
    (">10%", "count_over_10pct"), (">50%", "count_over_50pct"), ("F1 proxy", "f1_mean"),
    ("F1 proxy w", "f1_weighted"),
]


def _fmt(key, value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if key == "dead_fraction":
        return f"{100 * value:.1f}"
    if isinstance(value, int):
        return str(value)
    if key in ("kl_div", "ce_increase", "accuracy_drop"):
        return f"{value:.4f}"
    return f"{value:.3f}"


def table_rows(results: dict) -> list[list[str]]:
    """One row per (variant, hookpoint), plus an "all" row per multi-hookpoint variant."""
    rows = []
    for v, entry in results["variants"].items():
        for h, m in entry["hookpoints"].items():
            proxy = m.get("interp_proxy") or {}
            row = [v, h]
            for _, key in TABLE_COLUMNS[2:]:
                row.append(_fmt(key, proxy.get(key) if key.startswith("f1") else m.get(key)))
            rows.append(row)
        if "all_hookpoints" in entry:
            a = entry["all_hookpoints"]
            proxy = entry.get("interp_proxy") or {}
            row = [v, "all at once"]
            for _, key in TABLE_COLUMNS[2:]:
                if key in ("ce_increase", "kl_div", "accuracy_drop"):
                    row.append(_fmt(key, a.get(key)))
                elif key.startswith("f1"):
                    row.append(_fmt(key, proxy.get(key)))  # mean over hookpoints
                else:
                    row.append("")
            rows.append(row)
    return rows


def format_table(results: dict, markdown: bool = False) -> str:
    header = [name for name, _ in TABLE_COLUMNS]
    rows = table_rows(results)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


# -- command ---------------------------------------------------------------------------------------


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, data and budget options, shared by ``binsparse eval`` and ``binsparse report``."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="a GGUF file, a local HF model folder or a hub name (default: the model the run was trained "
                        "on, from trainer_state.pt, else the trainer's offline SmolLM2)")
    g.add_argument("--dataset", default=None,
                   help="held-out text: .txt/.jsonl files or a folder of them, or a Hugging Face dataset name "
                        "(default: the dataset the run was trained on, from trainer_state.pt, else the built-in "
                        "corpus; either way only the chunks the trainer held out)")
    g.add_argument("--split", default=None, help="dataset split (Hugging Face datasets; default: the run's, else train)")
    g.add_argument("--text_column", default=None, help="default: the run's, else text")
    g.add_argument("--ctx_len", type=int, default=None,
                   help="tokens per evaluated sequence (default: the run's training ctx_len from trainer_state.pt, "
                        "else 256, the trainer's default; held-out chunks are disjoint from the training chunks "
                        "only at the training ctx_len)")
    g.add_argument("--all_chunks", action="store_true",
                   help="the --dataset is held out as a whole: evaluate any of its chunks, not only the chunks the "
                        "trainer holds out (every 20th)")
    g.add_argument("--tokens", type=int, default=2**16, help="token budget: evaluate tokens // ctx_len sequences")
    g.add_argument("--batch_size", type=int, default=8, help="sequences per LM forward")
    g.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="LM dtype (the coders keep their checkpoint dtype)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no_interp", action="store_true", help="skip the interpretability proxy")
    g.add_argument("--proxy_max_tokens", type=int, default=10, help="proxy: most tokens in an explanation")
    g.add_argument("--proxy_min_examples", type=int, default=10,
                   help="proxy: firings needed on the explanation half to score a latent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="run folders, variant folders or hookpoint folders")
    add_data_arguments(parser)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--delphi_cache", default=None,
                        help="also export the latent activations in delphi's cache format into this folder "
                             "(one subfolder per variant)")
    parser.add_argument("--delphi_splits", type=int, default=5)


def options_from_args(args) -> EvalOptions:
    for name in ("ctx_len", "tokens", "batch_size", "proxy_max_tokens", "proxy_min_examples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    return EvalOptions(batch_size=args.batch_size, interp=not args.no_interp, proxy_max_tokens=args.proxy_max_tokens,
                       proxy_min_examples=args.proxy_min_examples, seed=args.seed)


DEFAULT_CTX_LEN = 256  # the trainer's default


def data_defaults(args, checkpoints: dict[str, dict[str, Path]], log=print) -> None:
    """Fill ``args.model/dataset/split/text_column/ctx_len`` left unset from the runs' training config,
    so ``binsparse eval RUN`` scores the trainer's held-out chunks of the data the run was trained on."""
    configs = {}
    for hooks in checkpoints.values():
        for folder in hooks.values():
            for run_dir in (folder.parent.parent, folder.parent):
                if run_dir not in configs:
                    configs[run_dir] = runs.read_run_config(run_dir)
    found = [(d, c) for d, c in configs.items() if c]
    cfg = found[0][1] if found else {}
    keys = ("dataset", "split", "text_column", "ctx_len")
    if len({tuple(str(c.get(k)) for k in keys) for _, c in found}) > 1:
        log(f"warning: the runs were trained on different data settings; defaults taken from {found[0][0]}")
    if getattr(args, "model", None) is None and cfg.get("model"):
        args.model = cfg["model"]  # the model the run was trained on (None there: the default model)
    if args.dataset is None and cfg:
        args.dataset = cfg.get("dataset")  # None: the built-in corpus
    if args.split is None:
        args.split = cfg.get("split") or "train"
    if args.text_column is None:
        args.text_column = cfg.get("text_column") or "text"
    if args.ctx_len is None:
        args.ctx_len = int(cfg.get("ctx_len") or DEFAULT_CTX_LEN)
    elif cfg.get("ctx_len") and args.ctx_len != cfg["ctx_len"] and not args.all_chunks:
        log(f"warning: --ctx_len {args.ctx_len} differs from the training ctx_len {cfg['ctx_len']}: the held-out "
            f"chunks then overlap text the coders were trained on")


def check_hookpoints(model, checkpoints: dict[str, dict[str, Path]]) -> None:
    """Every checkpoint's hookpoint must name a module of the model (checked before any data is read)."""
    for variant, hooks in checkpoints.items():
        for hookpoint, folder in hooks.items():
            try:
                models.resolve_hookpoint(model, hookpoint)
            except ValueError as exc:
                raise ValueError(f"{folder} (variant {variant!r}): {exc}") from None


def prepare(args, log=print, checkpoints: Optional[dict] = None):
    """(model, tokenizer, model label, tokens, device) for the eval/report commands."""
    if args.ctx_len is None or args.split is None or args.text_column is None:
        data_defaults(args, {}, log)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    log(f"loading the model ({args.model or 'default: offline SmolLM2'}) on {device}")
    model, tokenizer, label = models.load_model(args.model, device=device, dtype=dtype)
    if checkpoints:
        check_hookpoints(model, checkpoints)
    tokens = held_out_tokens(tokenizer, dataset=args.dataset, split=args.split, text_column=args.text_column,
                                  ctx_len=args.ctx_len, n_tokens=args.tokens, seed=args.seed,
                                  all_chunks=getattr(args, "all_chunks", False))
    log(f"evaluating on {tokens.shape[0]} sequences x {tokens.shape[1]} tokens")
    return model, tokenizer, label, tokens, device


def dataset_info(args) -> dict:
    return {"dataset": args.dataset or "built-in corpus", "split": args.split, "text_column": args.text_column,
            "ctx_len": args.ctx_len, "token_budget": args.tokens, "seed": args.seed,
            "chunks": "all" if getattr(args, "all_chunks", False) else "the trainer's held-out chunks (every 20th)"}


def run(args) -> int:
    opts = options_from_args(args)
    log = lambda msg: print(msg, file=sys.stderr)
    checkpoints = discover_checkpoints(args.checkpoints)  # bad paths fail before the model loads
    data_defaults(args, checkpoints, log)
    model, tokenizer, label, tokens, device = prepare(args, log, checkpoints)
    coder_sets = load_coders(checkpoints, device)
    res = run_evaluation(model, coder_sets, tokens, opts, keep_codes=bool(args.delphi_cache), log=log)
    results = {"model": label, "data": dataset_info(args),
               "checkpoints": {v: {h: str(p) for h, p in hooks.items()} for v, hooks in checkpoints.items()},
               **res.results}
    print(format_table(results))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(nan_to_none(results), indent=2))
        log(f"wrote {out}")
    if args.delphi_cache:
        for v, coders in coder_sets.items():
            folder = Path(args.delphi_cache) / re.sub(r"[^A-Za-z0-9_.-]+", "_", v)
            export_delphi_cache(folder, res.tokens, res.codes[v], {h: c.num_latents for h, c in coders.items()},
                                n_splits=args.delphi_splits, model_name=label,
                                dataset={"dataset_repo": args.dataset or "", "dataset_split": args.split,
                                         "dataset_column": args.text_column, "dataset_row": args.text_column})
            log(f"wrote delphi cache {folder}")
        if any(c.cfg.binary or c.cfg.hybrid for cs in coder_sets.values() for c in cs.values()):
            log("note: binary latents all have activation 1, so delphi's quantile sampling degenerates for them; "
                "see README.md in the cache folder")
    return 0


def main(argv=None) -> int:
    """``python -m binsparse_kernels.evaluation.cli``: the same as ``binsparse eval``."""
    parser = argparse.ArgumentParser(prog="binsparse eval", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return int(run(parser.parse_args(argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
