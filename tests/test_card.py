"""The model card (mopeq_core.card): YAML front matter, content sections, the heatmap and the reproduce command."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from mopeq_core.card import (
    HEATMAP_NAME,
    bit_range_tag,
    build_card,
    render_heatmap,
    reproduce_args,
    reproduce_command,
    short_number,
    write_model_card,
)
from mopeq_core.config import QuantizeConfig

WIDTHS = [[2, 3, 4, 3, 2], [4, 4, 3, 2, 2], [3, 2, 4, 4]]  # the last layer has one expert fewer
PARAMS = 3072


def make_bitmap(model="org/tiny-moe") -> dict:
    layers = []
    for li, ws in enumerate(WIDTHS):
        layers.append({"layer": li * 2 + 1, "module": f"model.layers.{li * 2 + 1}.mlp.experts", "experts": [
            {"expert": e, "bits": b, "sensitivity": 0.00123 * (e + 1) * (li + 1), "frequency": 0.2, "params": PARAMS}
            for e, b in enumerate(ws)]})
    n = sum(len(w) for w in WIDTHS)
    avg = sum(b for w in WIDTHS for b in w) / n
    return {"format_version": 1, "model": model, "revision": "abc123", "bits_choices": [2, 3, 4],
            "group_size": 32, "symmetric": True, "quantizer": "gptq",
            "sensitivity": {"method": "hutchinson", "probes": 16, "calib_tokens": 4096, "rel_std_err_median": 0.03,
                            "selected_by": "auto",
                            "candidate_holdout_loss": {"hutchinson": 2.51, "fisher": 2.53}},
            "allocation": {"allocator": "knapsack", "scope": "model", "granularity": "expert",
                           "target_avg_bits": 3.0, "budget_bytes": None},
            "avg_bits": avg, "expert_bytes": 5000, "total_bytes": 105000, "layers": layers}


def make_report(**cfg_over) -> dict:
    cfg = QuantizeConfig(model="org/tiny-moe", sensitivity="auto", group_size=32, calib_samples=16, seq_len=128,
                         eval_file="data/eval.txt", **cfg_over).to_public_dict()
    return {"mopeq_version": "0.1.0", "model": "org/tiny-moe", "revision": "abc123", "config": cfg,
            "stages": {"fetch": {"seconds": 1.0}, "calibrate": {"seconds": 2.5}},
            "perplexity": {"fp_perplexity": 12.345, "quantized_perplexity": 13.0, "eval_tokens": 2048,
                           "eval_file": "data/eval.txt", "increase_pct": 5.306},
            "calibration": {"experts": 14, "experts_with_tokens": 14, "min_tokens": 9},
            "selected_sensitivity": "hutchinson",
            "candidate_holdout_loss": {"hutchinson": 2.51, "fisher": 2.53, "frequency": 2.60, "input-hessian": 2.55},
            "candidate_validation": {"paired_vs_best": {
                "hutchinson": {"mean_diff": 0.0, "std_err": 0.0}, "fisher": {"mean_diff": 0.02, "std_err": 0.004},
                "frequency": {"mean_diff": 0.09, "std_err": 0.011}, "input-hessian": {"mean_diff": 0.04,
                                                                        "std_err": 0.006}}},
            "allocation": {"exact": True},
            "sizes": {"expert_bytes": 5000, "non_expert_bytes": 100000, "total_bytes": 105000,
                      "avg_bits": 3.0, "fp_expert_bytes": 14 * PARAMS * 4}}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def test_card_front_matter_and_sections(tmp_path):
    bitmap, report = make_bitmap(), make_report()
    files = write_model_card(tmp_path, bitmap, report)
    assert files == [tmp_path / "README.md", tmp_path / HEATMAP_NAME]
    text = (tmp_path / "README.md").read_text()
    fm = front_matter(text)
    assert fm["base_model"] == "org/tiny-moe"
    assert fm["base_model_relation"] == "quantized"
    assert fm["library_name"] == "mopeq"
    assert {"mopeq", "moe", "mixed-precision", "2-4bit"} <= set(fm["tags"])
    assert fm["pipeline_tag"] == "text-generation"

    # sizes before / after, exact bytes
    assert f"{14 * PARAMS * 4 + 100000:,} B" in text and "105,000 B" in text
    # histogram: 14 experts, 5 at 2 bits, 4 at 3 bits, 5 at 4 bits
    assert "| 2-bit | 5 | 35.7 % |" in text and "| 3-bit | 4 | 28.6 % |" in text and "| 4-bit | 5 | 35.7 % |" in text
    # per-layer mean widths
    assert "| 1 | `model.layers.1.mlp.experts` | 2.80 | 2 | 2 | 1 |" in text
    assert "| 5 | `model.layers.5.mlp.experts` | 3.25 | 1 | 1 | 2 |" in text
    assert f"Mean bits per expert weight: **{bitmap['avg_bits']:.3f}** (target 3.0)" in text
    # perplexity before/after, method, candidates, allocator, calibration, versions, heatmap reference
    assert "| full precision | 12.3450 |" in text and "| quantized (this artifact) | 13.0000 |" in text
    assert "+5.31 %" in text
    assert "`hutchinson`" in text and "| `input-hessian` | 2.55000 | +0.04000 ± 0.00600 |  |" in text
    assert "| `hutchinson` | 2.51000 | +0.00000 ± 0.00000 | selected |" in text
    assert "`knapsack`" in text and "group size 32" in text
    assert "the built-in default calibration text" in text  # calib_file None
    for pkg in ("torch", "transformers", "mopeq"):
        assert f"| {pkg} |" in text
    assert f"]({HEATMAP_NAME})" in text
    assert "load_quantized" in text


def test_card_without_perplexity_and_with_engine_format(tmp_path):
    report = make_report(format="compressed-tensors", calib_file="data/calib.jsonl")
    report["perplexity"] = {"fp_perplexity": None, "quantized_perplexity": None}
    report["candidate_holdout_loss"] = {}
    bitmap = make_bitmap(model="/models/local-moe")
    bitmap["layers"] = [{**layer, "experts": [{**x, "bits": 4} for x in layer["experts"]]}
                        for layer in bitmap["layers"]]
    text = build_card(tmp_path, bitmap, report)
    fm = front_matter(text)
    assert fm["library_name"] == "transformers" and "compressed-tensors" in fm["tags"] and "4bit" in fm["tags"]
    assert "base_model" not in fm and "base_model_relation" not in fm  # a path is never a base_model
    assert "/models/local-moe" not in text and "local-moe" in text
    assert "Not measured" in text and "`data/calib.jsonl`" in text
    assert "AutoModelForCausalLM.from_pretrained" in text


def test_heatmap_is_a_png_of_the_layer_by_expert_grid(tmp_path):
    from PIL import Image

    bitmap = make_bitmap()
    path = tmp_path / "h.png"
    drawn = render_heatmap(bitmap, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (drawn["rows"], drawn["cols"]) == (3, 5)
    assert drawn["layers"] == [1, 3, 5]
    assert drawn["bits"] == [[2, 3, 4, 3, 2], [4, 4, 3, 2, 2], [3, 2, 4, 4, None]]
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        assert im.text["mopeq:grid"] == "3x5"
        assert im.text["mopeq:layers"] == "1,3,5"


def test_short_numbers_and_range_tag():
    assert short_number(0.00123) == "1.2e-03"
    assert short_number(0.5) == "0.5"
    assert short_number(12345.0) == "1.2e+04"
    assert short_number(0) == "0" and short_number(None) == "-"
    assert bit_range_tag([2, 3, 4]) == "2-4bit" and bit_range_tag([4]) == "4bit"


def _parse(command: str) -> dict:
    from typer.main import get_command

    from app.cli import app

    argv = shlex.split(command)
    assert argv[:2] == ["mopeq", "quantize"]
    ctx = get_command(app).commands["quantize"].make_context("quantize", argv[2:])
    return ctx.params


@pytest.mark.parametrize("over", [
    {},
    {"symmetric": False, "act_order": True, "calib_all_experts": True, "low_memory": True,
     "trust_remote_code": True, "revision": "v1.0", "calib_file": "my data/calib file.txt", "format": "gptq",
     "granularity": "layer", "bits": (4, 8), "seed": 7, "device": "cuda"},
])
def test_reproduce_command_parses_back(over):
    from mopeq_core.config import Budget

    budget = Budget(gb=1.25) if over else Budget(avg_bits=2.75)
    cfg = QuantizeConfig(model="org/tiny-moe", budget=budget, eval_file="data/eval.txt", probes=12,
                         probe_tol=0.05, **over).to_public_dict()
    p = _parse(reproduce_command(cfg, "out dir/run"))
    assert p["model"] == "org/tiny-moe" and p["out"] == Path("out dir/run")
    assert p["avg_bits"] == cfg["budget"]["avg_bits"] and p["budget_gb"] == cfg["budget"]["gb"]
    assert tuple(int(x) for x in p["bits"].split(",")) == tuple(cfg["bits"])
    for key in ("sensitivity", "allocator", "scope", "granularity", "quantizer", "group_size", "act_order", "probes",
                "probe_tol", "calib_samples", "seq_len", "calib_all_experts", "eval_samples", "device", "revision",
                "low_memory", "trust_remote_code", "seed"):
        assert p[key] == cfg[key], key
    assert p["asymmetric"] is (not cfg["symmetric"])
    assert p["fmt"] == cfg["format"]
    assert (str(p["calib_file"]) if p["calib_file"] else None) == cfg["calib_file"]
    assert str(p["eval_file"]) == cfg["eval_file"]


def test_reproduce_pins_the_resolved_revision():
    cfg = QuantizeConfig(model="org/tiny-moe").to_public_dict()
    args = reproduce_args(cfg, "o", revision="0123abcd")
    assert args[args.index("--revision") + 1] == "0123abcd"


def _card_data(text: str):
    """The front matter through huggingface_hub: ModelCard parses it, ModelCardData validates it."""
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard(text)
    data = ModelCardData(**front_matter(text))
    assert card.data.to_dict() == data.to_dict()
    return data


@pytest.mark.parametrize("name_or_path, expected", [
    ("upstream-org/Mixtral-tiny", "upstream-org/Mixtral-tiny"),  # a local copy of a Hub repo: that repo
    (None, None),  # a local path (the config's own folder): no base_model
    ("just-a-name", None),  # no namespace: not taken for a repo id
])
def test_card_of_a_local_model_names_a_hub_repo_or_nothing_and_no_path(tmp_path, name_or_path, expected):
    import json

    model_dir = tmp_path / "models" / "my-local-moe"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(
        {"_name_or_path": name_or_path or str(model_dir), "architectures": ["MixtralForCausalLM"]}))
    out = tmp_path / "artifacts" / "run1"
    calib = tmp_path / "data" / "calib.txt"
    report = make_report(calib_file=str(calib))
    report["config"]["model"] = report["model"] = str(model_dir)
    report["perplexity"]["eval_file"] = str(tmp_path / "data" / "eval.txt")
    write_model_card(out, make_bitmap(model=str(model_dir)), report)
    text = (out / "README.md").read_text()
    data = _card_data(text)
    assert data.base_model == expected
    assert (data.to_dict().get("base_model_relation") == "quantized") is (expected is not None)
    assert str(tmp_path) not in text  # no path of this machine anywhere in the card
    assert "mopeq quantize ./my-local-moe --out run1" in text and "`calib.txt`" in text


def test_card_of_a_hub_model_validates(tmp_path):
    text = build_card(tmp_path, make_bitmap(), make_report())
    data = _card_data(text)
    assert data.base_model == "org/tiny-moe" and data.library_name == "mopeq" and data.base_model_relation == "quantized"


def test_base_model_of_hub_ids() -> None:
    from mopeq_core.card import base_model_id

    assert base_model_id("org/tiny-moe") == "org/tiny-moe" and base_model_id("gpt2") == "gpt2"  # fetched from the Hub
    for path in ("/models/org/x", "./org-x", "~/x", "a/b/c", "org/bad..name"):
        assert base_model_id(path) is None, path
