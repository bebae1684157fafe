"""The layer-streaming engine: the layer-local trace, streamed layers (artifact, spilled activations, resume),
the cache policy (resident and streamed give the same bit map and report), sequential GPTQ, ``auto`` end to end,
and peak memory on a 16-layer checkpoint larger than what the run may hold (measured in a subprocess)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mopeq_core.config import Budget, QuantizeConfig
from mopeq_core.errors import CancelledError, UserInputError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "mopeq-tiny-moe"
EVAL = REPO / "data" / "eval.txt"
CALIB = REPO / "data" / "calib.jsonl"
sys.path.insert(0, str(REPO / "bench"))

torch.set_num_threads(1)


def _spearman(a, b) -> float:
    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _eval_ppl(model_or_dir, n=8, seq=64) -> float:
    from mopeq_core.data import read_texts, token_samples
    from mopeq_core.evaluate import mean_token_loss
    from mopeq_core.loading import load_tokenizer

    ids = token_samples(load_tokenizer(SHIPPED), read_texts(EVAL), n, seq)
    return math.exp(mean_token_loss(model_or_dir, ids))


# ---- the layer-local sensitivity against independent references ------------------------------------------------
def _tiny_model(name: str):
    import transformers
    from tiny_models import ARCHS, tokenizer

    torch.manual_seed(0)
    cfg = ARCHS[name].make_config(len(tokenizer()))
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager",
                                                         experts_implementation="eager")


def _expert_fn(g, e, x, w):
    """F(in-weights..., out-weight) = w * expert_e(x) for the dense references."""
    names = [p.name for p in g.projections if p.role == "in"]
    out = next(p.name for p in g.projections if p.role == "out")

    def f(*ws):
        h = g.intermediate(e, x, weights=dict(zip(names, ws[:-1])))
        return torch.nn.functional.linear(h, ws[-1]) * w[:, None]
    return f, [g.weight(e, n).detach().clone() for n in names] + [g.weight(e, out).detach().clone()]


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "standin"])
def test_layer_hessian_trace_equals_twice_the_squared_jacobian(arch):
    """tr(H_e) of the routed-output reconstruction error at W0 is 2 ||dF/dW_e||_F^2 (fused, transposed with biases
    and a clamped interleaved gate, and ModuleList experts)."""
    from mopeq_core.moe import find_expert_groups
    from mopeq_core.sensitivity import layer_hessian_trace

    if arch == "standin":
        from tiny_models import ARCHS, STANDIN, StandInConfig, StandInForCausalLM, register_standin, tokenizer

        register_standin()
        base = ARCHS["deepseek_v2"].make_config(len(tokenizer()))
        torch.manual_seed(0)
        model = StandInForCausalLM(StandInConfig(**{k: v for k, v in base.to_dict().items()
                                                     if k not in ("model_type", "architectures")}))
        assert STANDIN.num_experts == 4
    else:
        model = _tiny_model(arch)
    g = find_expert_groups(model)[0]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, g.projections[0].in_features, generator=gen)
    w = torch.rand(6, generator=gen) + 0.2
    for e in (0, g.num_experts - 1):
        f, ws = _expert_fn(g, e, x, w)
        jac = torch.autograd.functional.jacobian(f, tuple(ws))
        dense = 2.0 * sum(float(j.double().square().sum()) for j in jac)
        got = layer_hessian_trace(g, e, x, w if g.kind == "fused" else None)
        if g.kind != "fused":  # ModuleList experts are scored without routing weights
            f1, _ = _expert_fn(g, e, x, torch.ones(6))
            dense = 2.0 * sum(float(j.double().square().sum())
                              for j in torch.autograd.functional.jacobian(f1, tuple(ws)))
        assert got == pytest.approx(dense, rel=1e-4), (arch, e)


def test_layer_hessian_trace_is_the_second_derivative_of_the_reconstruction_error():
    """Against the dense Hessian of L(W) = ||F(W) - F(W0)||^2 taken by double differentiation (tiny expert)."""
    import transformers

    from mopeq_core.moe import find_expert_groups
    from mopeq_core.sensitivity import layer_hessian_trace

    cfg = transformers.MixtralConfig(vocab_size=16, hidden_size=6, intermediate_size=4, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,
                                     num_experts_per_tok=1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float64,
                                                          experts_implementation="eager")
    g = find_expert_groups(model)[0]
    x = torch.randn(5, 6, dtype=torch.float64)
    w = torch.rand(5, dtype=torch.float64) + 0.5
    f, ws = _expert_fn(g, 1, x, w)
    y0 = f(*ws).detach()
    sizes = [t.numel() for t in ws]

    def loss(flat):
        parts = flat.split(sizes)
        return (f(*[p.view_as(t) for p, t in zip(parts, ws)]) - y0).square().sum()

    H = torch.autograd.functional.hessian(loss, torch.cat([t.reshape(-1) for t in ws]))
    assert layer_hessian_trace(g, 1, x, w) == pytest.approx(float(H.diagonal().sum()), rel=1e-4)


# ---- building blocks --------------------------------------------------------------------------------------------
def test_checkpoint_reader_counts_bytes_and_reads_every_dtype(tmp_path):
    from safetensors.torch import save_file

    from mopeq_core.streaming import SafetensorsCheckpoint

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
               "d": torch.randn(2, 2).half(), "e": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ck = SafetensorsCheckpoint(tmp_path)
    header = ck.bytes_read
    for k, v in tensors.items():
        assert torch.equal(ck.read(k), v)
    assert ck.bytes_read - header == sum(v.numel() * v.element_size() for v in tensors.values())
    assert ck.bytes_read == ck.checkpoint_bytes == (tmp_path / "model.safetensors").stat().st_size


def test_batched_gptq_matches_the_per_expert_quantizer():
    from mopeq_core.gptq_batched import gptq_batched
    from mopeq_core.quantize import QuantSpec, quantization_error, quantize_gptq

    gen = torch.Generator().manual_seed(0)
    E, out, inp = 3, 24, 48
    W = torch.randn(E, out, inp, generator=gen)
    X = torch.randn(E, 200, inp, generator=gen)
    H = X.transpose(1, 2) @ X
    H[1] = 0  # an expert that saw no tokens: RTN, as quantize_gptq does
    H[2, :, 5] = 0
    H[2, 5, :] = 0  # a dead input
    for bits in (2, 4):
        spec = QuantSpec(bits, 16)
        got = gptq_batched(W, H, spec)
        for e in range(E):
            ref = quantize_gptq(W[e], H[e], spec)
            same = float((got[e].codes == ref.codes).double().mean())
            assert same > 0.995, (bits, e, same)
            assert quantization_error(W[e], got[e]) == pytest.approx(quantization_error(W[e], ref), rel=1e-3)


def test_streamed_layers_refuse_engine_formats_before_compute(tmp_path):
    from mopeq_core.engine import run

    with pytest.raises(UserInputError, match="needs the whole model in memory"):
        run(QuantizeConfig(model=str(SHIPPED), format="gguf-overrides", granularity="layer", low_memory=True),
            tmp_path)


# ---- a tiny Mixtral: streamed layers, spilled activations, resume ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import build_model

    return build_model("mixtral", tmp_path_factory.mktemp("lm-mixtral"))


def _tiny_cfg(model_dir, **over) -> QuantizeConfig:
    base = dict(model=str(model_dir), budget=Budget(avg_bits=2.5), group_size=16, calib_samples=6, seq_len=32,
                sensitivity="hutchinson", probes=3, quantizer="gptq", calib_file=str(CALIB), eval_file=str(EVAL),
                eval_samples=4, low_memory=True)
    base.update(over)
    return QuantizeConfig(**base)


def test_tiny_streamed_gptq_run_with_spilled_activations_matches_its_artifact(tiny_dir, tmp_path):
    from mopeq_core.data import read_texts, token_samples
    from mopeq_core.engine import run
    from mopeq_core.evaluate import mean_token_loss
    from mopeq_core.loader import load_quantized
    from mopeq_core.loading import load_model, load_tokenizer

    r = run(_tiny_cfg(tiny_dir), tmp_path / "out", spill_bytes=0)  # every kept activation goes to disk
    rep = r.report
    assert rep["engine"]["layers"] == "streamed"
    # one calibration stream, one forward and one backward stream for the probes, one quantization stream
    assert rep["engine"]["passes"] == {"calibrate": 1, "sensitivity-forward": 1, "sensitivity-backward": 1,
                                       "quantize": 1}
    assert rep["engine"]["bytes_read"] <= 4.2 * rep["engine"]["checkpoint_bytes"]
    assert set(rep["stages"]) == {"fetch", "calibrate", "sensitivity", "allocate", "quantize", "evaluate",
                                  "export"}
    assert all("peak_rss_mb" in s for s in rep["stages"].values())
    assert r.bitmap["sensitivity"]["method"] == "hutchinson"  # the score asked for, not a layer-local stand-in
    assert r.bitmap["expert_bytes"] <= rep["allocation"]["budget_expert_bytes"]
    assert rep["quantization"]["sequential"] is True
    assert not (tmp_path / "out" / ".mopeq-state").exists()
    ids = token_samples(load_tokenizer(tiny_dir), read_texts(EVAL), 4, 32)
    fp = math.exp(mean_token_loss(load_model(tiny_dir), ids))
    q = math.exp(mean_token_loss(load_quantized(tmp_path / "out"), ids))
    assert rep["perplexity"]["fp_perplexity"] == pytest.approx(fp, rel=1e-5)
    assert rep["perplexity"]["quantized_perplexity"] == pytest.approx(q, rel=1e-4)
    assert (tmp_path / "out" / "README.md").is_file()


def test_cancel_then_resume_after_the_last_finished_stage(tiny_dir, tmp_path):
    from mopeq_core.engine import run

    cfg = _tiny_cfg(tiny_dir, quantizer="rtn", eval_file=None)
    clean = run(cfg, tmp_path / "clean")
    seen = []

    def cancel():
        return "allocate" in seen

    with pytest.raises(CancelledError):
        run(cfg, tmp_path / "out", state_dir=tmp_path / "st", on_event=lambda ev: seen.append(ev.stage),
            should_cancel=cancel)
    resumed = run(cfg, tmp_path / "out", state_dir=tmp_path / "st")
    # calibration and sensitivity were not run again
    assert "calibrate" not in resumed.report["engine"]["passes"]
    assert "sensitivity-backward" not in resumed.report["engine"]["passes"]
    assert [e["bits"] for L in resumed.bitmap["layers"] for e in L["experts"]] == \
        [e["bits"] for L in clean.bitmap["layers"] for e in L["experts"]]
    assert [e["sensitivity"] for L in resumed.bitmap["layers"] for e in L["experts"]] == \
        pytest.approx([e["sensitivity"] for L in clean.bitmap["layers"] for e in L["experts"]])


def test_an_unknown_expert_layout_is_refused_with_the_keys(tiny_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from mopeq_core.engine import run
    from mopeq_core.errors import UnsupportedArchitectureError

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd = {k.replace(".w1.weight", ".fc_in.weight") if ".layers.1." in k else k: v for k, v in sd.items()}
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedArchitectureError, match=r"layers\.1\.mlp\.experts\.gate_up_proj.*fc_in"):
        run(_tiny_cfg(bad, quantizer="rtn", eval_file=None), tmp_path / "out")


def test_sequential_gptq_takes_each_layer_inputs_from_the_quantized_layers_before_it(tiny_dir, tmp_path):
    """The inputs layer l's GPTQ Hessians come from are the outputs of the already-quantized layers 0..l-1:
    recomputed here from the artifact (dequantized experts) with the model's own forward."""
    from mopeq_core.data import read_texts, token_samples
    from mopeq_core.engine import EngineHooks, run
    from mopeq_core.loader import load_quantized
    from mopeq_core.loading import load_model, load_tokenizer

    seen = {}
    hooks = EngineHooks(gptq_inputs=lambda i, key, x: seen.setdefault((i, key), x.detach().clone()))
    cfg = _tiny_cfg(tiny_dir, sensitivity="frequency", eval_file=None, low_memory=False)
    r = run(cfg, tmp_path / "out", hooks=hooks)
    assert r.report["quantization"]["sequential"] is True
    q_model, fp_model = load_quantized(tmp_path / "out"), load_model(tiny_dir)
    ids = token_samples(load_tokenizer(tiny_dir), read_texts(CALIB), 6, 32)[:8]
    with torch.no_grad():
        q_states = q_model(input_ids=ids, output_hidden_states=True).hidden_states
        fp_states = fp_model(input_ids=ids, output_hidden_states=True).hidden_states
    n_layers = len(q_states) - 1
    assert {i for i, _ in seen} == set(range(n_layers))
    for i in range(n_layers):
        got = seen[(i, ("calib", 0))]
        assert torch.allclose(got, q_states[i], rtol=1e-4, atol=1e-5), i
        if i > 0:  # and not the full-precision ones
            assert not torch.allclose(got, fp_states[i], rtol=1e-4, atol=1e-5), i


