"""Benchmark cases: what is timed, at which shapes (presets), on which inputs, and how each impl runs it.

A case is one operation at one shape:

* ``encode``: the fused encode forward (``topk_binary_encode`` / ``topk_encode``), no autograd.
* ``decode``: the sparse decode forward (``sparse_decode``) of given codes, no autograd.
* ``backward``: the backward of encode + decode (x detached, as in a transcoder or on cached
  activations): gradients of W_enc, b_enc, log_threshold (binary), W_dec and b_dec. The forward
  runs untimed before each timed backward.
* ``step``: one whole training step of a sparse coder, ``bae`` (SAE: encodes ``x - b_dec``,
  unit-norm decoder rows) or ``btc`` (skip transcoder): decoder renorm, forward, FVU, backward,
  gradient projection, a Signum update. Package backends run ``SparseCoder(backend=...)``;
  ``eager``, ``compile`` and the binary reference formulation run the same coder's parameters
  through ``baselines.coder_fvu``; the ``sparsify`` and ``saelens`` baselines run their library's
  own training module with the same weights (``Impl.make_step``).

``variant`` is ``binary`` (binary TopK codes, sigmoid STE) or ``topk`` (continuous TopK).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor

from . import baselines

OPS = ("encode", "decode", "backward", "step")
VARIANTS = ("binary", "topk")
CODERS = ("bae", "btc")

# The paper's models and coder widths (expansion 32 and 64 of d_model).
MODELS = {
    "SmolLM2-135M": (576, (18432, 36864)),
    "SmolLM2-1.7B": (2048, (65536, 131072)),
}
PAPER_KS = (16, 32, 64, 128)
TEMPERATURE = 2.0
INIT_THRESHOLD = 0.004


@dataclass(frozen=True)
class Case:
    op: str
    variant: str
    N: int
    d: int
    M: int
    k: int
    dtype: str  # "bfloat16" (GPU) or "float32" (CPU)
    coder: str = ""  # "bae" / "btc" for steps, "" for ops
    model: str = ""  # label only

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if (self.op == "step") != (self.coder in CODERS):
            raise ValueError(f"coder must be one of {CODERS} for steps and empty otherwise, got {self.coder!r}")
        if not (1 <= self.k <= self.M and self.N >= 1 and self.d >= 1):
            raise ValueError(f"bad shape N={self.N} d={self.d} M={self.M} k={self.k}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")

    @property
    def binary(self) -> bool:
        return self.variant == "binary"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def name(self) -> str:
        what = f"step/{self.coder}-{self.variant}" if self.op == "step" else f"{self.op}/{self.variant}"
        return f"{what} N={self.N} d={self.d} M={self.M} k={self.k} {self.dtype}"

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


def _ops_grid(shapes, ks, Ns, dtype, ops=("encode", "decode", "backward"), variants=VARIANTS):
    return [Case(op, variant, N, d, M, k, dtype, model=model)
            for model, d, M in shapes for N in Ns for k in ks for op in ops for variant in variants]


def _steps(shapes, k, N, dtype, coders=CODERS, variants=VARIANTS):
    return [Case("step", variant, N, d, M, k, dtype, coder=coder, model=model)
            for model, d, M in shapes for coder in coders for variant in variants]


def _shapes(models=tuple(MODELS), widths=None):
    out = []
    for model in models:
        d, Ms = MODELS[model]
        out += [(model, d, M) for M in (widths or Ms)]
    return out


def preset(name: str) -> list[Case]:
    """The cases of a preset (see ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name][1]()


def _quick():
    small = [("SmolLM2-135M", 576, 36864)]
    large = [("SmolLM2-1.7B", 2048, 131072)]
    return (_ops_grid(small, (32,), (16384,), "bfloat16") + _steps(small, 32, 16384, "bfloat16")
            + _ops_grid(large, (32,), (16384,), "bfloat16", variants=("binary",)))


def _paper():
    shapes = _shapes()
    return (_ops_grid(shapes, PAPER_KS, (16384,), "bfloat16")
            + _ops_grid(shapes, (32,), (65536,), "bfloat16")
            + _steps(shapes, 32, 16384, "bfloat16"))


def _cpu():
    ops = _ops_grid([("SmolLM2-135M", 576, 18432)], (32,), (4096,), "float32")
    steps = _steps([("SmolLM2-135M/8x", 576, 4608)], 32, 2048, "float32")
    gemm_bound_steps = _steps([("SmolLM2-135M", 576, 18432)], 32, 4096, "float32")  # where the encode GEMM dominates
    return ops + steps + gemm_bound_steps


def _cpu_quick():
    return _ops_grid([("tiny", 128, 2048)], (16,), (512,), "float32") + _steps([("tiny", 128, 2048)], 16, 512, "float32")


