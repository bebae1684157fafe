"""The fast read path of ``GET /v1/jobs/{id}`` (issue 12), in-process on SQLite and on PostgreSQL: its body is what the
ORM path renders for the same row (the reference: a Session's ``Job`` through ``job_out``), ownership holds (another
key: 404, an admin key: 200), the lane that answers it before routing keeps the route's rules (401, 429, metrics) and
answers what the routed FastAPI route answers, and a verified key is remembered for at most MOPEQ_AUTH_CACHE_TTL_S: a key revoked
behind the API's back (the admin CLI writes the row) is still accepted within the TTL and refused after it, while a
revocation through the API is refused at once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from svc_util import BOOT_KEY, FAST_JOB, auth, migrate, reset_pg, service_env, settings_from_env

from app.api.job_read_lane import JobReadLane
from app.db.models import ApiKey, Job, utcnow
from app.main import create_app
from app.services.job_view import job_out

TTL_S = 2.0


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def app_settings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 model_root: Path) -> Iterator[Any]:
    home = tmp_path_factory.mktemp(f"readpath-{request.param}")
    db_url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    settings = settings_from_env(service_env(home, model_root, database_url=db_url,
                                             MOPEQ_AUTH_CACHE_TTL_S=TTL_S))
    migrate(settings.database_url)
    if db_url:
        reset_pg(db_url)
    yield settings


def _key(c: TestClient, name: str, scope: str = "user", **limits: int) -> tuple[str, str]:
    r = c.post("/v1/admin/keys", json={"name": name, "scope": scope, **limits}, headers=auth())
    assert r.status_code == 201, r.text
    return r.json()["api_key"], r.json()["id"]


def test_get_job_renders_what_the_orm_path_renders(app_settings: Any, model_root: Path) -> None:
    app = create_app(app_settings)
    with TestClient(app) as c:
        owner, _ = _key(c, "owner")
        other, _ = _key(c, "other")
        body = {"model": str(model_root / "tiny-moe"), **FAST_JOB, "bits": [2, 4],
                "evaluation": {"file": str(model_root / "calib.txt"), "samples": 2}}
        r = c.post("/v1/jobs", json=body, headers=auth(owner))
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        with app.state.sessionmaker() as db, db.begin():  # fill the columns a queued job leaves empty
            job = db.get(Job, job_id)
            job.status, job.stage, job.progress, job.started_at = "running", "calibrate", 0.25, utcnow()
            job.timings, job.result = {"fetch": 0.5}, {"avg_bits": 3.0, "layers": [1, 2]}
        got = c.get(f"/v1/jobs/{job_id}", headers=auth(owner))
        assert got.status_code == 200 and got.headers["content-type"] == "application/json"
        with app.state.sessionmaker() as db:
            reference = job_out(db.get(Job, job_id)).model_dump(mode="json")
        assert got.json() == reference
        assert reference["stage"] == "calibrate" and reference["result"]["layers"] == [1, 2]
        assert reference["evaluation"]["samples"] == 2 and reference["bits"] == [2, 4]
        r = c.get(f"/v1/jobs/{job_id}", headers=auth(other))
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        assert c.get(f"/v1/jobs/{job_id}", headers=auth(BOOT_KEY)).json() == reference  # admin sees every job
        assert c.get("/v1/jobs/" + "x" * 65, headers=auth(owner)).status_code == 404
        assert c.get("/v1/jobs/%00", headers=auth(owner)).status_code == 404  # PostgreSQL refuses NUL in text
        with app.state.sessionmaker() as db, db.begin():  # a later write is seen: no snapshot kept between reads
            db.get(Job, job_id).progress = 0.5
        assert c.get(f"/v1/jobs/{job_id}", headers=auth(owner)).json()["progress"] == 0.5


def test_the_lane_keeps_the_routes_rules_and_answers(app_settings: Any, model_root: Path) -> None:
    app = create_app(app_settings)
    routed = create_app(app_settings)  # the same service with GET /v1/jobs/{id} going through FastAPI's routing
    routed.user_middleware = [m for m in routed.user_middleware if m.cls is not JobReadLane]
    assert len(routed.user_middleware) == len(app.user_middleware) - 1
    with TestClient(app) as c, TestClient(routed) as rc:
        owner, _ = _key(c, "lane-owner")
        limited, _ = _key(c, "lane-limited", rate_limit_per_minute=3)
        r = c.post("/v1/jobs", json={"model": str(model_root / "tiny-moe"), **FAST_JOB}, headers=auth(owner))
        assert r.status_code == 202, r.text
        path = f"/v1/jobs/{r.json()['id']}"
        for client in (c, rc):
            for headers in ({}, {"Authorization": "Basic " + owner}, {"Authorization": "Bearer nope"}):
                r = client.get(path, headers=headers)
                assert (r.status_code, r.json()["code"], r.headers["www-authenticate"]) == (
                    401, "unauthorized", "Bearer"), (client is rc, headers)
        lane_body, routed_body = c.get(path, headers=auth(owner)), rc.get(path, headers=auth(owner))
        assert lane_body.status_code == routed_body.status_code == 200
        assert lane_body.content == routed_body.content
        # the key's rate limit holds (it does not own the job: 404s count as requests too)
        codes = [c.get(path, headers=auth(limited)).status_code for _ in range(4)]
        assert codes == [404, 404, 404, 429], codes
        r = c.get(path, headers=auth(limited))
        assert r.json()["code"] == "rate_limited" and int(r.headers["retry-after"]) >= 1
        # the path's other routes and methods are routed as before
        r = c.get(path + "/allocations", headers=auth(owner))
        assert r.status_code == 200 and isinstance(r.json(), list), r.text
        assert c.post(path, headers=auth(owner)).status_code == 405
        # counted under the route's label, as the routed request is
        label = 'mopeq_http_requests_total{method="GET",route="/jobs/{job_id}",status="%d"}'
        assert label % 200 in rc.get("/metrics").text
        metrics = c.get("/metrics").text
        assert label % 200 in metrics and label % 429 in metrics and label % 401 in metrics


def test_verified_keys_are_remembered_for_at_most_the_ttl(app_settings: Any) -> None:
    app = create_app(app_settings)
    with TestClient(app) as c:
        key, key_id = _key(c, "cached")
        t0 = time.monotonic()
        assert c.get("/v1/jobs", headers=auth(key)).status_code == 200
        with app.state.sessionmaker() as db, db.begin():  # as `mopeq admin revoke` does: the row only
            db.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))
        code = c.get("/v1/jobs", headers=auth(key)).status_code
        assert code == 200 or time.monotonic() - t0 >= TTL_S, "remembered within the TTL"
        while c.get("/v1/jobs", headers=auth(key)).status_code != 401:
            assert time.monotonic() - t0 < TTL_S + 0.5, "a revoked key outlived the cache TTL"
            time.sleep(0.05)
        key2, key2_id = _key(c, "revoked-through-the-api")
        assert c.get("/v1/jobs", headers=auth(key2)).status_code == 200
        assert c.delete(f"/v1/admin/keys/{key2_id}", headers=auth()).status_code == 200
        assert c.get("/v1/jobs", headers=auth(key2)).status_code == 401  # forgotten at once