def test_auto_cross_fits_its_candidates_end_to_end(tiny_dir, tmp_path):
    """auto: every candidate scored on one half and validated on the other, every calibration sequence once;
    the chosen method has the lowest validation loss; paired standard errors are recorded."""
    from mopeq_core.engine import AUTO_CANDIDATES, run

    cfg = _tiny_cfg(tiny_dir, sensitivity="auto", quantizer="rtn", calib_samples=16, probes=2, low_memory=False)
    r = run(cfg, tmp_path / "out")
    v = r.report["candidate_validation"]
    assert set(v["loss"]) == set(AUTO_CANDIDATES)
    assert v["sequences"] == 16 and v["folds"] == 2
    best = min(v["loss"], key=v["loss"].get)
    assert r.report["selected_sensitivity"] == best == r.bitmap["sensitivity"]["method"]
    assert v["paired_vs_best"][best]["mean_diff"] == 0.0
    for m in AUTO_CANDIDATES:
        assert v["paired_vs_best"][m]["std_err"] is not None and v["paired_vs_best"][m]["mean_diff"] >= -1e-12
    assert r.report["engine"]["passes"]["auto-validation"] == 1
    assert r.bitmap["sensitivity"]["selected_by"] == "auto"


def test_layer_projection_granularity_end_to_end(tiny_dir, tmp_path):
    """One width per (layer, stored projection), from the engine's per-projection errors and costs: every expert of
    a layer shares each projection's width, the packed artifact holds those widths and its perplexity is the
    report's."""
    from mopeq_core.engine import run
    from mopeq_core.loader import load_quantized

    r = run(_tiny_cfg(tiny_dir, sensitivity="frequency", granularity="layer-projection", low_memory=False),
            tmp_path / "out")
    seen = set()
    for layer in r.bitmap["layers"]:
        per_proj = {}
        for ex in layer["experts"]:
            for proj, w in ex["projections"].items():
                per_proj.setdefault(proj, set()).add(w)
        assert all(len(ws) == 1 for ws in per_proj.values()), per_proj
        seen |= {w for ws in per_proj.values() for w in ws}
    assert len(seen) > 1  # 2.5 mean bits: a mix of widths across projections
    assert r.bitmap["expert_bytes"] <= r.report["allocation"]["budget_expert_bytes"]
    assert r.bitmap["avg_bits"] <= 2.5 + 1e-9
    from mopeq_core.data import read_texts, token_samples
    from mopeq_core.evaluate import mean_token_loss
    from mopeq_core.loading import load_tokenizer

    ids = token_samples(load_tokenizer(tiny_dir), read_texts(EVAL), 4, 32)
    q = math.exp(mean_token_loss(load_quantized(tmp_path / "out"), ids))
    assert r.report["perplexity"]["quantized_perplexity"] == pytest.approx(q, rel=1e-4)


