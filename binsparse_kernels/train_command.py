"""``binsparse train``: train sparse coders (``train/``), then write the comparison report (``evaluation/``).

The one module that uses both packages; neither imports the other.
"""

from __future__ import annotations

import argparse

from .data import REPORT_SEQUENCES
from .evaluation.report import build_default_report
from .train import cli as train_cli


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train_cli.add_arguments(parser)
    parser.add_argument("--no_report", action="store_true", help="skip the comparison report at the end")


def run(args) -> int:
    trainer = train_cli.run(args)
    if trainer.rank != 0 or args.no_report or not trainer.finished:  # a stopped run gets its report when resumed
        return 0
    try:  # the checkpoints are already saved: a failing report must not lose them
        out = build_default_report(trainer.run_dir, model=trainer.model, tokenizer=trainer.tokenizer,
                                   model_label=trainer.model_label, ctx_len=trainer.ctx_len,
                                   n_tokens=REPORT_SEQUENCES * trainer.ctx_len, device=str(trainer.device))
        print(f"report:      {out / 'report.md'}")
    except Exception as exc:  # noqa: BLE001
        print(f"report failed ({type(exc).__name__}: {exc}); run `binsparse report {trainer.run_dir}` to retry")
    return 0
