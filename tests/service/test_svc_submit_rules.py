"""Issue 12, the job API's contract: what the schema states is what submit enforces (the engine's own rules, checked
at submit), probe_tol and calibration.all_experts reach the worker's engine config, and the per-key storage quota
(SQLite and PostgreSQL)."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker
from svc_util import BOOT_KEY, FAST_JOB, auth, migrate, reset_pg, service_env, settings_from_env

from app.db.models import Artifact, Job
from app.main import create_app
from app.schemas.jobs import JobCreate
from app.services.errors import ServiceError
from app.services.jobs import quantize_config
from app.services.refusals import check_job


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           model_root: Path) -> Iterator[tuple[TestClient, Any]]:
    home = tmp_path_factory.mktemp(f"rules-{request.param}")
    db_url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    env = service_env(home, model_root, database_url=db_url, MOPEQ_MAX_PROBES=200, MOPEQ_MAX_SAMPLES=500)
    settings = settings_from_env(env)
    migrate(settings.database_url)
    if db_url:
        reset_pg(db_url)
    with TestClient(create_app(settings)) as c:
        yield c, settings


def _submit(c: TestClient, root: Path, key: str = BOOT_KEY, **body: Any):
    fast = {k: v for k, v in FAST_JOB.items() if k != "budget" or "bits" not in body}  # the default follows bits
    return c.post("/v1/jobs", json={"model": str(root / "tiny-moe"), **fast, **body}, headers=auth(key))


def _jobs(settings: Any) -> int:
    with create_engine(settings.database_url).connect() as conn:
        return len(conn.execute(select(Job.id)).all())


# ---- the schema's cross-field rules are the engine's ------------------------------------------------------------
def _server_accepts(body: dict[str, Any]) -> bool:
    try:
        check_job(quantize_config(JobCreate(**body)))
    except ServiceError:
        return False
    return True


def test_schema_rules_and_submit_refusals_agree_on_every_combination() -> None:
    """Every combination of format, bits, granularity, symmetry, low_memory and evaluation suites: the JSON Schema of
    the job body (what /openapi.json states) accepts it exactly when the submit-time check (mopeq_core.formats, the
    engine's own refusals) does."""
    validator = jsonschema.Draft202012Validator(JobCreate.model_json_schema())
    bits_choices = [None, [2], [4], [8], [4, 8], [2, 3, 4], [2, 4, 8]]
    grid = itertools.product(["mopeq", "fake", "compressed-tensors", "gptq", "gguf", "gguf-overrides", None],
                             bits_choices, [None, "expert", "layer", "layer-projection"], [None, False],
                             [None, True, False], [None, ["lm-eval:arc_easy"]])
    n = refused = 0
    for fmt, bits, gran, sym, low, suites in grid:
        body: dict[str, Any] = {"model": "org/m", "sensitivity": "frequency"}
        for k, v in (("format", fmt), ("bits", bits), ("granularity", gran), ("symmetric", sym), ("low_memory", low)):
            if v is not None:
                body[k] = v
        if suites:
            body["evaluation"] = {"suites": suites}
        if bits:
            body["budget"] = {"avg_bits": float(min(bits))}
        schema_ok = validator.is_valid(body)
        assert schema_ok == _server_accepts(body), body
        n += 1
        refused += not schema_ok
    assert n == 2352 and 500 < refused < 2000  # both verdicts are well represented


def test_default_budget_follows_the_bits() -> None:
    assert JobCreate(model="m").budget.avg_bits == 3.0
    assert JobCreate(model="m", bits=[4]).budget.avg_bits == 4.0
    assert JobCreate(model="m", bits=[8]).budget.avg_bits == 8.0
    assert JobCreate(model="m", bits=[2]).budget.avg_bits == 2.0
    assert JobCreate(model="m", bits=[4], budget={"avg_bits": 4}).budget.avg_bits == 4.0
    schema = JobCreate.model_json_schema()
    # without bits (so [2, 3, 4]) an avg_bits outside 2..4 is infeasible for every model: the schema says so
    assert not jsonschema.Draft202012Validator(schema).is_valid({"model": "m", "budget": {"avg_bits": 5}})
    assert jsonschema.Draft202012Validator(schema).is_valid({"model": "m", "budget": {"avg_bits": 5}, "bits": [8]})


# ---- refusals through the API -------------------------------------------------------------------------------------
REFUSED = [
    ("gguf needs a width per tensor", {"format": "gguf"}, "invalid_input", "--granularity layer-projection"),
    ("compressed-tensors widths", {"format": "compressed-tensors", "bits": [2, 4], "granularity": "layer"},
     "invalid_input", "takes widths 4 and 8 only"),
    ("compressed-tensors symmetric only", {"format": "compressed-tensors", "bits": [4], "symmetric": False},
     "invalid_input", "symmetric"),
    ("gguf-overrides widths per layer", {"format": "gguf-overrides", "bits": [2, 4]}, "invalid_input",
     "--granularity layer"),
    ("streamed engine format", {"format": "gptq", "low_memory": True}, "invalid_input", "needs the whole model in memory"),
    ("streamed suites", {"low_memory": True, "evaluation": {"suites": ["lm-eval:arc_easy"]}}, "invalid_input",
     "evaluation suites need the whole model"),
    ("auto sensitivity, few samples", {"sensitivity": "auto", "calibration": {"samples": 8, "seq_len": 16}},
     "invalid_input", "at least 9 calibration samples"),
    ("probe_tol range", {"probe_tol": 1.5}, "invalid_request", "probe_tol"),
    ("avg_bits beyond every width", {"budget": {"avg_bits": 9}}, "invalid_request", "less than or equal to 8"),
    ("probes above MOPEQ_MAX_PROBES", {"probes": 300}, "limit_exceeded", "MOPEQ_MAX_PROBES"),
    ("seq_len beyond the context", {"calibration": {"samples": 2, "seq_len": 512}}, "limit_exceeded",
     "max_position_embeddings 128"),
    ("bad suite spelling", {"evaluation": {"suites": ["lm-eval"]}}, "invalid_request", "HARNESS:TASK"),
]


@pytest.mark.parametrize(("case", "body", "code", "text"), REFUSED, ids=[r[0] for r in REFUSED])
def test_submit_refuses_what_would_fail_later(client: tuple[TestClient, Any], model_root: Path, case: str,
                                              body: dict, code: str, text: str) -> None:
    c, settings = client
    before = _jobs(settings)
    r = _submit(c, model_root, **body)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == code and text in r.json()["detail"], r.text
    assert _jobs(settings) == before


def test_what_the_rules_allow_is_accepted(client: tuple[TestClient, Any], model_root: Path) -> None:
    c, _ = client
    for body in ({"format": "gguf", "granularity": "layer-projection"}, {"format": "gguf", "bits": [4]},
                 {"format": "compressed-tensors", "bits": [4, 8], "granularity": "layer"},
                 {"low_memory": True}, {"sensitivity": "auto", "calibration": {"samples": 9, "seq_len": 16}}):
        r = _submit(c, model_root, **body)
        assert r.status_code == 202, (body, r.text)
        c.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=auth())


