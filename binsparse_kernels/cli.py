"""The ``binsparse`` command: ``binsparse {train,eval,report,bench,doctor,push,cache} ...``.

Each subcommand lives in its own module and exposes ``add_arguments(parser)`` and ``run(args)``;
this file only routes, importing the subcommand's module when it is used.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": ("binsparse_kernels.train_command", "train binary / TopK sparse coders (no arguments: the default run)"),
    "eval": ("binsparse_kernels.evaluation.cli", "evaluate checkpoints: FVU, CE/KL with the coder spliced in, firing rates"),
    "report": ("binsparse_kernels.evaluation.report", "build the comparison report (markdown + plots) for runs"),
    "bench": ("binsparse_kernels.bench.cli", "benchmark the ops and training steps across backends"),
    "doctor": ("binsparse_kernels.doctor", "versions, GPUs, backends, and a self-check of every backend (bug reports)"),
    "push": ("binsparse_kernels.hub", "upload a run's coders (or one coder) to the Hugging Face Hub with a model card"),
    "cache": ("binsparse_kernels.activation_cache", "write the hooked activations of a model once, for many trainings"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="binsparse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        args = parser.parse_args(argv)  # prints help or the "invalid choice" error
        parser.print_help()
        return 0 if args.command is None else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    sub_parser = argparse.ArgumentParser(prog=f"binsparse {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
    module.add_arguments(sub_parser)
    return int(module.run(sub_parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
