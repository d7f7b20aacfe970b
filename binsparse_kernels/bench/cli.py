"""``binsparse bench``: time the ops and training steps on every backend against the baselines and floors.

    binsparse bench --preset cpu                        # this machine, fp32, a few minutes
    binsparse bench --preset quick --device cuda        # one GPU, bf16, the paper's SmolLM2-135M shape
    binsparse bench --preset paper --device cuda --models SmolLM2-135M --ops encode,decode

Prints a markdown table and writes ``<out-dir>/<name>.json`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import baselines, cases, harness


def _csv(kind):
    def parse(text: str):
        return [kind(part) for part in text.split(",") if part.strip()]

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    presets = "; ".join(f"{name}: {desc}" for name, (desc, _) in cases.PRESETS.items())
    parser.add_argument("--preset", default=None, choices=sorted(cases.PRESETS),
                        help=f"case set (default: quick on a GPU, cpu otherwise). {presets}")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    parser.add_argument("--impls", type=_csv(str), default=None,
                        help="comma list of backends (reference,cpu,triton,cuda) and baselines "
                             f"({','.join(baselines.BASELINES)}); default: every available backend + every baseline")
    parser.add_argument("--ops", type=_csv(str), default=None, help=f"keep these ops ({','.join(cases.OPS)})")
    parser.add_argument("--variants", type=_csv(str), default=None, help="keep binary and/or topk")
    parser.add_argument("--coders", type=_csv(str), default=None, help="keep these step coders (bae,btc)")
    parser.add_argument("--k", type=_csv(int), default=None, help="keep these k")
    parser.add_argument("--models", type=_csv(str), default=None, help="keep these model labels (substring match)")
    parser.add_argument("--widths", type=_csv(int), default=None, help="keep these numbers of latents M")
    parser.add_argument("--N", type=int, default=None, help="override the number of tokens of every case")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                        help="override every case's dtype")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per measurement (also compiles)")
    parser.add_argument("--min-repeats", type=int, default=None, help="timed calls at least (default 5; 3 on CPU)")
    parser.add_argument("--max-repeats", type=int, default=100, help="timed calls at most")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of timed calls to aim for per measurement (default 1.0; 2.0 on CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    parser.add_argument("--no-check", action="store_true", help="skip the output check against eager")
    parser.add_argument("--value-checks", action="store_true",
                        help="keep the ops' data-dependent input checks (device syncs) on while timing")
    parser.add_argument("--out-dir", default="benchmarks/results", help="where the JSON and CSV go")
    parser.add_argument("--name", default=None, help="file name stem (default: <device>-<preset>-<date>)")
    parser.add_argument("--no-write", action="store_true", help="print only, write no files")
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    preset = args.preset or ("quick" if device.type == "cuda" else "cpu")
    selected = cases.filter_cases(cases.preset(preset), ops=args.ops, variants=args.variants, coders=args.coders,
                                  ks=args.k, models=args.models, widths=args.widths, N=args.N, dtype=args.dtype)
    if not selected:
        print("error: the filters leave no case", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(c.name for c in selected))
        return 0
    on_cpu = device.type == "cpu"
    options = harness.Options(
        warmup=args.warmup,
        min_repeats=args.min_repeats or (3 if on_cpu else 5),
        max_repeats=args.max_repeats,
        min_time_s=args.min_time if args.min_time is not None else (2.0 if on_cpu else 1.0),
        memory=not args.no_memory, check=not args.no_check, value_checks=args.value_checks)
    try:
        results = harness.run_suite(selected, args.impls, device, options=options, preset=preset)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(harness.format_table(results))
    if not args.no_write:
        name = args.name or harness.default_name(results.meta, preset)
        json_path, csv_path = harness.write_results(results, args.out_dir, name)
        print(f"\nwrote {json_path} and {csv_path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="binsparse bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
