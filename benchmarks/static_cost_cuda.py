"""Static cost of the Hopper CUDA encode kernel (csrc/cuda/encode_sm90.cu) read from its machine code,
with an ESTIMATE of its time relative to the bare GEMM. No GPU needed; nothing here is a timing.

    python benchmarks/static_cost.py --backend cuda [--so binsparse_kernels/_C_cuda*.so]   (imports this module)

What it reads (sm_90a cubin of the built library, via benchmarks/sass.py):
* per-tile instruction counts by class of the epilogue of one warp, located in the bf16 kernel's
  binary variant: the scores (bias, theta, 128 per thread: from the first bias load to the scan's
  loop head, divided by the number of copies the compiler made), one gate scan (compare with tau,
  branch to the staging of survivors: from that loop head to the next vote), and the insertion
  (instructions per list slot of the worst-entry scan, and per insertion step outside it);
* registers, stack and local memory; shared memory per CTA (the kernel's formula) and CTAs per SM.

The ESTIMATE (labelled so in every row), per consumer warpgroup tile of 64 x 256 scores:
* MMA time = 2*64*256*d FLOP at the rate of the bare bf16 GEMM (790 TFLOP/s measured on H100 =
  3270 FLOP/clk/SM at 1.83 GHz), i.e. it assumes the wgmma main loop runs as fast as cuBLAS;
* epilogue time = issue-bound clocks of one warp on its SM sub-partition (sass.issue_cycles): scores
  + one gate scan always; if some row of the warp's 16 has a survivor (probability 1 - exp(-16 s))
  the insertion steps (as many as the busiest thread's survivors, 4 lanes x 2 rows each, with a
  worst-entry rescan of k/4 slots where an insertion happens), where s = expected survivors per row
  of the tile for scores in random order: sum over its columns m of min(1, k / m), m counted within
  the consumer's own tiles. The first tile: the bisection (2 rows x 12 steps x 64 compares) and
  about k survivors per row, staged in ceil(k / 2 / slots) passes;
* the two consumers alternate, so a pair of tiles takes max(2 MMA, MMA + epilogue);
* per CTA add the final merge (k offers and a k^2/32 rank write per row); CTAs run one per SM in
  ceil(CTAs / 132) waves (chunk count chosen as in encode_forward.cu);
* bare GEMM = 2 N d M / 790 TFLOP/s. Not modelled: L2 bandwidth (the 64-row tiles read ~52 FLOP per
  byte of L2; no cluster multicast yet), TMA latency with 2 stages (k = 128), instruction cache.
"""

from __future__ import annotations

import glob
import math
import os
import re
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
SOURCE = os.path.join(ROOT, "csrc", "cuda", "encode_sm90.cu")
ROWS, COLS, BK, ALIGN, CONSUMER_THREADS = 64, 256, 64, 1024, 256
STAGED = int(re.search(r"constexpr int kStaged = (\d+);", open(SOURCE).read()).group(1))  # per consumer thread
SHAPES = [(576, 36864), (2048, 131072)]
N_TOKENS = 16384
KS = [32, 64, 128]


def smem_bytes(k: int, stages: int) -> int:  # encode_sm90.cu: smem_bytes
    return (ALIGN + stages * (ROWS + COLS) * BK * 2 + 2 * ROWS * k * 8 + CONSUMER_THREADS * STAGED * 8 + 2 * ROWS * 16
            + 2 * stages * 8)


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


def skipped_blocks(instrs, lo, hi):
    """[(start, end)) of the blocks inside instrs[lo:hi] that forward conditional branches jump over
    (outermost only): the code a thread runs only when its branch is not taken."""
    index = {ins.addr: n for n, ins in enumerate(instrs)}
    blocks, n = [], lo
    while n < hi:
        ins = instrs[n]
        if ins.base == "BRA" and ins.pred and ins.target is not None and ins.target > ins.addr:
            end = index[ins.target]
            if end <= hi:
                blocks.append((n + 1, end))
                n = end
                continue
        n += 1
    return blocks


