"""binsparse ops inside your own SAE: a binary TopK autoencoder in ~30 lines of PyTorch.

The two calls that replace a dense encoder and decoder::

    codes = bk.topk_binary_encode(x, W_enc, b_enc, log_threshold, k)       # fused GEMM + top-k + step
    x_hat = bk.sparse_decode(codes.indices, codes.acts, W_dec, b_dec, binary=True)   # gather-sum

Both are autograd-aware (the binary step's gradient is a sigmoid straight-through estimator), so a
plain training loop works. Swap in ``bk.topk_encode`` + ``sparse_decode(..., binary=False)`` for a
continuous TopK SAE. Runs offline on synthetic data: sums of a few hidden unit directions.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import binsparse_kernels as bk


class BinarySAE(nn.Module):
    def __init__(self, d: int, num_latents: int, k: int):
        super().__init__()
        self.k = k
        self.W_enc = nn.Parameter(torch.empty(num_latents, d).uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d)))
        self.b_enc = nn.Parameter(torch.zeros(num_latents))
        self.log_threshold = nn.Parameter(torch.full((num_latents,), math.log(0.004)))
        self.W_dec = nn.Parameter(self.W_enc.detach().clone())
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.normalize_decoder()

    @torch.no_grad()
    def normalize_decoder(self):
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor):
        codes = bk.topk_binary_encode(x - self.b_dec, self.W_enc, self.b_enc, self.log_threshold, self.k)
        x_hat = bk.sparse_decode(codes.indices, codes.acts, self.W_dec, self.b_dec, binary=True)
        return x_hat, codes


def synthetic_batch(dictionary: torch.Tensor, n: int, active: int) -> torch.Tensor:
    """Each token is the sum of `active` random dictionary directions, plus a little noise."""
    idx = torch.rand(n, dictionary.shape[0]).argsort(dim=1)[:, :active]  # `active` distinct directions
    return dictionary[idx].sum(1) + 0.01 * torch.randn(n, dictionary.shape[1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--latents", type=int, default=256)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    truth = torch.nn.functional.normalize(torch.randn(args.latents // 2, args.d), dim=1)
    sae = BinarySAE(args.d, args.latents, args.k)
    with torch.no_grad():
        sae.b_dec.copy_(synthetic_batch(truth, 4096, 4).mean(0))  # b_dec = data mean, as sparsify does
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    history = []
    for step in range(args.steps):
        x = synthetic_batch(truth, args.batch, 4)
        sae.normalize_decoder()
        x_hat, codes = sae(x)
        fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        opt.zero_grad()
        fvu.backward()
        with torch.no_grad():  # keep unit-norm rows: drop the gradient along each row
            sae.W_dec.grad -= (sae.W_dec.grad * sae.W_dec).sum(1, keepdim=True) * sae.W_dec
        opt.step()
        history.append(fvu.item())
        if step % 50 == 0 or step == args.steps - 1:
            l0 = codes.acts.sum(1).mean().item()
            print(f"step {step:4d}  FVU {fvu.item():.3f}  L0 {l0:.1f}")
    return {"first_fvu": history[0], "last_fvu": history[-1]}


if __name__ == "__main__":
    main()
