"""The CUDA path: both pipelines with ``--device cuda``, batched GPTQ and the layer-local trace on the GPU.

Marked ``requires_gpu`` (``make test`` deselects them) and skipped when torch sees no CUDA device.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mopeq_core.config import Budget, QuantizeConfig

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "data" / "eval.txt"
CALIB = REPO / "data" / "calib.jsonl"

pytestmark = [pytest.mark.requires_gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import build_model

    return build_model("mixtral", tmp_path_factory.mktemp("gpu-mixtral"))


def _cfg(model_dir, **over) -> QuantizeConfig:
    base = dict(model=str(model_dir), budget=Budget(avg_bits=2.5), group_size=16, calib_samples=8, seq_len=32,
                sensitivity="hutchinson", probes=4, quantizer="gptq", calib_file=str(CALIB), eval_file=str(EVAL),
                eval_samples=8)
    base.update(over)
    return QuantizeConfig(**base)


def _ppl(model, model_dir, device) -> float:
    from mopeq_core.data import read_texts, token_samples
    from mopeq_core.evaluate import mean_token_loss
    from mopeq_core.loading import load_tokenizer

    ids = token_samples(load_tokenizer(model_dir), read_texts(EVAL), 8, 32)
    return math.exp(mean_token_loss(model.to(device), ids))


def test_low_memory_on_cuda_agrees_with_cpu(tiny_dir, tmp_path):
    from mopeq_core.engine import run
    from mopeq_core.loader import load_quantized

    gpu = run(_cfg(tiny_dir, device="cuda", low_memory=True), tmp_path / "gpu")
    cpu = run(_cfg(tiny_dir, low_memory=True), tmp_path / "cpu")
    g, c = gpu.report, cpu.report
    assert g["low_memory"]["compute_dtype"] == "bfloat16"
    assert g["low_memory"]["experts_implementation"] in ("grouped_mm", "eager")
    assert all("peak_gpu_mb" in s for s in g["stages"].values())
    assert g["bytes_read"] == g["checkpoint_bytes"]
    # bfloat16 forwards: the full-precision perplexity agrees to bf16 accuracy
    assert g["perplexity"]["fp_perplexity"] == pytest.approx(c["perplexity"]["fp_perplexity"], rel=0.03)
    assert gpu.bitmap["expert_bytes"] <= g["allocation"]["budget_expert_bytes"]
    ppl = _ppl(load_quantized(tmp_path / "gpu", device="cuda"), tiny_dir, "cuda")
    assert ppl == pytest.approx(g["perplexity"]["quantized_perplexity"], rel=0.03)
    sg = torch.tensor([e["sensitivity"] for L in gpu.bitmap["layers"] for e in L["experts"]])
    sc = torch.tensor([e["sensitivity"] for L in cpu.bitmap["layers"] for e in L["experts"]])
    # bf16 activations feed the float32 trace (and may flip near-tied routing): the ranking must survive
    rg, rc = sg.argsort().argsort().double(), sc.argsort().argsort().double()
    rg, rc = rg - rg.mean(), rc - rc.mean()
    assert float((rg * rc).sum() / (rg.norm() * rc.norm())) > 0.8


def test_in_memory_pipeline_on_cuda(tiny_dir, tmp_path):
    from mopeq_core.engine import run
    from mopeq_core.loader import load_quantized

    r = run(_cfg(tiny_dir, device="cuda"), tmp_path / "out")
    assert math.isfinite(r.report["perplexity"]["quantized_perplexity"])
    assert all("peak_gpu_mb" in s for s in r.report["stages"].values())
    ppl = _ppl(load_quantized(tmp_path / "out", device="cuda"), tiny_dir, "cuda")
    assert ppl == pytest.approx(r.report["perplexity"]["quantized_perplexity"], rel=1e-3)


def test_batched_gptq_on_cuda_matches_the_cpu_quantizer():
    from mopeq_core.gptq_batched import gptq_batched
    from mopeq_core.quantize import QuantSpec, quantization_error, quantize_gptq

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4, 64, 256, generator=gen)
    X = torch.randn(4, 512, 256, generator=gen)
    H = X.transpose(1, 2) @ X
    for bits in (2, 3, 4):
        spec = QuantSpec(bits, 64)
        got = gptq_batched(W.cuda(), H.cuda(), spec)
        for e in range(4):
            ref = quantize_gptq(W[e], H[e], spec)
            assert float((got[e].codes.cpu() == ref.codes).double().mean()) > 0.99
            assert quantization_error(W[e], got[e]) == pytest.approx(quantization_error(W[e], ref), rel=1e-2)


def test_layer_hessian_trace_on_cuda_matches_cpu():
    import transformers

    from mopeq_core.moe import find_expert_groups
    from mopeq_core.sensitivity import layer_hessian_trace

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
    x = torch.randn(40, 32)
    w = torch.rand(40)
    ref = layer_hessian_trace(find_expert_groups(model)[0], 1, x, w)
    model.cuda()
    got = layer_hessian_trace(find_expert_groups(model)[0], 1, x.cuda(), w.cuda())
    assert got == pytest.approx(ref, rel=1e-4)


def test_gpu_bench_small_scale_runs(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench/gpu_bench.py", "--scale", "small", "--device", "cuda",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["ok"] and res["runs"][0]["stages"]
