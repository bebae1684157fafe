"""`mopeq estimate --local` on a directory holding only config.json: the model's classes build it on the meta
device and its parameters are sized like a checkpoint's headers (mopeq_core.meta_checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from app.cli import app
from mopeq_core.meta_checkpoint import estimate_local

REAL_CONFIGS = Path(__file__).resolve().parent / "fixtures" / "real_configs"


def mixtral_params(c: dict) -> tuple[int, int]:
    """Closed form of a Mixtral checkpoint's parameter count: (expert parameters, all parameters)."""
    h, f, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    experts = layers * c["num_local_experts"] * 3 * h * f
    per_layer = 2 * h * h + 2 * h * kv + h * c["num_local_experts"] + 2 * h  # q, o, k, v, router, two norms
    return experts, experts + layers * per_layer + 2 * vocab * h + h  # + untied embedding and head, final norm


def test_config_only_mixtral_matches_the_closed_form_and_the_published_count(tmp_path):
    src = REAL_CONFIGS / "mixtral-8x7b"
    config = json.loads((src / "config.json").read_text())
    expert, total = mixtral_params(config)
    est = estimate_local(src)
    assert (est.expert_params, est.total_params) == (expert, total)
    assert abs(est.total_params - 46.7e9) / 46.7e9 < 0.01  # Mistral AI's announced 46.7B
    assert est.moe_layers == 32 and est.num_experts == 256
    assert est.stored_bytes == 2 * total  # bfloat16
    # four bits per weight plus an fp16 scale per group of 128, for every expert
    assert est.max_bytes == est.non_expert_bytes + expert * 4 // 8 + expert // 128 * 2


def test_the_cli_sizes_a_config_only_directory_and_checks_a_budget(tmp_path):
    d = tmp_path / "mixtral"
    shutil.copytree(REAL_CONFIGS / "mixtral-8x7b", d)
    res = CliRunner().invoke(app, ["estimate", str(d), "--local", "--json", "--avg-bits", "2.5"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["total_params"] == mixtral_params(json.loads((d / "config.json").read_text()))[1]
    assert out["budget_feasible"] is True
    res = CliRunner().invoke(app, ["estimate", str(d), "--local", "--json", "--budget-gb", "1"])
    assert res.exit_code == 2 and json.loads(res.stdout)["budget_feasible"] is False


def test_a_config_with_remote_code_is_refused_without_trust(tmp_path):
    d = tmp_path / "remote"
    d.mkdir()
    cfg = json.loads((REAL_CONFIGS / "mixtral-8x7b" / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "m.Model"}}))
    res = CliRunner().invoke(app, ["estimate", str(d), "--local", "--json"])
    assert res.exit_code == 2 and "remote code" in res.stdout
