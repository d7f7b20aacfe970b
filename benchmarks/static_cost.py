"""Static cost of the fused encode, without a GPU: one entry point for both GPU backends.

    python benchmarks/static_cost.py                          # both backends (Triton: minutes)
    python benchmarks/static_cost.py --backend triton --only bf16 --arch 90
    python benchmarks/static_cost.py --backend cuda           # reads the built binsparse_kernels/_C_cuda*.so

Writes benchmarks/results/static_cost_sm90.json: one ``est_ratio_to_gemm`` table (a ``backend`` per
row: ESTIMATES, not timings) and each backend's details under ``"triton"`` / ``"cuda"``. The CUDA
analysis and its model are benchmarks/static_cost_cuda.py's; the Triton part is below. ``--only`` /
``--arch`` recompile those dtypes / targets and keep the other Triton rows of --out.

Triton: every encode configuration compiled ahead of time for sm_90a and sm_80 with the specialisation a
launch at d = 576 gets, disassembled, and its loops found in the control-flow graph
(sass.natural_loops): the tile loop, the k-loop inside it, the two append-round loops (one per tile
half) and the flush (a loop over row groups around a loop over column steps). Per configuration:
registers, spills (stack bytes, local-memory instructions), shared memory, CTAs per SM, and the
instructions one warp executes (by class) per k-step, per tile outside every inner loop (the append
path; the flush path's extra), per append round, per flush row group and per flush column step; the
append path and one round reduced to integer + shuffle instructions per score (a warp-instruction is
32 lanes: per score = warps x instructions x 32 / (BLOCK_N x BLOCK_M)).

The model that turns counts into time (H100 SXM; all figures are assumptions: RATES in sass.py, H100
below): per (row block, tile) step one CTA per SM runs its MMA phase, then its epilogue, not overlapped
(1 CTA/SM, no warp specialisation):
    mma_clk  = max(2 BN BM d / (4096 FLOP/clk x eff), (BN + BM) d 2 bytes / L2 bytes per clk per SM)
    epi_clk  = the busiest issue resource (sass.issue_cycles) of the step's epilogue counts x warps:
               the append path + (rounds of half 0 + rounds of half 1) x one round
               [+ on a flush: the flush path's extra + per row group (one group + its column steps
               x one column step), and an L2 round trip (400 clk) exposed for each dependent global
               load: per row group 2 + its column steps (the fills and the list, then each step's
               candidates; conservative), one for tau after]
               + a fixed exposed latency per tile (the next tile's loads start after the epilogue)
    time     = programs per SM x sum over the chunk's steps of (mma_clk + epi_clk) / clock + merge kernel
               (CTAs sharing an SM run one after the other: no overlap)
with the rounds, flushes and column steps of every step taken from survivor_stats.simulate (the
kernel's gate replayed in torch) on random-order scores of the full shape (real activations behave
alike: benchmarks/results/survivor_stats.json), averaged over the simulated row blocks.
The bare GEMM: 2 N M d / 790 TFLOP/s (cuBLAS bf16, as measured in the design notes).
Small N (``"small_n"``: N = 1, 16, 64 at d = 576, M = 36864, k = 32): the same model with the replay at
N rows (one row block, padded), for the configuration launched there, the 128-row one and the tiles
considered and not launched (SMALL_N_CONSIDERED, compiled for bf16 KP 32 sm_90a only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

H100 = {"sms": 132, "clock_hz": 1.755e9, "mma_flop_per_clk_sm": 4096, "gemm_tflops": 790.0,
        "l2_bytes_per_s": 8.0e12, "tile_latency_clk": 800, "l2_latency_clk": 400,
        "mma_efficiency": {"HGMMA_N64+": 0.8, "HGMMA_N32": 0.53, "HMMA": 0.4, "FFMA": 0.03},
        "regs_per_sm": 65536, "smem_per_sm": {90: 228 * 1024, 80: 164 * 1024}, "max_threads_per_sm": 2048}
SHAPES = [(576, 36864), (2048, 131072)]
N_TOKENS = 16384
KS = (32, 64, 128)
KERNEL = "_encode_partial_kernel"


def _setup():
    os.environ.pop("TRITON_INTERPRET", None)


def ctas_per_sm(regs: int, threads: int, shared: int, arch: int) -> int:
    per_thread = -(-regs // 8) * 8  # allocation granularity
    by_regs = H100["regs_per_sm"] // (per_thread * threads)
    by_smem = H100["smem_per_sm"][arch] // max(1, shared + 1024)
    return max(0, min(by_regs, by_smem, H100["max_threads_per_sm"] // threads))


def _is_mma(i) -> bool:
    import sass
    return sass.instr_class(i.base) == "tensor" or i.base == "FFMA"


def kernel_parts(instrs) -> dict:
    """The gated kernel's loops and per-iteration instruction lists (see the module docstring)."""
    import sass

    bounds, loops = sass.natural_loops(instrs)
    has = lambda lp, pred: any(pred(instrs[n]) for n in lp.instructions(bounds))  # noqa: E731
    kloop = min((lp for lp in loops if has(lp, _is_mma)), key=lambda lp: len(lp.blocks))
    tile = max((lp for lp in loops if kloop.blocks <= lp.blocks), key=lambda lp: len(lp.blocks))
    stores = lambda i: i.base == "STG"  # noqa: E731
    rounds = [lp for lp in tile.children if lp is not kloop and not lp.children and has(lp, stores)]
    flush = [lp for lp in tile.children if lp.children]
    own = lambda lp: [(p, e) for p, e in sass.iteration_paths(instrs, bounds, lp)]  # noqa: E731
    longest = lambda paths: max(paths, key=lambda pe: len(pe[0]))[0] if paths else []  # noqa: E731
    tile_paths = own(tile)
    parts = {"k_step": longest(own(kloop)), "rounds_loops": len(rounds)}
    if flush:
        group = flush[0]
        column = group.children[0]
        append = [pe for pe in tile_paths if group not in pe[1]]
        flushing = [pe for pe in tile_paths if group in pe[1]]
        parts.update(append=longest(append), flush_path=longest(flushing), round=longest(own(rounds[0])),
                     flush_group=longest(own(group)), flush_column=longest(own(column)))
    else:  # the flush's loops not found inside the tile loop (sm_80: the CFG reading does not nest them)
        parts["tile"] = longest(tile_paths)
    return {k: ([instrs[n] for n in v] if isinstance(v, list) else v) for k, v in parts.items()}


