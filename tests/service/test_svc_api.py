"""The HTTP API in-process (FastAPI TestClient) on SQLite and on PostgreSQL: auth and scopes, validation of every
bad input before anything is written, idempotency, limits, SSE resume, health and metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, text
from svc_util import BOOT_KEY, FAST_JOB, HF_TOKEN, auth, migrate, reset_pg, service_env, settings_from_env

from app.db.models import Job, JobEvent
from app.main import create_app


class Api:
    def __init__(self, client: TestClient, settings: Any, model_root: Path):
        self.c, self.settings, self.root = client, settings, model_root
        self.engine = create_engine(settings.database_url)

    def key(self, name: str, scope: str = "user", **limits: Any) -> str:
        r = self.c.post("/v1/admin/keys", json={"name": name, "scope": scope, **limits}, headers=auth())
        assert r.status_code == 201, r.text
        return r.json()["api_key"]

    def submit(self, key: str = BOOT_KEY, headers: dict[str, str] | None = None, **body: Any):
        payload = {"model": str(self.root / "tiny-moe"), **FAST_JOB, **body}
        return self.c.post("/v1/jobs", json=payload, headers={**auth(key), **(headers or {})})

    def count_jobs(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(Job)).scalar_one()

    def queued_messages(self) -> int:
        q = self.settings.broker_dir / "queue"
        return sum(1 for p in q.iterdir() if p.name.endswith(f".{self.settings.QUEUE}.msg"))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, model_root: Path,
        hub) -> Iterator[Api]:
    home = tmp_path_factory.mktemp(f"api-{request.param}")
    db_url = None
    if request.param == "postgresql":
        db_url = request.getfixturevalue("pg_url")
    env = service_env(home, model_root, database_url=db_url, MOPEQ_RATE_LIMIT_PER_MINUTE=100000,
                      MOPEQ_MAX_CONCURRENT_JOBS=1000, MOPEQ_ALLOW_REMOTE_CODE_REPOS="*trusted-remote*")
    settings = settings_from_env(env)
    migrate(settings.database_url)
    if db_url:
        reset_pg(db_url)
    mp = pytest.MonkeyPatch()
    import huggingface_hub.constants as hf_constants

    # huggingface_hub reads HF_ENDPOINT at import; a served process gets it from its environment
    mp.setattr(hf_constants, "ENDPOINT", hub.url)
    mp.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    mp.delenv("HF_HUB_OFFLINE", raising=False)
    mp.setenv("HF_HOME", str(home / "hf"))
    hub.add_repo_from_dir("org/tiny-moe", model_root / "tiny-moe")
    with TestClient(create_app(settings)) as client:
        yield Api(client, settings, model_root)
    mp.undo()


def test_health_ready_metrics(api: Api) -> None:
    assert api.c.get("/healthz").json() == {"status": "ok"}
    r = api.c.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "broker": "ok"}
    api.submit()
    m = api.c.get("/metrics").text
    assert 'mopeq_jobs{status="queued"}' in m and "mopeq_queue_depth" in m and "mopeq_http_requests_total" in m


def test_readyz_reports_an_unreachable_broker(api: Api, tmp_path: Path) -> None:
    env = service_env(tmp_path, api.root, database_url=api.settings.DATABASE_URL,
                      broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings_from_env(env))) as c:
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["broker"].startswith("error")
    assert r.json()["checks"]["database"] == "ok"


def test_auth_and_scopes(api: Api) -> None:
    r = api.c.get("/v1/jobs")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "missing API key" in r.json()["detail"]
    for bad in ("nope", "mpq_AAAAAAAAAAAA_" + "x" * 40, BOOT_KEY + "x"):
        r = api.c.get("/v1/jobs", headers=auth(bad))
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    user = api.key("scoped-user")
    r = api.c.post("/v1/admin/keys", json={"name": "x"}, headers=auth(user))
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    key_id = user.split("_")[1]
    assert api.c.delete(f"/v1/admin/keys/{key_id}", headers=auth()).status_code == 200
    assert api.c.get("/v1/jobs", headers=auth(user)).status_code == 401
    # keys are stored only as HMACs
    with api.engine.connect() as conn:
        dump = json.dumps([list(map(str, row)) for row in conn.execute(text("SELECT * FROM api_keys"))])
    assert user not in dump and BOOT_KEY not in dump


def test_another_users_job_is_404(api: Api) -> None:
    alice, bob = api.key("alice"), api.key("bob")
    r = api.submit(alice)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert api.c.get(f"/v1/jobs/{job_id}", headers=auth(alice)).status_code == 200
    for method, path in [("GET", ""), ("POST", "/cancel"), ("GET", "/events"), ("GET", "/bitmap"),
                         ("GET", "/artifacts"), ("GET", "/allocations"), ("GET", "/artifacts/bitmap.json")]:
        r = api.c.request(method, f"/v1/jobs/{job_id}{path}", headers=auth(bob))
        assert r.status_code == 404 and r.json()["code"] == "not_found", (method, path, r.text)
    assert api.c.get("/v1/jobs", headers=auth(bob)).json()["total"] == 0
    mine = api.c.get("/v1/jobs", headers=auth(alice)).json()
    assert [j["id"] for j in mine["items"]] == [job_id]
    assert job_id in [j["id"] for j in api.c.get("/v1/jobs?limit=200", headers=auth()).json()["items"]]  # admin


def test_list_filters_and_paginates(api: Api) -> None:
    k = api.key("lister")
    ids = [api.submit(k).json()["id"] for _ in range(3)]
    page = api.c.get("/v1/jobs?limit=2&offset=0", headers=auth(k)).json()
    assert page["total"] == 3 and len(page["items"]) == 2 and page["items"][0]["id"] == ids[-1]
    assert len(api.c.get("/v1/jobs?limit=2&offset=2", headers=auth(k)).json()["items"]) == 1
    assert api.c.get("/v1/jobs?status=succeeded", headers=auth(k)).json()["total"] == 0
    assert api.c.get(f"/v1/jobs?model={api.root / 'tiny-moe'}", headers=auth(k)).json()["total"] == 3
    assert api.c.get("/v1/jobs?status=bogus", headers=auth(k)).status_code == 422


BAD_INPUTS = [
    ("unknown hub model", {"model": "org/does-not-exist"}, 422, "model_not_found", "was not found on the Hub"),
    ("bad repo id", {"model": "not a model!"}, 422, "invalid_input", "neither a Hub repo id"),
    ("not MoE", {"model": "{root}/not-moe"}, 422, "not_moe", "not a Mixture-of-Experts"),
    ("pickle only", {"model": "{root}/pickle-only"}, 422, "pickle_only", "pickle"),
    ("remote code", {"model": "{root}/remote-code"}, 422, "remote_code", "trust_remote_code"),
    ("remote code not allowed", {"model": "{root}/remote-code", "trust_remote_code": True}, 422, "remote_code",
     "MOPEQ_ALLOW_REMOTE_CODE_REPOS"),
    ("traversal", {"model": "{root}/../../../etc"}, 422, "path_not_allowed", "outside the server's allowed"),
    ("absolute outside", {"model": "/etc"}, 422, "path_not_allowed", "outside the server's allowed"),
    ("dir symlink escape", {"model": "escape"}, 422, "path_not_allowed", "outside the server's allowed"),
    ("file symlink escape", {"model": "{root}/sneaky"}, 422, "path_not_allowed", "outside the allowed model roots"),
    ("missing local", {"model": "{root}/nothing-here"}, 422, "model_not_found", "does not exist"),
    ("name too long for the filesystem", {"model": "\u00e4" * 200}, 422, "invalid_input", "not a usable path"),
    ("boolean as a number", {"probes": True}, 422, "invalid_request", "got a boolean"),
    ("infeasible avg bits", {"budget": {"avg_bits": 1.5}}, 422, "infeasible_budget", "feasible range 2...4"),
    ("infeasible gb", {"budget": {"gb": 0.00001}}, 422, "infeasible_budget", "outside the feasible range"),
    ("two budgets", {"budget": {"avg_bits": 3, "gb": 1}}, 422, "invalid_request", "exactly one"),
    ("bad bits", {"bits": [2, 5]}, 422, "invalid_input", "--bits must be a subset"),
    ("bad group size", {"group_size": 12}, 422, "invalid_input", "multiple of 8"),
    ("unknown knob", {"colour": "red"}, 422, "invalid_request", "colour"),
    ("bad sensitivity", {"sensitivity": "vibes"}, 422, "invalid_request", "sensitivity"),
    ("calibration outside", {"calibration": {"file": "/etc/passwd"}}, 422, "path_not_allowed", "calibration"),
    ("push without token", {"push": {"private": True}}, 422, "invalid_input", "hf_token"),
    ("bad push repo", {"push": {"repo_id": "../x"}, "hf_token": HF_TOKEN}, 422, "invalid_request", "repo_id"),
]


@pytest.mark.parametrize(("case", "body", "status", "code", "text"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_before_anything_is_written(api: Api, case: str, body: dict, status: int, code: str,
                                                        text: str) -> None:
    body = {k: (v.replace("{root}", str(api.root)) if isinstance(v, str) else v) for k, v in body.items()}
    before_jobs, before_msgs = api.count_jobs(), api.queued_messages()
    r = api.submit(**body)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code, r.text
    assert text in json.dumps(r.json()), r.text
    assert (api.count_jobs(), api.queued_messages()) == (before_jobs, before_msgs)
    assert HF_TOKEN not in r.text


def test_infeasible_budget_names_the_range(api: Api) -> None:
    r = api.submit(budget={"avg_bits": 5.0})
    assert r.status_code == 422
    assert r.json()["feasible"] == {"unit": "avg_bits", "min": 2.0, "max": 4.0}


def test_malformed_json_is_400(api: Api) -> None:
    r = api.c.post("/v1/jobs", content=b'{"model": "x",', headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "malformed_json"
    r = api.c.post("/v1/jobs", content=b"[1, 2]", headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 422


def test_huge_body_is_413(api: Api) -> None:
    r = api.c.post("/v1/jobs", content=b'{"model": "' + b"a" * (2 << 20) + b'"}',
                   headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 413


def test_remote_code_allowed_by_operator_and_job(api: Api, tmp_path: Path) -> None:
    target = api.root / "trusted-remote-code"
    if not target.exists():
        target.symlink_to(api.root / "remote-code")
    r = api.submit(model=str(target), trust_remote_code=True, budget={"avg_bits": 3.0})
    assert r.status_code == 202, r.text


def test_hub_model_is_pinned_to_a_commit(api: Api, hub) -> None:
    r = api.submit(model="org/tiny-moe")
    assert r.status_code == 202, r.text
    assert r.json()["resolved_revision"] == hub.repos["org/tiny-moe"].sha


def test_idempotency_key_replays_and_mismatches(api: Api) -> None:
    k = api.key("idem")
    before = api.queued_messages()
    r1 = api.submit(k, headers={"Idempotency-Key": "abc-1"})
    r2 = api.submit(k, headers={"Idempotency-Key": "abc-1"})
    assert r1.status_code == r2.status_code == 202
    assert r1.json() == r2.json() and r2.headers["idempotent-replayed"] == "true"
    r3 = api.submit(k, headers={"Idempotency-Key": "abc-1"}, budget={"avg_bits": 2.5})
    assert r3.status_code == 422 and r3.json()["code"] == "idempotency_mismatch"
    assert api.c.get("/v1/jobs", headers=auth(k)).json()["total"] == 1
    assert api.queued_messages() == before + 1
    # keys are per API key: another key may use the same Idempotency-Key
    assert api.submit(api.key("idem2"), headers={"Idempotency-Key": "abc-1"}).json()["id"] != r1.json()["id"]


def test_rate_limit_and_concurrency_limit(api: Api) -> None:
    k = api.key("limited", rate_limit_per_minute=3)
    codes = [api.c.get("/v1/jobs", headers=auth(k)).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = api.c.get("/v1/jobs", headers=auth(k))
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60 and r.json()["code"] == "rate_limited"
    one = api.key("one-at-a-time", max_concurrent_jobs=1)
    assert api.submit(one).status_code == 202
    r = api.submit(one)
    assert r.status_code == 429 and r.json()["code"] == "too_many_jobs" and r.headers["retry-after"]


def test_cancel_queued_job(api: Api) -> None:
    job_id = api.submit().json()["id"]
    r = api.c.post(f"/v1/jobs/{job_id}/cancel", headers=auth())
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    r = api.c.post(f"/v1/jobs/{job_id}/cancel", headers=auth())
    assert r.status_code == 409 and r.json()["code"] == "not_cancellable"
    assert api.c.get(f"/v1/jobs/{job_id}/bitmap", headers=auth()).status_code == 409


def test_evaluation_suites_are_validated_recorded_and_echoed(api: Api) -> None:
    before = api.count_jobs()
    r = api.submit(evaluation={"suites": ["nonsense"]})
    assert r.status_code == 422 and "HARNESS:TASK" in r.json()["detail"]
    assert api.count_jobs() == before
    r = api.submit(evaluation={"suites": ["lm-eval:mopeq_next_line"], "suite_limit": 4})
    assert r.status_code == 202, r.text
    ev = api.c.get(f"/v1/jobs/{r.json()['id']}", headers=auth()).json()["evaluation"]
    assert ev["suites"] == ["lm-eval:mopeq_next_line"] and ev["suite_limit"] == 4
    api.c.post(f"/v1/jobs/{r.json()['id']}/cancel", headers=auth())


def test_token_is_write_only(api: Api) -> None:
    r = api.submit(hf_token=HF_TOKEN, push={"repo_id": "tester/out", "private": True})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert "hf_token" not in r.json() and HF_TOKEN not in r.text
    assert HF_TOKEN not in api.c.get(f"/v1/jobs/{job_id}", headers=auth()).text
    with api.engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM jobs WHERE id = :i"), {"i": job_id}).mappings().one()
        events = conn.execute(text("SELECT * FROM job_events WHERE job_id = :i"), {"i": job_id}).all()
    assert row["hf_token_enc"] and HF_TOKEN not in json.dumps({k: str(v) for k, v in row.items()})
    assert HF_TOKEN not in str(events)
    # a rejected body never echoes the token
    r = api.submit(hf_token=HF_TOKEN, bits="x")
    assert r.status_code == 422 and HF_TOKEN not in r.text


def test_estimate_route(api: Api) -> None:
    r = api.c.post("/v1/estimate", json={"model": str(api.root / "tiny-moe"), "budget": {"avg_bits": 1.5}},
                   headers=auth())
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["num_experts"] == 8 and d["moe_layers"] == 2 and d["feasible"]["avg_bits"] == [2.0, 4.0]
    assert d["budget_feasible"] is False and "feasible range" in d["budget_message"]
    assert d["min_bytes"] < d["max_bytes"] < d["stored_bytes"]
    assert d["engines"]["llama.cpp (gguf)"]["granularities"] == ["layer-projection", "layer"]
    assert d["engines"]["vLLM (compressed-tensors)"] == {"granularities": ["layer"], "bits": [4]}
    r = api.c.post("/v1/estimate", json={"model": "org/tiny-moe"}, headers=auth())
    assert r.status_code == 200 and r.json()["source"] == "hub"
    r = api.c.post("/v1/estimate", json={"model": str(api.root / "not-moe")}, headers=auth())
    assert r.status_code == 422 and r.json()["code"] == "not_moe"


def test_sse_stream_and_last_event_id_resume(api: Api) -> None:
    job_id = api.submit().json()["id"]
    with api.engine.begin() as conn:
        for i, stage in enumerate(["fetch", "calibrate", "sensitivity"]):
            conn.execute(JobEvent.__table__.insert().values(job_id=job_id, kind="stage", stage=stage,
                                                            progress=i / 3, message=f"stage {stage}"))
        conn.execute(JobEvent.__table__.insert().values(job_id=job_id, kind="status", status="failed",
                                                        message="done"))
        conn.execute(Job.__table__.update().where(Job.id == job_id).values(status="failed"))

    def read(headers: dict[str, str]) -> list[dict[str, Any]]:
        events, cur = [], {}
        with api.c.stream("GET", f"/v1/jobs/{job_id}/events", headers={**auth(), **headers}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if not line:
                    if cur:
                        events.append(cur)
                    cur = {}
                elif line.startswith(("event:", "id:", "data:")):
                    k, v = line.split(":", 1)
                    cur[k] = v.strip()
        return events

    all_events = read({})
    assert [e["event"] for e in all_events] == ["status", "stage", "stage", "stage", "status", "end"]
    ids = [int(e["id"]) for e in all_events if "id" in e]
    assert ids == sorted(ids)
    resumed = read({"Last-Event-ID": str(ids[2])})
    assert [int(e["id"]) for e in resumed if "id" in e] == ids[3:]
    assert json.loads(resumed[-1]["data"]) == {"status": "failed"}


def test_openapi_documents_errors_and_hides_the_token(api: Api) -> None:
    spec = api.c.get("/openapi.json").json()
    post = spec["paths"]["/v1/jobs"]["post"]
    assert {"400", "401", "422", "429"} <= set(post["responses"])
    body = spec["components"]["schemas"]["JobCreate"]["properties"]["hf_token"]
    assert body.get("writeOnly") is True
    assert "hf_token" not in spec["components"]["schemas"]["JobOut"]["properties"]
    for path, ops in spec["paths"].items():
        if path.startswith("/v1/"):
            for op in ops.values():
                assert "401" in op["responses"], path


def test_retry_makes_a_linked_job_with_the_same_settings(api: Api) -> None:
    old = api.submit(calibration={"samples": 3, "seq_len": 24}).json()
    r = api.c.post(f"/v1/jobs/{old['id']}/retry", headers=auth())
    assert r.status_code == 409 and r.json()["code"] == "not_retryable"  # queued
    assert api.c.post(f"/v1/jobs/{old['id']}/cancel", headers=auth()).json()["status"] == "cancelled"
    other = api.key("not-the-owner")
    assert api.c.post(f"/v1/jobs/{old['id']}/retry", headers=auth(other)).status_code == 404
    before = api.queued_messages()
    r = api.c.post(f"/v1/jobs/{old['id']}/retry", headers=auth())
    assert r.status_code == 202, r.text
    new = r.json()
    assert r.headers["location"] == f"/v1/jobs/{new['id']}" and api.queued_messages() == before + 1
    assert (new["status"], new["retry_of"], new["model"]) == ("queued", old["id"], old["model"])
    assert new["id"] != old["id"] and new["settings"] == old["settings"]
    assert new["settings"]["version"] == 1 and new["settings"]["calib_samples"] == 3
    assert new["calibration"] == old["calibration"] == {"file": None, "samples": 3, "seq_len": 24}
    with api.engine.connect() as conn:
        msgs = conn.execute(select(JobEvent.message).where(JobEvent.job_id == new["id"])).scalars().all()
    assert msgs == [f"job queued (retry of {old['id']})"]
    # a job that pushes needs a new token (the old one was wiped when it ended)
    pushing = api.submit(hf_token=HF_TOKEN, push={"repo_id": "tester/x"}).json()
    api.c.post(f"/v1/jobs/{pushing['id']}/cancel", headers=auth())
    r = api.c.post(f"/v1/jobs/{pushing['id']}/retry", headers=auth())
    assert r.status_code == 422 and "hf_token" in r.json()["detail"]
    r = api.c.post(f"/v1/jobs/{pushing['id']}/retry", json={"hf_token": HF_TOKEN}, headers=auth())
    assert r.status_code == 202 and r.json()["push"] == {"repo_id": "tester/x", "private": False}
    for j in (new, r.json()):
        api.c.post(f"/v1/jobs/{j['id']}/cancel", headers=auth())
