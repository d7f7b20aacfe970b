"""The comparison report and the eval command, end to end, on a tiny real training run.

The run is made here with SparseCoder directly: a tiny randomly initialised Llama, a word-level
tokenizer and synthetic text; binary, TopK and hybrid coders (a skip transcoder on layers.0.mlp,
an SAE on layers.1) trained for a few dozen steps, saved in the trainer's layout
``<run>/<variant>/<hookpoint>/{cfg.json, sae.safetensors}`` with a ``metrics.jsonl`` per variant.
"""

from __future__ import annotations

import json

import pytest
import torch

from binsparse_kernels.coder import SparseCoder, SparseCoderConfig
from binsparse_kernels.data import chunk_tokens, load_chunks
from binsparse_kernels.cli import main as binsparse_main
from binsparse_kernels.evaluation.cli import TABLE_COLUMNS, data_defaults, discover_checkpoints
from binsparse_kernels.evaluation.report import build_default_report, read_fvu_curves
from binsparse_kernels.models import capture
from test_eval_splice import synthetic_text, tiny_lm, word_tokenizer

HOOKS = {"layers.0.mlp": True, "layers.1": False}  # hookpoint -> transcode
CTX = 32


def _train(coder, x, y, steps=30):
    coder.init_from_batch(x, y)
    opt = torch.optim.Adam(coder.parameters(), lr=1e-2)
    curve = []
    for step in range(steps):
        out = coder(x, y)
        opt.zero_grad()
        out.fvu.backward()
        opt.step()
        if not coder.cfg.transcode:
            coder.set_decoder_norm_to_unit_norm()
        curve.append((step, out.fvu.item()))
    return curve


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_run")
    tokenizer = word_tokenizer()
    model = tiny_lm(vocab_size=64)
    text = synthetic_text(300, seed=1)
    tokens = chunk_tokens(tokenizer, [text], CTX)
    train, held_out = tokens[:40], tokens[40:60]
    with torch.no_grad(), capture(model, HOOKS) as cap:
        model(input_ids=train)
    run = root / "run"
    for activation, name in (("topk_binary", "binary"), ("topk", "topk"), ("topk_hybrid", "hybrid")):
        lines = {}
        for hook, transcode in HOOKS.items():
            inp, out = cap[hook]
            x = (inp if transcode else out).reshape(-1, 16).detach()
            y = out.reshape(-1, 16).detach()
            torch.manual_seed(0)
            coder = SparseCoder(16, SparseCoderConfig(activation=activation, num_latents=64, k=4, transcode=transcode,
                                                      skip_connection=transcode))
            for step, value in _train(coder, x, y):
                lines.setdefault(step, {"step": step})[f"fvu/{hook}"] = value
            coder.save_to_disk(run / name / hook)
        (run / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines.values()) + "\n")
    # The model, tokenizer and held-out text on disk, for the commands.
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "heldout.txt").write_text(synthetic_text(120, seed=2))
    return {"root": root, "run": run, "model": model, "tokenizer": tokenizer, "tokens": held_out}


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = plt.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas


