"""Static cost of the Hopper CUDA encode kernel (csrc/cuda/encode_sm90.cu) read from its machine code,
with an ESTIMATE of its time relative to the bare GEMM. No GPU needed; nothing here is a timing.

    python benchmarks/static_cost_cuda.py [--so binsparse_kernels/_C_cuda*.so] [--out benchmarks/results/static_cost_sm90.json]

What it reads (sm_90a cubin of the built library, via benchmarks/sass.py):
* per-tile instruction counts by class of the epilogue's three parts, located in the bf16 kernel's SASS:
  the fast path (bias, theta / ReLU and the tau compare of 128 scores per thread: from the first bias
  load to the warp vote), one compaction pass (the 128 ballots that stage survivors: from that vote to
  the first REDUX), and the quad insertion's slot-scan loop (the loop with two shared loads);
* registers, stack and local memory; shared memory per CTA (the kernel's own formula) and CTAs per SM.

The ESTIMATE (labelled so in every row), per consumer warpgroup tile of 64 x 256 scores:
* MMA time = 2*64*256*d FLOP at the rate of the bare bf16 GEMM (790 TFLOP/s measured on H100 =
  3270 FLOP/clk/SM at 1.83 GHz), i.e. it assumes the wgmma main loop runs as fast as cuBLAS;
* epilogue time = issue-bound clocks of one warp per SM sub-partition (sass.issue_cycles):
  fast path always; with probability 1 - exp(-16 s) (16 rows per warp) the compaction passes
  (ceil(s / staging size)) and the insertions (s per row, both rows of a quad, each a slot scan of
  k/4 slots plus the rest of one offer, both counted in the SASS), where s = expected
  survivors per row of the tile for scores in random order: sum over the tile's columns m of
  min(1, k / m) (m counted within the consumer's own tiles);
* the two consumers alternate, so a pair of tiles takes max(2 MMA, MMA + epilogue);
* per CTA add the final merge (k offers and a k^2/32 rank write per row) and the last epilogue;
  CTAs run one per SM in ceil(CTAs / 132) waves (chunk count chosen as in encode_forward.cu);
* bare GEMM = 2 N d M / 790 TFLOP/s.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import tempfile
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sass  # noqa: E402

ROOT = os.path.dirname(HERE)
SMS, CLOCK, GEMM_TFLOPS, SMEM_OPTIN = 132, 1.83e9, 790.0, 232448
FLOP_PER_CLK = GEMM_TFLOPS * 1e12 / (SMS * CLOCK)
ROWS, COLS, BK, STAGED, ALIGN = 64, 256, 64, 16, 1024
SHAPES = [(576, 36864), (2048, 131072)]
N_TOKENS = 16384
KS = [32, 64, 128]


def smem_bytes(k: int, stages: int) -> int:  # encode_sm90.cu: smem_bytes
    return ALIGN + stages * (ROWS + COLS) * BK * 2 + 2 * ROWS * k * 8 + 2 * ROWS * STAGED * 8 + 2 * stages * 8


def stages_for(k: int) -> int:
    return next(s for s in (4, 3, 2, 0) if s == 0 or smem_bytes(k, s) <= SMEM_OPTIN)


def choose_chunks(row_blocks: int, col_tiles: int, slots: int) -> int:  # encode_forward.cu: choose_chunks
    most = min(col_tiles, 65535)
    least = min(most, max(1, -(-slots // row_blocks)))
    best, best_fill = least, 0.0
    for c in range(least, min(most, 4 * least + 8) + 1):
        ctas = row_blocks * c
        fill = ctas / (-(-ctas // slots) * slots)
        if fill >= 0.9:
            return c
        if fill > best_fill:
            best, best_fill = c, fill
    return best


def sm90_kernel(so: str):
    """(instructions, resources) of the bf16 Hopper encode kernel in the library's sm_90a cubins."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sass._tool("cuobjdump"), "-xelf", "all", so], cwd=tmp, check=True, capture_output=True)
        for name in sorted(glob.glob(os.path.join(tmp, "*sm_90a*.cubin"))):
            cubin = open(name, "rb").read()
            for kernel, instrs in sass.parse(sass.disassemble(cubin)).items():
                if "encode_sm90_kernel" in kernel and "bfloat16" in kernel:
                    return kernel, instrs, sass.resources(cubin)[kernel]
    raise SystemExit(f"no sm_90a encode kernel in {so} (built without 9.0a?)")


def epilogue_parts(instrs):
    """The binary variant's fast path and one compaction pass (instruction lists), and the quad
    insertion: instructions per list slot of group_worst<4>'s scan (the compiler unrolls it: the
    innermost loop after the compaction, loads per slot = 2) and the rest of one offer (the
    enclosing loop minus the scan)."""
    first_load = next(n for n, i in enumerate(instrs) if i.opcode.startswith("LDG.E.128"))
    vote = next(n for n in range(first_load, len(instrs))
                if instrs[n].base == "VOTE" and instrs[n].operands.replace(" ", "").startswith("P"))
    redux = next(n for n in range(vote, len(instrs)) if instrs[n].base == "REDUX")
    fast, scan = instrs[first_load:vote + 1], instrs[vote + 1:redux]
    ballots = sum(1 for i in scan if i.base == "VOTE")
    assert ballots >= 128, f"expected 128 ballots in the compaction pass, found {ballots}"
    after = [(h, t) for h, t in sass.loops(instrs) if h > redux]
    loads = lambda h, t: sum(1 for i in instrs[h:t + 1] if i.base == "LDS")  # noqa: E731
    inner = next((h, t) for h, t in after if loads(h, t) >= 2)
    outer = next((h, t) for h, t in after if h <= inner[0] and t >= inner[1] and (h, t) != inner)
    per_slot = (inner[1] - inner[0] + 1) / (loads(*inner) / 2)
    fixed = (outer[1] - outer[0] + 1) - (inner[1] - inner[0] + 1)
    return fast, scan, per_slot, fixed