def test_an_infeasible_budget_is_refused_before_any_compute(tiny_dir, tmp_path):
    from mopeq_core.engine import run
    from mopeq_core.errors import InfeasibleBudgetError

    stages = []
    with pytest.raises(InfeasibleBudgetError, match="infeasible"):
        run(_tiny_cfg(tiny_dir, budget=Budget(gb=1e-6)), tmp_path / "o", on_event=lambda ev: stages.append(ev.stage))
    assert set(stages) == {"fetch"}


# ---- the cache policy: resident and streamed layers give the same run ----------------------------------------------
@pytest.fixture(scope="module")
def shipped_runs(tmp_path_factory):
    from mopeq_core.engine import run

    base = dict(model=str(SHIPPED), budget=Budget(avg_bits=2.5), group_size=32, calib_samples=8, seq_len=64,
                sensitivity="hutchinson", quantizer="gptq", probes=4, calib_file=str(CALIB), eval_file=str(EVAL),
                eval_samples=8)
    streamed = run(QuantizeConfig(**base, low_memory=True), tmp_path_factory.mktemp("ship-streamed"))
    resident = run(QuantizeConfig(**base), tmp_path_factory.mktemp("ship-resident"))
    return streamed, resident


def _keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k not in ("stages", "details", "config", "passes", "non_expert_by_component"):
            out |= _keys(v, prefix + k + ".")
    return out