def epilogue_parts(instrs):
    """From the bf16 kernel's binary epilogue: (scores of one tile, the gate scan's common path,
    instructions of one group's staging block, instructions per list slot of the insertion's
    worst-entry scan, the rest of one insertion step)."""
    loads = [n for n, i in enumerate(instrs) if i.opcode.startswith("LDG.E.128")]
    assert len(loads) == 32, f"expected one block of 32 bias loads, found {len(loads)}"
    z_end = next(n for n in range(loads[-1], len(instrs)) if instrs[n].base == "BRA")
    z = sass.count_classes(instrs[loads[0]:z_end])
    scan_head = next(n for n in range(z_end, len(instrs))
                     if instrs[n].base == "VOTE" and instrs[n].operands.replace(" ", "") == "P0,PT")
    scan_end = next(n for n in range(scan_head + 1, len(instrs)) if instrs[n].base == "VOTE")
    blocks = [(a, b) for a, b in skipped_blocks(instrs, scan_head + 2, scan_end) if b - a > 8]
    assert len(blocks) == 16, f"expected 16 group blocks in the gate scan, found {len(blocks)}"
    rare = {n for a, b in blocks for n in range(a, b)}
    scan = sass.count_classes([instrs[n] for n in range(scan_head, scan_end + 1) if n not in rare])
    group_block = sum(b - a for a, b in blocks) / len(blocks)
    after = [(h, t) for h, t in sass.loops(instrs) if h > scan_end]
    lds = lambda h, t: sum(1 for i in instrs[h:t + 1] if i.base == "LDS")  # noqa: E731
    inner = next((h, t) for h, t in after if lds(h, t) >= 2)
    outer = next((h, t) for h, t in after if h <= inner[0] and t >= inner[1] and lds(h, t) > lds(*inner))
    per_slot = (inner[1] - inner[0] + 1) / (lds(*inner) / 2)
    inner_total = sum(t - h + 1 for h, t in after if outer[0] <= h and t <= outer[1] and lds(h, t) >= 2
                      and (h, t) != outer)
    fixed = (outer[1] - outer[0] + 1) - inner_total
    return z, scan, group_block, per_slot, fixed


def clocks(counts: Counter) -> float:
    """Issue-bound clocks of one warp on its SM sub-partition (= 4 warps on the SM)."""
    return sass.issue_cycles(counts, warps=4)["bound"]


def survivors(t: int, k: int) -> float:
    """Expected scores of a consumer's t-th tile (0-based) that enter its running top-k, random order."""
    n0 = t * COLS
    return sum(min(1.0, k / m) for m in range(n0 + 1, n0 + COLS + 1))