PRESETS: dict[str, tuple[str, Callable[[], list[Case]]]] = {
    "quick": ("GPU, bf16: d=576 M=36864 N=16384 k=32 every op and step, plus d=2048 M=131072 binary ops", _quick),
    "paper": ("GPU, bf16: both SmolLM2 sizes x both widths x k in 16..128 at N=16384, k=32 at N=65536, "
              "steps at k=32 (long: split it with --models/--ops/--k)", _paper),
    "cpu": ("CPU, fp32: ops at N=4096 d=576 M=18432 k=32; steps at N=2048 d=576 M=4608 k=32 and at "
            "N=4096 M=18432", _cpu),
    "cpu-quick": ("CPU, fp32, seconds: N=512 d=128 M=2048 k=16, every op and step", _cpu_quick),
}


def filter_cases(cases: list[Case], *, ops=None, variants=None, coders=None, ks=None, models=None,
                 widths=None, N: Optional[int] = None, dtype: Optional[str] = None) -> list[Case]:
    """Keep the matching cases; ``N``/``dtype`` override every case's token count / dtype."""
    out = []
    for c in cases:
        if ops and c.op not in ops:
            continue
        if variants and c.variant not in variants:
            continue
        if coders and c.op == "step" and c.coder not in coders:
            continue
        if ks and c.k not in ks:
            continue
        if models and not any(m.lower() in c.model.lower() for m in models):
            continue
        if widths and c.M not in widths:
            continue
        out.append(replace(c, N=N or c.N, dtype=dtype or c.dtype))
    return list(dict.fromkeys(out))  # an N override can make duplicates


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def _copies(per_copy_bytes: int, rotate_bytes: int, max_copies: int = 16) -> int:
    """How many copies of the per-token inputs to rotate through so they do not sit in cache."""
    if rotate_bytes <= 0 or per_copy_bytes <= 0:
        return 1
    return max(1, min(max_copies, math.ceil(rotate_bytes / per_copy_bytes)))


def random_codes(N: int, M: int, k: int, binary: bool, dtype, device, generator) -> tuple[Tensor, Tensor]:
    """k distinct latents per token, spread over all M (one per stride of M//k), and their acts.

    Binary acts are 1 with probability 0.9 (selected-but-inactive slots exist in real codes);
    continuous acts are uniform in (0, 1].
    """
    stride = M // k
    idx = torch.randint(0, stride, (N, k), device=device, generator=generator)
    idx += torch.arange(k, device=device) * stride
    u = torch.rand(N, k, device=device, generator=generator)
    acts = (u < 0.9).to(dtype) if binary else (1 - u).to(dtype)
    return idx, acts


@dataclass
class Inputs:
    W_enc: Tensor  # float32 masters, as in training
    b_enc: Tensor
    log_threshold: Tensor
    W_dec: Tensor
    b_dec: Tensor
    xs: list  # rotating per-token inputs
    ys: list  # targets (transcoder steps) / output gradients (backward)
    codes: list  # (indices, acts) pairs (decode)

    @property
    def copies(self) -> int:
        return len(self.xs) or len(self.codes)


def case_copies(case: Case, device: torch.device, rotate_bytes: int) -> int:
    """How many rotating copies of its per-token inputs ``make_inputs`` makes for ``case``."""
    elem = torch.finfo(case.torch_dtype).bits // 8
    if case.op == "decode":
        return _copies(case.N * case.k * (8 + elem), rotate_bytes)
    return _copies(2 * case.N * case.d * elem, rotate_bytes)


