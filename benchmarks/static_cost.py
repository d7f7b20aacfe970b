"""Static cost of the Triton fused encode, without a GPU: every encode configuration compiled ahead of
time for sm_90a and sm_80 with the specialisation a launch at d = 576 gets, disassembled, and its
tile loop's instruction counts read per branch (skip, extract, full). Combined with the branch
fractions of benchmarks/survivor_stats.py into an ESTIMATE (not a timing) of the encode's time
against the bare GEMM on an H100. Writes benchmarks/results/static_cost_sm90.json.

    python benchmarks/static_cost.py                  # all configurations, sm_90a and sm_80 (minutes)
    python benchmarks/static_cost.py --only bf16      # the 16-bit speed path only

Per configuration: registers, spills (stack bytes, local-memory instructions), shared memory, CTAs
per SM, the k-loop's instructions per k-step, and per branch the instructions one warp executes per
tile outside the k-loop (paths through the tile loop: sass.loop_paths), by class, reduced to
integer + shuffle instructions per score (per warp-instruction 32 lanes; per score = warps x
instructions x 32 / (BLOCK_N x BLOCK_M)). The extract branch is counted for 1 and S rounds.

The model that turns counts into time (H100 SXM, all figures assumptions, see RATES in sass.py and
H100 below): per (row block, tile) step one CTA per SM runs its MMA phase, then its epilogue, not
overlapped (1 CTA/SM, no warp specialisation):
    mma_clk  = max(2 BN BM d / (4096 FLOP/clk x eff), (BN + BM) d 2 bytes / L2 bytes per clk per SM)
    epi_clk  = the busiest issue resource of the branch's counts x warps (sass.issue_cycles)
               + a fixed exposed latency per tile (the next tile's loads start after the epilogue)
    time     = waves x tiles per chunk x E[mma_clk + epi_clk] / clock + merge kernel
with E over the branch fractions at each tile position (survivor_stats.simulate on random-order
scores of the full shape, checked against real activations at M = 9216 in survivor_stats.json).
The bare GEMM: 2 N M d / 790 TFLOP/s (cuBLAS bf16, as measured in the design notes).
"""

from __future__ import annotations

import argparse
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
        "l2_bytes_per_s": 8.0e12, "tile_latency_clk": 800,
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


def _classify_paths(instrs, paths, kloop, inner):
    """(skip, extract, full) index lists: extract paths contain the extract loop's head; of the
    others, skip is the shortest and full the longest (the binary/continuous branch doubles them;
    the larger of each pair is kept)."""
    head = inner[0] if inner else None
    ext = [p for p in paths if head is not None and head in set(p)]
    rest = [p for p in paths if p not in ext]
    body = set(range(kloop[0], kloop[1] + 1))
    size = lambda p: sum(1 for n in p if n not in body)  # noqa: E731
    rest.sort(key=size)
    return rest[0], max(ext, key=size) if ext else None, rest[-1]


