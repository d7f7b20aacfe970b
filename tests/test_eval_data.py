"""Held-out token loading for evaluation (binsparse_kernels.data): EOS-joined chunks from local text and JSONL files."""

from __future__ import annotations

import json

import pytest
import torch

from binsparse_kernels import data
from test_eval_splice import word_tokenizer


def test_chunk_tokens_eos_first_and_partial_chunk_dropped():
    tok = word_tokenizer()
    texts = ["the cat sat", "a dog ran on a mat", "red"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    stream = [x for seq in ids for x in [tok.eos_token_id] + seq]  # 4 + 7 + 2 = 13 tokens
    chunks = data.chunk_tokens(tok, texts, 4)
    assert chunks.shape == (3, 4)
    assert chunks.reshape(-1).tolist() == stream[:12]
    assert chunks[0, 0] == tok.eos_token_id
    with pytest.raises(ValueError, match="fewer than"):
        data.chunk_tokens(tok, ["red"], 50)


def test_load_eval_tokens_from_text_and_jsonl(tmp_path):
    tok = word_tokenizer()
    (tmp_path / "a.txt").write_text("the cat sat on a mat . " * 20)
    rows = [{"text": "the dog ran over a log ."}, {"other": 1}, {"text": "a bird sang ."}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tokens = data.held_out_tokens(tok, dataset=str(tmp_path), split="train", text_column="text", ctx_len=8,
                                  n_tokens=64, seed=0, all_chunks=True)
    assert tokens.shape == (8, 8) and tokens.dtype == torch.int64
    again = data.held_out_tokens(tok, dataset=str(tmp_path), split="train", text_column="text", ctx_len=8,
                                 n_tokens=64, seed=0, all_chunks=True)
    assert torch.equal(tokens, again)  # seeded order
    only_jsonl = data.held_out_tokens(tok, dataset=str(tmp_path / "b.jsonl"), split="train", text_column="text",
                                      ctx_len=4, n_tokens=8, seed=0, all_chunks=True)
    assert set(only_jsonl.reshape(-1).tolist()) <= set(tok("the dog ran over a log . a bird sang .")["input_ids"]) | {0}
    with pytest.raises(ValueError, match="no text found"):
        data.held_out_tokens(tok, dataset=str(tmp_path / "b.jsonl"), split="train", text_column="body", ctx_len=4,
                             n_tokens=8)


def test_load_eval_tokens_keeps_only_the_trainers_held_out_chunks(tmp_path):
    """Without all_chunks, evaluating on the training dataset scores exactly the chunks the trainer
    holds out (data.split_chunks), never a training chunk."""
    tok = word_tokenizer()
    text = " ".join(f"the {w} cat sat on a mat ." for w in ("red", "blue", "big", "small", "old", "new") * 40)
    (tmp_path / "t.txt").write_text(text)
    train, held = data.load_chunks(tok, str(tmp_path / "t.txt"), ctx_len=8, seed=0)
    tokens = data.held_out_tokens(tok, dataset=str(tmp_path / "t.txt"), split="train", text_column="text", ctx_len=8,
                                  n_tokens=10_000, seed=0)
    assert tokens.shape[0] == held.shape[0] >= 2
    as_set = lambda t: {tuple(r) for r in t.tolist()}
    assert as_set(tokens) == as_set(held)
    few = data.held_out_tokens(tok, dataset=str(tmp_path / "t.txt"), split="train", text_column="text", ctx_len=8,
                               n_tokens=3 * 8, seed=0)  # tokenises only a prefix: the first 3 held-out chunks
    assert as_set(few) == as_set(held[:3]) and few.shape == (3, 8)
    all_chunks = data.held_out_tokens(tok, dataset=str(tmp_path / "t.txt"), split="train", text_column="text",
                                      ctx_len=8, n_tokens=10_000, seed=0, all_chunks=True)
    assert all_chunks.shape[0] == train.shape[0] + held.shape[0]
    with pytest.raises(ValueError, match="--all_chunks"):
        data.held_out_tokens(tok, dataset=str(tmp_path / "t.txt"), split="train", text_column="text", ctx_len=400,
                             n_tokens=800)