def test_resident_and_streamed_layers_give_the_same_bit_map_and_report_keys(shipped_runs):
    from mopeq_core.loader import load_quantized

    streamed, resident = shipped_runs
    assert streamed.report["engine"]["layers"] == "streamed" and resident.report["engine"]["layers"] == "resident"
    assert [e["bits"] for L in streamed.bitmap["layers"] for e in L["experts"]] == \
        [e["bits"] for L in resident.bitmap["layers"] for e in L["experts"]]
    assert [e["sensitivity"] for L in streamed.bitmap["layers"] for e in L["experts"]] == \
        pytest.approx([e["sensitivity"] for L in resident.bitmap["layers"] for e in L["experts"]], rel=1e-5)
    assert _keys(streamed.report) == _keys(resident.report)
    assert streamed.report["perplexity"]["quantized_perplexity"] == \
        pytest.approx(resident.report["perplexity"]["quantized_perplexity"], rel=1e-5)
    rep = streamed.report
    assert rep["engine"]["bytes_read"] <= 4.2 * rep["engine"]["checkpoint_bytes"]
    q = _eval_ppl(load_quantized(streamed.out_dir))
    assert math.isfinite(q)


# ---- a 12-layer checkpoint: peak memory bounded by a few layers -------------------------------------------------
_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    torch.set_num_threads(1)
    # the runtime the run needs, imported before the baseline is taken
    import transformers.models.mixtral.modeling_mixtral, transformers.core_model_loading  # noqa
    import transformers.conversion_mapping, mopeq_core.engine, mopeq_core.allocate, mopeq_core.card  # noqa
    import mopeq_core.sensitivity, mopeq_core.streaming  # noqa
    from mopeq_core.config import Budget, QuantizeConfig
    from mopeq_core.engine import run

    def peak_mb():  # VmHWM: ru_maxrss would carry the parent's peak across exec
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024

    base = peak_mb()
    cfg = QuantizeConfig(model=sys.argv[1], budget=Budget(avg_bits=3.0), bits=(2, 4), quantizer="rtn",
                         group_size=32, sensitivity="hutchinson", probes=2, calib_samples=4, seq_len=64,
                         calib_file=sys.argv[3], eval_file=sys.argv[4], eval_samples=2, low_memory=True)
    t0 = time.time()
    r = run(cfg, sys.argv[2])
    print("RESULT " + json.dumps({"baseline_peak_mb": base, "peak_mb": peak_mb(), "seconds": time.time() - t0,
                                  "report": r.report}))