def test_discover_checkpoints(tiny_run):
    run = tiny_run["run"]
    found = discover_checkpoints([run])
    assert set(found) == {"binary", "topk", "hybrid"}
    assert set(found["binary"]) == set(HOOKS)
    assert discover_checkpoints([run / "topk"]) == {"topk": found["topk"]}
    assert discover_checkpoints([run / "binary" / "layers.1"]) == {"binary": {"layers.1": run / "binary" / "layers.1"}}
    (run / "topk" / "best").mkdir()  # a copy below a variant folder is not a variant of its own
    (run / "topk" / "layers.1").rename(run / "topk" / "best" / "layers.1")
    try:
        assert set(discover_checkpoints([run / "topk"])) == {"topk"}
        assert set(discover_checkpoints([run])["topk"]) == {"layers.0.mlp"}
    finally:
        (run / "topk" / "best" / "layers.1").rename(run / "topk" / "layers.1")
        (run / "topk" / "best").rmdir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_checkpoints([run / "nope"])
    # Two runs with the same variant names: every one is named <run>/<variant>.
    other = tiny_run["root"] / "other_run"
    if not other.exists():
        import shutil

        shutil.copytree(run / "topk", other / "topk")
    two = discover_checkpoints([run / "topk", other])
    assert set(two) == {"run/topk", "other_run/topk"}
    assert two["other_run/topk"]["layers.1"] == other / "topk" / "layers.1"
    assert set(discover_checkpoints([run / "topk", run / "topk" / "layers.1"])) == {"topk"}  # the same folder twice
    with pytest.raises(FileNotFoundError, match="no sparse coder checkpoints"):
        discover_checkpoints([tiny_run["root"] / "model"])


def test_default_report_from_a_run(tiny_run):
    run = tiny_run["run"]
    out = build_default_report(run, model=tiny_run["model"], tokenizer=tiny_run["tokenizer"], tokens=tiny_run["tokens"],
                               model_label="tiny random Llama", batch_size=4, log=None)
    assert out == run / "report"
    md = (out / "report.md").read_text()
    # Side-by-side table: one column per variant, binary first.
    assert "| metric | binary | topk | hybrid |" in md
    for row in ("FVU", "CE increase (nats)", r"KL(clean \|\| spliced)", "L0 (firing latents per token)",
                "dead fraction (never fired)", "latents firing on >10% of tokens", "latents firing on >50% of tokens",
                "proxy F1 (plain mean)", "proxy F1 (frequency-weighted)", "CE increase, all hookpoints at once"):
        assert f"| {row} |" in md, row
    header = "| " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |"
    assert header in md
    assert md.count("| binary | layers.") == 2 and "| binary | all at once |" in md
    assert "Proxy F1 is not the paper's interpretability score" in md
    assert "[[" in md and "]]" in md  # marked tokens in the contexts
    assert "## binary vs TopK vs hybrid on these runs" in md
    assert "- hybrid, binary part vs continuous part: L0" in md
    _assert_png(out / "firing_rates.png")
    _assert_png(out / "fvu_curves.png")
    assert "![FVU vs step](fvu_curves.png)" in md
    results = json.loads((out / "results.json").read_text())
    m = results["variants"]["binary"]["hookpoints"]["layers.1"]
    assert m["activation"] == "topk_binary" and 0 < m["l0"] <= 4
    assert 0 <= m["fvu"] < 1.5 and m["interp_proxy"]["n_scored"] > 0
    assert_summary_table_matches_results(md, results)


# Each row of the report's summary table and where its numbers come from in results.json, written
# out here rather than taken from report.SUMMARY_ROWS.
HOOK_MEAN_ROWS = {"FVU": "fvu", "explained variance": "explained_variance", "CE increase (nats)": "ce_increase",
                  "KL(clean || spliced)": "kl_div", "next-token accuracy drop": "accuracy_drop",
                  "ce_loss_score": "ce_loss_score", "kl_div_score": "kl_div_score",
                  "L0 (firing latents per token)": "l0", "dead fraction (never fired)": "dead_fraction",
                  "latents firing on >10% of tokens": "count_over_10pct",
                  "latents firing on >50% of tokens": "count_over_50pct", "cosine similarity": "cossim",
                  "relative reconstruction bias": "relative_reconstruction_bias"}
ALL_AT_ONCE_ROWS = {"CE increase, all hookpoints at once": "ce_increase", "KL, all hookpoints at once": "kl_div"}
PROXY_ROWS = {"proxy F1 (plain mean)": "f1_mean", "proxy F1 (frequency-weighted)": "f1_weighted"}


