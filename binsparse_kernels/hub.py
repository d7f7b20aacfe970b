"""Sparse coders on the Hugging Face Hub, in sparsify's layout: ``<hookpoint>/cfg.json`` + ``sae.safetensors``.

    SparseCoder.load_from_hub("user/repo", "layers.9.mlp")       # one coder (coder.py, through this module)
    SparseCoder.load_many_from_hub("user/repo", pattern="layers.*")
    binsparse push runs/default user/repo [--private] [--dry-run]  # a run, a variant or a coder folder

Downloads go through ``huggingface_hub.snapshot_download`` with ``allow_patterns``, so only the
files asked for are fetched, the usual cache is used, and ``HF_HUB_OFFLINE=1`` works from it.
Stock sparsify (TopK) checkpoints load as they are; binary and hybrid coders are marked by
``activation`` and their ``log_threshold`` tensor (stock sparsify refuses them loudly).

An upload holds the coders in the layout they have under the folder given (a run folder:
``<variant>/<hookpoint>/``; a variant folder: ``<hookpoint>/``; one coder folder: ``<its name>/``)
and a model card (``README.md``): architecture, k, activation, hookpoints, training tokens and,
when the run has one, its evaluation summary.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
from pathlib import Path
from typing import Optional

from . import runs

CODER_FILES = ("cfg.json", "sae.safetensors")


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _snapshot(repo_id: str, revision: Optional[str], allow_patterns: list[str], token=None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns, token=token))
    except LocalEntryNotFoundError as exc:
        raise FileNotFoundError(f"{repo_id} (revision {revision or 'main'}) is not in the local Hugging Face cache "
                                f"and the hub cannot be reached: {exc}") from exc


def _coder_folders(root: Path) -> list[str]:
    """Folders under ``root`` holding a cfg.json, as repo paths ('' for the root), natural order."""
    found = [p.parent.relative_to(root).as_posix() for p in root.rglob("cfg.json")]
    return sorted(("" if f == "." else f for f in found), key=_natural_key)


def _describe(repo_id: str, root: Path, found: list[str]) -> str:
    if found:
        return f"{repo_id} has coders at: {', '.join(f or '(the repo root)' for f in found)}"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return (f"{repo_id} holds no sparse coder (no <hookpoint>/cfg.json); its files: "
            f"{', '.join(files[:20]) or 'none'}{' ...' if len(files) > 20 else ''}")


def _discover(repo_id: str, revision: Optional[str], token=None) -> tuple[Path, list[str]]:
    """(snapshot folder, coder folders): only the small cfg.json files are fetched."""
    root = _snapshot(repo_id, revision, ["*cfg.json"], token)
    return root, _coder_folders(root)


def _fetch(folder: str, repo_id: str, revision, token) -> Path:
    patterns = [f"{folder}/{name}" if folder else name for name in CODER_FILES]
    root = _snapshot(repo_id, revision, patterns, token)
    path = root / folder if folder else root
    if not (path / "sae.safetensors").is_file():
        raise FileNotFoundError(f"{repo_id}: {folder or 'the repo root'} has cfg.json but no sae.safetensors")
    return path


def download_coder(repo_id: str, hookpoint: Optional[str] = None, *, revision: Optional[str] = None,
                   token=None) -> Path:
    """The local folder (cfg.json + sae.safetensors) of one coder of ``repo_id``: the one at ``hookpoint`` (a
    folder of the repo, e.g. ``layers.9.mlp`` or ``binary/layers.9.mlp``); without ``hookpoint``, the coder at
    the repo root or the repo's only coder. ``SparseCoder.load_from_hub`` loads it."""
    root, found = _discover(repo_id, revision, token)
    if hookpoint is None:
        if len(found) != 1:
            raise ValueError(f"{_describe(repo_id, root, found)}; pass hookpoint= to choose one" if found
                             else _describe(repo_id, root, found))
        hookpoint = found[0]
    hookpoint = hookpoint.strip("/")
    if hookpoint not in found:
        raise ValueError(f"no coder at {hookpoint!r}: {_describe(repo_id, root, found)}")
    return _fetch(hookpoint, repo_id, revision, token)


