"""``binsparse report RUNS... --out DIR``: what binarisation does, measured, in one folder.

The folder holds ``report.md`` (side-by-side table of the variants, per-hookpoint table, notes on
the metrics), ``results.json`` (everything ``binsparse eval`` computes), and PNG plots: overlaid
log-scale firing-rate histograms, FVU-vs-step curves from the runs' ``metrics.jsonl`` and, in the
markdown, top activating contexts for a few latents of each coder. ``build_default_report(run_dir)``
is what the trainer's default run calls when it finishes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from .. import models, runs
from ..runs import read_lr_sweep
from ..data import held_out_tokens
from .cli import (EvalOptions, add_data_arguments, data_defaults, dataset_info, discover_checkpoints, format_table,
                  load_coders, options_from_args, prepare, run_evaluation)
from .interp import render_context, top_contexts
from .metrics import nan_to_none

VARIANT_ORDER = ["binary", "topk", "hybrid"]
LINESTYLES = ["-", "--", "-.", ":"]
_ACTIVATION_VARIANT = {"topk_binary": "binary", "topk": "topk", "topk_hybrid": "hybrid"}
SUMMARY_ROWS = [  # (label, key, where): where = "hook" (mean over hookpoints), "all", or "proxy"
    ("FVU", "fvu", "hook"),
    ("explained variance", "explained_variance", "hook"),
    ("CE increase (nats)", "ce_increase", "hook"),
    ("KL(clean || spliced)", "kl_div", "hook"),
    ("next-token accuracy drop", "accuracy_drop", "hook"),
    ("ce_loss_score", "ce_loss_score", "hook"),
    ("kl_div_score", "kl_div_score", "hook"),
    ("CE increase, all hookpoints at once", "ce_increase", "all"),
    ("KL, all hookpoints at once", "kl_div", "all"),
    ("L0 (firing latents per token)", "l0", "hook"),
    ("dead fraction (never fired)", "dead_fraction", "hook"),
    ("latents firing on >10% of tokens", "count_over_10pct", "hook"),
    ("latents firing on >50% of tokens", "count_over_50pct", "hook"),
    ("proxy F1 (plain mean)", "f1_mean", "proxy"),
    ("proxy F1 (frequency-weighted)", "f1_weighted", "proxy"),
    ("cosine similarity", "cossim", "hook"),
    ("relative reconstruction bias", "relative_reconstruction_bias", "hook"),
]


def _variant_sort_key(name: str):
    base, _, k = name.split("/")[-1].partition("-k")  # "binary-k16": a k sweep's variant
    base = _ACTIVATION_VARIANT.get(base, base)  # folders named after the activation sort the same way
    return (VARIANT_ORDER.index(base) if base in VARIANT_ORDER else len(VARIANT_ORDER),
            int(k) if k.isdigit() else 0, name)


def _mean(values):
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def summary_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Rows = metrics, columns = variants; per-hookpoint metrics averaged over the variant's hookpoints."""
    variants = sorted(results["variants"], key=_variant_sort_key)
    header = ["metric"] + variants
    rows = []
    for label, key, where in SUMMARY_ROWS:
        row = [label]
        for v in variants:
            entry = results["variants"][v]
            if where == "hook":
                value = _mean([m.get(key) for m in entry["hookpoints"].values()])
            elif where == "all":
                together = entry.get("all_hookpoints")
                if together is None and len(entry["hookpoints"]) == 1:
                    together = next(iter(entry["hookpoints"].values()))  # one hookpoint: that splice is all of them
                value = (together or {}).get(key, float("nan"))
            else:
                value = (entry.get("interp_proxy") or {}).get(key, float("nan"))
            row.append(_format(key, value))
        rows.append(row)
    return header, rows


