"""The activation cache: a language model's hooked inputs and outputs, written once, read by many trainings.

On a CPU the LM forward is nearly all of a training run's cost; a sweep (layers x k x variants x
learning rates x seeds) should pay it once. ``binsparse cache`` runs the model over the trainer's
data and writes what every hookpoint's module read and wrote; ``binsparse train --activations DIR``
trains from it with no model at all, in the order the trainer itself would have used.

    DIR/manifest.json                what was cached (model, revision, data, hookpoints, ctx_len, dtype,
                                     the held-out split, token counts, per-hookpoint mean and norms)
    DIR/train/00000.safetensors      one shard per LM batch: "<hookpoint>/input", "<hookpoint>/output"
    DIR/held_out/00000.safetensors   [sequences * ctx_len, width] in the cache dtype, "token_ids" [sequences, ctx_len]

The training sequences are the trainer's training chunks in its seeded order (the first
``max_tokens // ctx_len`` of them); the held-out sequences are the first held-out chunks
(``binsparse_kernels.data``: every 20th chunk of the dataset's cut). Each shard is written
atomically and the manifest after it, so an interrupted ``binsparse cache`` continues where it
stopped when run again with the same flags; a folder never mixes two configurations. A reader
checks every shard's size against the manifest (a truncated shard is an error) and every tensor's
dtype and shape when it reads it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import data, models
from ._io import atomic_write
from .progress import progress_bar

MANIFEST = "manifest.json"
FORMAT = "binsparse-activation-cache"
VERSION = 1
SPLITS = ("train", "held_out")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass
class CacheConfig:
    """What to cache. Every field is part of the cache's identity: one folder holds one configuration."""

    model: Optional[str] = None  # None: the offline SmolLM2-135M GGUF
    dataset: Optional[str] = None  # None: the built-in offline corpus
    hookpoints: list[str] = field(default_factory=lambda: ["layers.9.mlp"])
    max_tokens: int = 600_000  # training tokens (at most the dataset's training chunks: a run wraps around them)
    held_out_tokens: int = 8_192  # held-out tokens (the first held-out chunks), for evaluation and LR selection
    ctx_len: int = 256
    batch_size: int = 8  # sequences per LM forward, and per shard
    dtype: str = "bfloat16"
    shuffle_seed: int = 0
    split: str = "train"
    text_column: str = "text"
    max_examples: Optional[int] = None
    revision: Optional[str] = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("max_tokens", "ctx_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.held_out_tokens < 0:
            raise ValueError(f"held_out_tokens must be >= 0, got {self.held_out_tokens}")


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def read_manifest(folder) -> Optional[dict]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path} is not a binsparse activation cache of version {VERSION} "
                         f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    return manifest


def _differences(a: dict, b: dict) -> list[str]:
    return [f"{key}: {a.get(key)!r} there, {b.get(key)!r} here" for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key)]


def _stats_entry(sums: torch.Tensor, sq: float, n: int) -> dict:
    mean = sums / max(n, 1)
    return {"tokens": n, "mean_norm": float(mean.norm()), "rms_norm": math.sqrt(sq / max(n, 1)),
            "sum": sums.tolist(), "sum_sq_norms": sq}