def clocks(counts: Counter) -> float:
    """Issue-bound clocks of one warp on its SM sub-partition (= 4 warps on the SM)."""
    return sass.issue_cycles(counts, warps=4)["bound"]


def survivors(t: int, k: int) -> float:
    """Expected scores of a consumer's t-th tile (0-based) that enter its running top-k, random order."""
    n0 = t * COLS
    return sum(min(1.0, k / m) for m in range(n0 + 1, n0 + COLS + 1))


def estimate(d: int, M: int, k: int, fast_clk: float, scan_clk: float, per_slot: float, fixed: int) -> dict:
    stages = stages_for(k)
    row_blocks = -(-N_TOKENS // ROWS)
    col_tiles = -(-M // COLS)
    chunks = choose_chunks(row_blocks, col_tiles, SMS)
    tiles_per_chunk = -(-col_tiles // chunks)
    chunks = -(-col_tiles // tiles_per_chunk)
    mma = 2 * ROWS * COLS * d / FLOP_PER_CLK
    insert_clk = (per_slot * math.ceil(k / 4) + fixed) / 0.5  # int-bound: 0.5 warp-instr/clk/sub-partition
    epilogue = []
    for t in range(-(-tiles_per_chunk // 2)):
        s = survivors(t, k)
        slow = 1 - math.exp(-16 * s)
        passes = max(1, math.ceil((s + 2 * math.sqrt(s)) / STAGED))
        most = s + 2 * math.sqrt(s)  # the warp runs as many offers as its busiest quad
        epilogue.append(fast_clk + slow * (passes * scan_clk + 2 * most * insert_clk))
    cta = 0.0
    for t, epi in enumerate(epilogue):
        cta += max(2 * mma, mma + epi) if 2 * t + 1 < tiles_per_chunk else mma + epi
    merge = (ROWS / 8) * (k * fixed + k * k / 32 * 8) / 0.5  # 8 warps: k offers, rank write (estimate)
    cta += merge
    waves = -(-row_blocks * chunks // SMS)
    kernel_s = waves * cta / CLOCK
    gemm_s = 2 * N_TOKENS * d * M / (GEMM_TFLOPS * 1e12)
    return {"stages": stages, "smem_bytes": smem_bytes(k, stages), "ctas_per_sm": 1, "chunks": chunks,
            "waves": waves, "mma_clk_per_tile": round(mma), "epilogue_clk_first_tile": round(epilogue[0]),
            "epilogue_clk_last_tile": round(epilogue[-1]), "est_kernel_ms": round(kernel_s * 1e3, 3),
            "est_gemm_ms": round(gemm_s * 1e3, 3), "est_ratio_to_gemm": round(kernel_s / gemm_s, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_so = (sorted(glob.glob(os.path.join(ROOT, "binsparse_kernels", "_C_cuda*.so"))) or [None])[0]
    parser.add_argument("--so", default=default_so)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "static_cost_sm90.json"))
    args = parser.parse_args()
    if args.so is None:
        raise SystemExit("no built binsparse_kernels/_C_cuda*.so; build the package with CUDA first")
    kernel, instrs, res = sm90_kernel(args.so)
    fast, scan, per_slot, fixed = epilogue_parts(instrs)
    fast_c, scan_c = sass.count_classes(fast), sass.count_classes(scan)
    fast_clk, scan_clk = clocks(fast_c), clocks(scan_c)
    rows = []
    for d, M in SHAPES:
        for k in KS:
            rows.append({
                "backend": "cuda", "kernel": "encode_sm90_kernel<bf16> (wgmma + TMA, ping-pong consumers)",
                "label": "ESTIMATE", "N": N_TOKENS, "d": d, "M": M, "k": k,
                "registers": res["registers"], "stack": res["stack"], "local": res["local"],
                "spill_ops": res.get("spill_ops", 0), "kernel_instructions": len(instrs),
                "epilogue_fast_path_per_tile": dict(fast_c), "compaction_pass_per_tile": dict(scan_c),
                "insert_instructions_per_slot": round(per_slot, 1), "insert_instructions_fixed": fixed,
                "epilogue_fast_path_clk": round(fast_clk), "compaction_pass_clk": round(scan_clk),
                **estimate(d, M, k, fast_clk, scan_clk, per_slot, fixed),
            })
    others = []
    if os.path.exists(args.out):
        others = [r for r in json.load(open(args.out)) if r.get("backend") != "cuda"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(others + rows, f, indent=1)
    print(f"{kernel[:70]}...: {len(instrs)} instructions, {res['registers']} registers, local {res['local']}")
    print(f"fast path per tile {dict(fast_c)} -> {fast_clk:.0f} clk; compaction pass {scan_c['total']} instr "
          f"-> {scan_clk:.0f} clk; insertion {per_slot:.0f} instr per slot + {fixed}")
    for r in rows:
        print(f"d={r['d']:5d} M={r['M']:6d} k={r['k']:3d}: stages {r['stages']}, smem {r['smem_bytes']} B, "
              f"chunks {r['chunks']}, waves {r['waves']}, MMA/tile {r['mma_clk_per_tile']} clk, epilogue first/last "
              f"{r['epilogue_clk_first_tile']}/{r['epilogue_clk_last_tile']} clk -> ESTIMATE {r['est_ratio_to_gemm']}x GEMM")
    print(f"wrote {len(rows)} cuda rows to {args.out}")


if __name__ == "__main__":
    main()