def _format(key, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "dead_fraction":
        return f"{100 * value:.1f}%"
    if key.startswith("count_"):
        return f"{value:.1f}" if value != int(value) else str(int(value))
    if key in ("kl_div", "ce_increase", "accuracy_drop", "mse"):
        return f"{value:.4f}"
    return f"{value:.3f}"


def _md_table(header, rows) -> str:
    def line(cells):  # a "|" inside a cell ("KL(clean || spliced)") would start a new column
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|"] + [line(r) for r in rows])


# -- metrics.jsonl -----------------------------------------------------------------------------------


def read_fvu_curves(variant_dir: Path, variant: str) -> dict[str, tuple[list[float], list[float]]]:
    """{hookpoint: (steps, fvu)} from the training metrics next to a variant's checkpoints.

    Looks at ``<variant_dir>/metrics.jsonl`` then ``<run_dir>/metrics.jsonl``. A line holds ``step``
    (else ``tokens``) and ``fvu/<hookpoint>`` keys; in a run-level file lines are matched to the
    variant by a ``variant`` field or by ``fvu/<variant>/<hookpoint>`` keys.
    """
    curves: dict[str, tuple[list, list]] = {}
    for path in (variant_dir / "metrics.jsonl", variant_dir.parent / "metrics.jsonl"):
        if not path.is_file():
            continue
        run_level = path.parent != variant_dir
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written while we read
            if not isinstance(rec, dict):
                continue
            x = rec.get("step", rec.get("tokens"))
            if x is None:
                continue
            if run_level and "variant" in rec and rec["variant"] != variant:
                continue
            for key, value in rec.items():
                if not key.startswith("fvu/") or not isinstance(value, (int, float)):
                    continue
                hook = key[4:]
                if run_level and "variant" not in rec:
                    if not hook.startswith(variant + "/"):
                        continue
                    hook = hook[len(variant) + 1:]
                xs, ys = curves.setdefault(hook, ([], []))
                xs.append(float(x))
                ys.append(float(value))
        if curves:
            break
    return curves


# -- plots -------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_firing_histograms(results: dict, path: Path) -> Path:
    plt = _plt()
    hooks = sorted({h for e in results["variants"].values() for h in e["hookpoints"]})
    ncols = min(2, len(hooks))
    nrows = math.ceil(len(hooks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.8 * nrows), squeeze=False)
    for ax, hook in zip(axes.flat, hooks):
        lowest = 0.0
        for n, v in enumerate(sorted(results["variants"], key=_variant_sort_key)):
            m = results["variants"][v]["hookpoints"].get(hook)
            if m is None:
                continue
            hist = m["firing_hist"]
            live = [i for i, c in enumerate(hist["counts"]) if c]
            if live:
                lowest = min(lowest, hist["log10_edges"][live[0]])
            ax.stairs(hist["counts"], hist["log10_edges"], label=f"{v} (dead: {hist['dead']})", linewidth=1.6,
                      linestyle=LINESTYLES[n % len(LINESTYLES)])  # styles keep coinciding histograms apart
        for x, name in ((-1.0, "10%"), (math.log10(0.5), "50%")):
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
            ax.text(x, ax.get_ylim()[1] * 0.95, name, color="grey", ha="right", va="top", fontsize=8)
        ax.set_xlim(min(lowest, -2.0) - 0.25, 0.05)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("log10(firing rate)")
        ax.set_ylabel("latents")
        ax.set_title(hook)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(hooks):]:
        ax.axis("off")
    fig.suptitle(f"Latent firing rates on {results['n_tokens']:,} held-out tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fvu_curves(curves: dict[str, dict[str, tuple[list, list]]], path: Path) -> Optional[Path]:
    """curves[variant][hookpoint] = (steps, fvu); None when no run has training metrics."""
    hooks = sorted({h for per_hook in curves.values() for h in per_hook})
    if not hooks:
        return None
    plt = _plt()
    ncols = min(2, len(hooks))
    nrows = math.ceil(len(hooks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.8 * nrows), squeeze=False)
    for ax, hook in zip(axes.flat, hooks):
        for v in sorted(curves, key=_variant_sort_key):
            if hook in curves[v]:
                xs, ys = curves[v][hook]
                ax.plot(xs, ys, label=v, linewidth=1.4)
        ax.set_xlabel("step")
        ax.set_ylabel("training FVU")
        ax.set_yscale("log")
        ax.set_title(hook)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(hooks):]:
        ax.axis("off")
    fig.suptitle("FVU during training (training batches, from metrics.jsonl)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- LR sweep and k sweep -----------------------------------------------------------------------------


def read_lr_sweeps(runs) -> dict[str, dict]:
    """{run folder: its lr_sweep.json} for the given runs (or variant / hookpoint folders inside them) that have one."""
    found = {}
    for raw in runs:
        for folder in (Path(raw), *Path(raw).parents[:2]):
            sweep = read_lr_sweep(folder)
            if sweep is not None:
                found[str(folder)] = sweep
                break
    return found


def plot_lr_sensitivity(sweep: dict, path: Path) -> Path:
    """Held-out FVU and dead fraction against the learning rate, one line per variant, the chosen LR circled."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    families = sorted({c["family"] for c in sweep["candidates"]}, key=_variant_sort_key)
    for n, family in enumerate(families):
        rows = sorted((c for c in sweep["candidates"] if c["family"] == family), key=lambda c: c["lr"])
        chosen = sweep["chosen"][family]
        for ax, key, scale in ((axes[0], "fvu", 1), (axes[1], "dead_fraction", 100)):
            line, = ax.plot([c["lr"] for c in rows], [scale * c[key] for c in rows], marker="o", label=family,
                            linestyle=LINESTYLES[n % len(LINESTYLES)], linewidth=1.5)
            ax.plot([chosen["lr"]], [scale * chosen[key]], marker="o", markersize=13, fillstyle="none",
                    color=line.get_color())
    from matplotlib.ticker import NullFormatter

    for ax, label in ((axes[0], "held-out FVU"), (axes[1], "dead latents (% never fired on held-out tokens)")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # the minor labels of a short log axis overlap
        ax.set_xlabel("learning rate")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title("reconstruction (lower is better); circled: chosen")
    axes[1].set_title("dead latents at each learning rate")
    fig.suptitle(f"LR sensitivity: every variant on the same batches, {sweep.get('tokens_per_coder', 0):,} tokens each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lr_sweep_section(sweep: dict, plot_name: str) -> str:
    lines = ["## Learning rates: every variant at its best LR", "",
             f"Every variant was trained at each learning rate below on the same batches "
             f"({sweep.get('tokens_per_coder', 0):,} tokens, {sweep.get('batch_tokens', 0):,} per step, "
             f"optimizer {sweep.get('optimizer')}); the LR law is {sweep.get('lr_rule', 'method.md')}. "
             f"The comparison above uses, per variant, the LR with the **{sweep['criterion']}** on "
             f"{sweep['selection']}. The dead fraction (latents that never fired on those tokens) is shown beside "
             f"it but does not choose.", "",
             "| variant | learning rate | x law | held-out FVU | dead | L0 | chosen |", "|---|---:|---:|---:|---:|---:|---|"]
    for c in sorted(sweep["candidates"], key=lambda c: (_variant_sort_key(c["family"]), c["lr"])):
        chosen = sweep["chosen"][c["family"]]["name"] == c["name"]
        mult = "-" if c.get("multiplier") is None else f"{c['multiplier']:g}"
        lines.append(f"| {c['family']} | {c['lr']:.3g} | {mult} | {c['fvu']:.4f} | {100 * c['dead_fraction']:.1f}% | "
                     f"{c['l0']:.2f} | {'**yes**' if chosen else ''} |")
    edges = [f for f, c in sweep["chosen"].items() if c.get("at_edge_of_grid")]
    lines += ["", f"![LR sensitivity]({plot_name})", ""]
    if edges:
        lines += [f"The best LR of {', '.join(sorted(edges, key=_variant_sort_key))} is at the edge of the grid: a "
                  "wider sweep may find a better one.", ""]
    return "\n".join(lines)


def k_sweep_rows(results: dict) -> dict[str, dict[int, dict]]:
    """{kind: {k: metrics averaged over hookpoints}} when the variants span several k, else {}."""
    table: dict[str, dict[int, dict]] = {}
    for v, entry in results["variants"].items():
        hooks = list(entry["hookpoints"].values())
        kinds = {(_ACTIVATION_VARIANT.get(m.get("activation")), m.get("k")) for m in hooks}
        if len(kinds) != 1:
            continue
        kind, k = kinds.pop()
        table.setdefault(kind, {})[k] = {key: _mean([m.get(key) for m in hooks])
                                         for key in ("fvu", "ce_increase", "kl_div", "l0", "dead_fraction",
                                                     "count_over_10pct", "count_over_50pct")}
    if len({k for per_k in table.values() for k in per_k}) < 2:
        return {}
    return table


def plot_k_sweep(table: dict, path: Path) -> Path:
    plt = _plt()
    keys = (("fvu", "FVU"), ("ce_increase", "CE increase (nats)"), ("dead_fraction", "dead fraction"),
            ("count_over_10pct", "latents on >10% of tokens"))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8))
    for n, kind in enumerate(sorted(table, key=_variant_sort_key)):
        ks = sorted(table[kind])
        for ax, (key, label) in zip(axes, keys):
            ax.plot(ks, [table[kind][k][key] for k in ks], marker="o", label=kind,
                    linestyle=LINESTYLES[n % len(LINESTYLES)])
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.set_xlabel("k")
            ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("Across k (held-out tokens; each coder at its best LR when the run swept LRs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def k_sweep_section(table: dict, plot_name: str) -> str:
    kinds = sorted(table, key=_variant_sort_key)
    ks = sorted({k for per_k in table.values() for k in per_k})
    lines = ["## Across k", "", "Means over hookpoints; the ratio is to TopK at the same k.", "",
             "| k | " + " | ".join(f"{kind} FVU" for kind in kinds) + " | "
             + " | ".join(f"{kind} CE incr" for kind in kinds) + " | " + " | ".join(f"{kind} dead" for kind in kinds)
             + " |", "|---:|" + "---:|" * (3 * len(kinds))]
    for k in ks:
        cells = []
        for key in ("fvu", "ce_increase", "dead_fraction"):
            for kind in kinds:
                m = table[kind].get(k)
                if m is None:
                    cells.append("-")
                    continue
                text = _format(key, m[key])
                ref = table.get("topk", {}).get(k)
                if kind != "topk" and ref and key != "dead_fraction" and ref[key] > 0:
                    text += f" ({m[key] / ref[key]:.2f}x)"
                cells.append(text)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", f"![metrics across k]({plot_name})", ""]
    return "\n".join(lines)


# -- contexts ----------------------------------------------------------------------------------------


def _decoder(tokenizer):
    if tokenizer is None:
        return lambda ids: "".join(f"<{i}>" for i in ids)
    return lambda ids: tokenizer.decode(ids)


def context_section(res, coder_sets, tokenizer, *, n_latents: int = 5, n_contexts: int = 3, seed: int = 0) -> str:
    """Markdown: for each coder, its two most frequent latents plus a seeded random draw of scored latents."""
    decode = _decoder(tokenizer)
    out = []
    g = torch.Generator().manual_seed(seed)
    for v in sorted(coder_sets, key=_variant_sort_key):
        for h, coder in coder_sets[v].items():
            counts = res.firing_counts[v][h]
            n_tok = res.tokens.numel()
            chosen = [int(i) for i in torch.argsort(counts, descending=True)[:2] if counts[i] > 0]
            proxy = res.proxies.get(v, {}).get(h)
            pool = proxy.latents if proxy is not None and proxy.latents.numel() else (counts > 0).nonzero().squeeze(1)
            pool = pool[~torch.isin(pool, torch.tensor(chosen, dtype=pool.dtype))] if chosen else pool
            extra = pool[torch.randperm(pool.numel(), generator=g)[:max(0, n_latents - len(chosen))]].tolist()
            out.append(f"### {v} / {h}\n")
            if not chosen and not extra:
                out.append("No latent fired on the evaluated tokens.\n")
                continue
            for latent in chosen + extra:
                rate = float(counts[latent]) / n_tok
                line = f"- **latent {latent}** (fires on {100 * rate:.3g}% of tokens"
                if proxy is not None and bool((proxy.latents == latent).any()):
                    f1 = float(proxy.f1[proxy.latents == latent][0])
                    expl = ", ".join(repr(decode([t])) for t in proxy.explanation(latent)) or "(empty)"
                    line += f"; proxy explanation {{{expl}}}, F1 {f1:.2f}"
                out.append(line + ")")
                for seq, pos, act in top_contexts(res.tokens, *res.codes[v][h], latent, n=n_contexts, seed=seed):
                    text = render_context(res.tokens, seq, pos, decode).replace("|", "\\|").replace("`", "'")
                    out.append(f"    - act {act:.3g}: `{text}`")
            out.append("")
    return "\n".join(out)


# -- the report --------------------------------------------------------------------------------------

METRIC_NOTES = """\
## How the numbers are computed

- **FVU** = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 over all evaluated tokens (mean over those
  tokens); explained variance = 1 - FVU. For transcoders y is the MLP output, predicted from the
  MLP input.
- **CE increase / KL / accuracy drop**: the coder's output replaces the hooked activation in the LM
  forward pass (transcoders replace the MLP output, computed from its input; SAEs replace the
  hooked output), one hookpoint at a time, and all of a variant's hookpoints at once. KL is
  KL(clean || spliced) per predicted token. ce_loss_score = (CE_zero - CE_spliced) / (CE_zero - CE_clean)
  and kl_div_score = (KL_zero - KL_spliced) / KL_zero, with the hooked output zero-ablated as the baseline.
- **L0** counts latents that *fire*: for binary latents acts == 1 (a latent among the top k whose
  pre-activation did not pass its threshold does not count). **Dead** = never fired on the evaluated
  tokens (an estimate over this eval window, not the trainer's 10M-token counter).
- **Proxy F1 is not the paper's interpretability score.** The paper explains latents with an LLM
  and scores explanations with delphi. Here, offline and with no LLM, a latent's "explanation" is the
  small set of tokens most over-represented where it fires (built on one half of the evaluated
  sequences) and it is scored by detection F1 on the other half (predict "fires" iff the current
  token is in the set; balanced F1 as in delphi's detection scoring). It measures how
  token-specific a latent is, nothing more: context-dependent or abstract latents score low even
  when they are interpretable. Plain mean F1 and frequency-weighted F1 (sum F1_i c_i / sum c_i,
  c_i = firing count) are computed per hookpoint, then averaged. For the real metric, export a
  delphi cache with `binsparse eval --delphi_cache DIR` (binary latents: all activations are 1, so
  delphi's quantile sampling degenerates; use its random sampler).
"""


def _observations(results: dict) -> str:
    """A few sentences comparing binary, TopK and hybrid coders where present, computed from the numbers."""
    v = results["variants"]
    by_kind: dict[str, str] = {}
    for name in sorted(v, key=_variant_sort_key):
        hooks = v[name]["hookpoints"].values()
        kinds = {m.get("activation") for m in hooks}
        kind = _ACTIVATION_VARIANT.get(kinds.pop()) if len(kinds) == 1 else None
        if kind and kind not in by_kind:
            by_kind[kind] = name
    if "binary" not in by_kind or "topk" not in by_kind:
        return ""
    shown = [k for k in ("binary", "topk", "hybrid") if k in by_kind]
    label = {"binary": "binary", "topk": "TopK", "hybrid": "hybrid"}

    def mean(kind, key):
        return _mean([m.get(key) for m in v[by_kind[kind]]["hookpoints"].values()])

    title = " vs ".join(label[k] for k in shown)
    lines = [f"## {title} on these runs", "",
             "Means over hookpoints (variants: " + ", ".join(f"{label[k]} = `{by_kind[k]}`" for k in shown) + ").", ""]
    for name, key in (("FVU", "fvu"), ("CE increase", "ce_increase"), ("KL", "kl_div"), ("L0", "l0"),
                      ("dead fraction", "dead_fraction"), ("latents on >10% of tokens", "count_over_10pct"),
                      ("latents on >50% of tokens", "count_over_50pct")):
        vals = {k: mean(k, key) for k in shown}
        if any(math.isnan(x) for x in vals.values()):
            continue
        tv = vals["topk"]
        parts = []
        for k in shown:
            rel = (f" ({vals[k] / tv:.2f}x TopK)" if k != "topk" and vals[k] > 0 and tv > 0 and key != "dead_fraction"
                   else "")
            parts.append(f"{label[k]} {_format(key, vals[k])}{rel}")
        lines.append(f"- {name}: " + ", ".join(parts))
    proxies = {k: v[by_kind[k]].get("interp_proxy") or {} for k in shown}
    if all(proxies.values()):
        lines.append("- proxy F1 plain: " + ", ".join(f"{label[k]} {proxies[k]['f1_mean']:.3f}" for k in shown)
                     + "; frequency-weighted: " + ", ".join(f"{label[k]} {proxies[k]['f1_weighted']:.3f}" for k in shown))
    if "hybrid" in by_kind:
        parts = [m.get("hybrid_parts") for m in v[by_kind["hybrid"]]["hookpoints"].values()]
        parts = [p for p in parts if p]
        if parts:
            def pm(part, key):
                return _mean([p[part][key] for p in parts])
            lines.append("- hybrid, binary part vs continuous part: L0 "
                         f"{pm('binary', 'l0'):.2f} vs {pm('continuous', 'l0'):.2f}, latents on >10% of tokens "
                         f"{_format('count_', pm('binary', 'count_over_10pct'))} vs "
                         f"{_format('count_', pm('continuous', 'count_over_10pct'))}, on >50% "
                         f"{_format('count_', pm('binary', 'count_over_50pct'))} vs "
                         f"{_format('count_', pm('continuous', 'count_over_50pct'))}, dead "
                         f"{_format('dead_fraction', pm('binary', 'dead_fraction'))} vs "
                         f"{_format('dead_fraction', pm('continuous', 'dead_fraction'))}")
    lines.append("")
    lines.append("These are measurements on the runs above, at their training budget; small or short runs need not "
                 "reproduce the paper's findings.")
    return "\n".join(lines) + "\n"


def build_report(runs, out_dir, *, model, tokenizer, tokens: torch.Tensor, model_label: str = "",
                 opts: EvalOptions = EvalOptions(), data: Optional[dict] = None, device=None, log=None) -> Path:
    """Evaluate every variant found in ``runs`` on ``tokens`` and write the report folder ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = discover_checkpoints(runs)
    device = device or next(model.parameters()).device
    coder_sets = load_coders(checkpoints, device)
    res = run_evaluation(model, coder_sets, tokens, opts, keep_codes=True, log=log)
    results = {"model": model_label, "data": data or {},
               "checkpoints": {v: {h: str(p) for h, p in hooks.items()} for v, hooks in checkpoints.items()},
               **res.results}
    (out / "results.json").write_text(json.dumps(nan_to_none(results), indent=2))

    plot_firing_histograms(results, out / "firing_rates.png")
    sweeps = read_lr_sweeps(runs)
    curves = {}
    for v, hooks in checkpoints.items():
        variant_dir = next(iter(hooks.values())).parent
        name = v.split("/")[-1]
        sweep = sweeps.get(str(variant_dir.parent))
        if sweep and name in sweep["chosen"]:  # the chosen coder's curve, logged under its sweep name
            name = sweep["chosen"][name]["name"]
        c = read_fvu_curves(variant_dir, name)
        if c:
            curves[v] = c
    fvu_plot = plot_fvu_curves(curves, out / "fvu_curves.png")
    if sweeps:
        results["lr_sweeps"] = sweeps
        (out / "results.json").write_text(json.dumps(nan_to_none(results), indent=2))
    sweep_parts = []
    for n, (run_dir, sweep) in enumerate(sorted(sweeps.items())):
        plot_name = "lr_sensitivity.png" if len(sweeps) == 1 else f"lr_sensitivity_{n}.png"
        plot_lr_sensitivity(sweep, out / plot_name)
        if len(sweeps) > 1:
            sweep_parts.append(f"Run `{run_dir}`:\n")
        sweep_parts.append(lr_sweep_section(sweep, plot_name))
    k_table = k_sweep_rows(results)
    if k_table:
        plot_k_sweep(k_table, out / "k_sweep.png")

    header, rows = summary_table(results)
    md = [
        "# Binary vs continuous sparse coders: the comparison report",
        "",
        f"- model: {model_label or 'unknown'}",
        f"- held-out data: {json.dumps(data or {})}",
        f"- evaluated: {results['n_sequences']} sequences x {results['ctx_len']} tokens = {results['n_tokens']:,} "
        f"tokens; clean CE {results['clean']['ce_loss']:.4f} nats, clean next-token accuracy "
        f"{results['clean']['accuracy']:.4f}",
        "- variants: " + ", ".join(f"{v} ({len(h)} hookpoint{'s' * (len(h) != 1)}: {', '.join(h)})"
                                   for v, h in sorted(checkpoints.items(), key=lambda kv: _variant_sort_key(kv[0]))),
        "",
        "## Side by side (mean over hookpoints)",
        "",
        _md_table(header, rows),
        "",
        *(["Each variant is at the learning rate its LR sweep chose (see *Learning rates* below).", ""]
          if sweeps else []),
        _observations(results),
        *sweep_parts,
        k_sweep_section(k_table, "k_sweep.png") if k_table else "",
        "## Per hookpoint",
        "",
        format_table(results, markdown=True),
        "",
        "## Firing rates",
        "",
        "![firing-rate histograms](firing_rates.png)",
        "",
        "Histograms of log10(firing rate) of the live latents (dead latents are counted in the legend). "
        "Dotted lines: 10% and 50% of tokens.",
        "",
        "## FVU during training",
        "",
        "![FVU vs step](fvu_curves.png)" if fvu_plot else "No metrics.jsonl found next to the checkpoints.",
        "",
        METRIC_NOTES,
        "## Top activating contexts",
        "",
        "The marked token is `[[token]]`. Binary latents have activation 1 wherever they fire, so their "
        "'top' contexts are a seeded random draw of their firings.",
        "",
        context_section(res, coder_sets, tokenizer, seed=opts.seed),
    ]
    (out / "report.md").write_text("\n".join(md))
    if log is not None:
        log(f"wrote {out / 'report.md'}")
    return out


def build_default_report(run_dir, out_dir=None, *, model=None, tokenizer=None, tokens=None, model_label=None,
                         n_tokens: int = 2**16, ctx_len: Optional[int] = None, batch_size: int = 8, dataset=None,
                         device=None, log=print) -> Path:
    """The report for a finished run: ``<run_dir>/report`` unless ``out_dir`` is given.

    Pass the already-loaded ``model``/``tokenizer`` (and held-out ``tokens`` [n, T]) to avoid loading
    them again; otherwise the default offline model is loaded. Without ``tokens``, the held-out
    chunks of ``dataset`` are evaluated; ``dataset``/``ctx_len`` left None come from the run's
    ``trainer_state.pt`` (the data it was trained on), else the built-in corpus and 256 tokens.
    """
    cfg = runs.read_run_config(run_dir) or {}
    given = tokens is not None
    if model is None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, label = models.load_model(cfg.get("model"), device=device)
        model_label = model_label or label
    if tokens is None:
        if tokenizer is None:
            raise ValueError("build_default_report needs a tokenizer to read the held-out text (or tokens)")
        if dataset is None:
            dataset = cfg.get("dataset")
        ctx_len = ctx_len or int(cfg.get("ctx_len") or 256)
        tokens = held_out_tokens(tokenizer, dataset=dataset, split=cfg.get("split") or "train",
                                      text_column=cfg.get("text_column") or "text", ctx_len=ctx_len,
                                      n_tokens=n_tokens)
    data = {"dataset": dataset or "built-in corpus", "ctx_len": int(tokens.shape[1]), "tokens": int(tokens.numel()),
            "chunks": "given by the caller" if given else "the trainer's held-out chunks"}
    return build_report([run_dir], out_dir or Path(run_dir) / "report", model=model, tokenizer=tokenizer,
                        tokens=tokens, model_label=model_label or "", opts=EvalOptions(batch_size=batch_size),
                        data=data, device=device, log=log)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or variant / hookpoint folders)")
    parser.add_argument("--out", required=True, help="the report folder to write")
    add_data_arguments(parser)


def run(args) -> int:
    opts = options_from_args(args)
    log = lambda msg: print(msg, file=sys.stderr)
    checkpoints = discover_checkpoints(args.runs)  # bad paths fail before the model loads
    data_defaults(args, checkpoints, log)
    model, tokenizer, label, tokens, device = prepare(args, log, checkpoints)
    out = build_report(args.runs, args.out, model=model, tokenizer=tokenizer, tokens=tokens, model_label=label,
                       opts=opts, data=dataset_info(args), device=device, log=log)
    print(out / "report.md")
    return 0


def main(argv=None) -> int:
    """``python -m binsparse_kernels.evaluation.report``: the same as ``binsparse report``."""
    parser = argparse.ArgumentParser(prog="binsparse report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return int(run(parser.parse_args(argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