def parse_summary_table(md):
    """(variant columns, {row label: {variant: cell}}), splitting rows on unescaped "|" as markdown does."""
    import re

    def cells(line):
        assert line.startswith("|") and line.endswith("|"), line
        return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line[1:-1])]

    lines = md.split("## Side by side (mean over hookpoints)\n\n", 1)[1].splitlines()
    header = cells(lines[0])
    assert header[0] == "metric" and set(lines[1]) <= set("|-")
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        row = cells(line)
        assert len(row) == len(header), line
        rows[row[0]] = dict(zip(header[1:], row[1:]))
    return header[1:], rows


def assert_summary_table_matches_results(md, results):
    """Every cell of the summary table is the mean over hookpoints (or the all-at-once / proxy value)
    of results.json, in the right column, to the digits shown."""
    variants, rows = parse_summary_table(md)
    assert set(variants) == set(results["variants"])
    assert set(rows) == set(HOOK_MEAN_ROWS) | set(ALL_AT_ONCE_ROWS) | set(PROXY_ROWS)
    for label, cells in rows.items():
        for variant, cell in cells.items():
            entry = results["variants"][variant]
            if label in HOOK_MEAN_ROWS:
                values = [m[HOOK_MEAN_ROWS[label]] for m in entry["hookpoints"].values()]
                expected = sum(values) / len(values)
            elif label in ALL_AT_ONCE_ROWS:  # one hookpoint: its own splice is all of them at once
                together = entry["all_hookpoints"] if len(entry["hookpoints"]) > 1 else \
                    next(iter(entry["hookpoints"].values()))
                expected = together[ALL_AT_ONCE_ROWS[label]]
            else:
                expected = entry["interp_proxy"][PROXY_ROWS[label]]
            assert cell != "-", (label, variant)
            scale = 100 if cell.endswith("%") else 1
            shown = cell.rstrip("%")
            digits = len(shown.split(".")[1]) if "." in shown else 0
            assert abs(float(shown) - scale * expected) <= 0.5 * 10 ** -digits + 1e-12, (label, variant, cell, expected)
    # every two columns differ in some row, so a swap of two columns fails the cell checks above
    for i, a in enumerate(variants):
        for b in variants[i + 1:]:
            assert any(cells[a] != cells[b] for cells in rows.values()), (a, b)


