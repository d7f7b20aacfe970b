"""The report of a run that swept learning rates and k: variants at their best LR, LR sensitivity, k table."""

from __future__ import annotations

import json

import pytest

from binsparse_kernels.evaluation.report import build_default_report
from binsparse_kernels.train import TrainConfig, Trainer
from test_eval_splice import synthetic_text, tiny_lm, word_tokenizer
from test_report import _assert_png

CTX = 16


@pytest.fixture(scope="module")
def swept_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("swept")
    text = root / "text.txt"
    text.write_text(synthetic_text(900, seed=4))
    cfg = TrainConfig(dataset=str(text), hookpoints=["layers.1.mlp"], variants=["binary", "topk", "hybrid"], k=[2, 4],
                      num_latents=48, batch_size=4, ctx_len=CTX, max_tokens=4 * CTX * 8, lr_sweep=[1, 10],
                      save_dir=str(root), run_name="run", log_every=2, save_every=1000, device="cpu")
    trainer = Trainer(cfg, tiny_lm(), word_tokenizer(), log=lambda m: None)
    trainer.train()
    return trainer


def test_report_compares_variants_at_their_best_lr(swept_run):
    trainer = swept_run
    run = trainer.run_dir
    sweep = json.loads((run / "lr_sweep.json").read_text())
    out = build_default_report(run, model=trainer.model, tokenizer=trainer.tokenizer, model_label="tiny",
                               ctx_len=CTX, n_tokens=16 * CTX, log=None)
    md = (out / "report.md").read_text()
    families = ["binary-k2", "binary-k4", "topk-k2", "topk-k4", "hybrid-k2", "hybrid-k4"]
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert sorted(header.strip("| ").split(" | ")[1:]) == sorted(families)
    assert "Each variant is at the learning rate its LR sweep chose" in md
    assert "## Learning rates: every variant at its best LR" in md
    assert "**lowest held-out FVU (mean over hookpoints)** on held-out sequences 16.." in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "-k" in line.split("|")[1]
            and line.count("|") == 8]
    assert len(rows) == 12 and sum("**yes**" in r for r in rows) == 6
    for family in families:
        chosen = sweep["chosen"][family]
        row = next(r for r in rows if r.startswith(f"| {family} | {chosen['lr']:.3g} |"))
        assert "**yes**" in row and f"{chosen['fvu']:.4f}" in row
    _assert_png(out / "lr_sensitivity.png")
    assert "![LR sensitivity](lr_sensitivity.png)" in md
    # the k table: one row per k, TopK ratios
    assert "## Across k" in md
    k_rows = [line for line in md.splitlines() if line.startswith("| 2 |") or line.startswith("| 4 |")]
    assert len(k_rows) == 2 and "x)" in k_rows[0]
    _assert_png(out / "k_sweep.png")
    # the FVU curves are the chosen coders' (logged under their sweep names)
    _assert_png(out / "fvu_curves.png")
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == set(families)
    assert list(results["lr_sweeps"].values())[0]["chosen"]["topk-k4"]["name"] == sweep["chosen"]["topk-k4"]["name"]
    for family in families:
        assert results["variants"][family]["hookpoints"]["layers.1.mlp"]["k"] == int(family[-1])
