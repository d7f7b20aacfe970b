"""Train several sparse coders side by side on the activations of one LM forward (or cache read) per batch.

The coders of a run: every variant x every k x every learning rate of an LR sweep (``sweep.py``).
The activations come from the language model (``models.py``) or from an activation cache
(``activation_cache.py``), in the same order either way. Run layout (sparsify's per-hookpoint
layout, one folder per coder; ``runs.py`` names the files):

    <save_dir>/<run_name>/metrics.jsonl                  one JSON line per logged step
    <save_dir>/<run_name>/trainer_state.pt               everything a resume needs, in one file
    <save_dir>/<run_name>/<variant>/<hookpoint>/cfg.json + sae.safetensors
    <save_dir>/<run_name>/lr_sweep/<variant>@<lr>/<hookpoint>/...   with an LR sweep: every coder (the
                                                         chosen ones are copied to <variant>/), and lr_sweep.json

Every file is written to a temporary name, fsynced and renamed over the old one, so a crash in the
middle of a save leaves the previous checkpoint loadable. ``trainer_state.pt`` holds the coders'
weights as well as the optimizer states, step and dead counters, so ``resume`` restores one
consistent snapshot even if the process died between writing two files; the data position
follows from the step (batches are taken in a fixed, seeded order).

Data parallel: launched by ``torchrun`` (``WORLD_SIZE`` > 1), each rank takes its own
``batch_size`` sequences per step, gradients are averaged across ranks with one all-reduce per
coder, dead counters combine every rank's firings, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from schedulefree import ScheduleFreeWrapper

from .. import data as data_mod
from .. import models, runs
from .._checks import deferred_checks, raise_deferred
from .._io import atomic_write, stale_temporaries
from ..activation_cache import ActivationCache
from ..coder import SparseCoder, SparseCoderConfig
from ..progress import progress_bar
from . import sweep

VARIANTS = {"binary": "topk_binary", "topk": "topk", "hybrid": "topk_hybrid"}


@dataclass
class TrainConfig:
    model: Optional[str] = None  # None: the offline SmolLM2-135M GGUF
    dataset: Optional[str] = None  # None: the built-in offline corpus
    hookpoints: list[str] = field(default_factory=lambda: ["layers.9.mlp"])
    # The paper's binary and TopK skip transcoders, and the hybrid (half the latents and half of k
    # binary) that asks whether mixing the two wins back reconstruction.
    variants: list[str] = field(default_factory=lambda: ["binary", "topk", "hybrid"])
    transcode: bool = True
    skip_connection: bool = True
    k: Union[int, list[int]] = 32  # several: one coder per k, on the same batches
    expansion_factor: int = 8
    num_latents: int = 0
    batch_size: int = 8  # sequences per step
    ctx_len: int = 256
    grad_acc_steps: int = 1
    optimizer: str = "signum"  # or "adam"
    lr: Optional[float] = None  # None: the LR law for each coder (``default_lr``)
    lr_sweep: list[float] = field(default_factory=list)  # multipliers of the LR law (or of lr): every coder at each
    lr_sweep_values: list[float] = field(default_factory=list)  # or these learning rates; see sweep.py
    selection_tokens: int = 16_384  # held-out tokens (at most) that choose the LR of an LR sweep
    activations: Optional[str] = None  # train from this activation cache (``binsparse cache``) instead of the LM
    lr_warmup_steps: int = 1000  # Adam only
    auxk_alpha: float = 0.0
    dead_feature_threshold: int = 10_000_000
    exclude_tokens: list[int] = field(default_factory=list)
    max_tokens: int = 450_000  # per coder; the default run (3 variants x 5 LRs) takes about 10 min on 2 CPU cores
    save_dir: str = "runs"
    run_name: str = "default"
    save_every: int = 500
    log_every: int = 10
    device: Optional[str] = None
    backend: Optional[str] = None
    shuffle_seed: int = 0
    init_seed: int = 0  # coder initialisation: the same seed gives the same starting weights
    split: str = "train"
    text_column: str = "text"
    max_examples: Optional[int] = None
    layer_stride: int = 1  # keep only hookpoints layers.N[.mlp] with N % layer_stride == 0
    revision: Optional[str] = None  # hub model revision
    resume: bool = False  # continue <save_dir>/<run_name> exactly where its last save left off
    log_to_wandb: bool = False
    wandb_log_frequency: int = 1  # in logged steps

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        if self.optimizer not in ("signum", "adam"):
            raise ValueError(f"optimizer must be 'signum' or 'adam', got {self.optimizer!r}")
        if self.skip_connection and not self.transcode:
            raise ValueError("skip_connection needs transcode (a skip maps the input to the output)")
        for name in ("batch_size", "ctx_len", "grad_acc_steps", "max_tokens", "layer_stride", "save_every",
                     "log_every", "wandb_log_frequency", "selection_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.k_values or min(self.k_values) < 1 or len(set(self.k_values)) != len(self.k_values):
            raise ValueError(f"k must be one or more distinct values >= 1, got {self.k}")
        if self.lr_sweep and self.lr_sweep_values:
            raise ValueError("give lr_sweep (multipliers) or lr_sweep_values (learning rates), not both")
        if any(v <= 0 for v in self.lr_sweep + self.lr_sweep_values) or (self.lr is not None and self.lr <= 0):
            raise ValueError("learning rates and their multipliers must be > 0")

    @property
    def k_values(self) -> list[int]:
        return [self.k] if isinstance(self.k, int) else list(self.k)


REFERENCE_BATCH_TOKENS = 2**16  # the reference trainer's batch: 32 sequences x 2048 tokens
LR_RULE = "method.md's law x sqrt(tokens per step / 65,536)"


def default_lr(optimizer: str, activation: str, num_latents: int, batch_tokens: int = REFERENCE_BATCH_TOKENS) -> float:
    """method.md's LR laws, made for the reference trainer's 65,536-token batches, scaled to ``batch_tokens``
    (tokens per optimizer step) by the square-root rule: ``law * sqrt(batch_tokens / 65,536)``.

    Why the square root (docs/TRAINING.md has the long form): sign-SGD moves every weight by lr per
    step whatever the gradient's size, and for a gradient coordinate whose mean is small against its
    noise, the chance that the batch gradient has the right sign grows with sqrt(batch). Over a fixed
    number of tokens, a batch B/c gives c times the steps, each with 1/sqrt(c) of the drift and the
    same lr^2 of noise: lr * sqrt(B) keeps both the drift and the noise per token what they were.
    (The same rule Malladi et al. 2022 derive for Adam-type optimizers.) It is what carries the law's
    per-token behaviour to another batch size; short runs still want larger LRs, see ``--lr_sweep``.
    """
    if optimizer == "adam":
        law = 2e-4 / math.sqrt(num_latents / 2**14)
    elif activation == "topk":
        law = 5e-3 / math.sqrt(num_latents / 2**14)
    else:
        law = 3e-3 / math.sqrt(num_latents / 2**15)
    return law * math.sqrt(batch_tokens / REFERENCE_BATCH_TOKENS)


class SignSGD(torch.optim.Optimizer):
    """``p -= lr * sign(grad)``; wrapped by ``schedulefree.ScheduleFreeWrapper`` this is Signum."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def make_optimizer(cfg: TrainConfig, coder: SparseCoder, total_steps: int, lr: float):
    """(optimizer, LR scheduler or None, lr). A schedule-free optimizer comes back in eval mode:
    the caller switches it to train mode once any saved state is loaded."""
    if cfg.optimizer == "signum":
        return ScheduleFreeWrapper(SignSGD(coder.parameters(), lr), momentum=0.95), None, lr
    # fused: the step counters stay tensors on the parameters' device (no host read per step)
    opt = torch.optim.Adam(coder.parameters(), lr=lr, fused=True)

    def schedule(step):  # warm-up, then linear decay to 0
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - cfg.lr_warmup_steps))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule), lr


