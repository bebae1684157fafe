"""The whole pipeline on a tiny Mixtral: bitmap.json contract, budgets, resume after cancel, artifact round trip."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mopeq_core import engine
from mopeq_core.apply import apply_fake_quant
from mopeq_core.artifact import INDEX_NAME, expert_tensor_bytes
from mopeq_core.config import Budget, QuantizeConfig
from mopeq_core.data import read_texts, token_samples
from mopeq_core.engine import STAGES
from mopeq_core.errors import (
    ArtifactError,
    CalibrationDataError,
    CancelledError,
    InfeasibleBudgetError,
    UserInputError,
)
from mopeq_core.evaluate import mean_token_loss
from mopeq_core.loader import load_packed_matrices, load_quantized
from mopeq_core.loading import load_model, load_tokenizer
from mopeq_core.moe import find_expert_groups
from mopeq_core.sizing import SCALE_BYTES, n_groups

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "data" / "eval.txt"
CALIB_JSONL = REPO / "data" / "calib.jsonl"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import build_model

    return build_model("mixtral", tmp_path_factory.mktemp("mixtral"))


def _cfg(model_dir, **over) -> QuantizeConfig:
    base = dict(model=str(model_dir), budget=Budget(avg_bits=2.5), group_size=16, calib_samples=6, seq_len=32,
                probes=4, sensitivity="hutchinson", quantizer="gptq", calib_file=str(CALIB_JSONL),
                eval_file=str(EVAL), eval_samples=6)
    base.update(over)
    return QuantizeConfig(**base)


@pytest.fixture(scope="module")
def run_gptq(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out_gptq")
    events = []
    result = engine.run(_cfg(tiny_dir), out, on_event=events.append)
    return result, out, events


def test_bitmap_follows_the_contract(run_gptq, tiny_dir):
    result, out, _ = run_gptq
    bm = json.loads((out / "bitmap.json").read_text())
    for key in ("format_version", "model", "revision", "bits_choices", "group_size", "symmetric", "quantizer",
                "sensitivity", "allocation", "avg_bits", "expert_bytes", "total_bytes", "layers"):
        assert key in bm, key
    assert bm["format_version"] == 1 and bm["bits_choices"] == [2, 3, 4] and bm["quantizer"] == "gptq"
    assert bm["sensitivity"]["method"] == "hutchinson" and bm["sensitivity"]["probes"] == 4
    assert bm["allocation"] == {"allocator": "knapsack", "scope": "model", "granularity": "expert",
                                "target_avg_bits": 2.5, "budget_bytes": None}
    model = load_model(Path(tiny_dir))
    groups = find_expert_groups(model)
    assert [x["layer"] for x in bm["layers"]] == [g.layer for g in groups]
    assert [x["module"] for x in bm["layers"]] == [g.path for g in groups]
    expected_bytes = 0
    weighted = 0
    for layer, g in zip(bm["layers"], groups):
        assert [x["expert"] for x in layer["experts"]] == list(range(g.num_experts))
        assert sum(x["frequency"] for x in layer["experts"]) == pytest.approx(1.0)
        for x in layer["experts"]:
            assert x["bits"] in (2, 3, 4) and x["params"] == g.expert_params
            weighted += x["params"] * x["bits"]
            # params × bits / 8 (per projection, rounded up) plus one float16 scale per row and group
            expected_bytes += sum(math.ceil(p.params * x["bits"] / 8) + p.out_features * n_groups(p.in_features, 16)
                                  * SCALE_BYTES for p in g.projections)
    assert bm["expert_bytes"] == expected_bytes
    assert bm["avg_bits"] == pytest.approx(weighted / sum(x["params"] for l_ in bm["layers"] for x in l_["experts"]))
    assert bm["avg_bits"] <= 2.5 + 1e-9
    assert bm["total_bytes"] > bm["expert_bytes"]
    # the mean is not trivially uniform: a sensitivity-driven map mixes widths
    assert len({x["bits"] for l_ in bm["layers"] for x in l_["experts"]}) >= 2


def test_report_has_timings_and_perplexities(run_gptq):
    result, out, events = run_gptq
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == set(STAGES)
    assert all(v["seconds"] >= 0 and v["peak_rss_mb"] > 0 for v in report["stages"].values())
    ppl = report["perplexity"]
    assert ppl["fp_perplexity"] > 1 and ppl["quantized_perplexity"] > 1
    assert report["sensitivity"]["hutchinson"]["probes"] == 4
    assert "token" not in json.dumps(report["config"]).lower().replace("calib_tokens", "")
    stages_seen = [e.stage for e in events if e.message == "finished"]
    assert stages_seen == list(STAGES)
    overall = [e.overall for e in events]
    assert overall == sorted(overall) and overall[-1] == pytest.approx(1.0)


def test_loaded_artifact_matches_fake_quantized_model_and_report(run_gptq, tiny_dir):
    result, out, _ = run_gptq
    q = load_quantized(out, attn_implementation="eager")
    ref = load_model(Path(tiny_dir))
    groups = find_expert_groups(ref)
    apply_fake_quant(groups, load_packed_matrices(out, groups))
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = q(input_ids=ids).logits, ref(input_ids=ids).logits
    assert float((a - b).norm() / b.norm()) <= 1e-5
    tok = load_tokenizer(Path(tiny_dir))
    ev = token_samples(tok, read_texts(EVAL), 6, 32)
    assert math.exp(mean_token_loss(q, ev)) == pytest.approx(result.report["perplexity"]["quantized_perplexity"],
                                                             rel=1e-5)
    # the packed experts take about what the bit map promises, on disk and in memory
    on_disk = expert_tensor_bytes(out)
    assert abs(on_disk - result.bitmap["expert_bytes"]) <= 0.01 * result.bitmap["expert_bytes"]
    packed_in_memory = sum(b.numel() * b.element_size() for n, b in q.named_buffers() if n.split(".")[-1]
                           .startswith("mopeq_"))
    assert abs(packed_in_memory - result.bitmap["expert_bytes"]) <= 0.01 * result.bitmap["expert_bytes"]
    assert not any(".experts.gate_up_proj" in n or ".experts.down_proj" in n for n, _ in q.named_parameters())
    out_ids = q.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    assert out_ids.shape == (1, 8)


def test_truncated_or_missing_shards_fail_with_the_file_name(run_gptq, tmp_path):
    import shutil

    _, out, _ = run_gptq
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = sorted(bad.glob("model-0000[1-9]-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=shard.name):
        load_quantized(bad)
    shard.unlink()
    with pytest.raises(ArtifactError, match=shard.name):
        load_quantized(bad)
    (bad / INDEX_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match=INDEX_NAME):
        load_quantized(bad)


def test_budget_gb_is_never_exceeded_and_infeasible_budgets_state_the_range(run_gptq, tiny_dir, tmp_path):
    result, _, _ = run_gptq
    total = result.bitmap["total_bytes"]
    gb = (total + 300) / 1e9
    r = engine.run(_cfg(tiny_dir, budget=Budget(gb=gb), sensitivity="frequency", quantizer="rtn",
                              eval_file=None), tmp_path / "gb")
    assert r.bitmap["total_bytes"] <= gb * 1e9
    assert r.bitmap["allocation"]["budget_bytes"] == int(gb * 1e9)
    with pytest.raises(InfeasibleBudgetError, match="between") as exc:
        engine.run(_cfg(tiny_dir, budget=Budget(gb=1e-6), sensitivity="frequency", quantizer="rtn",
                              eval_file=None), tmp_path / "gb2")
    lo, hi = exc.value.feasible
    assert lo < hi and exc.value.unit == "GB"
    with pytest.raises(InfeasibleBudgetError, match="feasible range"):
        engine.run(_cfg(tiny_dir, budget=Budget(avg_bits=1.5), sensitivity="frequency", quantizer="rtn",
                              eval_file=None), tmp_path / "ab")


def test_cancel_then_resume_skips_finished_stages_and_matches_a_clean_run(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, sensitivity="fisher", quantizer="rtn", eval_file=None)
    state = tmp_path / "state"
    seen = []

    def cancel_at_allocate():
        return bool(seen) and seen[-1].stage == "allocate"

    with pytest.raises(CancelledError):
        engine.run(cfg, tmp_path / "a", state_dir=state, on_event=seen.append, should_cancel=cancel_at_allocate)
    assert (state / "sensitivity.done").exists() and not (state / "allocate.done").exists()
    sens_mtime = (state / "sensitivity.json").stat().st_mtime
    resumed = engine.run(cfg, tmp_path / "a", state_dir=state)
    assert (state / "sensitivity.json").stat().st_mtime == sens_mtime  # not recomputed
    clean = engine.run(cfg, tmp_path / "b")
    assert resumed.bitmap == clean.bitmap
    assert not (tmp_path / "b" / ".mopeq-state").exists()  # own state removed after success
    # a changed configuration invalidates the stage files
    engine.run(_cfg(tiny_dir, sensitivity="frequency", quantizer="rtn", eval_file=None), tmp_path / "c",
                     state_dir=state)
    assert json.loads((state / "sensitivity.json").read_text()).keys() == {"frequency"}


def test_model_identity_lets_a_copy_at_another_path_reuse_finished_stages(tiny_dir, tmp_path):
    """The service runs each job on its own copy of a local model: with the same model_identity the stages of one
    copy serve the other (fetch is redone for the new path), with another identity nothing is reused."""
    for name in ("m1", "m2"):
        shutil.copytree(tiny_dir, tmp_path / name)
    cfg = _cfg(tmp_path / "m1", sensitivity="frequency", quantizer="rtn", eval_file=None)
    state, seen = tmp_path / "state", []
    with pytest.raises(CancelledError):
        engine.run(cfg, tmp_path / "a", state_dir=state, on_event=seen.append, model_identity="tiny@1",
                   should_cancel=lambda: bool(seen) and seen[-1].stage == "allocate")
    copy = dataclasses.replace(cfg, model=str(tmp_path / "m2"))
    events = []
    resumed = engine.run(copy, tmp_path / "b", state_dir=state, model_identity="tiny@1", on_event=events.append)
    stages = resumed.report["stages"]
    assert [s for s in STAGES if stages[s].get("resumed")] == ["calibrate", "sensitivity"]
    assert {e.stage for e in events if e.message == "reused from its stage files"} == {"calibrate", "sensitivity"}
    assert json.loads((state / "fetch.json").read_text())["path"] == str(tmp_path / "m2")
    clean = engine.run(copy, tmp_path / "c")
    assert resumed.bitmap["layers"] == clean.bitmap["layers"]
    other = engine.run(copy, tmp_path / "d", state_dir=state, model_identity="tiny@2")
    assert not any(v.get("resumed") for v in other.report["stages"].values())


def test_bad_inputs_raise_user_errors(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(CalibrationDataError, match="bad.jsonl:2"):
        engine.run(_cfg(tiny_dir, calib_file=str(bad)), tmp_path / "o1")
    with pytest.raises(UserInputError, match="--bits"):
        engine.run(_cfg(tiny_dir, bits=(2, 5)), tmp_path / "o2")
    with pytest.raises(UserInputError, match="--group-size"):
        engine.run(_cfg(tiny_dir, group_size=7), tmp_path / "o3")
    with pytest.raises(CalibrationDataError, match="does not exist"):
        engine.run(_cfg(tiny_dir, calib_file=str(tmp_path / "nope.txt")), tmp_path / "o4")
