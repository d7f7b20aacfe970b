"""Several coders per pass: one per variant x k x learning rate, and the LR sweep's choice among them.

Every coder of a run trains on the same batches (one LM forward, or one cache read, per step). With
``lr_sweep`` (multipliers of each coder's LR law) or ``lr_sweep_values`` (learning rates), each
variant (and k) is trained at every LR; after training, the LR with the lowest **held-out FVU** is
chosen per variant (mean over hookpoints; the held-out chunks after the ones the end-of-run report
evaluates, so choosing and reporting do not use the same tokens). The dead fraction (latents that
never fired on those tokens) is recorded beside it, not used to choose. The chosen coders are saved
at ``<run>/<variant>/<hookpoint>/``, every coder at ``<run>/lr_sweep/<variant>@<lr>/<hookpoint>/``,
and the table of all of them in ``<run>/lr_sweep.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..runs import LR_SWEEP_DIR

CRITERION = "lowest held-out FVU (mean over hookpoints)"


@dataclass(frozen=True)
class CoderSpec:
    """One coder of a run (for every hookpoint)."""

    name: str  # its folder under the run: "binary", "binary-k16", "lr_sweep/binary@3x"
    family: str  # what the LR sweep chooses among: "binary", "binary-k16"
    variant: str  # binary / topk / hybrid
    k: int
    lr: float
    multiplier: Optional[float]  # of the LR law; None for an explicit LR
    label: str  # "3x", "lr0.001"; "" when the run has no LR sweep


def coder_specs(variants, ks, law, *, lr=None, multipliers=(), values=()) -> list[CoderSpec]:
    """Every (variant, k, LR) of a run. ``law(variant, k)`` is the LR law's value for that coder;
    multipliers scale ``lr`` when it is given, else the law."""
    specs = []
    for variant in variants:
        for k in ks:
            family = variant if len(ks) == 1 else f"{variant}-k{k}"
            base = lr or law(variant, k)
            if multipliers:
                grid = [(m * base, m, f"{m:g}x") for m in sorted(multipliers)]
            elif values:
                grid = [(v, None, f"lr{v:g}") for v in sorted(values)]
            else:
                specs.append(CoderSpec(family, family, variant, k, base, None if lr else 1.0, ""))
                continue
            specs += [CoderSpec(f"{LR_SWEEP_DIR}/{family}@{label}", family, variant, k, value, mult, label)
                      for value, mult, label in grid]
    return specs


class HeldOutScore:
    """FVU, dead fraction and L0 of one coder over held-out batches (sums in float64).

    FVU = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 over all the tokens, as in training and evaluation.
    """

    def __init__(self, num_latents: int):
        self.residual = 0.0
        self.sum_y: Optional[torch.Tensor] = None
        self.sum_sq = 0.0
        self.n = 0
        self.active = 0
        self.fired = torch.zeros(num_latents, dtype=torch.bool)

    def update(self, y: torch.Tensor, y_hat: torch.Tensor, acts: torch.Tensor, indices: torch.Tensor) -> None:
        y = y.double()
        self.residual += float((y - y_hat.double()).square().sum())
        self.sum_y = y.sum(0) if self.sum_y is None else self.sum_y + y.sum(0)
        self.sum_sq += float(y.square().sum())
        self.n += y.shape[0]
        on = acts != 0  # binary latents fire when their act is 1, not merely when selected
        self.active += int(on.sum())
        self.fired[indices[on].cpu()] = True

    def result(self) -> dict:
        total = self.sum_sq - float(self.sum_y.square().sum()) / self.n
        return {"fvu": self.residual / total if total > 0 else float("nan"),
                "dead_fraction": 1.0 - float(self.fired.float().mean()), "l0": self.active / self.n,
                "tokens": self.n}


def choose(specs: list[CoderSpec], scores: dict[str, dict[str, dict]]) -> dict[str, CoderSpec]:
    """The spec with the lowest mean held-out FVU per family (``scores[name][hookpoint]``); NaN never wins."""
    best: dict[str, tuple[float, CoderSpec]] = {}
    for spec in specs:
        fvus = [s["fvu"] for s in scores[spec.name].values()]
        value = sum(fvus) / len(fvus)
        value = math.inf if math.isnan(value) else value
        if spec.family not in best or value < best[spec.family][0]:
            best[spec.family] = (value, spec)
    return {family: spec for family, (_, spec) in best.items()}


def summary(specs: list[CoderSpec], scores: dict, chosen: dict[str, CoderSpec], **info) -> dict:
    """The content of ``lr_sweep.json``."""

    def mean(name, key):
        values = [s[key] for s in scores[name].values()]
        return sum(values) / len(values)

    def entry(spec):
        return {"name": spec.name, "family": spec.family, "variant": spec.variant, "k": spec.k, "lr": spec.lr,
                "multiplier": spec.multiplier, "label": spec.label, "fvu": mean(spec.name, "fvu"),
                "dead_fraction": mean(spec.name, "dead_fraction"), "l0": mean(spec.name, "l0"),
                "hookpoints": scores[spec.name]}

    out = {"criterion": CRITERION, **info, "candidates": [entry(s) for s in specs], "chosen": {}}
    for family, spec in chosen.items():
        grid = sorted(s.lr for s in specs if s.family == family)
        out["chosen"][family] = {**entry(spec), "at_edge_of_grid": len(grid) > 1 and spec.lr in (grid[0], grid[-1])}
    return out