def test_recorded_default_run_report_matches_its_results():
    """The published default run (docs/results/default-run-cpu, quoted in the README): its summary
    table is its results.json."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "docs" / "results" / "default-run-cpu"
    md, results = (folder / "report.md").read_text(), json.loads((folder / "results.json").read_text())
    assert_summary_table_matches_results(md, results)
    # the check sees a swap of two columns (here the two with equal FVU: they differ in other rows)
    swapped = md.replace("| metric | binary | topk | hybrid |", "| metric | binary | hybrid | topk |")
    assert swapped != md
    with pytest.raises(AssertionError):
        assert_summary_table_matches_results(swapped, results)


def test_eval_and_report_commands(tiny_run, tmp_path, capsys):
    root, run = tiny_run["root"], tiny_run["run"]
    common = ["--model", str(root / "model"), "--dataset", str(root / "heldout.txt"), "--ctx_len", str(CTX),
              "--tokens", str(16 * CTX), "--batch_size", "8", "--device", "cpu", "--all_chunks"]
    rc = binsparse_main(["eval", str(run / "binary"), str(run / "topk" / "layers.1"), *common,
                         "--out", str(tmp_path / "eval.json"), "--delphi_cache", str(tmp_path / "delphi")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "FVU" in printed and "F1 proxy w" in printed and "all at once" in printed
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["n_sequences"] == 16 and res["ctx_len"] == CTX
    assert set(res["variants"]) == {"binary", "topk"}
    assert set(res["variants"]["topk"]["hookpoints"]) == {"layers.1"}
    binary = res["variants"]["binary"]
    assert set(binary["hookpoints"]) == set(HOOKS) and "all_hookpoints" in binary
    for m in binary["hookpoints"].values():
        for key in ("fvu", "explained_variance", "ce_increase", "kl_div", "accuracy_drop", "ce_loss_score",
                    "kl_div_score", "l0", "dead_fraction", "count_over_10pct", "count_over_50pct", "cossim",
                    "l2_ratio", "relative_reconstruction_bias", "firing_hist", "interp_proxy"):
            assert key in m, key
    assert (tmp_path / "delphi" / "binary" / "latents" / "layers.1" / "config.json").is_file()
    assert (tmp_path / "delphi" / "binary" / "log" / "hookpoint_firing_counts.pt").is_file()

    rc = binsparse_main(["report", str(run), "--out", str(tmp_path / "report"), *common, "--no_interp"])
    assert rc == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| metric | binary | topk | hybrid |" in md
    _assert_png(tmp_path / "report" / "firing_rates.png")


def test_eval_command_rejects_bad_options(tiny_run):
    with pytest.raises(ValueError, match="--tokens"):
        binsparse_main(["eval", str(tiny_run["run"]), "--tokens", "0"])


def test_eval_command_fails_fast_on_bad_checkpoints(tiny_run, tmp_path):
    root, run = tiny_run["root"], tiny_run["run"]
    # A hookpoint the model does not have: reported right after the model loads, before any data is
    # read (the dataset path below does not exist, so reading it first would fail differently).
    bad = tmp_path / "badrun" / "binary" / "layers.7.mlp"
    bad.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(run / "binary" / "layers.1", bad)
    args = ["--model", str(root / "model"), "--dataset", str(tmp_path / "missing.txt"), "--device", "cpu"]
    with pytest.raises(ValueError, match=r"layers\.7\.mlp.*names no module"):
        binsparse_main(["eval", str(tmp_path / "badrun"), *args])
    with pytest.raises(ValueError, match="names no module"):
        binsparse_main(["report", str(tmp_path / "badrun"), "--out", str(tmp_path / "rep"), *args])
    assert not (tmp_path / "rep" / "report.md").exists()
    # No checkpoints at all, a missing folder, an incomplete checkpoint: before the model loads.
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no sparse coder checkpoints"):
        binsparse_main(["eval", str(tmp_path / "empty"), "--model", str(tmp_path / "no_model")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        binsparse_main(["eval", str(tmp_path / "nowhere"), "--model", str(tmp_path / "no_model")])
    (bad / "sae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no sae.safetensors"):
        binsparse_main(["report", str(tmp_path / "badrun"), "--out", str(tmp_path / "rep"),
                        "--model", str(tmp_path / "no_model")])


def test_data_defaults_come_from_the_runs_training_config(tmp_path):
    import argparse

    run = tmp_path / "run"
    (run / "binary" / "layers.1").mkdir(parents=True)
    torch.save({"step": 3, "config": {"model": "some/model", "dataset": "corpus.jsonl", "split": "validation",
                                      "text_column": "body", "ctx_len": 64}}, run / "trainer_state.pt")
    checkpoints = {"binary": {"layers.1": run / "binary" / "layers.1"}}
    blank = dict(model=None, dataset=None, split=None, text_column=None, ctx_len=None, all_chunks=False)
    args = argparse.Namespace(**blank)
    data_defaults(args, checkpoints, log=lambda m: None)
    assert (args.model, args.dataset, args.split, args.text_column, args.ctx_len) == (
        "some/model", "corpus.jsonl", "validation", "body", 64)
    logs = []
    args = argparse.Namespace(**(blank | {"ctx_len": 128, "dataset": "other.txt"}))
    data_defaults(args, checkpoints, log=logs.append)
    assert args.dataset == "other.txt" and args.ctx_len == 128
    assert any("overlap" in m for m in logs)  # a different ctx_len re-chunks the text: held-out is not held out
    (tmp_path / "bad" / "binary" / "h").mkdir(parents=True)
    (tmp_path / "bad" / "trainer_state.pt").write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="could not read the training config"):
        data_defaults(argparse.Namespace(**blank), {"binary": {"h": tmp_path / "bad" / "binary" / "h"}}, log=print)
    args = argparse.Namespace(**blank)  # no trainer_state.pt: built-in corpus, the trainer's default ctx_len
    data_defaults(args, {"binary": {"h": tmp_path / "x" / "binary" / "h"}}, log=lambda m: None)
    assert (args.model, args.dataset, args.split, args.text_column, args.ctx_len) == (None, None, "train", "text", 256)


def test_fvu_curves_from_a_run_level_metrics_file(tmp_path):
    """The trainer writes one ``<run>/metrics.jsonl`` with ``fvu/<variant>/<hookpoint>`` keys."""
    run = tmp_path / "run"
    (run / "binary").mkdir(parents=True)
    lines = [{"step": 10, "fvu/binary/layers.9.mlp": 0.5, "fvu/topk/layers.9.mlp": 0.4, "l0/binary/layers.9.mlp": 3.0},
             {"step": 20, "fvu/binary/layers.9.mlp": 0.3, "fvu/topk/layers.9.mlp": 0.2}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"step\": 30, \"fvu/bin")
    assert read_fvu_curves(run / "binary", "binary") == {"layers.9.mlp": ([10.0, 20.0], [0.5, 0.3])}
    assert read_fvu_curves(run / "topk", "topk") == {"layers.9.mlp": ([10.0, 20.0], [0.4, 0.2])}
    assert read_fvu_curves(run / "hybrid", "hybrid") == {}


def test_trainer_run_ends_with_the_report(tiny_run, tmp_path):
    """What ``binsparse train`` does at the end of a run (train/cli.py): the real Trainer on the tiny
    LM, then ``build_default_report`` with the same arguments; the held-out data comes from the run's
    trainer_state.pt."""
    from binsparse_kernels.train import trainer as trainer_mod

    text = tmp_path / "text.txt"
    text.write_text(synthetic_text(600, seed=3))
    cfg = trainer_mod.TrainConfig(dataset=str(text), hookpoints=["layers.1.mlp"], variants=["binary", "topk"], k=4,
                                  num_latents=64, batch_size=4, ctx_len=CTX, max_tokens=4 * CTX * 6,
                                  save_dir=str(tmp_path), run_name="r", log_every=2, save_every=1000, device="cpu")
    trainer = trainer_mod.Trainer(cfg, tiny_run["model"], tiny_run["tokenizer"], log=lambda m: None)
    run_dir = trainer.train()
    out = build_default_report(run_dir, model=trainer.model, tokenizer=trainer.tokenizer,
                               model_label=trainer.model_label, ctx_len=cfg.ctx_len, n_tokens=16 * cfg.ctx_len,
                               device=str(trainer.device), log=None)
    assert out == run_dir / "report"
    md = (out / "report.md").read_text()
    assert "| metric | binary | topk |" in md and "![FVU vs step](fvu_curves.png)" in md
    # One hookpoint: "all hookpoints at once" is that hookpoint's splice, not a blank.
    row = next(line for line in md.splitlines() if line.startswith("| CE increase, all hookpoints at once |"))
    assert "| - |" not in row
    _assert_png(out / "firing_rates.png")
    _assert_png(out / "fvu_curves.png")
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["dataset"] == str(text) and results["ctx_len"] == CTX
    # Only the trainer's held-out chunks were scored.
    _, held = load_chunks(tiny_run["tokenizer"], str(text), ctx_len=CTX)
    assert results["n_sequences"] == held.shape[0]
    for v in ("binary", "topk"):
        m = results["variants"][v]["hookpoints"]["layers.1.mlp"]
        assert m["transcode"] is True and 0 <= m["fvu"] < 1.5 and m["l0"] <= 4