def _atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _init_distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun with several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


class Trainer:
    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None, *, chunks: Optional[torch.Tensor] = None,
                 held_out: Optional[torch.Tensor] = None, log=print, hf_token: Optional[str] = None):
        """``model``/``tokenizer``/``chunks``/``held_out``: already loaded ones (else loaded as ``cfg`` says).
        ``held_out`` chunks are needed only to choose an LR sweep's learning rates."""
        self.cfg = cfg
        self.rank, self.world = _init_distributed()
        self.log = log if self.rank == 0 else (lambda *_: None)
        if cfg.device:
            self.device = torch.device(cfg.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if self.world > 1 else 0)
        else:
            self.device = torch.device("cpu")
        self.cache = ActivationCache(cfg.activations) if cfg.activations else None
        if self.cache is not None:  # no LM at all: the cache holds its activations
            if model is not None or chunks is not None:
                raise ValueError("train from an activation cache or from a model and chunks, not both")
            self.cache.check_source(model=cfg.model, revision=cfg.revision, dataset=cfg.dataset, split=cfg.split,
                                    text_column=cfg.text_column, max_examples=cfg.max_examples, ctx_len=cfg.ctx_len,
                                    shuffle_seed=cfg.shuffle_seed)
            self.model = self.tokenizer = None
            self.model_label = self.cache.model_label
            self.hookpoints = self.cache.select_hookpoints(cfg.hookpoints)
        else:
            if model is None:
                model, tokenizer, self.model_label = models.load_model(cfg.model, device=str(self.device),
                                                                       revision=cfg.revision, hf_token=hf_token)
            else:
                self.model_label = cfg.model or type(model).__name__
            self.model, self.tokenizer = model.eval(), tokenizer
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.hookpoints = models.expand_hookpoints(model, cfg.hookpoints)
        if cfg.layer_stride > 1:
            strided = [h for h in self.hookpoints
                       if (m := re.fullmatch(r"layers\.(\d+)(\.mlp)?", h)) and int(m.group(1)) % cfg.layer_stride == 0]
            if not strided:
                raise ValueError(f"layer_stride={cfg.layer_stride} keeps none of the hookpoints {self.hookpoints}")
            self.hookpoints = strided
        if self.cache is not None:
            self.chunks, self.held_out = None, None
            n_sequences, ctx_len = self.cache.sequences("train"), self.cache.ctx_len
        else:
            if chunks is None:
                chunks, held_out = data_mod.load_chunks(tokenizer, cfg.dataset, ctx_len=cfg.ctx_len,
                                                        seed=cfg.shuffle_seed, split=cfg.split,
                                                        text_column=cfg.text_column, max_examples=cfg.max_examples)
            self.chunks, self.held_out = chunks, held_out
            n_sequences, ctx_len = chunks.shape
        if n_sequences < cfg.batch_size * self.world:
            raise ValueError(f"the dataset has {n_sequences} chunks of {ctx_len} tokens, fewer than one "
                             f"step needs ({cfg.batch_size} sequences x {self.world} ranks)")
        self.n_sequences, self.ctx_len = n_sequences, ctx_len
        self.tokens_per_step = cfg.batch_size * ctx_len * cfg.grad_acc_steps * self.world
        self.total_steps = max(1, cfg.max_tokens // self.tokens_per_step)
        self.run_dir = Path(cfg.save_dir) / cfg.run_name
        d_model = self._width()
        self.coders: dict[str, dict[str, SparseCoder]] = {}
        self.optimizers, self.lrs = {}, {}

        def law(variant, k):
            ccfg = SparseCoderConfig(activation=VARIANTS[variant], k=k, expansion_factor=cfg.expansion_factor,
                                     num_latents=cfg.num_latents)
            return default_lr(cfg.optimizer, ccfg.activation, ccfg.latents(d_model), self.tokens_per_step)

        self.specs = sweep.coder_specs(cfg.variants, cfg.k_values, law, lr=cfg.lr, multipliers=cfg.lr_sweep,
                                       values=cfg.lr_sweep_values)
        for spec in self.specs:
            variant = spec.name
            ccfg = SparseCoderConfig(activation=VARIANTS[spec.variant], k=spec.k,
                                     expansion_factor=cfg.expansion_factor,
                                     num_latents=cfg.num_latents, transcode=cfg.transcode,
                                     skip_connection=cfg.skip_connection,
                                     normalize_decoder=not cfg.transcode)
            if ccfg.k > ccfg.latents(d_model):
                raise ValueError(f"k={ccfg.k} is larger than the number of latents ({ccfg.latents(d_model)})")
            self.coders[variant] = {}
            for hook in self.hookpoints:
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    torch.manual_seed(cfg.init_seed)
                    coder = SparseCoder(d_model, ccfg, device=self.device, backend=cfg.backend)
                key = f"{variant}/{hook}"
                self.coders[variant][hook] = coder
                self.optimizers[key] = make_optimizer(cfg, coder, self.total_steps, spec.lr)
                self.lrs[key] = self.optimizers[key][2]
        self.step, self.tokens_seen = 0, 0
        M = next(iter(next(iter(self.coders.values())).values())).num_latents
        self.since_fired = {key: torch.zeros(M, dtype=torch.long, device=self.device) for key in self.optimizers}
        if cfg.resume:
            self._load_state()
        for opt, _, _ in self.optimizers.values():
            if hasattr(opt, "train"):
                opt.train()  # schedule-free: from the averaged weights to the ones gradients are taken at
        self._stop = False
        self._wandb = None
        self._saved_step = self.step if cfg.resume else None

    @property
    def _all_coders(self):
        for variant, hooks in self.coders.items():
            for hook, coder in hooks.items():
                yield f"{variant}/{hook}", coder

    def _width(self) -> int:
        if self.cache is not None:
            inp, out = (self.cache.width(self.hookpoints[-1], side) for side in ("input", "output"))
            if inp != out:
                raise ValueError(f"hookpoint {self.hookpoints[-1]} maps width {inp} to {out}")
            return inp
        probe = self.chunks[:1, : min(8, self.chunks.shape[1])].to(self.device)
        with models.capture(self.model, self.hookpoints[-1:], stop_after_last=True) as store:
            models.run_to_hooks(self.model, probe)
        inp, out = store[self.hookpoints[-1]]
        if inp.shape[-1] != out.shape[-1]:
            raise ValueError(f"hookpoint {self.hookpoints[-1]} maps width {inp.shape[-1]} to {out.shape[-1]}")
        return inp.shape[-1]

    # -- checkpoints --------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.run_dir / runs.STATE_FILE

    def save(self) -> None:
        """Write every coder's checkpoint and the resume state (rank 0 only; every rank must call it)."""
        for opt, _, _ in self.optimizers.values():
            if hasattr(opt, "eval"):
                opt.eval()  # schedule-free: save the averaged weights
        try:
            if self.rank == 0:
                for key, coder in self._all_coders:
                    coder.save_to_disk(self.run_dir / key)
                state = {"step": self.step, "tokens_seen": self.tokens_seen, "config": asdict(self.cfg),
                         "world_size": self.world,
                         "coders": {key: coder.state_dict() for key, coder in self._all_coders},
                         "optimizers": {k: o.state_dict() for k, (o, _, _) in self.optimizers.items()},
                         "schedulers": {k: s.state_dict() for k, (_, s, _) in self.optimizers.items() if s is not None},
                         "since_fired": self.since_fired}
                _atomic_torch_save(state, self.state_path)
            self._saved_step = self.step
        finally:
            for opt, _, _ in self.optimizers.values():
                if hasattr(opt, "train"):
                    opt.train()
            if self.world > 1:
                dist.barrier()

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / runs.METRICS_FILE

    def _drop_metrics_after(self, step: int) -> None:
        """Keep the metric lines of steps <= ``step`` (the state this run starts from), atomically.

        A resumed run repeats the steps after its last save, and a fresh run starts at 0: without
        this their lines would appear twice. A line cut short by a crash is dropped too."""
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", math.inf) <= step:
                kept.append(line + "\n")
        atomic_write(self.metrics_path, lambda tmp: Path(tmp).write_text("".join(kept)))

    def _remove_stale_temporaries(self) -> None:
        """A process killed in the middle of a save (SIGKILL, power loss) leaves ``atomic_write``'s
        temporary file next to the file it was replacing, which is intact; remove those."""
        targets = [self.state_path, self.metrics_path]
        for key, _ in self._all_coders:
            targets += [self.run_dir / key / "sae.safetensors", self.run_dir / key / "cfg.json"]
        for target in targets:
            for tmp in stale_temporaries(target):
                tmp.unlink()
                self.log(f"removed {tmp}, left by an interrupted save")

    def _load_state(self) -> None:
        if not self.state_path.is_file():
            raise FileNotFoundError(f"resume: no saved run at {self.state_path}")
        state = torch.load(self.state_path, map_location=self.device, weights_only=False)
        missing = sorted(set(self.optimizers) ^ set(state["coders"]))
        if missing:
            raise ValueError(f"resume: the saved run at {self.run_dir} has coders {sorted(state['coders'])}, "
                             f"this configuration {sorted(self.optimizers)}")
        if state.get("world_size", 1) != self.world:
            raise ValueError(f"resume: the run was saved with {state['world_size']} ranks, now {self.world}; "
                             "its data order depends on the rank count")
        for key, coder in self._all_coders:
            coder.load_state_dict(state["coders"][key])
            opt, sched, _ = self.optimizers[key]
            opt.load_state_dict(state["optimizers"][key])
            if sched is not None:
                sched.load_state_dict(state["schedulers"][key])
        self.since_fired = {k: v.to(self.device) for k, v in state["since_fired"].items()}
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.log(f"resumed {self.run_dir} at step {self.step} ({self.tokens_seen} tokens)")

    # -- training -----------------------------------------------------------------------------------

    def _request_stop(self, signum, frame):
        self.log(f"signal {signum}: saving and stopping after this step")
        self._stop = True

    def _activations(self, batch):
        """{hookpoint: (coder input, target)} float32 [tokens, width] for token ids ``batch`` [B, T], from the LM."""
        with models.capture(self.model, self.hookpoints, stop_after_last=True) as store:
            models.run_to_hooks(self.model, batch)
        return self._coder_inputs(store, batch)

    def _coder_inputs(self, store, token_ids):
        """Hooked (input, output) pairs -> (coder input, target) pairs: flattened, float32, excluded tokens dropped."""
        keep = None
        if self.cfg.exclude_tokens:
            keep = ~torch.isin(token_ids.reshape(-1), torch.tensor(self.cfg.exclude_tokens, device=token_ids.device))
        acts = {}
        for hook in self.hookpoints:
            inp, out = store[hook]
            inp, out = inp.reshape(-1, inp.shape[-1]), out.reshape(-1, out.shape[-1])
            x, y = (inp, out) if self.cfg.transcode else (out, out)
            if keep is not None:
                x, y = x[keep.to(x.device)], y[keep.to(y.device)]
            acts[hook] = (x.to(self.device, torch.float32), y.to(self.device, torch.float32))
        return acts

    def _sequence_indices(self, micro: int) -> torch.Tensor:
        """This rank's sequences for the current step and micro-step: a fixed order, so the data
        position of a resumed run follows from its step."""
        cfg = self.cfg
        per_step = cfg.batch_size * self.world
        start = ((self.step * cfg.grad_acc_steps + micro) * per_step + self.rank * cfg.batch_size)
        return torch.arange(start, start + cfg.batch_size) % self.n_sequences  # epochs wrap around

    def _batch(self, micro: int) -> torch.Tensor:
        return self.chunks[self._sequence_indices(micro)]

    def _step_activations(self, micro: int) -> dict:
        """The activations of this step's (micro-)batch: from the activation cache, or from one LM forward."""
        if self.cache is not None:
            store, token_ids = self.cache.read("train", self._sequence_indices(micro), self.hookpoints)
            return self._coder_inputs(store, token_ids)
        return self._activations(self._batch(micro).to(self.device))

    def _open_wandb(self):
        if not (self.cfg.log_to_wandb and self.rank == 0):
            return None
        try:
            import wandb  # optional: imported only when asked for
        except ImportError as exc:
            raise ImportError("--log_to_wandb needs `pip install wandb`") from exc
        # WANDB_PROJECT / WANDB_ENTITY are honoured by wandb itself.
        return wandb.init(name=self.cfg.run_name, config=asdict(self.cfg), resume="allow")

    def train(self) -> Path:
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        for key, lr in self.lrs.items():
            self.log(f"{key}: optimizer {self.cfg.optimizer} "
                     f"({'schedule-free sign-SGD, momentum 0.95' if self.cfg.optimizer == 'signum' else 'Adam'}), "
                     f"lr {lr:.3g}")
        self.log(f"model {self.model_label}; {self.total_steps} steps of {self.tokens_per_step} tokens"
                 f"{f' over {self.world} ranks' if self.world > 1 else ''}; run dir {self.run_dir}")
        metrics = None
        if self.rank == 0:
            self._remove_stale_temporaries()
            self._drop_metrics_after(self.step)
            metrics = open(self.metrics_path, "a")
        old = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        self._wandb = self._open_wandb()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        bar = progress_bar(self.total_steps, initial=self.step, desc="train", unit="step", disable=self.rank != 0)
        t0, tokens0, logged = time.perf_counter(), self.tokens_seen, 0
        try:
            # The ops' input checks record bad input on the device; it is raised at the logging
            # steps, which read the metrics anyway: no host sync in the steps between.
            with deferred_checks():
                while self.step < self.total_steps and not self._stop_requested():
                    record = self._train_step(autocast)
                    self.step += 1
                    bar.update(1)
                    if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                        raise_deferred()
                        record = {name: float(value) for name, value in record.items()}  # the one host read
                        rate = (self.tokens_seen - tokens0) / max(time.perf_counter() - t0, 1e-9)
                        record.update(step=self.step, tokens=self.tokens_seen, tokens_per_sec=rate)
                        if metrics is not None:
                            metrics.write(json.dumps(record) + "\n")
                            metrics.flush()
                        if self._wandb is not None and logged % self.cfg.wandb_log_frequency == 0:
                            self._wandb.log(record, step=self.step)
                        logged += 1
                        fvus = [v for k, v in record.items() if k.startswith("fvu/")]
                        bar.set_postfix(tok_s=f"{rate:.0f}", fvu=f"{sum(fvus) / len(fvus):.3f}",
                                        l0=f"{max(v for k, v in record.items() if k.startswith('l0/')):.1f}",
                                        dead=f"{max(v for k, v in record.items() if k.startswith('dead_pct/')):.2f}")
                    if self.step % self.cfg.save_every == 0:
                        self.save()
            if self._saved_step != self.step:
                self.save()
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
            if self._wandb is not None:
                self._wandb.finish()
            for s, handler in old.items():
                signal.signal(s, handler)
        if self.sweeping and self.finished:
            self.select_learning_rates()
        return self.run_dir

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    # -- LR sweep ------------------------------------------------------------------------------------

    @property
    def sweeping(self) -> bool:
        return bool(self.cfg.lr_sweep or self.cfg.lr_sweep_values)

    def _selection_sequences(self) -> tuple[range, str]:
        """Which held-out sequences choose the LRs, and a sentence saying so."""
        n = self.cache.sequences("held_out") if self.cache is not None else (
            0 if self.held_out is None else self.held_out.shape[0])
        if n == 0:
            raise ValueError("an LR sweep chooses on held-out tokens, and this run has none (pass held_out chunks, "
                             "or a cache made with --held_out_tokens > 0)")
        first = data_mod.REPORT_SEQUENCES if n > data_mod.REPORT_SEQUENCES else 0
        count = min(n - first, max(1, self.cfg.selection_tokens // self.ctx_len))
        note = (f"held-out sequences {first}..{first + count - 1} ({count * self.ctx_len:,} tokens): after the "
                f"{first} the end-of-run report evaluates" if first else
                f"held-out sequences 0..{count - 1} ({count * self.ctx_len:,} tokens): all there are, so the end-of-run "
                f"report evaluates some of the tokens the LRs were chosen on")
        return range(first, first + count), note

    @torch.no_grad()
    def select_learning_rates(self) -> Optional[dict]:
        """Score every saved coder on held-out tokens, choose each variant's LR (sweep.py), copy the chosen
        checkpoints to ``<run>/<variant>/`` and write ``lr_sweep.json``. Rank 0 does it; the others wait."""
        if self.rank != 0:
            dist.barrier()
            return None
        indices, note = self._selection_sequences()
        saved = {key: SparseCoder.load_from_disk(self.run_dir / key, device=self.device, backend=self.cfg.backend)
                 for key, _ in self._all_coders}  # exactly the checkpoints (schedule-free: the averaged weights)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        scores = {key: sweep.HeldOutScore(coder.num_latents) for key, coder in saved.items()}
        for start in range(indices.start, indices.stop, self.cfg.batch_size):
            idx = torch.arange(start, min(start + self.cfg.batch_size, indices.stop))
            if self.cache is not None:
                acts = self._coder_inputs(*self.cache.read("held_out", idx, self.hookpoints))
            else:
                acts = self._activations(self.held_out[idx].to(self.device))
            for key, coder in saved.items():
                x, y = acts[key.rsplit("/", 1)[1]]
                with autocast:
                    out = coder(x, y if self.cfg.transcode else None)
                scores[key].update(y, out.sae_out, out.latent_acts, out.latent_indices)
        results = {spec.name: {hook: scores[f"{spec.name}/{hook}"].result() for hook in self.hookpoints}
                   for spec in self.specs}
        chosen = sweep.choose(self.specs, results)
        table = sweep.summary(self.specs, results, chosen, selection=note, optimizer=self.cfg.optimizer,
                              batch_tokens=self.tokens_per_step, tokens_per_coder=self.tokens_seen, lr_rule=LR_RULE,
                              model=self.model_label)
        for family, spec in chosen.items():
            for hook in self.hookpoints:
                saved[f"{spec.name}/{hook}"].save_to_disk(self.run_dir / family / hook)
        atomic_write(self.run_dir / runs.LR_SWEEP_FILE, lambda tmp: Path(tmp).write_text(json.dumps(table, indent=1)))
        self.log(f"LR sweep, chosen by {sweep.CRITERION} on {note}:")
        for entry in table["candidates"]:
            mark = "  <- chosen" if table["chosen"][entry["family"]]["name"] == entry["name"] else ""
            self.log(f"  {entry['family']:>12} lr {entry['lr']:.3g} ({entry['label']}): held-out FVU "
                     f"{entry['fvu']:.4f}, dead {100 * entry['dead_fraction']:.1f}%{mark}")
        for family, entry in table["chosen"].items():
            if entry["at_edge_of_grid"]:
                self.log(f"  note: {family}'s best LR is at the edge of the grid; a wider sweep may do better")
        if self.world > 1:
            dist.barrier()
        return table

    def _stop_requested(self) -> bool:
        """A signal on any rank stops every rank after the same step."""
        if self.world == 1:
            return self._stop
        flag = torch.tensor([float(self._stop)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _train_step(self, autocast) -> dict:
        cfg = self.cfg
        record: dict = {}
        fired = {key: torch.zeros_like(c, dtype=torch.bool) for key, c in self.since_fired.items()}
        n_tokens = 0
        for micro in range(cfg.grad_acc_steps):
            acts = self._step_activations(micro)
            micro_tokens = next(iter(acts.values()))[0].shape[0]
            n_tokens += micro_tokens
            for variant, hooks in self.coders.items():
                for hook, coder in hooks.items():
                    key = f"{variant}/{hook}"
                    x, y = acts[hook]
                    if self.step == 0 and micro == 0:
                        coder.init_from_batch(x, y)
                        # Ranks built the same seeded weights; rank 0's first-batch biases (and
                        # weights, for safety) go to every rank. A resume loads one file everywhere.
                        if self.world > 1:
                            for t in coder.state_dict().values():
                                dist.broadcast(t, 0)
                    dead = self.since_fired[key] >= cfg.dead_feature_threshold
                    # since_fired <= tokens_seen: before the threshold no latent can be dead, and
                    # AuxK (exactly 0 then) need not run its extra encode
                    maybe_dead = self.tokens_seen >= cfg.dead_feature_threshold
                    with autocast:
                        out = coder(x, y if cfg.transcode else None, dead_mask=dead if maybe_dead else None,
                                    auxk_alpha=cfg.auxk_alpha)
                    loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
                    (loss / cfg.grad_acc_steps).backward()
                    # a latent fires when its act is nonzero (binary: 1, not merely selected); counted
                    # with index_add_ rather than a boolean mask (a data-dependent shape, a host sync)
                    active = (out.latent_acts.detach() != 0).reshape(-1).to(torch.int32)
                    hits = torch.zeros(fired[key].shape, dtype=torch.int32, device=active.device)
                    fired[key] |= hits.index_add_(0, out.latent_indices.reshape(-1), active) > 0
                    # metrics stay tensors until a logging step reads them
                    for name, value in ((f"fvu/{key}", out.fvu.detach()),
                                        (f"l0/{key}", (out.latent_acts.detach() != 0).sum(1).float().mean()),
                                        (f"auxk/{key}", out.auxk_loss.detach() if cfg.auxk_alpha else None)):
                        if value is not None:
                            record[name] = record.get(name, 0.0) + value / cfg.grad_acc_steps
                    record[f"dead_pct/{key}"] = dead.float().mean()
        if self.world > 1:
            n_tokens = self._all_reduce_step(fired, record, n_tokens)
        self.tokens_seen += n_tokens
        for key, was_fired in fired.items():
            self.since_fired[key] += n_tokens
            self.since_fired[key].masked_fill_(was_fired, 0)
            record[f"explained_variance/{key}"] = 1 - record[f"fvu/{key}"]
        for key, coder in self._all_coders:
            opt, sched, _ = self.optimizers[key]
            if not cfg.transcode:
                coder.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
                record[f"lr/{key}"] = sched.get_last_lr()[0]
            if not cfg.transcode:
                coder.set_decoder_norm_to_unit_norm()
        return record

    def _all_reduce_step(self, fired: dict, record: dict, n_tokens: int) -> int:
        """Average gradients and metrics over ranks, combine firings; returns the tokens of all ranks.
        The same collectives in the same order on every rank."""
        for key, coder in self._all_coders:
            grads = [p.grad for p in coder.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            mask = fired[key].to(torch.uint8)
            dist.all_reduce(mask, op=dist.ReduceOp.MAX)
            fired[key] = mask.bool()
        names = sorted(record)
        values = torch.stack([torch.as_tensor(record[n], dtype=torch.float64, device=self.device).reshape(())
                              for n in names] + [torch.tensor(float(n_tokens), dtype=torch.float64, device=self.device)])
        dist.all_reduce(values)
        for i, name in enumerate(names):
            record[name] = values[i] / self.world
        return int(values[-1].item())  # tokens differ by rank only with exclude_tokens
