"""The benchmark suite (binsparse_kernels.bench): baselines agree with the package's ops, every case
runs on every implementation through the ``benchmark`` fixture, and the harness times, checks and
writes complete results. CPU-sized, well under a minute in total.

pyproject's addopts has ``--benchmark-disable``: ``benchmark(fn, *args)`` then calls ``fn`` once and
returns its result, which the tests check. ``pytest --benchmark-enable tests/test_bench.py`` times them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time

import pytest
import torch

from binsparse_kernels import cli
from binsparse_kernels.bench import baselines, cases, harness
from binsparse_kernels.bench.cases import Case

TINY = dict(N=96, d=32, M=256, k=8, dtype="float32")
DEVICE = torch.device("cpu")
BACKENDS = [n for n in harness.default_impls(DEVICE) if n not in baselines.BASELINES]
OP_IMPLS = BACKENDS + ["eager", "sparsify", "saelens", baselines.FORMULATION]  # compile: one case below


def _case(op, variant, coder="", **kw):
    return Case(op, variant, coder=coder, **{**TINY, **kw})


def _inputs(case, seed=0):
    return cases.make_inputs(case, DEVICE, seed=seed)


# ----------------------------------------------------------------------------------------------
# Baselines == package ops (values, indices, outputs and every gradient)
# ----------------------------------------------------------------------------------------------


def _encode_decode_grads(impl, x, W_enc, b_enc, lt, W_dec, b_dec, k, binary, grad_y):
    leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, lt, W_dec, b_dec)]
    px, pW, pb, plt, pWd, pbd = leaves
    acts, indices, values = impl.encode(px, pW, pb, plt, k, binary, cases.TEMPERATURE)
    y = impl.decode(indices, acts, pWd, pbd, binary)
    wanted = leaves if binary else [t for t in leaves if t is not plt]
    grads = torch.autograd.grad(y, wanted, grad_y)
    order = indices.sort(1).indices  # compare per-row sets, whatever the slot order
    return (acts.gather(1, order).detach(), indices.gather(1, order), values.gather(1, order).detach(),
            y.detach(), grads)


@pytest.mark.parametrize("baseline,binary", [("eager", True), ("eager", False), (baselines.FORMULATION, True),
                                             ("sparsify", False)])
def test_baseline_matches_package_ops(baseline, binary):
    case = _case("backward", "binary" if binary else "topk")
    inp = _inputs(case, seed=3)
    x, grad_y = inp.xs[0], inp.ys[0]
    # thresholds that leave some selected latents inactive, so the binary STE sees both acts
    lt = torch.empty_like(inp.log_threshold).uniform_(0.0, 0.6)  # theta in (1, 1.8)
    args = (x, inp.W_enc, inp.b_enc, lt, inp.W_dec, inp.b_dec, case.k, binary, grad_y)
    want = _encode_decode_grads(baselines.backend_impl("reference"), *args)
    got = _encode_decode_grads(baselines.make_impl(baseline), *args)
    if binary:
        assert 0 < want[0].sum() < want[0].numel()
    else:  # sparsify's backward does not mask ReLU zeros: every selected value here is positive
        assert (want[2] > 0).all()
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # same latents selected
    for g, w in zip(got[:1] + got[2:4], want[:1] + want[2:4]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    names = ["x", "W_enc", "b_enc", "log_threshold", "W_dec", "b_dec"] if binary else ["x", "W_enc", "b_enc", "W_dec", "b_dec"]
    assert len(got[4]) == len(want[4]) == len(names)
    for name, g, w in zip(names, got[4], want[4]):
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_which_baseline_runs_which_case():
    formulation, sparsify, saelens = (baselines.make_impl(n) for n in (baselines.FORMULATION, "sparsify", "saelens"))
    for op in ("encode", "decode", "backward"):
        assert formulation.supports(_case(op, "binary")) and not formulation.supports(_case(op, "topk"))
        assert sparsify.supports(_case(op, "topk")) and sparsify.exact(_case(op, "topk"))
        assert sparsify.supports(_case(op, "binary")) and not sparsify.exact(_case(op, "binary"))  # TopK stands in
        assert not saelens.supports(_case(op, "topk"))
    assert saelens.supports(_case("step", "topk", "bae")) and not saelens.supports(_case("step", "topk", "btc"))
    assert saelens.supports(_case("step", "binary", "bae")) and not saelens.exact(_case("step", "binary", "bae"))
    with pytest.raises(ValueError, match="does not run"):
        cases.build(_case("encode", "topk"), formulation, _inputs(_case("encode", "topk")), DEVICE)


@pytest.mark.parametrize("coder", cases.CODERS)
def test_sparsify_library_step_matches_the_package_topk_coder(coder):
    """The library's own SparseCoder, given the case's weights, has our TopK coder's loss and gradients
    (up to its decoder renorm's eps): the baseline is the same training problem, run by the library."""
    case = _case("step", "topk", coder)
    inp = _inputs(case, seed=2)
    x, y = inp.xs[0], inp.ys[0]
    lib, lib_loss, _, _ = baselines.sparsify_step(case, inp, DEVICE)
    ours = cases.make_coder(case, inp, DEVICE, backend="reference")
    yy = None if coder == "bae" else y
    got, want = lib_loss(x, yy), ours(x, yy).fvu
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    mine = dict(ours.named_parameters())
    for name, p in lib.named_parameters():
        torch.testing.assert_close(p.grad, mine[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_saelens_step_reconstructs_as_the_package_topk_sae():
    """SAELens' TopK SAE with the case's weights (unit-norm W_dec, so its decoder-norm rescaling is a
    no-op) selects the same latents and reconstructs x as our TopK SAE."""
    case = _case("step", "topk", "bae")
    inp = _inputs(case, seed=4)
    x = inp.xs[0]
    sae, loss, _, after = baselines.saelens_step(case, inp, DEVICE)
    ours = cases.make_coder(case, inp, DEVICE, backend="reference")
    torch.testing.assert_close(sae(x), ours(x).sae_out, rtol=1e-4, atol=1e-5)
    value = loss(x, None)
    value.backward()
    after()  # clips the gradient norm to 1, as SAELens' trainer does
    total = torch.cat([p.grad.reshape(-1) for p in sae.parameters() if p.grad is not None]).norm()
    assert float(value.detach()) > 0 and float(total) <= 1.0 + 1e-5


def test_cpu_peak_memory_shows_the_dense_n_by_m():
    """The CPU peak column: the reference and the baselines hold N x M floats, the cpu backend's extra
    memory is O(N*k + M*d) (here well under one N x M fp32 matrix)."""
    case = Case("step", "binary", coder="btc", N=256, d=16, M=16384, k=8, dtype="float32")
    nm_mib = case.N * case.M * 4 / 2**20  # 16 MiB; the cpu encode's bounded GEMM scratch here: 4 MiB
    inp = _inputs(case)
    peaks = {}
    for name in ["reference", "eager", baselines.FORMULATION, "sparsify"] + (["cpu"] if "cpu" in BACKENDS else []):
        runner = cases.build(case, baselines.make_impl(name), inp, DEVICE)
        runner.run(runner.prepare(0))  # warm-up (optimizer state)
        peaks[name] = harness.measure_memory(runner.prepare, runner.run, DEVICE)[0]
    for name in ("reference", "eager", baselines.FORMULATION, "sparsify"):
        assert peaks[name] >= nm_mib, (name, peaks)
    if "cpu" in peaks:
        assert 0 < peaks["cpu"] < nm_mib / 2, peaks


@pytest.mark.parametrize("variant", cases.VARIANTS)
@pytest.mark.parametrize("coder", cases.CODERS)
def test_baseline_coder_matches_sparse_coder(coder, variant):
    """coder_fvu(coder, baseline) has the value and the parameter gradients of SparseCoder.forward."""
    case = _case("step", variant, coder)
    inp = _inputs(case, seed=1)
    x, y = inp.xs[0], (None if coder == "bae" else inp.ys[0])
    results = {}
    others = ["eager"] + ([baselines.FORMULATION] if variant == "binary" else [])
    for name in ["reference"] + others:
        model = cases.make_coder(case, inp, DEVICE, backend="reference")
        impl = baselines.make_impl(name)
        loss = model(x, y).fvu if name == "reference" else baselines.coder_fvu(model, impl, x, y)
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    want_loss, want_grads = results["reference"]
    assert want_grads["encoder.weight"].abs().sum() > 0
    for name in others:
        loss, grads = results[name]
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == want_grads.keys()
        for pname, g in grads.items():
            torch.testing.assert_close(g, want_grads[pname], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name} grad {pname}: {m}")


# ----------------------------------------------------------------------------------------------
# Every case on every implementation, through the benchmark fixture
# ----------------------------------------------------------------------------------------------

OP_CASES = [_case(op, v) for op in ("encode", "decode", "backward") for v in cases.VARIANTS]
OP_CASES += [_case("step", v, c) for c in cases.CODERS for v in cases.VARIANTS]


RUNS = [(case, name) for case in OP_CASES for name in OP_IMPLS if baselines.make_impl(name).supports(case)]


@pytest.mark.parametrize("case,impl_name", RUNS, ids=[f"{c.name.split(' ')[0]}-{n}" for c, n in RUNS])
def test_case_runs(benchmark, case, impl_name):
    impl = baselines.make_impl(impl_name)
    inp = _inputs(case)
    runner = cases.build(case, impl, inp, DEVICE)
    out = benchmark(runner.run, runner.prepare(0))
    # the same case run by the eager baseline, on fresh inputs from the same seed (a TopK library
    # standing in on a binary case is compared with eager's TopK run of it; its decode of 0/1 codes
    # is the binary decode)
    ref_case = case if impl.exact(case) or case.op == "decode" else dataclasses.replace(case, variant="topk")
    ref_inp = _inputs(ref_case)
    ref = cases.build(ref_case, baselines.make_impl("eager"), ref_inp, DEVICE)
    want = ref.run(ref.prepare(0))
    if case.op in ("encode", "decode"):
        torch.testing.assert_close(runner.key(out), ref.key(want), rtol=1e-5, atol=1e-5)
    elif case.op == "backward":
        assert len(out) == len(want) == (5 if case.binary and impl.exact(case) else 4)
        for g, w in zip(out, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    elif impl_name == "saelens":  # its own loss (MSE summed over d), not the FVU: one finite step
        assert torch.isfinite(out) and float(out) > 0
    else:  # one training step from the same initial weights: same loss, then the same update
        assert torch.isfinite(out) and 0 < float(out) < 10
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        # The next step's loss is taken at the updated weights, so it checks the backward and the
        # update (except a binary encoder's STE gradient, which moves no code at this lr; the op
        # cases check it). Signum moves every weight by lr * sign(momentum): entries whose sign
        # differs between implementations have gradients near 0, so they barely move this loss.
        plain = _plain_steps(ref_case, 3)
        for i in (1, 2):
            got, expected = runner.run(runner.prepare(i)), ref.run(ref.prepare(i))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(expected, plain[i], rtol=1e-5, atol=1e-6)
        assert abs(float(plain[1]) - float(_plain_steps(ref_case, 2, update=False)[1])) > 1e-3 * float(plain[1])


def _plain_steps(case, n, update=True):
    """The losses of ``n`` training steps written out with the reference backend: decoder rows
    renormalised (SAEs), backward, parallel gradient removed, m = 0.95 m + 0.05 g, p -= 1e-4 sign(m)."""
    inp = _inputs(case)
    coder = cases.make_coder(case, inp, DEVICE, backend="reference")
    sae = not coder.cfg.transcode
    momentum = {p: torch.zeros_like(p) for p in coder.parameters()}
    losses = []
    for i in range(n):
        if sae:
            coder.set_decoder_norm_to_unit_norm()
        x, y = inp.xs[i % inp.copies], inp.ys[i % inp.copies]  # the runners rotate through the copies
        loss = coder(x, None if sae else y).fvu
        loss.backward()
        if sae:
            coder.remove_gradient_parallel_to_decoder_directions()
        with torch.no_grad():
            for p, m in momentum.items():
                m.mul_(0.95).add_(p.grad, alpha=0.05)
                if update:
                    p.sub_(1e-4 * m.sign())
        coder.zero_grad()
        losses.append(loss.detach())
    return losses


# ----------------------------------------------------------------------------------------------
# The harness
# ----------------------------------------------------------------------------------------------

FAST = harness.Options(warmup=1, min_repeats=2, max_repeats=3, min_time_s=0.0)


def test_measure_times_what_it_runs():
    t = harness.measure(lambda i: 0.004, time.sleep, DEVICE, warmup=1, min_repeats=5, max_repeats=5)
    assert t.repeats == 5
    assert 4.0 <= t.min_ms <= t.q1_ms <= t.median_ms <= t.q3_ms
    assert t.median_ms < 40
    calls = []
    harness.measure(lambda i: i, calls.append, DEVICE, warmup=2, min_repeats=3, max_repeats=3)
    assert calls == [0, 1, 2, 3, 4]  # rotating inputs: each call gets the next index
    with pytest.raises(ValueError, match="min_repeats"):
        harness.measure(lambda i: i, calls.append, DEVICE, min_repeats=0)


def test_measure_interleaved_rounds_and_failures():
    order = []

    class Sleeper:
        def __init__(self, name, seconds, fail_at=None):
            self.name, self.seconds, self.fail_at = name, seconds, fail_at

        def prepare(self, i):
            return i

        def run(self, i):
            if i == self.fail_at:
                raise RuntimeError(f"{self.name} broke at call {i}")
            order.append(self.name)
            time.sleep(self.seconds)
            return i

    runners = {"a": Sleeper("a", 0.001), "b": Sleeper("b", 0.004), "c": Sleeper("c", 0.0, fail_at=3)}
    firsts = {}
    out = harness.measure_interleaved(runners, DEVICE, warmup=1, min_repeats=4, max_repeats=4,
                                      keys={"b": lambda v: v + 100}, first_outputs=firsts)
    assert isinstance(out["a"], harness.Timing) and out["a"].repeats == 4
    assert 1.0 <= out["a"].median_ms < out["b"].median_ms and out["b"].median_ms >= 4.0
    assert isinstance(out["c"], RuntimeError) and "call 3" in str(out["c"])
    assert order[3:9] == ["a", "b", "c", "a", "b", "c"]  # after the warm-ups: one call of each per round
    assert firsts == {"b": 100}  # the first output of b, through its key


def test_floors():
    bw, gemm_ms = 1e10, 2.0
    dec = _case("decode", "binary")
    ms, what = harness.floor_for(dec, None, bw)
    N, d, k = dec.N, dec.d, dec.k
    assert ms == pytest.approx((N * k * d * 4 + N * d * 4 + N * k * 12) / bw * 1e3)
    assert "bandwidth" in what
    assert harness.floor_for(_case("encode", "topk"), gemm_ms, None) == (gemm_ms, "GEMM x@W_enc.T (measured)")
    bae, _ = harness.floor_for(_case("step", "binary", "bae"), gemm_ms, bw)
    btc, _ = harness.floor_for(_case("step", "binary", "btc"), gemm_ms, bw)
    assert gemm_ms < bae < btc
    assert set(harness.floor_runners(_case("step", "topk", "btc"), DEVICE, 0)) == {"gemm", "copy"}
    assert set(harness.floor_runners(_case("backward", "topk"), DEVICE, 0)) == {"copy"}
    assert harness.copy_bandwidth(DEVICE, nbytes=8 * 2**20, min_time_s=0.0) > 1e8  # > 0.1 GB/s


def test_suite_results_complete(benchmark, tmp_path):
    suite_cases = [_case("encode", "binary"), _case("decode", "topk"), _case("backward", "binary"),
                   _case("step", "topk", "bae")]
    impls = harness.default_impls(DEVICE)
    assert "reference" in impls and set(baselines.BASELINES) <= set(impls)
    impls = [n for n in impls if n != "compile"]  # compile: test_compile_baseline
    results = benchmark(harness.run_suite, suite_cases, impls, DEVICE, options=FAST, log=None, preset="test")
    runs = [(c.name, n) for c in suite_cases for n in impls if baselines.make_impl(n).supports(c)]
    assert [(r["case"], r["impl"]) for r in results.rows] == runs
    assert ("encode/binary", baselines.FORMULATION) in {(c.split(" ")[0], n) for c, n in runs}
    assert ("decode/topk", baselines.FORMULATION) not in {(c.split(" ")[0], n) for c, n in runs}
    assert ("step/bae-topk", "saelens") in {(c.split(" ")[0], n) for c, n in runs}
    for r in results.rows:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] and r["repeats"] >= 2
        assert r["floor_ms"] > 0 and r["x_floor"] == pytest.approx(r["median_ms"] / r["floor_ms"])
        if r["op"] in ("encode", "step"):  # the floor's parts, measured in the same rounds
            assert r["gemm_ms"] > 0 and r["gemm_tflops"] > 0
        if r["op"] != "encode":
            assert r["copy_gbs"] > 0
        assert r["speedup_vs_eager"] > 0 and r["speedup_vs_sparsify"] > 0
        assert (r.get("speedup_vs_formulation") is not None) == (r["variant"] == "binary")
        assert r["peak_mb"] is not None and r["peak_mb"] >= 0 and r["extra_mb"] == r["peak_mb"]  # profiler, CPU
        stand_in = r["impl"] in ("sparsify", "saelens") and r["variant"] == "binary"
        assert (r.get("note") == "topk stand-in") == stand_in
        if r["op"] in ("encode", "decode") and r["impl"] != "eager":
            if stand_in:
                assert "check_vs" not in r
            else:
                assert r["check_vs"] == "eager" and r["max_rel_diff"] < 1e-5
    assert results.by(suite_cases[0].name, "eager")["speedup_vs_eager"] == 1.0
    meta = results.meta
    for key in ("device", "torch", "triton", "commit", "memory_note", "date_utc", "load_avg_start"):
        assert meta.get(key) not in (None, ""), key
    assert meta["torch"] == torch.__version__ and "torch.profiler" in meta["memory_note"]

    json_path, csv_path = harness.write_results(results, tmp_path, "cpu-test")
    data = json.loads(json_path.read_text())
    assert data["meta"]["commit"] == meta["commit"] and len(data["rows"]) == len(results.rows)
    assert {"N", "d", "M", "k", "dtype", "op", "variant", "median_ms"} <= data["rows"][0].keys()
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(results.rows)
    assert rows[0]["device"] == meta["device"] and rows[0]["torch"] == meta["torch"]
    assert rows[0]["commit"] == meta["commit"] and int(rows[0]["N"]) == TINY["N"]
    assert float(rows[0]["median_ms"]) > 0
    table = harness.format_table(results)
    assert table.count("\n") == len(results.rows) + 1 and "sparsify (topk stand-in)" in table


def test_compile_baseline(benchmark):
    case = _case("encode", "binary")
    one_at_a_time = harness.Options(**{**vars(FAST), "interleave": False})  # the GPU default, checked here
    results = benchmark(harness.run_suite, [case], ["eager", "compile"], DEVICE, options=one_at_a_time, log=None)
    row = results.by(case.name, "compile")
    assert row["status"] == "ok" and row["median_ms"] > 0
    assert row["check_vs"] == "eager" and row["max_rel_diff"] < 1e-5


def test_failures_are_recorded_not_raised(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    real = baselines.make_impl

    def make(name):
        impl = real(name)
        if name == "sparsify":
            impl.encode = broken
        return impl

    monkeypatch.setattr(baselines, "make_impl", make)
    case = _case("encode", "topk")
    one_at_a_time = harness.Options(**{**vars(FAST), "interleave": False})
    results = harness.run_suite([case], ["eager", "sparsify"], DEVICE, options=one_at_a_time, log=None)
    assert results.meta["options"]["interleave"] is False
    assert results.by(case.name, "eager")["status"] == "ok"
    assert "kernel exploded" in results.by(case.name, "sparsify")["status"]


def test_bad_requests():
    with pytest.raises(ValueError, match="unknown implementation"):
        harness.run_suite([_case("encode", "binary")], ["eagre"], DEVICE, options=FAST, log=None)
    with pytest.raises(ValueError, match="op must be"):
        Case("encoder", "binary", **TINY)
    with pytest.raises(ValueError, match="coder"):
        Case("step", "binary", **TINY)
    with pytest.raises(ValueError, match="bad shape"):
        Case("encode", "binary", **{**TINY, "k": 1000})
    with pytest.raises(ValueError, match="unknown preset"):
        cases.preset("huge")


def test_presets_cover_the_paper_shapes():
    paper = cases.preset("paper")
    shapes = {(c.d, c.M) for c in paper}
    assert shapes == {(576, 18432), (576, 36864), (2048, 65536), (2048, 131072)}
    assert {c.k for c in paper} == {16, 32, 64, 128} and max(c.N for c in paper) == 65536
    assert {c.dtype for c in paper} == {"bfloat16"} and {c.dtype for c in cases.preset("cpu")} == {"float32"}
    assert {(c.coder, c.variant) for c in paper if c.op == "step"} == {(a, b) for a in cases.CODERS for b in cases.VARIANTS}
    kept = cases.filter_cases(paper, ops=["encode"], ks=[32], models=["1.7b"], N=1024)
    assert kept and all(c.op == "encode" and c.k == 32 and c.d == 2048 and c.N == 1024 for c in kept)
    assert len(kept) == len(set(kept))


def test_cli(tmp_path, capsys):
    assert cli.main(["bench", "--preset", "cpu-quick", "--ops", "decode", "--list"]) == 0
    listed = capsys.readouterr().out.split("\n")
    assert [line for line in listed if line] == [c.name for c in cases.preset("cpu-quick") if c.op == "decode"]
    argv = ["bench", "--preset", "cpu-quick", "--ops", "decode", "--variants", "binary", "--N", "64",
            "--impls", "eager,sparsify", "--min-time", "0", "--min-repeats", "2", "--max-repeats", "2",
            "--no-memory", "--out-dir", str(tmp_path), "--name", "cli-test"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| decode/binary N=64" in out and "cli-test.json" in out
    data = json.loads((tmp_path / "cli-test.json").read_text())
    assert [r["impl"] for r in data["rows"]] == ["eager", "sparsify"] and data["meta"]["preset"] == "cpu-quick"
    assert cli.main(["bench", "--preset", "cpu-quick", "--ops", "nothing"]) == 2
    assert cli.main(["bench", "--preset", "cpu-quick", "--ops", "decode", "--impls", "warp-drive", "--no-write"]) == 2


def test_random_codes_are_distinct_per_row():
    g = torch.Generator().manual_seed(0)
    idx, acts = cases.random_codes(500, 1000, 32, True, torch.float32, DEVICE, g)
    assert idx.shape == acts.shape == (500, 32) and idx.min() >= 0 and idx.max() < 1000
    assert all(len(set(row.tolist())) == 32 for row in idx)
    assert set(acts.unique().tolist()) == {0.0, 1.0}
    assert math.isclose(float(acts.mean()), 0.9, abs_tol=0.02)


@pytest.mark.gpu
def test_gpu_suite_bf16():
    """On a GPU: every available backend and baseline in bf16, CUDA-event timing, peak memory, rotation."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda")
    small = dict(N=2048, d=64, M=4096, k=16, dtype="bfloat16")
    suite_cases = [Case("encode", "binary", **small), Case("decode", "binary", **small),
                   Case("backward", "topk", **small), Case("step", "binary", coder="btc", **small)]
    impls = harness.default_impls(device)
    results = harness.run_suite(suite_cases, impls, device, options=FAST, log=None)
    assert results.meta["device_type"] == "cuda" and results.meta["l2_mib"] > 0
    for r in results.rows:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["floor_ms"] > 0
        assert r["peak_mb"] > 0 and r["extra_mb"] >= 0 and r["copies"] >= 1
        if r.get("check_vs"):  # bf16 pre-activations in eager vs fp32 in the fused kernels
            assert r["max_rel_diff"] < 5e-2
