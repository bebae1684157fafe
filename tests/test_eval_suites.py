"""Evaluation suites on local tasks (no network): lm-evaluation-harness on the shipped text MoE before and after
quantization, lmms-eval on a tiny Qwen3-VL-MoE; both on the in-memory model objects."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch

from mopeq_core import engine
from mopeq_core.config import Budget, QuantizeConfig
from mopeq_core.data import read_records
from mopeq_core.eval_suites import (
    EvalSuiteError,
    caption_match_docs,
    compare,
    next_line_docs,
    parse_suites,
    run_suites,
)
from mopeq_core.loader import load_quantized
from mopeq_core.loading import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "mopeq-tiny-moe"
EVAL_TXT = REPO / "data" / "eval.txt"
VLM_EVAL = REPO / "data" / "vlm" / "eval.jsonl"
LM_SUITE = "lm-eval:mopeq_next_line,mopeq_text_ppl"
VLM_SUITE = "lmms-eval:mopeq_caption_match"
PIPELINE_HAS_SUITES = "eval_suites" in QuantizeConfig.__dataclass_fields__


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_suite_specs_are_parsed_and_checked():
    suites = parse_suites(["lm-eval:a,b", "lmms_eval:c", "lm-eval:b,d"])
    assert [(s.harness, s.tasks) for s in suites] == [("lm-eval", ("a", "b", "d")), ("lmms-eval", ("c",))]
    for bad in ("helm:x", "lm-eval", "lm-eval:", "x"):
        with pytest.raises(EvalSuiteError):
            parse_suites([bad])


def test_local_task_documents_are_deterministic_and_correct():
    text = EVAL_TXT.read_text()
    docs = next_line_docs(text, n=20)
    assert docs == next_line_docs(text, n=20) and len(docs) == 20
    lines = text.splitlines()
    for d in docs:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        true = d["choices"][d["label"]]
        assert true in lines  # the true continuation is a real line of the text
    caps = caption_match_docs(read_records(VLM_EVAL))
    assert len(caps) == len(read_records(VLM_EVAL))
    for d in caps:
        assert Path(d["image"]).is_file() and len(d["choices"]) == 4
    with pytest.raises(EvalSuiteError):
        next_line_docs("too short\n")


def _flat(res: dict, key: str) -> dict:
    return {t: {m: v[key] for m, v in ms.items()} for t, ms in res.items()}


def test_lm_eval_on_the_shipped_model_before_and_after_quantization(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval[hf]==0.4.13')")
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip("models/mopeq-tiny-moe is not trained yet (scripts/train_tiny_moe.py)")
    kw = {"model": str(SHIPPED), "budget": Budget(avg_bits=2.5), "sensitivity": "frequency", "quantizer": "rtn",
          "group_size": 32, "calib_samples": 8, "seq_len": 64, "eval_file": str(EVAL_TXT), "eval_samples": 4}
    if PIPELINE_HAS_SUITES:
        kw.update(eval_suites=(LM_SUITE,), eval_suite_limit=24)
    result = engine.run(QuantizeConfig(**kw), tmp_path)
    tok = load_tokenizer(SHIPPED)
    quantized = run_suites(load_quantized(tmp_path), tok, None, [LM_SUITE], eval_file=EVAL_TXT, limit=24)
    if PIPELINE_HAS_SUITES:
        table = result.report["eval_suites"]
        fp = _flat(table, "fp")
        # the stage ran on the in-memory fake-quantized model; the packed artifact computes the same numbers
        for task, metrics in _flat(table, "quantized").items():
            for m, v in metrics.items():
                assert quantized[task][m] == pytest.approx(v, rel=1e-4, abs=1e-6), (task, m)
    else:
        fp = run_suites(load_model(SHIPPED), tok, None, [LM_SUITE], eval_file=EVAL_TXT, limit=24)
    assert set(fp) == set(quantized) == {"lm-eval/mopeq_next_line", "lm-eval/mopeq_text_ppl"}
    assert 0.0 <= fp["lm-eval/mopeq_next_line"]["acc"] <= 1.0
    # the trained model compresses held-out text of its domain: uniform guessing over its 4096 tokens costs
    # ~3.3 bits per byte (the untrained model's level); the shipped model is near 1.6
    assert fp["lm-eval/mopeq_text_ppl"]["bits_per_byte"] < 3.0
    for res in (fp, quantized):
        ppl = res["lm-eval/mopeq_text_ppl"]
        assert math.isfinite(ppl["bits_per_byte"]) and ppl["byte_perplexity"] > 1
    # 2.5-bit experts cost some likelihood on held-out text
    assert quantized["lm-eval/mopeq_text_ppl"]["bits_per_byte"] >= fp["lm-eval/mopeq_text_ppl"]["bits_per_byte"]
    table = compare(fp, quantized)
    assert table["lm-eval/mopeq_next_line"]["acc"]["delta"] == pytest.approx(
        quantized["lm-eval/mopeq_next_line"]["acc"] - fp["lm-eval/mopeq_next_line"]["acc"])


def test_lmms_eval_on_a_tiny_vlm_before_and_after_quantization(tmp_path):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'lmms-eval==0.7.3')")
    import vlm_models as vm

    src = vm.build_qwen3_vl_moe(tmp_path / "models")
    if PIPELINE_HAS_SUITES and "load_samples" in inspect.getsource(engine):
        cfg = QuantizeConfig(model=str(src), budget=Budget(avg_bits=2.5), sensitivity="frequency", quantizer="rtn",
                             group_size=16, calib_samples=4, seq_len=32, calib_file=str(vm.VLM_DATA / "calib.jsonl"),
                             eval_file=str(VLM_EVAL), eval_samples=4, eval_suites=(VLM_SUITE,))
        result = engine.run(cfg, tmp_path / "out")
        table = result.report["eval_suites"]["lmms-eval/mopeq_caption_match"]
        assert set(table["acc"]) == {"fp", "quantized", "delta"}
        assert 0.0 <= table["acc"]["fp"] <= 1.0 and 0.0 <= table["acc"]["quantized"] <= 1.0
    else:
        from mopeq_core.multimodal import load_processor

        res = run_suites(load_model(src), load_tokenizer(src), load_processor(src), [VLM_SUITE], eval_file=VLM_EVAL)
        assert 0.0 <= res["lmms-eval/mopeq_caption_match"]["acc"] <= 1.0


def test_markdown_table_for_the_model_card():
    from mopeq_core.eval_suites import markdown_table

    table = compare({"lm-eval/t": {"acc": 0.5, "acc_stderr": 0.1}}, {"lm-eval/t": {"acc": 0.25, "acc_stderr": 0.1}})
    lines = markdown_table(table)
    assert lines[2] == "| lm-eval/t | acc | 0.5 | 0.25 | -0.25 |" and len(lines) == 3
    assert markdown_table(None) == []
