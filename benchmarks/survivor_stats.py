"""How often the gated Triton encode appends and flushes: the kernel's gate replayed in torch (same
threshold rule, tile halves, quad groups, flush rule and chunking), on real activations and on
adversarial orders. Nothing is timed. Writes benchmarks/results/survivor_stats.json.

    python benchmarks/survivor_stats.py --run /tmp/runs/surv --tokens 16384     # real data (trained coders)
    python benchmarks/survivor_stats.py --synthetic-only                        # orders without a model

Real data: SmolLM2-135M (the package's offline GGUF), the input of ``layers.9.mlp`` on held-out text,
through the binary and the TopK coder trained by ``binsparse train --variants binary topk`` into
``--run`` (scores exactly as the kernel computes them: ``x W^T + b - theta`` or ``ReLU(x W^T + b)``).

Per (row block, chunk, tile position) step the kernel appends every score above its row's
threshold tau (the k-th best key of the running list at the last flush) to the row's candidate
buffers, in as many rounds per tile half as the block's largest survivor count of one quad group (the
columns 8 j + 2 q + b of one q); it sorts only when it flushes (a group buffer holds more than
``FLUSH_AT`` keys, or the chunk ends). A step without a flush is the cheap path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from binsparse_kernels.backends.triton import encode as enc  # noqa: E402

SENTINEL = -(2**63 - 1)


def _tau(running: torch.Tensor, k: int, kp: int) -> torch.Tensor:
    """As encode._threshold: the float score of the k-th best key, NaN for the sentinel (all pass), +inf for a NaN."""
    kth = running[:, kp - k]
    score, _ = enc._torch_decode(kth.unsqueeze(1))
    score = score.squeeze(1)
    tau = torch.where(torch.isnan(score), torch.full_like(score, math.inf), score)
    return torch.where(kth == SENTINEL, torch.full_like(score, math.nan), tau)  # not full: all pass


def _top(keys: torch.Tensor, kp: int) -> torch.Tensor:
    """The kp largest keys of each row, ascending (padded with the sentinel)."""
    if keys.shape[1] < kp:
        keys = torch.cat([keys, keys.new_full((keys.shape[0], kp - keys.shape[1]), SENTINEL)], 1)
    return keys.topk(kp, 1).values.flip(1)


def simulate(z: torch.Tensor, k: int, block_n: int, block_m: int, tiles_per_chunk: int,
             flush_at: int = enc.Config.FLUSH_AT, flush_rows: int = enc.Config.FLUSH_ROWS) -> dict:
    """The gate of ``_encode_partial_kernel`` replayed on scores z [N, M] (float32), step by step: per
    (row block, chunk, tile position) the append rounds of each tile half (the block's largest group
    survivor count; a group is the four columns 8 j + 2 q + b of one q), whether the step ends in a
    flush, and per flush each FLUSH_ROWS-row group's largest buffer fill (its flush's column steps; -1
    for a group past N, whose loads are masked off).
    Tensors [row blocks, chunks, tiles_per_chunk, ...], rounds -1 where there is no tile (past M). The
    thresholds are the kernel's: set at each flush from the running lists, so they depend on FLUSH_AT,
    not on anything else. The final top k is checked against torch.topk on the keys (asserted)."""
    N, M = z.shape
    kp = enc._kp(k)
    half = block_m // 2
    rb = -(-N // block_n)
    groups = block_n // min(flush_rows, block_n)
    tiles = -(-M // block_m)
    n_chunks = -(-tiles // tiles_per_chunk)
    pad = rb * block_n - N
    zp = torch.cat([z, z.new_zeros(pad, M)]) if pad else z
    row_ok = torch.arange(rb * block_n) < N
    group_live = row_ok.view(rb, groups, -1)[:, :, 0]  # row groups holding a row below N (the rest: -1)
    rounds = torch.full((rb, n_chunks, tiles_per_chunk, 2), -1, dtype=torch.int32)
    flush = torch.zeros((rb, n_chunks, tiles_per_chunk), dtype=torch.bool)
    group_fill = torch.zeros((rb, n_chunks, tiles_per_chunk, groups), dtype=torch.int32)
    finals = []
    for c in range(n_chunks):
        chunk_start = c * tiles_per_chunk * block_m
        n_tiles = min(tiles_per_chunk, -(-(M - chunk_start) // block_m))
        running = torch.full((rb * block_n, kp), SENTINEL, dtype=torch.int64)
        pending = running.clone()  # the top kp of the keys buffered since the last flush
        fill = torch.zeros((rb * block_n, 4), dtype=torch.int32)
        tau = torch.where(row_ok, math.nan, math.inf)
        for t in range(n_tiles):
            for h in range(2):
                m0 = chunk_start + t * block_m + h * half
                cols = m0 + torch.arange(half)
                ok = cols < M
                s = zp[:, cols.clamp(max=M - 1)]
                # the kernel's gate: not (s <= tau): above tau, NaN, or any s while tau is NaN (a list
                # not yet full); a tie at tau loses on index
                surv = ~(s <= tau[:, None]) & ok[None, :]
                count = surv.view(-1, half // 8, 4, 2).sum((1, 3)).to(torch.int32)  # [rows, 4 groups]
                rounds[:, c, t, h] = count.view(rb, -1).amax(1)
                keys = torch.where(surv, enc._torch_keys(s, m0), torch.full_like(s, SENTINEL, dtype=torch.int64))
                pending = _top(torch.cat([pending, keys], 1), kp)
                fill += count
            most = fill.view(rb, -1).amax(1)
            now = (most > flush_at) | ((t == n_tiles - 1) & (most > 0))
            flush[:, c, t] = now
            flushed = torch.where(now[:, None], fill.view(rb, groups, -1).amax(2), 0)
            group_fill[:, c, t] = torch.where(group_live, flushed, -1)
            rows = now.repeat_interleave(block_n)
            running = torch.where(rows[:, None], _top(torch.cat([running, pending], 1), kp), running)
            pending = torch.where(rows[:, None], SENTINEL, pending)
            fill = torch.where(rows[:, None], 0, fill)
            tau = torch.where(rows, torch.where(row_ok, _tau(running, k, kp), math.inf), tau)
        finals.append(running[:N, kp - k:])
    got = torch.cat(finals, 1).topk(k, 1).values
    want = enc._torch_keys(z, 0).topk(k, 1).values
    assert torch.equal(got, want), "the replayed gating lost a top-k key"
    return {"rounds": rounds, "flush": flush, "group_fill": group_fill}


def fractions(sim: dict) -> dict:
    """Step statistics from ``simulate``: the fraction of steps that end in a flush (the only steps that
    sort), the rounds of a tile half (mean and histogram), overall and per tile position."""
    rounds, flush = sim["rounds"], sim["flush"]
    valid = rounds[..., 0] >= 0
    n = int(valid.sum())
    r = rounds[valid]
    per_pos = []
    for t in range(rounds.shape[2]):
        v = valid[:, :, t]
        if v.any():
            per_pos.append([round(float(flush[:, :, t][v].float().mean()), 4),
                            round(float(rounds[:, :, t][v].float().mean()), 2)])
    hist = torch.bincount(r.flatten().clamp(max=32), minlength=33)
    return {"steps": n, "flush": round(float(flush[valid].float().mean()), 4),
            "no_flush": round(1 - float(flush[valid].float().mean()), 4),
            "mean_rounds_per_half": round(float(r.float().mean()), 3),
            "rounds_hist_0_to_32": hist.tolist(),
            "per_tile_position_flush_rounds": per_pos}


def _positions_summary(per_pos: list, tiles: int) -> dict:
    """The per-position curve at a few positions (the JSON keeps it whole)."""
    keep = sorted({0, 1, 2, 4, 8, 16, 32, 64, 128, 256, tiles - 1} & set(range(len(per_pos))))
    return {str(t): per_pos[t] for t in keep}


def adversarial(N: int, M: int, k: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, M, generator=g)
    ties = torch.randint(0, 3, (N, M), generator=g).float()  # many exact ties at every threshold
    nan = base.clone()
    nan[::3, torch.randperm(M, generator=g)[: 2 * k]] = math.nan  # every third row: 2k NaNs
    return {
        "random order (i.i.d. scores)": base,
        "rising along M (every tile beats the list)": torch.sort(base, 1).values,
        "falling along M (best first)": torch.sort(base, 1, descending=True).values,
        "all equal": torch.zeros(N, M),
        "3 values: more than k ties at tau": ties,
        "NaN rows (2k NaNs in every third row)": nan,
    }


def real_scores(run: Path, n_tokens: int, device: str = "cpu") -> tuple[dict, dict]:
    """{variant: scores [n_tokens, M] float32} of the trained coders in ``run`` on SmolLM2 layer 9's
    MLP input (held-out text), and facts about them."""
    from binsparse_kernels.coder import SparseCoder
    from binsparse_kernels.data import held_out_tokens
    from binsparse_kernels.models import capture, load_model, run_to_hooks

    model, tok, label = load_model(None, device=device)
    ctx = 256
    tokens = held_out_tokens(tok, dataset=None, split="train", text_column="text", ctx_len=ctx, n_tokens=n_tokens)
    xs = []
    with capture(model, ["layers.9.mlp"]) as store:
        for i in range(0, tokens.shape[0], 8):
            run_to_hooks(model, tokens[i:i + 8])
            xs.append(store["layers.9.mlp"][0].float().flatten(0, -2))  # [batch, seq, d] -> [tokens, d]
    x = torch.cat(xs)[:n_tokens]
    out, facts = {}, {"model": label, "hookpoint": "layers.9.mlp (input)", "tokens": int(x.shape[0]), "d": int(x.shape[1])}
    for variant in ("binary", "topk"):
        path = run / variant / "layers.9.mlp"
        coder = SparseCoder.load_from_disk(path, decoder=False)
        with torch.no_grad():
            xin = coder._encode_input(x)
            pre = xin @ coder.encoder.weight.float().T + coder.encoder.bias.float()
            z = pre - coder.log_threshold.exp().float() if variant == "binary" else torch.relu(pre)
        out[variant] = z.contiguous()
        facts[variant] = {"M": int(z.shape[1]), "k": int(coder.cfg.k)}
    return out, facts


def stats_for(z: torch.Tensor, ks, block_ms, block_n: int, chunks_list) -> list:
    rows = []
    M = z.shape[1]
    cfg = enc.Config
    for k in ks:
        for bm in block_ms:
            tiles = -(-M // bm)
            for chunks in chunks_list:
                per = -(-tiles // chunks)
                sim = simulate(z, k, block_n, bm, per, flush_at=cfg.FLUSH_AT, flush_rows=cfg.FLUSH_ROWS)
                f = fractions(sim)
                rows.append({"k": k, "BLOCK_N": block_n, "BLOCK_M": bm, "chunks": chunks, "tiles_per_chunk": per,
                             "FLUSH_AT": cfg.FLUSH_AT, "steps": f["steps"], "no_flush": f["no_flush"],
                             "flush": f["flush"], "mean_rounds_per_half": f["mean_rounds_per_half"],
                             "rounds_hist_0_to_32": f["rounds_hist_0_to_32"],
                             "per_position_flush_rounds": _positions_summary(f["per_tile_position_flush_rounds"], per)})
                print(f"  k={k} BM={bm} chunks={chunks}: no flush {f['no_flush']:.3f}, "
                      f"{f['mean_rounds_per_half']} rounds per half", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="run folder of `binsparse train --variants binary topk`")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--synthetic-only", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "survivor_stats.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"FLUSH_AT": enc.Config.FLUSH_AT, "FLUSH_ROWS": enc.Config.FLUSH_ROWS, "block_n": "128 unless named",
              "note": "per (row block, chunk, tile) step: the fraction that ends in a flush (the only steps that "
                      "sort) and the append rounds per tile half, from replaying the kernel's gate in torch "
                      "(benchmarks/survivor_stats.py); not timings"}
    if not args.synthetic_only:
        scores, facts = real_scores(args.run, args.tokens)
        result["real"] = {"facts": facts}
        for variant, z in scores.items():
            print(f"real {variant}: {tuple(z.shape)}", flush=True)
            M = z.shape[1]
            # 256-latent tiles (sm_90a) and 128 (sm_80), one chunk and four
            result["real"][variant] = stats_for(z, (32, 64, 128), (128, 256), 128, (1, 4))
            # the same sizes with the latent order shuffled: how far real data is from random order
            perm = torch.randperm(M, generator=torch.Generator().manual_seed(0))
            result["real"][variant + " (latents shuffled)"] = stats_for(z[:, perm], (32,), (256,), 128, (1,))
    result["adversarial"] = {}
    for name, z in adversarial(512, 4096, 32).items():
        print(f"adversarial: {name}", flush=True)
        result["adversarial"][name] = stats_for(z, (32,), (256,), 128, (1,))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # encode.py imports triton; nothing here launches a kernel
    main()
