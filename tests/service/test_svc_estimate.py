"""mopeq_core.estimate: sizes and feasible ranges from config + safetensors headers, local and from the Hub mock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from svc_util import HF_TOKEN, REPO

from mopeq_core.errors import (
    InfeasibleBudgetError,
    ModelNotFoundError,
    NotMoEError,
    RemoteCodeRequiredError,
    UnsafeCheckpointError,
    UserInputError,
)
from mopeq_core.estimate import estimate_checkpoint, estimate_model, inspect_hub, inspect_local
from mopeq_core.sizing import matrix_bytes


def test_tiny_moe_counts_match_the_model(model_root: Path) -> None:
    est = estimate_model(model_root / "tiny-moe", bits=(2, 3, 4), group_size=64)
    cfg = json.loads((model_root / "tiny-moe" / "config.json").read_text())
    h, f, n_exp, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"], 2
    assert est.moe_layers == n_layers and est.experts_per_layer == [n_exp] * n_layers
    assert est.num_experts == n_exp * n_layers
    assert est.expert_params == n_layers * n_exp * 3 * h * f
    per_expert = lambda b: 2 * matrix_bytes(f, h, b, 64, True) + matrix_bytes(h, f, b, 64, True)
    assert est.min_bytes == est.non_expert_bytes + n_layers * n_exp * per_expert(2)
    assert est.max_bytes == est.non_expert_bytes + n_layers * n_exp * per_expert(4)
    assert est.non_expert_bytes == 4 * est.non_expert_params  # stored as float32
    assert est.feasible()["avg_bits"] == [2.0, 4.0]
    est.check_budget(avg_bits=2.5)
    est.check_budget(gb=(est.min_bytes + est.max_bytes) / 2e9)
    with pytest.raises(InfeasibleBudgetError, match=r"feasible range 2\.\.\.4") as exc:
        est.check_budget(avg_bits=1.5)
    assert exc.value.feasible == (2.0, 4.0)
    with pytest.raises(InfeasibleBudgetError, match="outside the feasible range"):
        est.check_budget(gb=est.min_bytes / 2e9)


def test_fused_layout(model_root: Path) -> None:
    est = estimate_model(model_root / "fused-moe", bits=(2, 4), group_size=16)
    assert est.moe_layers == 2 and est.experts_per_layer == [4, 4]
    assert est.expert_params == 2 * 4 * (64 * 16 + 16 * 32)
    assert est.non_expert_params == 32 * 16 + 4 * 16


@pytest.mark.parametrize(("name", "error", "text"), [
    ("not-moe", NotMoEError, "not a Mixture-of-Experts"),
    ("pickle-only", UnsafeCheckpointError, "pickle"),
    ("remote-code", RemoteCodeRequiredError, "remote code"),
    ("bad-header", UserInputError, "malformed safetensors header"),
])
def test_rejections(model_root: Path, name: str, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        estimate_model(model_root / name)


def test_links_out_of_the_roots_are_refused(model_root: Path) -> None:
    with pytest.raises(UserInputError, match="outside the allowed model roots"):
        inspect_local(model_root / "sneaky", roots=[model_root])
    inspect_local(model_root / "tiny-moe", roots=[model_root])


def test_remote_code_passes_when_trusted(model_root: Path) -> None:
    ck = inspect_local(model_root / "remote-code", trust_remote_code=True)
    assert estimate_checkpoint(ck).num_experts == 1


def test_hub_model_through_the_mock(model_root: Path, hub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    repo = hub.add_repo_from_dir("org/tiny-moe", model_root / "tiny-moe")
    ck = inspect_hub("org/tiny-moe", endpoint=hub.url)
    assert ck.revision == repo.sha and ck.source == "hub"
    local = estimate_model(model_root / "tiny-moe")
    remote = estimate_checkpoint(ck)
    assert (remote.expert_params, remote.non_expert_params, remote.min_bytes) == \
        (local.expert_params, local.non_expert_params, local.min_bytes)
    # only headers were read: no full download of the weights
    gets = [r for r in hub.requests if r["method"] == "GET" and r["path"].endswith(".safetensors")]
    assert gets, "safetensors headers are read with ranged GETs"
    with pytest.raises(ModelNotFoundError, match="was not found on the Hub"):
        inspect_hub("org/does-not-exist", endpoint=hub.url)
    with pytest.raises(ModelNotFoundError, match="revision 'nope' was not found"):
        inspect_hub("org/tiny-moe", revision="nope", endpoint=hub.url)
    hub.add_repo_from_dir("org/private-moe", model_root / "tiny-moe", private=True)
    with pytest.raises(ModelNotFoundError):
        inspect_hub("org/private-moe", endpoint=hub.url)
    assert inspect_hub("org/private-moe", endpoint=hub.url, token=HF_TOKEN).revision


def test_estimate_is_torch_free() -> None:
    code = ("import sys, mopeq_core.estimate, mopeq_core.config, mopeq_core.sizing, app.main;"
            "from app.main import create_app; from app.core.config import Settings;"
            "import tempfile; create_app(Settings(HOME=tempfile.mkdtemp()));"
            "bad = [m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules];"
            "assert not bad, bad")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOPEQ_")}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=120)