def analyse(job) -> dict:
    """Compile one configuration for one arch (the launch variant, and the unspecialised one for its
    resources) and count its loops."""
    _setup()
    import torch

    import sass
    from binsparse_kernels.backends.triton import encode as enc

    dtype_name, kp, arch, gate, cfg = job
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    fn, sig, cx, opts = enc._partial_spec(dtype, kp, cfg, gate=gate)
    lsig, lcx, attrs = enc.launch_variant(fn, sig, cx, d=576)
    cubin, shared = sass.compile_triton(fn, lsig, lcx, arch, attrs, opts)
    res = sass.resources(cubin)[KERNEL]
    plain_cubin, plain_shared = sass.compile_triton(fn, sig, cx, arch, None, opts)
    plain = sass.resources(plain_cubin)[KERNEL]
    instrs = sass.parse(sass.disassemble(cubin))[KERNEL]
    warps = opts["num_warps"]
    fr, fc = cfg.flush_shape(kp)
    out = {"dtype": dtype_name, "KP": kp, "arch": f"sm_{arch}" + ("a" if arch == 90 else ""), "gated": gate,
           "config": dataclasses.asdict(cfg),
           "BLOCK_N": cfg.BLOCK_N, "BLOCK_M": cfg.BLOCK_M, "BLOCK_K": cfg.BLOCK_K, "num_warps": warps,
           "num_stages": cfg.num_stages, "FLUSH_AT": cfg.FLUSH_AT, "FLUSH_ROWS": fr, "FLUSH_COLS": fc,
           "launch_variant": {"registers": res["registers"], "stack_bytes": res["stack"], "spill_instructions":
                              res["spill_ops"], "shared_bytes": shared + res["shared_static"],
                              "ctas_per_sm": ctas_per_sm(res["registers"], 32 * warps, shared, arch)},
           "unspecialised_variant": {"registers": plain["registers"], "stack_bytes": plain["stack"],
                                     "spill_instructions": plain["spill_ops"],
                                     "shared_bytes": plain_shared + plain["shared_static"]},
           "total_instructions": len(instrs)}
    parts = kernel_parts(instrs)
    k_step = parts.pop("k_step")
    out["k_loop"] = {"instructions_per_k_step": dict(sass.count_classes(k_step)),
                     "mma": dict(Counter(i.base for i in k_step if _is_mma(i))),
                     "mma_shapes": sorted({i.opcode for i in k_step if _is_mma(i)})}
    out["round_loops"] = parts.pop("rounds_loops", 0)
    scores = cfg.BLOCK_N * cfg.BLOCK_M
    out["per_warp"] = {}
    for name, ins in parts.items():
        c = sass.count_classes(ins)
        if name == "flush_path":  # the flush path's own instructions beyond the append path's
            base = sass.count_classes(parts["append"])
            c = Counter({key: max(0, v - base.get(key, 0)) for key, v in c.items()})
            name = "flush_extra"
        entry = {"counts": {key: v for key, v in c.items() if v}}
        if name in ("append", "round", "tile"):
            entry["int_plus_shuffle_per_score"] = round(warps * 32 * (c.get("int", 0) + c.get("shuffle", 0)) / scores, 2)
        out["per_warp"][name] = entry
    return out


