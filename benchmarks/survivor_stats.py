"""How often the gated Triton encode skips, extracts or fully sorts a tile: the kernel's gating logic
replayed in torch (same threshold rule, tile order, chunking and block-uniform branch), on real
activations and on adversarial orders. Nothing is timed. Writes benchmarks/results/survivor_stats.json.

    python benchmarks/survivor_stats.py --run /tmp/runs/surv --tokens 16384     # real data (trained coders)
    python benchmarks/survivor_stats.py --synthetic-only                        # orders without a model

Real data: SmolLM2-135M (the package's offline GGUF), the input of ``layers.9.mlp`` on held-out text,
through the binary and the TopK coder trained by ``binsparse train --variants binary topk`` into
``--run`` (scores exactly as the kernel computes them: ``x W^T + b - theta`` or ``ReLU(x W^T + b)``).

Per (row block, chunk, tile position) the kernel takes one of three branches on the block's largest
survivor count ``most`` (survivors: scores not below the row's threshold tau, the k-th best key of the
running list so far): ``most == 0`` skip, ``1 <= most <= S`` extract (``most`` rounds), else full sort.
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
    """As encode._gate_threshold: the float score of the k-th best key, -inf for the sentinel,
    +inf for a NaN."""
    kth = running[:, kp - k]
    score, _ = enc._torch_decode(kth.unsqueeze(1))
    score = score.squeeze(1)
    tau = torch.where(torch.isnan(score), torch.full_like(score, math.inf), score)
    return torch.where(kth == SENTINEL, torch.full_like(score, -math.inf), tau)


def simulate(z: torch.Tensor, k: int, block_n: int, block_m: int, tiles_per_chunk: int,
             extract_max: int = enc.EXTRACT_MAX) -> torch.Tensor:
    """``most`` (the block's largest survivor count) of every (row block, chunk, tile position) step
    for scores z [N, M] (float32): an int tensor [row blocks, chunks, tiles_per_chunk], -1 where there
    is no such tile (past M). The branch is skip for 0, extract for 1..S, full above S; the thresholds
    (hence ``most``) do not depend on S, since every branch keeps the exact running top k. The final
    top k is checked against torch.topk on the keys (asserted)."""
    N, M = z.shape
    kp = enc._kp(k)
    rb = -(-N // block_n)
    tiles = -(-M // block_m)
    n_chunks = -(-tiles // tiles_per_chunk)
    pad = rb * block_n - N
    zp = torch.cat([z, z.new_zeros(pad, M)]) if pad else z
    row_ok = (torch.arange(rb * block_n) < N).view(rb, block_n)
    out = torch.full((rb, n_chunks, tiles_per_chunk), -1, dtype=torch.int32)
    finals = []
    for c in range(n_chunks):
        running = torch.full((rb * block_n, kp), SENTINEL, dtype=torch.int64)
        for t in range(tiles_per_chunk):
            m0 = (c * tiles_per_chunk + t) * block_m
            if m0 >= M:
                break
            m1 = min(M, m0 + block_m)
            s = zp[:, m0:m1]
            keys = enc._torch_keys(s, m0)
            tau = _tau(running, k, kp)
            surv = ~(s < tau[:, None]) & row_ok.reshape(-1, 1)
            most = surv.view(rb, block_n, -1).sum(2).amax(1)  # per row block
            out[:, c, t] = most.to(torch.int32)
            full = (most > extract_max).repeat_interleave(block_n)
            part = (most > 0).repeat_interleave(block_n)
            new = torch.where(full[:, None] | surv, keys, torch.full_like(keys, SENTINEL))
            new = torch.where(part[:, None], new, torch.full_like(keys, SENTINEL))
            running = torch.cat([running, new], 1).topk(kp, 1).values.flip(1)  # ascending, as the kernel
        finals.append(running[:N, kp - k:])
    got = torch.cat(finals, 1).topk(k, 1).values
    want = enc._torch_keys(z, 0).topk(k, 1).values
    assert torch.equal(got, want), "the replayed gating lost a top-k key"
    return out


def fractions(branches: torch.Tensor, extract_max: int = enc.EXTRACT_MAX) -> dict:
    """Branch fractions, overall and per tile position, for S = extract_max, from ``simulate``'s output."""
    valid = branches >= 0
    n = int(valid.sum())
    per_pos = []
    for t in range(branches.shape[2]):
        b = branches[:, :, t][valid[:, :, t]]
        if b.numel():
            per_pos.append([round(float((b == 0).float().mean()), 4),
                            round(float(((b > 0) & (b <= extract_max)).float().mean()), 4),
                            round(float((b > extract_max).float().mean()), 4)])
    b = branches[valid]
    return {"steps": n, "skip": round(float((b == 0).float().mean()), 4),
            "extract": round(float(((b > 0) & (b <= extract_max)).float().mean()), 4),
            "full": round(float((b > extract_max).float().mean()), 4),
            "extract_rounds_hist": [int((b == r).sum()) for r in range(1, extract_max + 1)],
            "per_tile_position_skip_extract_full": per_pos}


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
            xs.append(store["layers.9.mlp"][0].float())
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
    for k in ks:
        for bm in block_ms:
            if bm < enc._kp(k):
                continue
            tiles = -(-M // bm)
            for chunks in chunks_list:
                per = -(-tiles // chunks)
                most = simulate(z, k, block_n, bm, per)
                row = {"k": k, "BLOCK_N": block_n, "BLOCK_M": bm, "chunks": chunks, "tiles_per_chunk": per}
                for S in (4, 8, 16):
                    f = fractions(most, S)
                    row[f"S={S}"] = {"skip": f["skip"], "extract": f["extract"], "full": f["full"],
                                     "skip_or_extract": round(f["skip"] + f["extract"], 4),
                                     "extract_rounds_hist": f["extract_rounds_hist"],
                                     "per_position": _positions_summary(f["per_tile_position_skip_extract_full"], per)}
                    print(f"  k={k} BM={bm} chunks={chunks} S={S}: skip {f['skip']:.3f} extract {f['extract']:.3f} "
                          f"full {f['full']:.3f}", flush=True)
                rows.append(row)
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
    result = {"kernel_extract_max_S": enc.EXTRACT_MAX, "fractions_for_S": [4, 8, 16], "block_n": "128 unless named",
              "note": "branch fractions of (row block, chunk, tile) steps, from replaying the kernel's gating in "
                      "torch (benchmarks/survivor_stats.py); not timings"}
    if not args.synthetic_only:
        scores, facts = real_scores(args.run, args.tokens)
        result["real"] = {"facts": facts}
        for variant, z in scores.items():
            print(f"real {variant}: {tuple(z.shape)}", flush=True)
            M = z.shape[1]
            result["real"][variant] = stats_for(z, (32, 64, 128), (64, 128), 128, (1, 4))
            # 64-row blocks (the sm_80 configuration at KP <= 32): the block-wide maximum is over fewer rows
            result["real"][variant + " (BLOCK_N 64)"] = stats_for(z, (32, 64), (64,), 64, (1, 4))
            # the same sizes with the latent order shuffled: how far real data is from random order
            perm = torch.randperm(M, generator=torch.Generator().manual_seed(0))
            result["real"][variant + " (latents shuffled)"] = stats_for(z[:, perm], (32,), (64,), 128, (1,))
    result["adversarial"] = {}
    for name, z in adversarial(512, 4096, 32).items():
        print(f"adversarial: {name}", flush=True)
        result["adversarial"][name] = stats_for(z, (32,), (64,), 128, (1,))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # encode.py imports triton; nothing here launches a kernel
    main()
