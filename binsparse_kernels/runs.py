"""The files of a training run folder: their names, and reading them back (training writes, evaluation reads).

    <run_dir>/trainer_state.pt                      everything a resume needs, and the training config
    <run_dir>/metrics.jsonl                         one JSON line per logged step
    <run_dir>/lr_sweep.json                         with --lr_sweep: every coder's LR, held-out FVU and dead
                                                    fraction, and which LR was chosen per variant
    <run_dir>/<variant>/<hookpoint>/cfg.json        one coder (sparsify's layout) + sae.safetensors
    <run_dir>/lr_sweep/<variant>@<lr>/<hookpoint>/  with --lr_sweep: every trained coder
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import torch

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
LR_SWEEP_FILE = "lr_sweep.json"
LR_SWEEP_DIR = "lr_sweep"


def read_run_config(run_dir) -> Optional[dict]:
    """The training config saved with a run (``<run_dir>/trainer_state.pt``), or None."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001  (an older or foreign file: no defaults from it)
        warnings.warn(f"could not read the training config in {path} ({type(exc).__name__}: {exc}); the "
                      f"evaluation falls back to the default model, data and ctx_len unless they are given")
        return None
    cfg = state.get("config") if isinstance(state, dict) else None
    return cfg if isinstance(cfg, dict) else None


def read_run_summary(run_dir) -> Optional[dict]:
    """``{"config", "step", "tokens_seen"}`` of a saved run, or None when it has no readable state."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {key: state.get(key) for key in ("config", "step", "tokens_seen")}


def read_lr_sweep(run_dir) -> Optional[dict]:
    """The LR sweep summary of a run (``<run_dir>/lr_sweep.json``), or None for a run without a sweep."""
    path = Path(run_dir) / LR_SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else None
