"""Fixtures of the service tests: tiny models on disk, a real PostgreSQL database and Redis namespace per run,
the Hub mock. Helpers (processes, environments) live in svc_util."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubmock import HubMock
from svc_util import HF_TOKEN, PG_ADMIN_URL, REDIS_URL, REPO, _pg_admin, _write_safetensors, make_tiny_moe


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root with one real tiny MoE and the hostile cases next to it."""
    base = tmp_path_factory.mktemp("models")
    root = base / "root"
    root.mkdir()
    make_tiny_moe(root / "tiny-moe")
    # dense model: no experts
    (root / "not-moe").mkdir()
    (root / "not-moe" / "config.json").write_text(json.dumps({"model_type": "llama",
                                                              "architectures": ["LlamaForCausalLM"]}))
    _write_safetensors(root / "not-moe" / "model.safetensors", {
        "model.embed_tokens.weight": ("F16", [32, 8]), "model.layers.0.mlp.gate_proj.weight": ("F16", [16, 8]),
        "model.layers.0.mlp.down_proj.weight": ("F16", [8, 16])})
    # pickle-only
    (root / "pickle-only").mkdir()
    (root / "pickle-only" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (root / "pickle-only" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    # remote code
    (root / "remote-code").mkdir()
    (root / "remote-code" / "config.json").write_text(json.dumps(
        {"model_type": "custom_moe", "auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomMoE"}}))
    _write_safetensors(root / "remote-code" / "model.safetensors", {
        "model.layers.0.mlp.experts.0.w1.weight": ("F16", [16, 8])})
    # fused transformers-5 layout (3-D expert tensors)
    (root / "fused-moe").mkdir()
    (root / "fused-moe" / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    _write_safetensors(root / "fused-moe" / "model.safetensors", {
        "model.embed_tokens.weight": ("BF16", [32, 16]),
        "model.layers.0.mlp.gate.weight": ("BF16", [4, 16]),
        "model.layers.0.mlp.experts.gate_up_proj": ("BF16", [4, 64, 16]),
        "model.layers.0.mlp.experts.down_proj": ("BF16", [4, 16, 32]),
        "model.layers.1.mlp.experts.gate_up_proj": ("BF16", [4, 64, 16]),
        "model.layers.1.mlp.experts.down_proj": ("BF16", [4, 16, 32])})
    # a header that claims more data than the file holds
    (root / "bad-header").mkdir()
    (root / "bad-header" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    _write_safetensors(root / "bad-header" / "model.safetensors",
                       {"model.layers.0.mlp.experts.0.w1.weight": ("F16", [16, 8])}, lie=True)
    # a symlink that leaves the root, and a model dir whose weight file links outside
    outside = base / "outside"
    make_link_target = outside / "secret-model"
    make_link_target.mkdir(parents=True)
    (make_link_target / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    _write_safetensors(make_link_target / "model.safetensors", {"model.layers.0.mlp.experts.0.w1.weight":
                                                                ("F16", [16, 8])})
    (root / "escape").symlink_to(make_link_target, target_is_directory=True)
    (root / "sneaky").mkdir()
    (root / "sneaky" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (root / "sneaky" / "model.safetensors").symlink_to(make_link_target / "model.safetensors")
    (root / "calib.txt").write_text((REPO / "mopeq_core" / "data" / "calib_default.txt").read_text()[:20_000])
    return root


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database for this test run (dropped at the end)."""
    name = f"mopeq_test_{uuid.uuid4().hex[:12]}"
    try:
        with _pg_admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is needed by the service tests ({exc}); .ci/run starts it")
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_ns() -> Iterator[tuple[str, str]]:
    """(broker url, key prefix): a private namespace in the shared Redis, removed at the end."""
    import redis

    prefix = f"mopeq-test-{uuid.uuid4().hex[:10]}:"
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Redis at {REDIS_URL} is needed by the service tests ({exc}); .ci/run starts it")
    yield REDIS_URL, prefix
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def hub() -> Iterator[HubMock]:
    h = HubMock(tokens={HF_TOKEN: "tester"}).start()
    yield h
    h.stop()