@pytest.fixture(scope="module")
def vlm_root(model_root: Path) -> Path:
    """A tiny Qwen3-VL-MoE (image processor included) and the shipped image+text calibration set, under the root."""
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import vlm_models as vm

    root = model_root / "vlm-auto"
    if not root.exists():
        root.mkdir()
        vm.build_qwen3_vl_moe(root)
        shutil.copytree(vm.VLM_DATA, root / "data")
    return root


def test_auto_minimum_follows_the_model_and_data(client: tuple[TestClient, Any], model_root: Path,
                                                 vlm_root: Path) -> None:
    """The engine cross-fits auto on two batches: one image+text example each on a VLM, eight text windows each on
    a text model, so a VLM with image data and 2..8 samples runs (and is accepted) where a text MoE is refused."""
    c, settings = client
    calib = str(vlm_root / "data" / "calib.jsonl")
    auto = {"sensitivity": "auto", "calibration": {"samples": 2, "seq_len": 16, "file": calib}}
    r = c.post("/v1/jobs", json={**FAST_JOB, "model": str(vlm_root / "qwen3_vl_moe"), **auto}, headers=auth())
    assert r.status_code == 202, r.text
    c.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=auth())
    before = _jobs(settings)
    for model, data in (("tiny-moe", calib), ("tiny-moe", None)):  # text MoE: image data or not, 9 samples
        body = {**auto, "calibration": {**auto["calibration"], "file": data}}
        r = c.post("/v1/jobs", json={**FAST_JOB, "model": str(model_root / model), **body}, headers=auth())
        assert r.status_code == 422, r.text
        assert r.json()["code"] == "invalid_input" and "at least 9 calibration samples" in r.json()["detail"], r.text
    # a VLM given text-only data cuts text batches: the text bound holds for it too
    r = c.post("/v1/jobs", json={**FAST_JOB, "model": str(vlm_root / "qwen3_vl_moe"),
                                 "sensitivity": "auto", "calibration": {"samples": 2, "seq_len": 16}}, headers=auth())
    assert r.status_code == 422 and "at least 9 calibration samples" in r.json()["detail"], r.text
    # fewer than two examples is refused on every model
    r = c.post("/v1/jobs", json={**FAST_JOB, "model": str(vlm_root / "qwen3_vl_moe"),
                                 **{**auto, "calibration": {**auto["calibration"], "samples": 1}}}, headers=auth())
    assert r.status_code == 422 and "at least 2 calibration samples" in r.json()["detail"], r.text
    assert _jobs(settings) == before