def estimate(d: int, M: int, k: int, z_clk: float, scan_clk: float, group_block: float, per_slot: float,
             fixed: int) -> dict:
    stages = stages_for(k)
    row_blocks = -(-N_TOKENS // ROWS)
    col_tiles = -(-M // COLS)
    chunks = choose_chunks(row_blocks, col_tiles, SMS)
    tiles_per_chunk = -(-col_tiles // chunks)
    chunks = -(-col_tiles // tiles_per_chunk)
    mma = 2 * ROWS * COLS * d / FLOP_PER_CLK
    recompute = per_slot * math.ceil(k / 4)

    # Clocks are issue-bound (1 warp-instruction per clock per sub-partition), the integer-heavy
    # insertion at the integer rate (0.5 per clock).
    def insert(steps: float, recomputes: float) -> float:
        return (steps * 4 * fixed + recomputes * recompute) / 0.5

    epilogue = []
    for t in range(-(-tiles_per_chunk // 2)):
        if t == 0:
            # bisection (2 rows x 12 steps x 64 compares and adds); then about k + 4 survivors per
            # row, appended (one worst-entry scan when a list fills, one per later replacement)
            per_thread = (k + 4) / 2
            passes = math.ceil(per_thread / STAGED)
            steps = per_thread  # staged entries of the busiest thread, over all passes
            cost = (z_clk + 2 * 12 * (64 * 2 + 12) / 0.5 + passes * scan_clk + per_thread * group_block
                    + insert(steps, 2 * 5))
        else:
            s = survivors(t, k)
            per_thread = s / 2
            most = per_thread + 2 * math.sqrt(per_thread) if per_thread > 0 else 0.0
            p_any = 1 - math.exp(-16 * s)
            # a step rescans when some quad of the warp inserts: at most the warp's 16 s insertions
            recomputes = min(most * 4, 16 * s)
            cost = z_clk + scan_clk + per_thread * group_block + p_any * insert(max(most, 1.0), recomputes)
        epilogue.append(cost)
    cta = 0.0
    for t, epi in enumerate(epilogue):
        cta += max(2 * mma, mma + epi) if 2 * t + 1 < tiles_per_chunk else mma + epi
    merge = (ROWS / 8) * (k * 40 + k * k / 32 * 8) / 0.5  # 8 warps: k warp offers, rank write (estimate)
    cta += merge
    waves = -(-row_blocks * chunks // SMS)
    kernel_s = waves * cta / CLOCK
    gemm_s = 2 * N_TOKENS * d * M / (GEMM_TFLOPS * 1e12)
    return {"stages": stages, "smem_bytes": smem_bytes(k, stages), "ctas_per_sm": 1, "chunks": chunks,
            "waves": waves, "mma_clk_per_tile": round(mma), "epilogue_clk_first_tile": round(epilogue[0]),
            "epilogue_clk_last_tile": round(epilogue[-1]), "est_kernel_ms": round(kernel_s * 1e3, 3),
            "est_gemm_ms": round(gemm_s * 1e3, 3), "est_ratio_to_gemm": round(kernel_s / gemm_s, 3)}


def analyse(so: str | None = None) -> dict:
    """The CUDA backend's part of benchmarks/results/static_cost_sm90.json (written by
    benchmarks/static_cost.py): the kernel, this model, and one row per (shape, k) with ``"backend": "cuda"``."""
    so = so or default_so()
    if so is None:
        raise SystemExit("no built binsparse_kernels/_C_cuda*.so; build the package with CUDA first")
    kernel, instrs, res = sm90_kernel(so)
    z_counts, scan_counts, group_block, per_slot, fixed = epilogue_parts(instrs)
    z_clk, scan_clk = clocks(z_counts), clocks(scan_counts)
    rows = []
    for d, M in SHAPES:
        for k in KS:
            rows.append({
                "backend": "cuda", "kernel": "encode_sm90_kernel<bf16> (wgmma + TMA, ping-pong consumers)",
                "label": "ESTIMATE", "N": N_TOKENS, "d": d, "M": M, "k": k,
                "registers": res["registers"], "stack": res["stack"], "local": res["local"],
                "spill_ops": res.get("spill_ops", 0), "kernel_instructions": len(instrs),
                "epilogue_scores_per_tile": dict(z_counts), "epilogue_gate_scan_per_tile": dict(scan_counts),
                "staging_block_instructions": round(group_block, 1),
                "insert_instructions_per_slot": round(per_slot, 1), "insert_instructions_per_step": fixed,
                "epilogue_scores_clk": round(z_clk), "epilogue_gate_scan_clk": round(scan_clk),
                **estimate(d, M, k, z_clk, scan_clk, group_block, per_slot, fixed),
            })
    print(f"{kernel[:70]}...: {len(instrs)} instructions, {res['registers']} registers, local {res['local']}")
    print(f"per tile and warp: scores {z_counts['total']} instr -> {z_clk:.0f} clk; gate scan (common path) "
          f"{scan_counts['total']} instr -> {scan_clk:.0f} clk; staging block {group_block:.0f} instr; insertion "
          f"{per_slot:.0f} instr per list slot + {fixed} per step")
    for r in rows:
        print(f"d={r['d']:5d} M={r['M']:6d} k={r['k']:3d}: stages {r['stages']}, smem {r['smem_bytes']} B, "
              f"chunks {r['chunks']}, waves {r['waves']}, MMA/tile {r['mma_clk_per_tile']} clk, epilogue first/last "
              f"{r['epilogue_clk_first_tile']}/{r['epilogue_clk_last_tile']} clk -> ESTIMATE {r['est_ratio_to_gemm']}x GEMM")
    return {"so": os.path.relpath(so, ROOT), "kernel": kernel, "model": __doc__, "rows": rows}


def default_so() -> str | None:
    return (sorted(glob.glob(os.path.join(ROOT, "binsparse_kernels", "_C_cuda*.so"))) or [None])[0]


if __name__ == "__main__":  # one entry point for both backends' static cost
    import static_cost  # noqa: E402

    static_cost.main(["--backend", "cuda"] + sys.argv[1:])