def mma_efficiency(row: dict) -> float:
    shapes = " ".join(row["k_loop"]["mma_shapes"])
    if "HGMMA" in shapes:
        return H100["mma_efficiency"]["HGMMA_N32" if "64x32x" in shapes else "HGMMA_N64+"]
    if "HMMA" in shapes:
        return H100["mma_efficiency"]["HMMA"]
    return H100["mma_efficiency"]["FFMA"]


class _H100Device:
    type = "cpu"  # encode._device_facts gives an H100's SM count and L2 size for a non-CUDA device


def replay(d: int, M: int, k: int, row: dict, rows: int, seed: int = 0, n: int = N_TOKENS) -> dict:
    """survivor_stats.simulate on random-order scores: one chunk of the shape as launched at n rows
    (`rows` rows, i.e. rows / BLOCK_N row blocks, padded to a whole block; the thresholds depend on
    ranks only, so any continuous distribution gives the same statistics)."""
    import torch

    import survivor_stats as ss
    from binsparse_kernels.backends.triton import encode as enc

    bn, bm = row["BLOCK_N"], row["BLOCK_M"]
    per_chunk, chunks = enc._n_chunks(n, M, d, 2, bn, bm, _H100Device())
    z = torch.randn(rows, min(M, per_chunk * bm), generator=torch.Generator().manual_seed(seed))
    sim = ss.simulate(z, k, bn, bm, per_chunk, flush_at=row["FLUSH_AT"], flush_rows=row["FLUSH_ROWS"])
    sim.update(per_chunk=per_chunk, chunks=chunks)
    return sim