def test_openapi_states_the_rules_and_this_servers_bounds(client: tuple[TestClient, Any]) -> None:
    c, _ = client
    spec = c.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    job = schemas["JobCreate"]
    assert job["properties"]["probes"]["maximum"] == 200  # MOPEQ_MAX_PROBES of this server
    assert schemas["CalibrationIn"]["properties"]["samples"]["maximum"] == 500  # MOPEQ_MAX_SAMPLES
    assert job["properties"]["trust_remote_code"]["enum"] == [False]  # no MOPEQ_ALLOW_REMOTE_CODE_REPOS here
    assert job["properties"]["group_size"]["multipleOf"] == 8
    assert job["properties"]["budget"]["oneOf"]
    assert job["dependentRequired"] == {"push": ["hf_token"]}
    assert job["properties"]["probe_tol"]["maximum"] == 1.0
    assert "all_experts" in schemas["CalibrationIn"]["properties"]
    params = spec["paths"]["/v1/jobs"]["post"]["parameters"]
    idem = next(p for p in params if p["name"] == "Idempotency-Key")
    assert json.dumps(idem["schema"]).count("200") == 1


def test_probe_tol_and_all_experts_reach_the_engine_config(client: tuple[TestClient, Any], model_root: Path) -> None:
    from app.core.security import Keyring
    from worker.context import WorkerContext
    from worker.runner import JobRun

    c, settings = client
    r = _submit(c, model_root, probe_tol=0.125, cost="weight", sequential=False,
                calibration={"samples": 2, "seq_len": 16, "all_experts": True})
    assert r.status_code == 202, r.text
    shown = c.get(f"/v1/jobs/{r.json()['id']}", headers=auth()).json()
    assert shown["probe_tol"] == 0.125 and shown["calibration"]["all_experts"] is True
    assert shown["cost"] == "weight" and shown["sequential"] is False
    factory = sessionmaker(create_engine(settings.database_url), expire_on_commit=False)
    ctx = WorkerContext(settings=settings, factory=factory, keyring=Keyring(settings.secret_key()),
                        worker_id="test-config", hostname=socket.gethostname())
    with factory() as db:
        job = db.get(Job, r.json()["id"])
        cfg = JobRun(ctx, job.id)._config(job)
    assert (cfg.probe_tol, cfg.calib_all_experts, cfg.cost, cfg.sequential) == (0.125, True, "weight", False)
    c.post(f"/v1/jobs/{job.id}/cancel", headers=auth())