def make_inputs(case: Case, device: torch.device, rotate_bytes: int = 0, seed: int = 0) -> Inputs:
    """Weights as a freshly initialised coder has them (W_dec unit rows) and random activations."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt, N, d, M, k = case.torch_dtype, case.N, case.d, case.M, case.k
    W_enc = (torch.rand(M, d, device=device, generator=g) * 2 - 1) / math.sqrt(d)
    b_enc = torch.randn(M, device=device, generator=g) * 0.01
    log_threshold = torch.full((M,), math.log(INIT_THRESHOLD), device=device)
    W_dec = W_enc / W_enc.norm(dim=1, keepdim=True)
    b_dec = torch.randn(d, device=device, generator=g) * 0.1
    n = case_copies(case, device, rotate_bytes)
    xs, ys, codes = [], [], []
    if case.op == "decode":
        codes = [random_codes(N, M, k, case.binary, dt, device, g) for _ in range(n)]
    else:
        xs = [torch.randn(N, d, device=device, generator=g).to(dt) for _ in range(n)]
        if case.op in ("backward", "step"):
            ys = [torch.randn(N, d, device=device, generator=g).to(dt) for _ in range(n)]
    return Inputs(W_enc, b_enc, log_threshold, W_dec, b_dec, xs, ys, codes)


# ----------------------------------------------------------------------------------------------
# Runners: (prepare(i) -> ctx untimed, run(ctx) timed, key(out) -> tensor for the output check)
# ----------------------------------------------------------------------------------------------


@dataclass
class Runner:
    prepare: Callable[[int], object]
    run: Callable[[object], object]
    key: Optional[Callable[[object], Tensor]] = None  # comparable output (encode/decode only)


class Signum:
    """sign-SGD with momentum (the trainer's default optimizer, without the schedule-free averaging):
    ``m = beta*m + (1-beta)*g; p -= lr*sign(m)``, with foreach ops."""

    def __init__(self, params, lr: float = 1e-4, beta: float = 0.95):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.beta = lr, beta
        self.momentum = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        pairs = [(p, m) for p, m in zip(self.params, self.momentum) if p.grad is not None]
        if not pairs:
            return
        params, momentum = [p for p, _ in pairs], [m for _, m in pairs]
        torch._foreach_mul_(momentum, self.beta)
        torch._foreach_add_(momentum, [p.grad for p in params], alpha=1 - self.beta)
        torch._foreach_add_(params, torch._foreach_sign(momentum), alpha=-self.lr)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def make_coder(case: Case, inputs: Inputs, device: torch.device, backend: Optional[str] = None):
    """The step's sparse coder, float32 weights initialised from ``inputs`` (same for every impl)."""
    from binsparse_kernels.coder import SparseCoder, SparseCoderConfig

    btc = case.coder == "btc"
    cfg = SparseCoderConfig(activation="topk_binary" if case.binary else "topk", num_latents=case.M, k=case.k,
                            transcode=btc, skip_connection=btc, ste_temperature=TEMPERATURE,
                            init_threshold=INIT_THRESHOLD)
    coder = SparseCoder(case.d, cfg, device=device, dtype=torch.float32, backend=backend)
    with torch.no_grad():
        coder.encoder.weight.copy_(inputs.W_enc)
        coder.encoder.bias.copy_(inputs.b_enc)
        coder.W_dec.copy_(inputs.W_dec if not btc else inputs.W_dec * 0.1)  # a transcoder's W_dec is not unit-norm
        coder.b_dec.copy_(inputs.b_dec)
        if coder.W_skip is not None:
            coder.W_skip.normal_(0, 0.01 / math.sqrt(case.d), generator=torch.Generator(device).manual_seed(1))
    return coder


def _autocast(device: torch.device, dtype: torch.dtype):
    enabled = dtype != torch.float32
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def build(case: Case, impl: baselines.Impl, inputs: Inputs, device: torch.device) -> Runner:
    """How ``impl`` runs ``case`` on ``inputs`` (``impl.supports(case)``; a TopK library standing in
    on a binary case runs its TopK coder)."""
    if not impl.supports(case):
        raise ValueError(f"{impl.name} does not run {case.name}")
    n = inputs.copies
    W_enc, b_enc, lt, W_dec, b_dec = inputs.W_enc, inputs.b_enc, inputs.log_threshold, inputs.W_dec, inputs.b_dec
    k, binary = case.k, case.binary and impl.exact(case)

    if case.op == "encode":
        fn = impl.wrap(lambda x: impl.encode(x, W_enc, b_enc, lt, k, binary, TEMPERATURE))

        def run(x):
            with torch.no_grad():
                return fn(x)

        # Sorted selected values per row: equal for any correct top-k, whatever the tie order.
        return Runner(lambda i: inputs.xs[i % n], run, key=lambda out: out[2].float().sort(1, descending=True)[0])

    if case.op == "decode":
        fn = impl.wrap(lambda idx, acts: impl.decode(idx, acts, W_dec, b_dec, binary))

        def run(codes):
            with torch.no_grad():
                return fn(*codes)

        return Runner(lambda i: inputs.codes[i % n], run, key=lambda y: y.float())

    if case.op == "backward":
        params = [t.clone().requires_grad_() for t in (W_enc, b_enc, lt, W_dec, b_dec)]
        pW, pb, plt, pWd, pbd = params
        if not binary:
            params = [p for p in params if p is not plt]

        def forward(x):
            acts, indices, _ = impl.encode(x, pW, pb, plt, k, binary, TEMPERATURE)
            return impl.decode(indices, acts, pWd, pbd, binary)

        fn = impl.wrap(forward)

        def prepare(i):
            with torch.enable_grad():
                return fn(inputs.xs[i % n]), inputs.ys[i % n]

        def run(ctx):
            y, grad_y = ctx
            return torch.autograd.grad(y, params, grad_y.to(y.dtype))

        return Runner(prepare, run)

    # step: decoder renorm (SAEs), forward, backward, gradient projection (SAEs), optimizer
    dtype = case.torch_dtype
    sae = case.coder == "bae"
    if impl.kind == "backend":
        model = make_coder(case, inputs, device, backend=impl.name)

        def loss_fn(x, y):
            return model(x, y).fvu
    elif impl.make_step is not None:  # a library's own training module
        model, loss_fn, before, after = impl.make_step(case, inputs, device)
    else:
        model = make_coder(case, inputs, device)
        loss_fn = impl.wrap(lambda x, y: baselines.coder_fvu(model, impl, x, y))
    if impl.make_step is None:
        before = model.set_decoder_norm_to_unit_norm if sae else None
        after = model.remove_gradient_parallel_to_decoder_directions if sae else None
    opt = Signum(model.parameters())

    def run(ctx):
        x, y = ctx
        if before is not None:
            before()
        with _autocast(device, dtype):
            loss = loss_fn(x, None if sae else y)
        loss.backward()
        if after is not None:
            after()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    return Runner(lambda i: (inputs.xs[i % n], inputs.ys[i % n]), run)