def estimate(row: dict, d: int, M: int, k: int, sim: dict, n: int = N_TOKENS) -> dict:
    """The model in the module docstring, for one 16-bit configuration at (n, d, M, k)."""
    import sass
    import triton

    from binsparse_kernels.backends.triton import encode as enc

    bn, bm, warps = row["BLOCK_N"], row["BLOCK_M"], row["num_warps"]
    clk = H100["clock_hz"]
    l2_per_clk_sm = H100["l2_bytes_per_s"] / H100["sms"] / clk
    tensor_clk = 2 * bn * bm * d / (H100["mma_flop_per_clk_sm"] * mma_efficiency(row))
    l2_clk = (bn + bm) * d * 2 / l2_per_clk_sm
    mma_clk = max(tensor_clk, l2_clk)
    pw = {name: Counter(v["counts"]) for name, v in row["per_warp"].items()}
    fq = row["FLUSH_COLS"] // 4
    rounds, flush, group_fill = sim["rounds"], sim["flush"], sim["group_fill"]
    blocks, _, per_chunk, _ = rounds.shape
    total = 0.0
    epi_total = 0.0
    for b in range(blocks):
        for t in range(per_chunk):
            r0, r1 = rounds[b, 0, t].tolist()
            if r0 < 0:
                continue
            c = Counter(pw["append"])
            for key, v in pw["round"].items():
                c[key] += (r0 + r1) * v
            waits = 0  # dependent global round trips of a flush, none overlapped (1 CTA per SM)
            if flush[b, 0, t]:
                c.update(pw["flush_extra"])
                waits = 1  # tau re-read after the flush
                for g in group_fill[b, 0, t].tolist():
                    if g < 0:  # a row group past N: its loads are masked off, its instructions count
                        steps = 0
                    else:
                        steps = -(-g // fq)
                        waits += 2 + steps  # the fills and the list, then each column step's candidates
                    for key, v in pw["flush_group"].items():
                        c[key] += v
                    for key, v in pw["flush_column"].items():
                        c[key] += steps * v
            epi = sass.issue_cycles(c, warps)["bound"] + waits * H100["l2_latency_clk"]
            epi_total += epi
            total += mma_clk + epi + H100["tile_latency_clk"]
    steps = int((rounds[:, 0, :, 0] >= 0).sum())
    per_block = total / blocks
    programs = triton.cdiv(n, bn) * sim["chunks"]
    per_sm = triton.cdiv(programs, H100["sms"])  # run one after the other, even where CTAs share an SM
    t_ms = per_sm * per_block / clk * 1e3
    merge_ms = n * sim["chunks"] * enc._kp(k) * 8 / 2.5e12 * 1e3 + 0.005
    gemm_ms = 2 * n * M * d / (H100["gemm_tflops"] * 1e12) * 1e3
    total_ms = t_ms + merge_ms
    return {"d": d, "M": M, "N": n, "k": k, "dtype": "bf16", "BLOCK_N": bn, "BLOCK_M": bm,
            "chunks": sim["chunks"], "tiles_per_chunk": sim["per_chunk"], "programs_per_sm": per_sm,
            "tensor_clk_per_tile": round(tensor_clk), "l2_clk_per_tile": round(l2_clk),
            "mean_epilogue_clk_per_tile": round(epi_total / steps), "exposed_latency_clk_per_tile": H100["tile_latency_clk"],
            "steps_with_flush": round(float(flush[rounds[..., 0] >= 0].float().mean()), 4),
            "mean_rounds_per_half": round(float(rounds[rounds >= 0].float().mean()), 3),
            "est_encode_ms": round(total_ms, 3), "est_gemm_ms": round(gemm_ms, 3),
            "est_ratio_to_gemm": round(total_ms / gemm_ms, 2), "label": "ESTIMATE (static model), not a timing"}


# Small N (few tokens): the launched configuration against the 128-row one, and tiles considered and
# not launched (compiled for bf16, KP 32, sm_90a only, as evidence for the choice)
SMALL_N_CASES = [(1, 576, 36864, 32), (16, 576, 36864, 32), (64, 576, 36864, 32)]
SMALL_N_CONSIDERED = [(64, 256, 32, 4, 4), (64, 256, 32, 8, 4), (32, 256, 32, 4, 4), (16, 256, 32, 4, 4)]  # BLOCK_N,
# BLOCK_M, BLOCK_K, warps, stages (64 x 256 x 4 warps spills 8 bytes at KP 64; 16 x 256: no per-part counts)


def row_classes(dtype, kp: int, arch: int, cfg) -> str:
    """The row counts that _config gives ``cfg`` for ("N <= 64", "N > 64", "any N"), or "not launched"."""
    from binsparse_kernels.backends.triton import encode as enc

    small = enc._config(dtype, kp, arch, enc.SMALL_N_ROWS) == cfg
    large = enc._config(dtype, kp, arch, enc.SMALL_N_ROWS + 1) == cfg
    n = enc.SMALL_N_ROWS
    return {(True, True): "any N", (True, False): f"N <= {n}", (False, True): f"N > {n}"}.get((small, large), "not launched")


def _config_row(rows: list, dtype: str, kp: int, arch: int, cfg) -> dict | None:
    tag = f"sm_{arch}" + ("a" if arch == 90 else "")
    return next((r for r in rows if (r["dtype"], r["KP"], r["arch"], r.get("config")) ==
                 (dtype, kp, tag, dataclasses.asdict(cfg))), None)


def triton_part(args) -> dict:
    """Compile, count and estimate the Triton encode: the document's "triton" part. Compiles the dtypes
    and archs asked for (every configuration ``encode._config`` launches for them, plus the small-N
    tiles considered); the rows of the others are kept from --out."""
    import torch

    from binsparse_kernels.backends.triton import encode as enc

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtypes = args.only or ["bf16", "fp16", "fp32"]
    old = json.loads(args.out.read_text()).get("triton") if args.out.exists() else None
    jobs = [(dt, kp, arch, True, cfg) for arch in args.arch for dt in dtypes for kp in (16, 32, 64, 128)
            for cfg in enc._configs(torch_dtype[dt], kp, arch)]
    if "bf16" in dtypes and 90 in args.arch:
        jobs += [("bf16", 32, 90, True, enc.Config(*c)) for c in SMALL_N_CONSIDERED]
    if args.reuse:
        rows = old["configs"]
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(analyse, jobs))
        redone = {(r["dtype"], r["arch"]) for r in rows}
        rows += [r for r in (old or {}).get("configs", []) if (r["dtype"], r["arch"]) not in redone]
    for r in rows:
        arch = int(r["arch"][3:5])
        r["launched_for"] = row_classes(torch_dtype[r["dtype"]], r["KP"], arch, enc.Config(**r["config"]))
        lv, pw = r["launch_variant"], r["per_warp"]
        print(f"{r['dtype']} KP={r['KP']} {r['arch']} ({r['launched_for']}): {r['BLOCK_N']}x{r['BLOCK_M']}x{r['BLOCK_K']} "
              f"{r['num_warps']} warps {r['num_stages']} stages: "
              f"regs {lv['registers']} stack {lv['stack_bytes']} smem {lv['shared_bytes']} ctas/SM {lv['ctas_per_sm']}; "
              + (f"int+shfl per score: append {pw['append']['int_plus_shuffle_per_score']}, "
                 f"round {pw['round']['int_plus_shuffle_per_score']}" if "append" in pw else
                 "flush loops not nested in the tile loop by the CFG reading: no per-part counts"), flush=True)
    bf16 = torch.bfloat16
    estimates = []
    for d, M in SHAPES:
        for k in KS:
            row = _config_row(rows, "bf16", enc._kp(k), 90, enc._config(bf16, enc._kp(k), 90, N_TOKENS))
            if row is None:
                continue
            est = estimate(row, d, M, k, replay(d, M, k, row, args.rows))
            estimates.append(est)
            print(f"ESTIMATE d={d} M={M} k={k}: {est['est_encode_ms']} ms vs GEMM {est['est_gemm_ms']} ms -> "
                  f"{est['est_ratio_to_gemm']}x (epilogue {est['mean_epilogue_clk_per_tile']} clk/tile, MMA "
                  f"{max(est['tensor_clk_per_tile'], est['l2_clk_per_tile'])}, flush on {est['steps_with_flush']} "
                  f"of the steps, {est['mean_rounds_per_half']} rounds per half)", flush=True)
    small_n = []
    for n, d, M, k in SMALL_N_CASES:
        kp = enc._kp(k)
        tiles = {"launched": enc._config(bf16, kp, 90, n), "128-row": enc._config(bf16, kp, 90, N_TOKENS)}
        tiles.update({f"{c[0]}x{c[1]}, {c[3]} warps, {c[4]} stages (not launched)": enc.Config(*c) for c in SMALL_N_CONSIDERED})
        case = {"N": n, "d": d, "M": M, "k": k, "dtype": "bf16", "label": "ESTIMATE (static model), not a timing"}
        for name, cfg in tiles.items():
            row = _config_row(rows, "bf16", kp, 90, cfg)
            if row is None or "append" not in row["per_warp"]:  # not compiled, or no per-part counts
                continue
            est = estimate(row, d, M, k, replay(d, M, k, row, n, n=n), n=n)
            case[name] = {key: est[key] for key in ("BLOCK_N", "BLOCK_M", "chunks", "tiles_per_chunk", "programs_per_sm",
                                                    "tensor_clk_per_tile", "l2_clk_per_tile", "mean_epilogue_clk_per_tile",
                                                    "steps_with_flush", "mean_rounds_per_half", "est_encode_ms")}
            case[name]["num_warps"] = cfg.num_warps
        if "launched" in case and "128-row" in case:
            case["est_ratio_launched_to_128_row"] = round(case["launched"]["est_encode_ms"] / case["128-row"]["est_encode_ms"], 2)
        small_n.append(case)
        print(f"ESTIMATE N={n} d={d} M={M} k={k}: " + ", ".join(
            f"{name} {v['BLOCK_N']}x{v['BLOCK_M']}: epilogue {v['mean_epilogue_clk_per_tile']} clk/tile, MMA "
            f"{max(v['tensor_clk_per_tile'], v['l2_clk_per_tile'])}, {v['est_encode_ms']} ms"
            for name, v in case.items() if isinstance(v, dict)), flush=True)
    import sass
    import triton
    return {"compiled_with": f"triton {triton.__version__}, disassembled with nvdisasm",
            "assumed_h100": H100, "assumed_issue_rates_warp_instr_per_clk_per_sm": sass.RATES,
            "model": __doc__.split("The model that turns counts into time")[1].strip(),
            "configs": rows, "estimates": estimates, "small_n": small_n}