def analyse(job) -> dict:
    """Compile one configuration for one arch (launch variant, and the unspecialised one for its
    resources) and count its tile loop."""
    _setup()
    import torch

    import sass
    from binsparse_kernels.backends.triton import encode as enc

    dtype_name, kp, arch, gate = job
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    fn, sig, cx, opts = enc._partial_spec(dtype, kp, arch, gate=gate)
    cfg = enc._config(dtype, kp, arch)
    lsig, lcx, attrs = enc.launch_variant(fn, sig, cx, d=576)
    cubin, shared = sass.compile_triton(fn, lsig, lcx, arch, attrs, opts)
    res = sass.resources(cubin)[KERNEL]
    plain_cubin, plain_shared = sass.compile_triton(fn, sig, cx, arch, None, opts)
    plain = sass.resources(plain_cubin)[KERNEL]
    instrs = sass.parse(sass.disassemble(cubin))[KERNEL]
    warps = opts["num_warps"]
    out = {"dtype": dtype_name, "KP": kp, "arch": f"sm_{arch}" + ("a" if arch == 90 else ""), "gated": gate,
           "BLOCK_N": cfg.BLOCK_N, "BLOCK_M": cfg.BLOCK_M, "BLOCK_K": cfg.BLOCK_K, "num_warps": warps,
           "num_stages": cfg.num_stages, "halves": cfg.HALVES,
           "launch_variant": {"registers": res["registers"], "stack_bytes": res["stack"], "spill_instructions":
                              res["spill_ops"], "shared_bytes": shared + res["shared_static"],
                              "ctas_per_sm": ctas_per_sm(res["registers"], 32 * warps, shared, arch)},
           "unspecialised_variant": {"registers": plain["registers"], "stack_bytes": plain["stack"],
                                     "spill_instructions": plain["spill_ops"],
                                     "shared_bytes": plain_shared + plain["shared_static"]},
           "total_instructions": len(instrs)}
    loops = [(h, l) for h, l in sass.loops(instrs) if h != l]
    is_mma = lambda i: sass.instr_class(i.base) == "tensor" or i.base == "FFMA"  # noqa: E731
    kloop = next((h, l) for h, l in loops if any(is_mma(i) for i in instrs[h:l + 1]))
    tile = max(((h, l) for h, l in loops if h <= kloop[0] and kloop[1] <= l), key=lambda e: e[1] - e[0])
    inner = [(h, l) for h, l in loops if tile[0] <= h and l <= tile[1] and (h, l) not in (kloop, tile)]
    mma_ops = Counter(i.base for i in instrs[kloop[0]:kloop[1] + 1] if is_mma(i))
    out["k_loop"] = {"instructions_per_k_step": dict(sass.count_classes(instrs[kloop[0]:kloop[1] + 1])),
                     "mma": dict(mma_ops), "mma_shapes": sorted({i.opcode for i in instrs[kloop[0]:kloop[1] + 1]
                                                                 if is_mma(i)})}
    paths = sass.loop_paths(instrs, tile[0], tile[1])
    out["tile_loop_paths"] = len(paths)
    body = set(range(kloop[0], kloop[1] + 1))
    scores = cfg.BLOCK_N * cfg.BLOCK_M
    per_branch = {}
    if gate:
        ext_loop = next((e for e in inner if not any(is_mma(i) for i in instrs[e[0]:e[1] + 1])), None)
        skip, ext, full = _classify_paths(instrs, paths, kloop, [ext_loop[0]] if ext_loop else [])
        named = {"skip": skip, "full": full}
        if ext is not None:
            named["extract_1_round"] = ext
        ext_body = Counter()
        if ext_loop:
            ext_body = sass.count_classes(instrs[ext_loop[0]:ext_loop[1] + 1])
    else:
        named = {"ungated": max(paths, key=len)}
    for name, p in named.items():
        c = sass.count_classes([instrs[n] for n in p if n not in body])
        per_branch[name] = c
    if gate and "extract_1_round" in per_branch:
        c = Counter(per_branch["extract_1_round"])
        for _ in range(enc.EXTRACT_MAX - 1):
            c.update(ext_body)
        per_branch[f"extract_{enc.EXTRACT_MAX}_rounds"] = c
        per_branch["extract_per_extra_round"] = ext_body
    out["per_tile_per_warp"] = {}
    for name, c in per_branch.items():
        int_shfl = c.get("int", 0) + c.get("shuffle", 0)
        out["per_tile_per_warp"][name] = {
            "counts": {k: v for k, v in c.items() if v},
            "int_plus_shuffle_per_score": round(warps * 32 * int_shfl / scores, 2),
            "epilogue_clk_per_sm": round(sass.issue_cycles(c, warps)["bound"], 1)}
    return out


def mma_efficiency(row: dict) -> float:
    shapes = " ".join(row["k_loop"]["mma_shapes"])
    if "HGMMA" in shapes:
        return H100["mma_efficiency"]["HGMMA_N32" if "64x32x" in shapes else "HGMMA_N64+"]
    if "HMMA" in shapes:
        return H100["mma_efficiency"]["HMMA"]
    return H100["mma_efficiency"]["FFMA"]


def estimate(row: dict, d: int, M: int, k: int, most_by_position: list, S: int | None = None) -> dict:
    """The model in the module docstring, for one 16-bit configuration at (N_TOKENS, d, M, k).
    most_by_position: per tile position of a chunk, the distribution of `most` (list of counts).
    S: the extract limit to model (the branch costs do not depend on it: the extract loop runs `most`
    rounds whatever S is; only which tiles take it does)."""
    import triton

    from binsparse_kernels.backends.triton import encode as enc

    bn, bm, warps = row["BLOCK_N"], row["BLOCK_M"], row["num_warps"]
    clk = H100["clock_hz"]
    l2_per_clk_sm = H100["l2_bytes_per_s"] / H100["sms"] / clk
    mma_clk = max(2 * bn * bm * d / (H100["mma_flop_per_clk_sm"] * mma_efficiency(row)), (bn + bm) * d * 2 / l2_per_clk_sm)
    br = row["per_tile_per_warp"]
    skip = br["skip"]["epilogue_clk_per_sm"]
    full = br["full"]["epilogue_clk_per_sm"]
    ext1 = br["extract_1_round"]["epilogue_clk_per_sm"]
    ext_round = br["extract_per_extra_round"]["epilogue_clk_per_sm"]
    S = S or enc.EXTRACT_MAX
    per_chunk, chunks = enc._n_chunks(N_TOKENS, M, d, 2, bn, bm, _H100Device())
    expect = 0.0  # clocks of one chunk: the expected step time summed over its tile positions
    mix = Counter()
    for t in range(per_chunk):
        hist = most_by_position[min(t, len(most_by_position) - 1)]
        total = sum(hist)
        for most, n in enumerate(hist):
            p = n / total
            if most == 0:
                e, name = skip, "skip"
            elif most <= S:
                e, name = ext1 + (most - 1) * ext_round, "extract"
            else:
                e, name = full, "full"
            expect += p * (mma_clk + e + H100["tile_latency_clk"])
            mix[name] += p / per_chunk
    programs = triton.cdiv(N_TOKENS, bn) * chunks
    ctas = max(1, row["launch_variant"]["ctas_per_sm"])
    waves = triton.cdiv(programs, H100["sms"] * ctas)
    # per SM: waves x tiles per chunk x E[step]; with 2+ CTAs per SM their phases could overlap, the
    # model stays conservative (no overlap, the CTAs of a wave share the SM's issue slots)
    t_ms = waves * ctas * expect / clk * 1e3  # expect: summed over the chunk's tile positions
    merge_ms = N_TOKENS * chunks * enc._kp(k) * 8 / 2.5e12 * 1e3 + 0.005
    gemm_ms = 2 * N_TOKENS * M * d / (H100["gemm_tflops"] * 1e12) * 1e3
    total = t_ms + merge_ms
    return {"d": d, "M": M, "N": N_TOKENS, "k": k, "S": S, "dtype": "bf16", "chunks": chunks, "tiles_per_chunk": per_chunk,
            "waves": waves, "mma_clk_per_tile": round(mma_clk), "branch_mix": {n: round(v, 4) for n, v in mix.items()},
            "est_encode_ms": round(total, 3), "est_gemm_ms": round(gemm_ms, 3),
            "est_ratio_to_gemm": round(total / gemm_ms, 2), "label": "ESTIMATE (static model), not a timing"}


