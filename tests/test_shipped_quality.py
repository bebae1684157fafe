"""Quality on the shipped trained model, measured from the loaded artifacts (not from the in-process model)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mopeq_core import engine
from mopeq_core.config import Budget, QuantizeConfig
from mopeq_core.data import read_texts, token_samples
from mopeq_core.evaluate import mean_token_loss
from mopeq_core.loader import load_quantized
from mopeq_core.loading import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "mopeq-tiny-moe"
EVAL = REPO / "data" / "eval.txt"


def _run(tmp: Path, quantizer: str) -> tuple[float, dict]:
    cfg = QuantizeConfig(model=str(MODEL), budget=Budget(avg_bits=2.5), quantizer=quantizer, group_size=64,
                         sensitivity="input-hessian", calib_samples=16, seq_len=128, eval_file=str(EVAL),
                         eval_samples=24)
    result = engine.run(cfg, tmp / quantizer)
    model = load_quantized(tmp / quantizer)
    ev = token_samples(load_tokenizer(MODEL), read_texts(EVAL), 24, 128)
    return math.exp(mean_token_loss(model, ev)), result.report


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shipped")
    return {q: _run(tmp, q) for q in ("rtn", "gptq")}


def test_gptq_beats_rtn_at_2_5_bits_from_loaded_artifacts(runs):
    (ppl_rtn, rep_rtn), (ppl_gptq, rep_gptq) = runs["rtn"], runs["gptq"]
    # the loaded artifact reproduces the perplexity the pipeline reported
    assert ppl_rtn == pytest.approx(rep_rtn["perplexity"]["quantized_perplexity"], rel=1e-4)
    assert ppl_gptq == pytest.approx(rep_gptq["perplexity"]["quantized_perplexity"], rel=1e-4)
    fp = rep_gptq["perplexity"]["fp_perplexity"]
    assert fp < ppl_gptq < ppl_rtn, (fp, ppl_gptq, ppl_rtn)
    # same budget for both
    assert rep_rtn["sizes"]["expert_bytes"] <= rep_rtn["allocation"]["budget_expert_bytes"]
    assert rep_gptq["sizes"]["expert_bytes"] <= rep_gptq["allocation"]["budget_expert_bytes"]