def build_cache(cfg: CacheConfig, out, *, model=None, tokenizer=None, model_label: Optional[str] = None,
                device: Optional[str] = None, hf_token: Optional[str] = None, log=print) -> Path:
    """Write (or finish) the cache of ``cfg`` in ``out``; returns the folder."""
    out = Path(out)
    identity = asdict(cfg)
    manifest = read_manifest(out)
    if manifest is not None:
        diff = _differences(manifest["config"], identity)
        if diff:
            raise ValueError(f"{out} holds the activation cache of another configuration ({'; '.join(diff)}); "
                             f"a folder holds one cache only: use another --out")
        if manifest["complete"]:
            log(f"{out}: complete already ({manifest['tokens']['train']:,} training tokens)")
            return out
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no activation cache ({MANIFEST} missing): use another --out")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        model, tokenizer, model_label = models.load_model(cfg.model, device=device, revision=cfg.revision,
                                                          hf_token=hf_token)
    hookpoints = models.expand_hookpoints(model, cfg.hookpoints)
    train, held = data.load_chunks(tokenizer, cfg.dataset, ctx_len=cfg.ctx_len, seed=cfg.shuffle_seed, split=cfg.split,
                                   text_column=cfg.text_column, max_examples=cfg.max_examples)
    ctx_len = train.shape[1]
    wanted = {"train": min(train.shape[0], max(1, cfg.max_tokens // ctx_len)),
              "held_out": min(held.shape[0], cfg.held_out_tokens // ctx_len)}
    sources = {"train": train, "held_out": held}
    # the token ids the cache is made of: an unfinished cache is continued only on the very same data
    digest = hashlib.sha256(b"".join(t[:wanted[s]].numpy().tobytes() for s, t in sources.items())).hexdigest()[:16]
    model_device = next(model.parameters()).device
    if manifest is None:
        probe = train[:1, :8].to(model_device)
        with models.capture(model, hookpoints, stop_after_last=True) as store:
            models.run_to_hooks(model, probe)
        manifest = {
            "format": FORMAT, "version": VERSION, "complete": False, "config": identity,
            "model": cfg.model, "model_label": model_label or cfg.model, "revision": cfg.revision,
            "model_commit": getattr(getattr(model, "config", None), "_commit_hash", None),
            "hookpoints": hookpoints, "ctx_len": ctx_len, "dtype": cfg.dtype, "token_digest": digest,
            "widths": {h: {"input": store[h][0].shape[-1], "output": store[h][1].shape[-1]} for h in hookpoints},
            "train": {"order": f"the trainer's training chunks in its seeded order (shuffle_seed {cfg.shuffle_seed})",
                      "dataset_sequences": train.shape[0], "sequences": wanted["train"]},
            "held_out": {"rule": f"the first of the held-out chunks (every {data.HELD_OUT_EVERY}th chunk of the "
                                 f"dataset's cut), in dataset order", "every": data.HELD_OUT_EVERY,
                         "dataset_sequences": held.shape[0], "sequences": wanted["held_out"]},
            "sequences_written": {s: 0 for s in SPLITS}, "tokens": {s: 0 for s in SPLITS},
            "shards": {s: [] for s in SPLITS},
            "stats": {h: {side: _stats_entry(torch.zeros(t.shape[-1], dtype=torch.float64), 0.0, 0)
                          for side, t in zip(("input", "output"), store[h])} for h in hookpoints},
        }
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / MANIFEST, manifest)
    elif (manifest["hookpoints"], manifest["ctx_len"], manifest["token_digest"]) != (hookpoints, ctx_len, digest):
        raise ValueError(f"{out}: the model or data changed since this cache was begun (now hookpoints {hookpoints}, "
                         f"ctx_len {ctx_len}, token digest {digest}; the cache has {manifest['hookpoints']}, "
                         f"{manifest['ctx_len']}, {manifest['token_digest']}); use another --out")

    dtype = DTYPES[cfg.dtype]
    remaining = sum(wanted[s] - manifest["sequences_written"][s] for s in SPLITS) * ctx_len
    bar = progress_bar(remaining, desc="cache", unit="tok")
    log(f"caching {hookpoints} of {manifest['model_label']} into {out}: {wanted['train']} training and "
        f"{wanted['held_out']} held-out sequences of {ctx_len} tokens, {cfg.dtype}")
    try:
        for split in SPLITS:
            (out / split).mkdir(exist_ok=True)
            for start in range(manifest["sequences_written"][split], wanted[split], cfg.batch_size):
                batch = sources[split][start:min(start + cfg.batch_size, wanted[split])]
                with models.capture(model, hookpoints, stop_after_last=True) as store:
                    models.run_to_hooks(model, batch.to(model_device))
                tensors = {"token_ids": batch.contiguous()}
                for h in hookpoints:
                    for side, t in zip(("input", "output"), store[h]):
                        flat = t.reshape(-1, t.shape[-1])
                        tensors[f"{h}/{side}"] = flat.to(dtype).cpu().contiguous()
                        if split == "train":  # statistics of the training activations, as stored
                            st = manifest["stats"][h][side]
                            stored = tensors[f"{h}/{side}"].double()
                            sums = torch.tensor(st["sum"], dtype=torch.float64) + stored.sum(0)
                            manifest["stats"][h][side] = _stats_entry(
                                sums, st["sum_sq_norms"] + float(stored.square().sum()), st["tokens"] + flat.shape[0])
                name = f"{split}/{len(manifest['shards'][split]):05d}.safetensors"
                atomic_write(out / name, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
                manifest["shards"][split].append({"file": name, "first": start, "sequences": batch.shape[0],
                                                  "bytes": (out / name).stat().st_size})
                manifest["sequences_written"][split] += batch.shape[0]
                manifest["tokens"][split] += batch.numel()
                _write_json(out / MANIFEST, manifest)
                bar.update(batch.numel())
        manifest["complete"] = True
        _write_json(out / MANIFEST, manifest)
    finally:
        bar.close()
    log(f"{out}: {manifest['tokens']['train']:,} training and {manifest['tokens']['held_out']:,} held-out tokens")
    return out


class ActivationCache:
    """A finished cache, read by sequence index (see the module docstring)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise FileNotFoundError(f"no activation cache at {self.folder} ({MANIFEST} missing): make one with "
                                    f"`binsparse cache ... --out {self.folder}`")
        if not manifest["complete"]:
            done, want = manifest["sequences_written"], {s: manifest[s]["sequences"] for s in SPLITS}
            raise ValueError(f"the activation cache at {self.folder} is incomplete ({done} of {want} sequences): "
                             f"run the same `binsparse cache` command again to finish it")
        self.manifest = manifest
        self.dtype = DTYPES[manifest["dtype"]]
        self.ctx_len = manifest["ctx_len"]
        self.hookpoints = manifest["hookpoints"]
        for split in SPLITS:
            for shard in manifest["shards"][split]:
                path = self.folder / shard["file"]
                if not path.is_file():
                    raise FileNotFoundError(f"activation cache shard {path} is missing")
                size = path.stat().st_size
                if size != shard["bytes"]:
                    raise ValueError(f"activation cache shard {path} is truncated or altered: {size:,} bytes, the "
                                     f"manifest says {shard['bytes']:,}; make the cache again")
        self._firsts = {s: [sh["first"] for sh in manifest["shards"][s]] for s in SPLITS}

    @property
    def model_label(self) -> str:
        return self.manifest["model_label"] or "unknown model"

    def sequences(self, split: str) -> int:
        return self.manifest["sequences_written"][split]

    def width(self, hookpoint: str, side: str) -> int:
        return self.manifest["widths"][hookpoint][side]

    def check_source(self, **wanted) -> None:
        """Raise if the run asks for other data than the cache holds (model, revision, dataset, ctx_len...)."""
        config = self.manifest["config"]
        bad = [f"{key}: the cache has {config.get(key)!r}, the run asks for {value!r}"
               for key, value in wanted.items() if config.get(key) != value]
        if bad:
            raise ValueError(f"the activation cache at {self.folder} does not hold the data this run asks for "
                             f"({'; '.join(bad)}): make a cache with these settings, or drop the flags")

    def select_hookpoints(self, patterns) -> list[str]:
        """The cache's hookpoints that the fnmatch ``patterns`` name; a pattern naming none is an error."""
        import fnmatch

        out = []
        for pattern in patterns:
            matched = [h for h in self.hookpoints if fnmatch.fnmatchcase(h, pattern)]
            if not matched:
                raise ValueError(f"the activation cache at {self.folder} has no hookpoint {pattern!r}; it has "
                                 f"{', '.join(self.hookpoints)}")
            out += [h for h in matched if h not in out]
        return [h for h in self.hookpoints if h in out]

    def read(self, split: str, indices: torch.Tensor, hookpoints) -> tuple[dict, torch.Tensor]:
        """({hookpoint: (input, output)} [n * ctx_len, width] in the cache dtype, token ids [n, ctx_len]) for
        the sequences ``indices`` of ``split``, in that order."""
        indices = [int(i) for i in indices]
        n = self.sequences(split)
        if any(i < 0 or i >= n for i in indices):
            raise IndexError(f"the cache's {split} split has {n} sequences; asked for {indices}")
        runs, start = [], 0  # consecutive indices inside one shard are read with one slice
        for pos in range(1, len(indices) + 1):
            if (pos == len(indices) or indices[pos] != indices[pos - 1] + 1
                    or self._shard_of(split, indices[pos]) != self._shard_of(split, indices[start])):
                runs.append((indices[start], pos - start))
                start = pos
        parts = [self._read_run(split, first, count, hookpoints) for first, count in runs]
        acts = {h: tuple(torch.cat([p[0][h][side] for p in parts]) for side in range(2)) for h in hookpoints}
        return acts, torch.cat([p[1] for p in parts])

    def _shard_of(self, split: str, index: int) -> int:
        return bisect_right(self._firsts[split], index) - 1

    def _read_run(self, split, first, count, hookpoints):
        shard = self.manifest["shards"][split][self._shard_of(split, first)]
        path = self.folder / shard["file"]
        a, b = first - shard["first"], first - shard["first"] + count
        want = _SAFETENSORS_DTYPES[self.manifest["dtype"]]
        acts = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                for h in hookpoints:
                    pair = []
                    for side in ("input", "output"):
                        name = f"{h}/{side}"
                        if name not in f.keys():
                            raise ValueError(f"activation cache shard {path} has no tensor {name!r}")
                        sl = f.get_slice(name)
                        shape, dtype = sl.get_shape(), sl.get_dtype()
                        if dtype != want:
                            raise ValueError(f"activation cache shard {path}: {name} is {dtype}, the manifest says "
                                             f"{self.manifest['dtype']}")
                        expected = [shard["sequences"] * self.ctx_len, self.width(h, side)]
                        if list(shape) != expected:
                            raise ValueError(f"activation cache shard {path}: {name} has shape {list(shape)}, "
                                             f"expected {expected}")
                        pair.append(sl[a * self.ctx_len:b * self.ctx_len])
                    acts[h] = tuple(pair)
                tokens = f.get_slice("token_ids")[a:b]
        except (OSError, SafetensorError) as exc:  # an unreadable file
            raise ValueError(f"activation cache shard {path} cannot be read ({exc}); make the cache again") from exc
        return acts, tokens


# -- ``binsparse cache`` -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = CacheConfig()
    parser.add_argument("model", nargs="?", default=None, help="model name or path (default: offline SmolLM2-135M)")
    parser.add_argument("dataset", nargs="?", default=None,
                        help="hub dataset, or text/JSONL file or folder (default: the built-in offline corpus)")
    parser.add_argument("--hookpoints", nargs="+", default=d.hookpoints, help="module names, fnmatch patterns allowed")
    parser.add_argument("--max_tokens", type=int, default=d.max_tokens,
                        help="training tokens to cache (at most the dataset's training chunks)")
    parser.add_argument("--held_out_tokens", type=int, default=d.held_out_tokens)
    parser.add_argument("--out", required=True, help="the cache folder (an unfinished one is continued)")
    parser.add_argument("--ctx_len", type=int, default=d.ctx_len)
    parser.add_argument("--batch_size", type=int, default=d.batch_size, help="sequences per LM forward and per shard")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype)
    parser.add_argument("--shuffle_seed", type=int, default=d.shuffle_seed,
                        help="the training chunks' order (the trainer's --shuffle_seed)")
    parser.add_argument("--split", default=d.split)
    parser.add_argument("--text_column", default=d.text_column)
    parser.add_argument("--max_examples", type=int, default=None)
    parser.add_argument("--revision", default=None, help="hub model revision")
    parser.add_argument("--hf_token", default=None, help="hub token (passed to the hub, never written to disk)")
    parser.add_argument("--device", default=None)


def run(args) -> int:
    cfg = CacheConfig(model=args.model, dataset=args.dataset, hookpoints=args.hookpoints, max_tokens=args.max_tokens,
                      held_out_tokens=args.held_out_tokens, ctx_len=args.ctx_len, batch_size=args.batch_size,
                      dtype=args.dtype, shuffle_seed=args.shuffle_seed, split=args.split, text_column=args.text_column,
                      max_examples=args.max_examples, revision=args.revision)
    build_cache(cfg, args.out, device=args.device, hf_token=args.hf_token, log=lambda m: print(m, file=sys.stderr))
    return 0