# ---- per-key storage quota ----------------------------------------------------------------------------------------
def test_storage_quota(client: tuple[TestClient, Any], model_root: Path) -> None:
    c, settings = client
    factory = sessionmaker(create_engine(settings.database_url), expire_on_commit=False)
    r = c.post("/v1/admin/keys", json={"name": "quota"}, headers=auth())
    key_id, key = r.json()["id"], r.json()["api_key"]
    assert r.json()["storage_quota_bytes"] is None
    first = _submit(c, model_root, key)
    assert first.status_code == 202, first.text
    with factory() as db:
        est = db.get(Job, first.json()["id"]).est_output_bytes
    assert est and est > 0

    # the unfinished job's estimate counts: a quota for one and a half jobs admits no second one
    r = c.patch(f"/v1/admin/keys/{key_id}", json={"storage_quota_bytes": est * 3 // 2}, headers=auth())
    assert r.status_code == 200 and r.json()["storage_quota_bytes"] == est * 3 // 2
    refused = _submit(c, model_root, key)
    assert refused.status_code == 422 and refused.json()["code"] == "storage_quota_exceeded", refused.text
    assert "storage_quota_bytes" in refused.json()["detail"]
    assert refused.json()["quota"] == {"storage_quota_bytes": est * 3 // 2, "stored_bytes": 0,
                                       "reserved_bytes": est, "requested_bytes": est}

    # a finished job's stored files count instead of its estimate
    c.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=auth(key))
    with factory() as db, db.begin():
        db.add(Artifact(job_id=first.json()["id"], kind="file", name="model.safetensors", uri="x", bytes=est))
        db.add(Artifact(job_id=first.json()["id"], kind="hub", name="tester/x", uri="y", bytes=10 * est))
    refused = _submit(c, model_root, key)
    assert refused.status_code == 422 and refused.json()["quota"]["stored_bytes"] == est  # hub pushes do not count

    # deleting it frees the bytes
    assert c.delete(f"/v1/jobs/{first.json()['id']}", headers=auth(key)).status_code == 204
    second = _submit(c, model_root, key)
    assert second.status_code == 202, second.text
    c.post(f"/v1/jobs/{second.json()['id']}/cancel", headers=auth(key))

    # a quota below one job's estimate, then none at all
    c.patch(f"/v1/admin/keys/{key_id}", json={"storage_quota_bytes": est - 1}, headers=auth())
    assert _submit(c, model_root, key).json()["code"] == "storage_quota_exceeded"
    r = c.patch(f"/v1/admin/keys/{key_id}", json={"storage_quota_bytes": None}, headers=auth())
    assert r.json()["storage_quota_bytes"] is None
    ok = _submit(c, model_root, key)
    assert ok.status_code == 202
    c.post(f"/v1/jobs/{ok.json()['id']}/cancel", headers=auth(key))

    # only an admin sets it, on a key that exists, at a size that is a byte count
    assert c.patch(f"/v1/admin/keys/{key_id}", json={"storage_quota_bytes": 1}, headers=auth(key)).status_code == 403
    assert c.patch("/v1/admin/keys/nokey", json={"storage_quota_bytes": 1}, headers=auth()).status_code == 404
    assert c.patch(f"/v1/admin/keys/{key_id}", json={"storage_quota_bytes": -1}, headers=auth()).status_code == 422
    listed = {k["id"]: k for k in c.get("/v1/admin/keys", headers=auth()).json()}
    assert listed[key_id]["storage_quota_bytes"] is None


def test_new_key_with_a_quota(client: tuple[TestClient, Any], model_root: Path) -> None:
    c, _ = client
    r = c.post("/v1/admin/keys", json={"name": "tiny-quota", "storage_quota_bytes": 1000}, headers=auth())
    assert r.status_code == 201 and r.json()["storage_quota_bytes"] == 1000
    refused = _submit(c, model_root, r.json()["api_key"])
    assert refused.status_code == 422 and refused.json()["code"] == "storage_quota_exceeded"


def test_sdk_sends_the_new_knobs(client: tuple[TestClient, Any], model_root: Path) -> None:
    from mopeq_client._core import job_body

    c, _ = client
    body = job_body(str(model_root / "tiny-moe"), avg_bits=3, sensitivity="frequency", quantizer="rtn",
                    group_size=64, calib_samples=2, seq_len=16, probe_tol=0.25, cost="weight", sequential=False,
                    calib_all_experts=True)
    r = c.post("/v1/jobs", json=body, headers=auth())
    assert r.status_code == 202, r.text
    shown = c.get(f"/v1/jobs/{r.json()['id']}", headers=auth()).json()
    assert (shown["probe_tol"], shown["cost"], shown["sequential"], shown["calibration"]["all_experts"]) == (
        0.25, "weight", False, True)
    c.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=auth())


def test_admin_cli_sets_the_quota(tmp_path: Path, model_root: Path) -> None:
    import subprocess
    import sys

    from app.db.models import ApiKey

    env = service_env(tmp_path, model_root)
    settings = settings_from_env(env)

    def cli(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "app.cli_admin", *args], env=env, capture_output=True,
                             text=True, timeout=120, check=False)
        assert res.returncode == 0, res.stderr
        return res.stdout

    key_id = json.loads(cli("create-key", "ci", "--storage-quota", "5000000000", "--json"))["id"]
    quota = lambda: sessionmaker(create_engine(settings.database_url))().get(ApiKey, key_id).storage_quota_bytes  # noqa: E731
    assert quota() == 5_000_000_000
    cli("set-quota", key_id, "7")
    assert quota() == 7
    cli("set-quota", key_id)
    assert quota() is None