""")
def test_twelve_layer_checkpoint_peak_rss_is_bounded_by_layers_not_the_model(tmp_path):
    from synthetic_moe import checkpoint_params, write_synthetic_mixtral

    # Mixtral's proportions (ffn = 2 x hidden), scaled down: the bound is in decoder layers, not in the model
    shape = dict(layers=12, hidden=512, heads=8, kv_heads=8, ffn=1024, experts=8, vocab=4096)
    ck = write_synthetic_mixtral(tmp_path / "synthetic-16l", dtype=torch.float32, **shape)
    fp32_bytes = checkpoint_params(**shape)["total"] * 4
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(ck), str(tmp_path / "out"), str(CALIB), str(EVAL)],
                          capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    increase_mb = res["peak_mb"] - res["baseline_peak_mb"]
    rep = res["report"]
    print({k: (v["seconds"], v["peak_rss_increase_mb"]) for k, v in rep["stages"].items()})
    eng = rep["engine"]
    print(f"\n12-layer synthetic MoE: float32 size {fp32_bytes / 2**20:.0f} MiB, checkpoint "
          f"{eng['checkpoint_bytes'] / 2**20:.0f} MiB; streamed run peak RSS increase {increase_mb:.0f} MiB "
          f"(baseline {res['baseline_peak_mb']:.0f} MiB), {res['seconds']:.1f} s, bytes read / checkpoint "
          f"{eng['bytes_read'] / eng['checkpoint_bytes']:.3f}, passes {eng['passes']}")
    for shard in ck.glob("*.safetensors"):
        shard.unlink()
    layer_bytes = checkpoint_params(**shape)["per_layer"] * 4
    # issue 11's bound: a few layers (one in float32 with its probe, gradient and product buffers), not the model
    assert increase_mb * 2**20 <= 8 * layer_bytes
    assert eng["bytes_read"] <= 4.2 * eng["checkpoint_bytes"]  # calibrate, two sensitivity streams, quantize
    assert eng["decoder_layers"] == 12
    assert math.isfinite(rep["perplexity"]["quantized_perplexity"])