class _H100Device:
    type = "cpu"  # encode._device_facts gives an H100's SM count and L2 size for a non-CUDA device


def most_histograms(M: int, k: int, bn: int, bm: int, rows: int, seed: int = 0) -> list:
    """Per tile position, the histogram of `most` for random-order scores of the full shape (rows
    row blocks' worth of rows; the thresholds depend on ranks only, so any continuous distribution
    gives the same statistics)."""
    import torch

    import survivor_stats as ss
    from binsparse_kernels.backends.triton import encode as enc

    per_chunk, chunks = enc._n_chunks(N_TOKENS, M, 576, 2, bn, bm, _H100Device())
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, per_chunk * bm, generator=g)  # one chunk's latents
    most = ss.simulate(z, k, bn, bm, per_chunk)
    hists = []
    for t in range(per_chunk):
        m = most[:, :, t].flatten()
        m = m[m >= 0]
        hists.append(torch.bincount(m, minlength=bm + 1).tolist())
    return hists


def triton_part(args) -> dict:
    """Compile, count and estimate the Triton encode: the document's "triton" part."""
    dtypes = args.only or ["bf16", "fp16", "fp32"]
    jobs = [(dt, kp, arch, True) for arch in args.arch for dt in dtypes for kp in (16, 32, 64, 128)]
    jobs += [("bf16", kp, 90, False) for kp in (32, 64, 128)]  # the ungated step, for comparison
    if args.reuse:
        rows = json.loads(args.out.read_text())["triton"]["configs"]
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(analyse, jobs))
    for r in rows:
        lv = r["launch_variant"]
        print(f"{r['dtype']} KP={r['KP']} {r['arch']} gated={r['gated']}: {r['BLOCK_N']}x{r['BLOCK_M']}x{r['BLOCK_K']} "
              f"regs {lv['registers']} stack {lv['stack_bytes']} smem {lv['shared_bytes']} ctas/SM {lv['ctas_per_sm']}; "
              + ", ".join(f"{n} {v['int_plus_shuffle_per_score']}" for n, v in r["per_tile_per_warp"].items()), flush=True)
    sm90 = {(r["dtype"], r["KP"]): r for r in rows if r["arch"] == "sm_90a" and r["gated"]}
    estimates, by_s = [], []
    from binsparse_kernels.backends.triton import encode as enc
    for d, M in SHAPES:
        for k in KS:
            row = sm90.get(("bf16", enc._kp(k)))
            if row is None:
                continue
            hists = most_histograms(M, k, row["BLOCK_N"], row["BLOCK_M"], args.rows)
            for S in (4, 8, 16):
                est = estimate(row, d, M, k, hists, S)
                by_s.append(est)
                if S == enc.EXTRACT_MAX:
                    estimates.append(est)
                print(f"ESTIMATE d={d} M={M} k={k} S={S}: {est['est_encode_ms']} ms vs GEMM {est['est_gemm_ms']} ms -> "
                      f"{est['est_ratio_to_gemm']}x, mix {est['branch_mix']}", flush=True)
    import sass
    import triton
    return {"compiled_with": f"triton {triton.__version__}, disassembled with nvdisasm",
            "assumed_h100": H100, "assumed_issue_rates_warp_instr_per_clk_per_sm": sass.RATES,
            "model": __doc__.split("The model that turns counts into time")[1].strip(),
            "extract_max_S": enc.EXTRACT_MAX, "configs": rows, "estimates": estimates, "est_by_extract_limit_S": by_s}


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
