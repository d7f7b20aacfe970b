"""Text for the language model, tokenised into fixed-length chunks, and the held-out split.

Training, the activation cache and evaluation all take their tokens from here, so they agree on
which chunks are held out.

Sources (``dataset``): ``None`` (or ``"builtin"``) is the built-in offline corpus, the Python
standard library's module documentation (present on every machine); a path is local text
(``.txt``/``.md`` files, ``.json``/``.jsonl`` rows with a ``text_column`` field, or a folder of them);
anything else is a Hugging Face dataset name (``split``, ``text_column``).

Chunks follow sparsify's ``chunk_and_tokenize``: documents joined with EOS (EOS first), cut into
``ctx_len`` tokens (at most the tokenizer's ``model_max_length``), the trailing partial chunk
dropped. Every 20th chunk (``HELD_OUT_EVERY``) is held out; the training chunks are shuffled with a
fixed seed, so a resumed run can skip exactly the chunks it has consumed.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

HELD_OUT_EVERY = 20
BUILTIN = "builtin"
# The end-of-run report evaluates the first 16 held-out chunks; an LR sweep chooses on the ones after them.
REPORT_SEQUENCES = 16


def builtin_corpus() -> list[str]:
    """Docstrings of the standard library's modules, classes and functions, in a fixed order."""
    names = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder and "site-packages" not in
                   str(getattr(m.module_finder, "path", "")) and not m.name.startswith("_"))
    names = [n for n in names if n in sys.stdlib_module_names and n not in ("antigravity", "this", "idlelib",
                                                                          "tkinter", "turtle", "turtledemo")]
    texts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                module = importlib.import_module(name)
            except Exception:  # some modules need platform support absent here
                continue
            parts = [module.__doc__ or ""]
            for attr in sorted(vars(module)):
                obj = getattr(module, attr, None)
                if not attr.startswith("_") and getattr(obj, "__module__", None) == name and obj.__doc__:
                    parts.append(f"{attr}: {obj.__doc__}")
            text = "\n\n".join(p.strip() for p in parts if p and p.strip())
            if len(text) > 200:
                texts.append(text)
    return texts


def _read_local_texts(path: Path, text_column: str) -> list[str]:
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    texts = []
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
            if f.suffix == ".json" and lines and lines[0].lstrip().startswith("["):
                rows = json.loads("\n".join(lines))
            else:
                rows = [json.loads(line) for line in lines if line.strip()]
            texts += [r[text_column] for r in rows if isinstance(r, dict) and r.get(text_column)]
        elif f.suffix in (".txt", ".md", ".text", ""):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
    if not texts:
        raise ValueError(f"no text found in {path} (.txt/.md files, or .json/.jsonl with a {text_column!r} field)")
    return texts


def load_texts(dataset: Optional[str], *, split: str = "train", text_column: str = "text") -> list[str]:
    """The documents of ``dataset`` (see the module docstring for what it can be)."""
    if dataset in (None, BUILTIN):
        return builtin_corpus()
    path = Path(dataset)
    if path.exists():
        return _read_local_texts(path, text_column)
    from datasets import load_dataset

    ds = load_dataset(dataset, split=split)
    if text_column not in ds.column_names:
        raise ValueError(f"dataset {dataset} has no column {text_column!r} (columns: {ds.column_names})")
    return list(ds[text_column])


def chunk_tokens(tokenizer, texts: list[str], ctx_len: int, max_sequences: Optional[int] = None) -> torch.Tensor:
    """EOS-joined (EOS first) token stream cut into [n, ctx_len] chunks; the trailing partial chunk is dropped.

    The cut is prefix-stable: ``max_sequences`` tokenises only as far as needed and gives the first
    chunks of the full cut.
    """
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be >= 2, got {ctx_len}")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    need = None if max_sequences is None else max_sequences * ctx_len
    for text in texts:
        if eos is not None:
            stream.append(eos)
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // ctx_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise ValueError(f"the text gives fewer than ctx_len={ctx_len} tokens")
    return torch.tensor(stream[: n * ctx_len], dtype=torch.int64).view(n, ctx_len)


def capped_ctx_len(tokenizer, ctx_len: int) -> int:
    """``ctx_len`` capped by the tokenizer's ``model_max_length``."""
    return min(ctx_len, getattr(tokenizer, "model_max_length", ctx_len) or ctx_len)


def is_held_out(n_chunks: int) -> torch.Tensor:
    """Boolean [n_chunks]: which chunks of a dataset's cut are held out (every ``HELD_OUT_EVERY``-th)."""
    return torch.arange(n_chunks) % HELD_OUT_EVERY == 0


def split_chunks(tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training chunks in a seeded order, held-out chunks in dataset order)."""
    if tokens.shape[0] < 2:
        raise ValueError("the dataset gives fewer than 2 chunks; use more text or a smaller --ctx_len")
    held = is_held_out(tokens.shape[0])
    train = tokens[~held]
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    return train[order], tokens[held]


def load_chunks(tokenizer, dataset: Optional[str], *, ctx_len: int, seed: int = 0, split: str = "train",
                text_column: str = "text", max_examples: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's data: (training chunks in their seeded order, held-out chunks)."""
    texts = load_texts(dataset, split=split, text_column=text_column)
    if max_examples:
        texts = texts[:max_examples]
    if not texts:
        raise ValueError(f"dataset {dataset or BUILTIN!r} has no text")
    return split_chunks(chunk_tokens(tokenizer, texts, capped_ctx_len(tokenizer, ctx_len)), seed)


def held_out_tokens(tokenizer, *, dataset: Optional[str], ctx_len: int, n_tokens: int, split: str = "train",
                    text_column: str = "text", seed: int = 0, all_chunks: bool = False) -> torch.Tensor:
    """The evaluation's tokens: held-out sequences [n, ctx_len], n = n_tokens // ctx_len (at least 2).

    The built-in corpus: its first n held-out chunks. Another dataset: n of the chunks the trainer
    holds out, in a seeded random order (``seed``); the text is tokenised only as far as needed,
    which gives the same chunks as the trainer's full pass (the cut is prefix-stable). That
    guarantee needs ``ctx_len`` equal to the training ``ctx_len``. ``all_chunks=True`` is for a
    dataset that is held out as a whole: any of its chunks may be drawn.
    """
    n_seq = max(2, n_tokens // ctx_len)
    if dataset in (None, BUILTIN):
        _, held = load_chunks(tokenizer, None, ctx_len=ctx_len, seed=seed)
        tokens = held[:n_seq]
    else:
        ctx_len = capped_ctx_len(tokenizer, ctx_len)
        tokens = chunk_tokens(tokenizer, load_texts(dataset, split=split, text_column=text_column), ctx_len,
                              max_sequences=None if all_chunks else n_seq * HELD_OUT_EVERY)
        if not all_chunks:
            tokens = tokens[is_held_out(tokens.shape[0])]
        g = torch.Generator().manual_seed(seed)
        tokens = tokens[torch.randperm(tokens.shape[0], generator=g)[:n_seq]]
    if tokens.shape[0] < 2:
        raise ValueError(f"only {tokens.shape[0]} held-out sequence(s) of {ctx_len} tokens: use more text, a smaller "
                         f"--ctx_len" + ("" if all_chunks or dataset in (None, BUILTIN) else
                                         ", or --all_chunks if the whole dataset is held out"))
    return tokens


def iter_batches(tokens: torch.Tensor, batch_size: int):
    """``tokens`` [n, T] in consecutive batches of ``batch_size`` sequences (the last one may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for s in range(0, tokens.shape[0], batch_size):
        yield tokens[s:s + batch_size]