def summary_row(backend: str, est: dict) -> dict:
    """One row of the document's top-level est_ratio_to_gemm table (both backends)."""
    return {"backend": backend, "dtype": "bf16", "N": est["N"], "d": est["d"], "M": est["M"], "k": est["k"],
            "est_encode_ms": est.get("est_encode_ms", est.get("est_kernel_ms")), "est_gemm_ms": est["est_gemm_ms"],
            "est_ratio_to_gemm": est["est_ratio_to_gemm"], "label": "ESTIMATE (static model), not a timing"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["triton", "cuda"], nargs="*", default=["triton", "cuda"],
                    help="which backends to (re)analyse; the other's part of --out is kept")
    ap.add_argument("--only", choices=["bf16", "fp16", "fp32"], nargs="*", help="triton: dtypes to compile")
    ap.add_argument("--arch", type=int, nargs="*", default=[90, 80], help="triton: targets to compile")
    ap.add_argument("--jobs", type=int, default=2, help="triton: parallel compiles")
    ap.add_argument("--rows", type=int, default=512, help="triton: rows simulated for the branch mix")
    ap.add_argument("--reuse", action="store_true", help="triton: take the compiled counts from --out, redo the estimates")
    ap.add_argument("--so", default=None, help="cuda: the built extension (default binsparse_kernels/_C_cuda*.so)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "static_cost_sm90.json")
    args = ap.parse_args(argv)
    _setup()
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc = {"what": "static cost of the fused encode of both GPU backends (benchmarks/static_cost.py; the CUDA "
                   "analysis in benchmarks/static_cost_cuda.py): compiled code read per kernel, and an ESTIMATE of "
                   "its time against the bare bf16 GEMM on an H100. Every time here is an ESTIMATE, not a timing; "
                   "each backend's model (its 'model' entry) states its own assumptions.",
           "est_ratio_to_gemm": [], "triton": old.get("triton"), "cuda": old.get("cuda")}
    if "triton" in args.backend:
        doc["triton"] = triton_part(args)
    if "cuda" in args.backend:
        import static_cost_cuda
        doc["cuda"] = static_cost_cuda.analyse(args.so)
    for backend in ("triton", "cuda"):
        part = doc[backend] or {}
        doc["est_ratio_to_gemm"] += [summary_row(backend, e) for e in part.get("estimates", part.get("rows", []))]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    for r in doc["est_ratio_to_gemm"]:
        print(f"ESTIMATE {r['backend']:6s} d={r['d']:5d} M={r['M']:6d} k={r['k']:3d}: {r['est_ratio_to_gemm']}x GEMM")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
