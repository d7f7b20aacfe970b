"""Training text, tokenised and packed into fixed-length chunks.

Sources: the built-in offline corpus (the Python standard library's module documentation, present
on every machine), local text / JSONL files, or a Hugging Face dataset name. Chunks follow
sparsify's ``chunk_and_tokenize``: documents joined with EOS (EOS first), cut into ``ctx_len``
tokens, the trailing partial chunk dropped. Every 20th chunk is held out for evaluation; the rest
are shuffled with a fixed seed, so a resumed run can skip exactly the chunks it has consumed.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from typing import Optional

import torch

from ..evaluation._lm import _read_texts, chunk_tokens

HELD_OUT_EVERY = 20
BUILTIN = "builtin"


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


def load_texts(dataset: Optional[str], *, split: str = "train", text_column: str = "text") -> list[str]:
    if dataset in (None, BUILTIN):
        return builtin_corpus()
    return _read_texts(dataset, split, text_column)


def split_chunks(tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training chunks in a seeded order, held-out chunks)."""
    if tokens.shape[0] < 2:
        raise ValueError("the dataset gives fewer than 2 chunks; use more text or a smaller --ctx_len")
    held = torch.arange(tokens.shape[0]) % HELD_OUT_EVERY == 0
    train = tokens[~held]
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    return train[order], tokens[held]


def load_chunks(tokenizer, dataset: Optional[str], *, ctx_len: int, seed: int = 0, split: str = "train",
                text_column: str = "text", max_examples: Optional[int] = None):
    texts = load_texts(dataset, split=split, text_column=text_column)
    if max_examples:
        texts = texts[:max_examples]
    if not texts:
        raise ValueError(f"dataset {dataset or BUILTIN!r} has no text")
    ctx_len = min(ctx_len, getattr(tokenizer, "model_max_length", ctx_len) or ctx_len)
    return split_chunks(chunk_tokens(tokenizer, texts, ctx_len), seed)


def eval_tokens(tokenizer, *, ctx_len: int, n_sequences: int, seed: int = 0) -> torch.Tensor:
    """Held-out chunks of the built-in corpus (the evaluation's default data)."""
    _, held = load_chunks(tokenizer, None, ctx_len=ctx_len, seed=seed)
    return held[:n_sequences]
