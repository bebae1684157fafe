"""Limits across replicas (issue 12): two API processes (``python -m app.serve --no-worker``) on one PostgreSQL and
one Redis (``MOPEQ_REDIS_URL``, a private key prefix) share every key's limits: a key allowed N requests a minute
gets exactly N successes in total, however its requests are spread over the two, and the rest are 429 with a
Retry-After; the open event streams of a key are bounded in total too; a key revoked through one replica is refused
by the other within MOPEQ_AUTH_CACHE_TTL_S."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from svc_util import BOOT_KEY, FAST_JOB, REDIS_URL, Proc, auth, free_port, migrate, service_env, wait_until

AUTH_TTL_S = 2.0
MAX_STREAMS = 2


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, pg_url: str, model_root: Path) -> Iterator[list[str]]:
    migrate(pg_url)
    base = tmp_path_factory.mktemp("replicas")
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    procs, urls = [], []
    try:
        for i in range(2):
            home = base / f"api{i}"
            home.mkdir()
            port = free_port()
            env = service_env(home, model_root, database_url=pg_url, MOPEQ_PORT=port, MOPEQ_REDIS_URL=REDIS_URL,
                              MOPEQ_REDIS_KEY_PREFIX=prefix, MOPEQ_SECRET_KEY="replicas-" + prefix,
                              MOPEQ_AUTH_CACHE_TTL_S=AUTH_TTL_S, MOPEQ_SSE_MAX_STREAMS_PER_KEY=MAX_STREAMS,
                              MOPEQ_SSE_MIN_POLL_S=0.25)
            procs.append(Proc([sys.executable, "-m", "app.serve", "--no-worker"], env, base / f"api{i}.log",
                              cwd=home))
            urls.append(f"http://127.0.0.1:{port}")
        for p in procs:
            p.wait_for("Uvicorn running", timeout=120)
        yield urls
    finally:
        for p in procs:
            p.stop()


def _new_key(url: str, **limits: int) -> tuple[str, str]:
    r = httpx.post(f"{url}/v1/admin/keys", json={"name": "replica-" + uuid.uuid4().hex[:6], **limits},
                   headers=auth(BOOT_KEY), timeout=30)
    assert r.status_code == 201, r.text
    return r.json()["api_key"], r.json()["id"]


def test_rate_limit_holds_in_total_across_two_replicas(replicas: list[str]) -> None:
    n = 12
    key, _ = _new_key(replicas[0], rate_limit_per_minute=n)
    clients = [httpx.Client(base_url=u, headers=auth(key), timeout=30) for u in replicas]
    try:
        # 3n requests, alternating between the replicas, 8 at a time: each process alone would allow n of its 1.5n
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: clients[i % 2].get("/v1/jobs"), range(3 * n)))
    finally:
        for c in clients:
            c.close()
    codes = [r.status_code for r in answers]
    assert codes.count(200) == n and codes.count(429) == 2 * n, codes
    per_replica = [sum(1 for i, c in enumerate(codes) if c == 200 and i % 2 == k) for k in (0, 1)]
    assert all(per_replica), per_replica  # both replicas served some: the total is shared, not one replica's
    refused = [r for r in answers if r.status_code == 429]
    assert all(r.json()["code"] == "rate_limited" and 1 <= int(r.headers["retry-after"]) <= 60 for r in refused)


def test_key_revoked_on_one_replica_is_refused_by_the_other_within_the_cache_ttl(replicas: list[str]) -> None:
    key, key_id = _new_key(replicas[0])
    assert httpx.get(f"{replicas[1]}/v1/jobs", headers=auth(key)).status_code == 200  # replica 1 caches it
    r = httpx.delete(f"{replicas[0]}/v1/admin/keys/{key_id}", headers=auth(BOOT_KEY))
    assert r.status_code == 200, r.text
    assert httpx.get(f"{replicas[0]}/v1/jobs", headers=auth(key)).status_code == 401  # at once where revoked
    t0 = time.monotonic()
    while httpx.get(f"{replicas[1]}/v1/jobs", headers=auth(key)).status_code != 401:
        assert time.monotonic() - t0 < AUTH_TTL_S + 1.0, "the other replica still accepts the revoked key"
        time.sleep(0.1)


def test_open_streams_are_bounded_in_total_across_two_replicas(replicas: list[str], model_root: Path) -> None:
    key, _ = _new_key(replicas[0])
    r = httpx.post(f"{replicas[0]}/v1/jobs", json={"model": "tiny-moe", **FAST_JOB}, headers=auth(key), timeout=60)
    assert r.status_code == 202, r.text  # no worker: it stays queued, so its event stream stays open
    path = f"/v1/jobs/{r.json()['id']}/events"
    clients = [httpx.Client(base_url=u, headers=auth(key), timeout=30) for u in replicas]
    streams = [c.stream("GET", path, params={"poll": 0.25}) for c in clients]  # one open on each replica
    try:
        assert [s.__enter__().status_code for s in streams] == [200] * MAX_STREAMS
        for url in replicas:  # the bound is the key's, over both processes
            r = httpx.get(f"{url}{path}", headers=auth(key), timeout=30)
            assert r.status_code == 429 and r.json()["code"] == "too_many_streams", r.text
        streams.pop().__exit__(None, None, None)  # the one on replica 1 closes: a slot is free on either

        def reopened() -> bool:
            with httpx.Client(base_url=replicas[0], headers=auth(key), timeout=5) as c, \
                    c.stream("GET", path) as s:
                return s.status_code == 200

        wait_until(reopened, 15, "a slot to free up after a stream on the other replica closed")
    finally:
        for s in streams:
            s.__exit__(None, None, None)
        for c in clients:
            c.close()