def download_coders(repo_id: str, *, revision: Optional[str] = None, pattern: Optional[str] = None,
                    token=None) -> dict[str, Path]:
    """{repo folder: local folder} of every coder of ``repo_id`` whose folder matches the fnmatch ``pattern``,
    in natural order. ``SparseCoder.load_many_from_hub`` loads them."""
    root, found = _discover(repo_id, revision, token)
    chosen = [f for f in found if pattern is None or fnmatch.fnmatchcase(f, pattern)]
    if not chosen:
        raise ValueError(f"no coder matches {pattern!r}: {_describe(repo_id, root, found)}" if found
                         else _describe(repo_id, root, found))
    return {f: _fetch(f, repo_id, revision, token) for f in chosen}


# -- upload ------------------------------------------------------------------------------------------


def upload_plan(folder) -> list[tuple[Path, str]]:
    """(local file, path in the repo) for every coder under ``folder`` (``lr_sweep/`` and ``report/`` left out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    if (folder / "cfg.json").is_file():  # one coder folder: it keeps its name (the hookpoint)
        coder_dirs, base = [folder], folder.parent
    else:
        coder_dirs = [p.parent for p in folder.rglob("cfg.json")
                      if not {runs.LR_SWEEP_DIR, "report"} & set(p.parent.relative_to(folder).parts)]
        base = folder
    if not coder_dirs:
        raise FileNotFoundError(f"no sparse coder (<hookpoint>/cfg.json + sae.safetensors) under {folder}")
    plan = []
    for d in sorted(coder_dirs, key=lambda p: _natural_key(p.as_posix())):
        for name in CODER_FILES:
            if not (d / name).is_file():
                raise FileNotFoundError(f"incomplete coder folder {d}: {name} is missing")
            plan.append((d / name, (d / name).relative_to(base).as_posix()))
    return plan


_KIND = {"topk_binary": "binary", "topk": "TopK (continuous)", "topk_hybrid": "hybrid (binary + continuous)"}


def _architecture(cfg: dict) -> str:
    if cfg.get("transcode"):
        return "skip transcoder" if cfg.get("skip_connection") else "transcoder"
    return "sparse autoencoder"


def model_card(folder, plan: list[tuple[Path, str]], repo_id: str) -> str:
    """The README.md uploaded with the coders."""
    folder = Path(folder)
    coders = []
    for local, repo_path in plan:
        if local.name == "cfg.json":
            coders.append((repo_path.rsplit("/", 1)[0] if "/" in repo_path else "", json.loads(local.read_text())))
    run_dir = folder if (folder / runs.STATE_FILE).is_file() else folder.parent
    summary = runs.read_run_summary(run_dir) if (run_dir / runs.STATE_FILE).is_file() else None
    cfg = (summary or {}).get("config") or {}
    kinds = sorted({_KIND.get(c.get("activation"), str(c.get("activation"))) for _, c in coders})
    lines = ["---", "library_name: binsparse-kernels",
             "tags: [sparse-autoencoder, transcoder, binary-sparse-coding, interpretability]"]
    if cfg.get("model"):
        lines.append(f"base_model: {cfg['model']}")
    lines += ["---", "", f"# {repo_id}", "",
              f"Sparse coders ({', '.join(kinds)}) in sparsify's layout (`<hookpoint>/cfg.json` + `sae.safetensors`), "
              "trained with binsparse-kernels ([binary sparse coding](https://arxiv.org/abs/2509.25596)).", "",
              "| folder | activation | architecture | d_in | d_out | latents | k |", "|---|---|---|---:|---:|---:|---:|"]
    for path, c in coders:
        latents = c.get("num_latents") or c.get("d_in", 0) * c.get("expansion_factor", 0)
        lines.append(f"| `{path or '.'}` | {c.get('activation')} | {_architecture(c)} | {c.get('d_in')} | "
                     f"{c.get('d_out', c.get('d_in'))} | {latents} | {c.get('k')} |")
    hooks = sorted({p.rsplit("/", 1)[-1] for p, _ in coders if p}, key=_natural_key)
    lines += ["", f"Hookpoints (module names relative to the model's `base_model`): {', '.join(hooks) or '-'}.", ""]
    if summary:
        lines += ["## Training", "",
                  f"- model: {cfg.get('model') or 'SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)'}",
                  f"- data: {cfg.get('dataset') or 'the built-in corpus'}, {cfg.get('ctx_len')}-token chunks",
                  f"- training tokens: {summary.get('tokens_seen'):,} ({summary.get('step')} steps)",
                  f"- optimizer: {cfg.get('optimizer')}", ""]
    sweep = runs.read_lr_sweep(run_dir)
    if sweep:
        lines += ["Learning rates chosen by the LR sweep (" + sweep.get("criterion", "held-out FVU") + "): "
                  + ", ".join(f"{v} {c['lr']:.3g}" for v, c in sweep.get("chosen", {}).items()), ""]
    results = run_dir / "report" / "results.json"
    if results.is_file():
        res = json.loads(results.read_text())
        lines += ["## Evaluation (held-out tokens)", "",
                  f"{res.get('n_tokens', 0):,} held-out tokens; clean CE {res.get('clean', {}).get('ce_loss', float('nan')):.4f} "
                  "nats. CE increase and KL with the coder spliced into the model in place of the activation.", "",
                  "| variant | hookpoint | FVU | CE increase | KL | L0 | dead |", "|---|---|---:|---:|---:|---:|---:|"]
        for v, entry in res.get("variants", {}).items():
            for h, m in entry.get("hookpoints", {}).items():
                lines.append(f"| {v} | {h} | {_num(m.get('fvu'))} | {_num(m.get('ce_increase'), 4)} | "
                             f"{_num(m.get('kl_div'), 4)} | {_num(m.get('l0'), 1)} | "
                             f"{_num(None if m.get('dead_fraction') is None else 100 * m['dead_fraction'], 1)}% |")
        lines.append("")
    first = coders[0][0] if coders else "layers.9.mlp"
    lines += ["## Loading", "", "```python", "from binsparse_kernels.coder import SparseCoder", "",
              f"coder = SparseCoder.load_from_hub({repo_id!r}, {first!r})" if first else
              f"coder = SparseCoder.load_from_hub({repo_id!r})",
              f"coders = SparseCoder.load_many_from_hub({repo_id!r})", "```", ""]
    if any(c.get("activation") in ("topk_binary", "topk_hybrid") for _, c in coders):
        lines += ["Binary and hybrid coders carry a `log_threshold` tensor and `activation` "
                  "`topk_binary`/`topk_hybrid`: stock sparsify refuses to load them (strict load), by design.", ""]
    return "\n".join(lines)


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def push_to_hub(folder, repo_id: str, *, private: bool = False, dry_run: bool = False, token=None,
                revision: Optional[str] = None, commit_message: str = "Upload sparse coders", log=print) -> list[str]:
    """Upload the coders under ``folder`` and a model card to ``repo_id``; returns the repo paths.

    ``dry_run`` prints what would be uploaded (and the card) and touches no network.
    """
    plan = upload_plan(folder)
    card = model_card(folder, plan, repo_id)
    paths = [p for _, p in plan] + ["README.md"]
    if dry_run:
        log(f"dry run: would upload {len(paths)} files to {repo_id} ({'private' if private else 'public'}):")
        for local, repo_path in plan:
            log(f"  {repo_path}  ({local.stat().st_size:,} bytes, from {local})")
        log(f"  README.md  (model card, {len(card.encode()):,} bytes):")
        log("\n".join("    " + line for line in card.splitlines()))
        return paths
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(local)) for local, p in plan]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision)
    log(f"uploaded {len(paths)} files to https://huggingface.co/{repo_id}")
    return paths


# -- ``binsparse push`` ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="RUN_OR_CODER_DIR", help="a run folder, a variant folder or one coder folder")
    parser.add_argument("repo_id", metavar="REPO_ID", help="user/name on the Hugging Face Hub (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the files and the model card that would be uploaded; upload nothing")
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--hf_token", default=os.environ.get("HF_TOKEN"),
                        help="hub token (default: $HF_TOKEN or the saved login; never written to disk)")


def run(args) -> int:
    push_to_hub(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run, token=args.hf_token,
                revision=args.revision)
    return 0


__all__ = ["download_coder", "download_coders", "push_to_hub", "upload_plan", "model_card"]
