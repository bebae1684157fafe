"""Watches and the Hub's webhook, against the real service (``python -m app.serve`` on SQLite + the filesystem
broker, and on PostgreSQL + Redis; ``python -m worker.webhooks`` for the announcements) and the Hub mock: a push
payload exactly as the Hub sends it queues exactly one job pinned to the commit, also when delivered twice and
when eight deliveries race; a wrong or missing secret is refused; other events are ignored with a reason; watches
are validated like jobs, owned by their key, and announce their jobs' ends signed with their secret."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from hookrecv import Receiver, hub_push_payload
from sqlalchemy import create_engine, func, select
from svc_util import (
    BOOT_KEY,
    HF_TOKEN,
    Proc,
    auth,
    free_port,
    migrate,
    reset_pg,
    service_env,
    settings_from_env,
    wait_status,
)

from app.db.models import Job, JobWebhook, WatchTrigger
from mopeq_client import AsyncMopeqClient, MopeqClient, NotFoundError

HUB_SECRET = "hub-" + uuid.uuid4().hex
TEMPLATE = {"budget": {"avg_bits": 3.0}, "sensitivity": "frequency", "quantizer": "rtn", "group_size": 64,
            "calibration": {"samples": 2, "seq_len": 16}}


class Stack:
    def __init__(self, home: Path, env: dict[str, str], backend: str, hooks: bool):
        self.home, self.env, self.backend = home, env, backend
        self.settings = settings_from_env(env)
        self.url = f"http://127.0.0.1:{env['MOPEQ_PORT']}"
        self.c = httpx.Client(base_url=self.url, timeout=60, headers=auth())
        self.engine = create_engine(self.settings.database_url)
        self.api = Proc([sys.executable, "-m", "app.serve", "--no-worker"], env, home / "serve.log", cwd=home)
        self.hooks: Proc | None = None
        try:
            self.api.wait_for("Uvicorn running", timeout=90)
            if hooks:
                self.hooks = Proc([sys.executable, "-m", "worker.webhooks"], env, home / "hooks.log", cwd=home)
                self.hooks.wait_for("webhook deliveries ready", timeout=90)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for p in (self.hooks, self.api):
            if p is not None:
                p.stop()
        self.c.close()
        self.engine.dispose()

    def hook(self, payload: Any, secret: str | None = HUB_SECRET, client: httpx.Client | None = None,
             **kw: Any) -> httpx.Response:
        headers = {"X-Webhook-Secret": secret} if secret is not None else {}
        c = client or self.c
        content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return c.post("/v1/hooks/hub", content=content, headers={**headers, "Content-Type": "application/json",
                                                                 "Authorization": ""}, **kw)

    def watch(self, key: str = BOOT_KEY, **body: Any) -> httpx.Response:
        return self.c.post("/v1/watches", json={"template": TEMPLATE, **body}, headers=auth(key))

    def key(self, name: str) -> str:
        r = self.c.post("/v1/admin/keys", json={"name": name})
        assert r.status_code == 201, r.text
        return r.json()["api_key"]

    def count(self, model: str) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(Job).where(Job.model == model)).scalar_one()

    def published(self, job_id: str) -> int:
        """How many broker messages carry this job (the API publishes each new job once)."""
        if self.backend == "sqlite":
            q = self.settings.broker_dir / "queue"
            return sum(job_id.encode() in p.read_bytes() for p in q.iterdir()
                       if p.name.endswith(f".{self.settings.QUEUE}.msg"))
        import redis

        r = redis.Redis.from_url(self.settings.broker_url)
        try:
            key = f"{self.settings.REDIS_KEY_PREFIX}{self.settings.QUEUE}"
            return sum(job_id.encode() in m for m in r.lrange(key, 0, -1))
        finally:
            r.close()


def _env(home: Path, model_root: Path, hub_url: str, **kw: Any) -> dict[str, str]:
    return service_env(home, model_root, hub_url=hub_url, MOPEQ_PORT=free_port(), MOPEQ_HUB_WEBHOOK_SECRET=HUB_SECRET,
                       MOPEQ_WEBHOOK_ALLOW_PRIVATE="true", MOPEQ_WEBHOOK_SWEEP_INTERVAL_S="0.3",
                       MOPEQ_WEBHOOK_RETRY_BASE_S="0.3", **kw)


@pytest.fixture(scope="module")
def sqlite_stack(tmp_path_factory: pytest.TempPathFactory, model_root: Path, hub) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("watches-sqlite")
    st = Stack(home, _env(home, model_root, hub.url), "sqlite", hooks=True)
    yield st
    st.stop()


@pytest.fixture(scope="module")
def postgresql_stack(tmp_path_factory: pytest.TempPathFactory, model_root: Path, hub, pg_url: str,
             redis_ns: tuple[str, str]) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("watches-pg")
    migrate(pg_url)
    reset_pg(pg_url)
    broker, prefix = redis_ns
    st = Stack(home, _env(home, model_root, hub.url, database_url=pg_url, broker_url=broker, redis_prefix=prefix),
               "postgresql", hooks=False)
    yield st
    st.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_hub_push_queues_exactly_one_job_also_when_redelivered_and_raced(
        backend: str, request: pytest.FixtureRequest, hub, model_root: Path) -> None:
    st: Stack = request.getfixturevalue(f"{backend}_stack")
    repo = f"org/watched-{backend}"
    hub_repo = hub.add_repo_from_dir(repo, model_root / "tiny-moe")
    r = st.watch(repo=repo)
    assert r.status_code == 201, r.text
    watch_id = r.json()["id"]

    first = hub_repo.sha
    payload = hub_push_payload(repo, first, extra_refs=[{"ref": "refs/tags/v1", "oldSha": None, "newSha": first}])
    r = st.hook(payload)
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["status"] == "queued" and out["sha"] == first and len(out["jobs"]) == 1, out
    job_id = out["jobs"][0]["job_id"]
    assert out["jobs"][0] == {"watch_id": watch_id, "job_id": job_id, "created": True}
    job = st.c.get(f"/v1/jobs/{job_id}").json()
    assert (job["model"], job["revision"], job["resolved_revision"], job["status"]) == (repo, first, first, "queued")
    assert (job["quantizer"], job["budget"]["avg_bits"], job["group_size"]) == ("rtn", 3.0, 64)

    # the Hub retries the delivery (or someone replays it from the webhook's activity tab)
    again = st.hook(payload)
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "duplicate" and again.json()["jobs"][0] == {**out["jobs"][0], "created": False}
    assert st.count(repo) == 1 and st.published(job_id) == 1

    # a new commit, delivered eight times at once: one job, the same id in every answer
    second = hub._commit(hub_repo, "v2")
    payload2 = hub_push_payload(repo, second, first)
    clients = [httpx.Client(base_url=st.url, timeout=120) for _ in range(8)]
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda c: st.hook(payload2, client=c), clients))
    finally:
        for c in clients:
            c.close()
    assert sorted(a.status_code for a in answers) == [200] * 7 + [202], [a.text for a in answers]
    ids = {a.json()["jobs"][0]["job_id"] for a in answers}
    assert len(ids) == 1 and job_id not in ids
    assert sum(a.json()["jobs"][0]["created"] for a in answers) == 1
    (job2,) = ids
    assert st.count(repo) == 2 and st.published(job2) == 1
    with st.engine.connect() as conn:
        rows = conn.execute(select(WatchTrigger.sha, WatchTrigger.job_id).where(WatchTrigger.watch_id == watch_id)
                            .order_by(WatchTrigger.id)).all()
    assert [tuple(x) for x in rows] == [(first, job_id), (second, job2)]
    assert st.c.get(f"/v1/jobs/{job2}").json()["resolved_revision"] == second


def test_a_tag_push_on_a_watched_pattern_queues_exactly_one_job(sqlite_stack: Stack, hub, model_root: Path) -> None:
    """A watch that follows tags ('refs/tags/v*'): a push of a matching tag makes one job pinned to the tagged
    commit (also when the Hub redelivers it, and when a second matching tag names the same commit); a branch push
    and a tag outside the pattern make none."""
    st = sqlite_stack
    repo = "org/tagged"
    hub_repo = hub.add_repo_from_dir(repo, model_root / "tiny-moe")
    with MopeqClient(st.url, api_key=BOOT_KEY) as c:
        w = c.create_watch(repo, ref="refs/tags/v*", quantizer="rtn", avg_bits=3, group_size=64,
                           sensitivity="frequency", calib_samples=2, seq_len=16)
    assert w.ref == "refs/tags/v*" and st.c.get(f"/v1/watches/{w.id}").json()["ref"] == "refs/tags/v*"
    assert st.watch(repo="org/x", ref="refs/pull/1").status_code == 422  # branches and tags only

    main_push = hub_push_payload(repo, hub_repo.sha)
    r = st.hook(main_push)
    assert r.status_code == 200 and r.json()["status"] == "ignored", r.text
    assert "no update of refs/tags/v*" in r.json()["reason"]
    r = st.hook(hub_push_payload(repo, hub_repo.sha, None, ref="refs/tags/nightly"))
    assert r.json()["status"] == "ignored" and st.count(repo) == 0, r.text

    release = hub._commit(hub_repo, "release 1.0")
    tag = hub_push_payload(repo, release, None, ref="refs/tags/v1.0",
                           extra_refs=[{"ref": "refs/tags/v1", "oldSha": None, "newSha": release}])
    r = st.hook(tag)
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["status"] == "queued" and out["sha"] == release and len(out["jobs"]) == 1, out
    job_id = out["jobs"][0]["job_id"]
    assert out["jobs"][0] == {"watch_id": w.id, "job_id": job_id, "created": True}
    job = st.c.get(f"/v1/jobs/{job_id}").json()
    assert (job["model"], job["revision"], job["resolved_revision"]) == (repo, release, release)
    again = st.hook(tag)
    assert again.status_code == 200 and again.json()["status"] == "duplicate", again.text
    assert again.json()["jobs"] == [{**out["jobs"][0], "created": False}]
    assert st.count(repo) == 1 and st.published(job_id) == 1


def test_a_wrong_or_missing_secret_is_refused(sqlite_stack: Stack, hub, model_root: Path) -> None:
    st = sqlite_stack
    repo = "org/guarded"
    sha = hub.add_repo_from_dir(repo, model_root / "tiny-moe").sha
    assert st.watch(repo=repo).status_code == 201
    for secret in ("wrong", HUB_SECRET + "x", HUB_SECRET[:-1], "", None):
        r = st.hook(hub_push_payload(repo, sha), secret=secret)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", (secret, r.text)
    assert st.hook(b"{not json", secret="wrong").status_code == 401  # the secret is checked before the body
    assert st.count(repo) == 0
    assert st.hook(hub_push_payload(repo, sha)).status_code == 202
    assert st.count(repo) == 1


def test_other_events_are_ignored_with_a_reason(sqlite_stack: Stack, hub, model_root: Path) -> None:
    st = sqlite_stack
    repo = "org/quiet"
    sha = hub.add_repo_from_dir(repo, model_root / "tiny-moe").sha
    assert st.watch(repo=repo).status_code == 201
    cases = {
        "not a model repo": hub_push_payload(repo, sha, repo_type="dataset"),
        "no update of refs/heads/main": hub_push_payload(repo, sha, ref="refs/tags/v2"),
        "is not a new commit": hub_push_payload(repo, sha, scope="repo.config"),
        "was deleted": hub_push_payload(repo, None),  # type: ignore[arg-type]
    }
    discussion = hub_push_payload(repo, sha, scope="discussion", action="create")
    del discussion["updatedRefs"]
    cases["discussion/create is not a new commit"] = discussion
    cases["no watch matches org/unwatched"] = hub_push_payload("org/unwatched", sha)
    for reason, payload in cases.items():
        r = st.hook(payload)
        assert r.status_code == 200 and r.json()["status"] == "ignored" and reason in r.json()["reason"], (reason,
                                                                                                          r.text)
    assert st.count(repo) == 0
    r = st.hook(b"{not json")
    assert r.status_code == 400 and r.json()["code"] == "malformed_json"
    r = st.hook({"event": {"action": "update"}})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"


def test_watches_are_validated_like_jobs(sqlite_stack: Stack) -> None:
    st = sqlite_stack
    bad: list[tuple[dict[str, Any], int, str, str]] = [
        ({"repo": "org/x", "template": {"group_size": 3}}, 422, "invalid_request", "template.group_size"),
        ({"repo": "org/x", "template": {"model": "org/y"}}, 422, "invalid_request", "template.model"),
        ({"repo": "org/x", "template": {"bits": [2, 5]}}, 422, "invalid_request", "bits"),
        ({"repo": "org/x", "template": {"calibration": {"file": "/etc/passwd"}}}, 422, "path_not_allowed", "outside"),
        ({"repo": "*/x"}, 422, "invalid_request", "repo"),
        ({"repo": "org/x", "target_repo": "{owner}/{name}-q"}, 422, "invalid_input", "hf_token"),
        ({"repo": "org/x", "target_repo": "{owner}/{nope}", "hf_token": HF_TOKEN}, 422, "invalid_input", "{nope}"),
        ({"repo": "org/x", "target_repo": "{owner}/{name}-{bits}b", "hf_token": HF_TOKEN,
          "template": {"budget": {"gb": 1.0}}}, 422, "invalid_input", "{bits}"),
        ({"repo": "org/x", "target_repo": "a/b/c", "hf_token": HF_TOKEN}, 422, "invalid_input", "not a Hub repo"),
        ({"repo": "org/x", "webhook": {"url": "ftp://x/y"}}, 422, "url_not_allowed", "http"),
        ({"repo": "org/x", "webhook": {"url": "http://127.0.0.1:9/h", "secret": "not-whsec"}}, 422,
         "invalid_input", "whsec_"),
        ({"repo": "org/x", "webhook": {"url": "http://127.0.0.1:9/h", "secret": "whsec_c2hvcnQ="}}, 422,
         "invalid_input", "24 to 64"),
    ]
    for body, status, code, text in bad:
        r = st.c.post("/v1/watches", json=body)
        assert r.status_code == status and r.json()["code"] == code and text in json.dumps(r.json()), (body, r.text)
    assert st.c.get("/v1/watches").json() == [] or all(w["repo"] != "org/x" for w in st.c.get("/v1/watches").json())
    ok = st.c.post("/v1/watches", json={"repo": "org/*-MoE*", "template": {"budget": {"avg_bits": 2.5}},
                                        "target_repo": "{owner}/{name}-MoPEQ-{bits}b", "hf_token": HF_TOKEN})
    assert ok.status_code == 201, ok.text
    w = ok.json()
    assert w["has_hf_token"] is True and "hf_token" not in w and HF_TOKEN not in ok.text
    assert w["template"]["budget"] == {"avg_bits": 2.5} and w["template"]["quantizer"] == "gptq"  # the defaults
    assert st.c.delete(f"/v1/watches/{w['id']}").status_code == 200


def test_owned_by_their_key_with_the_sdk_and_pattern_watches(sqlite_stack: Stack, hub, model_root: Path) -> None:
    st = sqlite_stack
    alice, bob = st.key("alice-w"), st.key("bob-w")
    with MopeqClient(st.url, api_key=alice) as ca, MopeqClient(st.url, api_key=bob) as cb:
        w = ca.create_watch("org/PAT-*", quantizer="rtn", avg_bits=3, group_size=64, sensitivity="frequency",
                            calib_samples=2, seq_len=16)
        assert w.repo == "org/PAT-*" and w.template["quantizer"] == "rtn" and w.webhook_secret is None
        assert [x.id for x in ca.list_watches()] == [w.id] and ca.get_watch(w.id).repo == "org/PAT-*"
        assert cb.list_watches() == []
        for call in (cb.get_watch, cb.delete_watch):
            with pytest.raises(NotFoundError):
                call(w.id)
        assert w.id in {x["id"] for x in st.c.get("/v1/watches").json()}  # the admin sees every watch

        sha = hub.add_repo_from_dir("org/pat-one", model_root / "tiny-moe").sha
        r = st.hook(hub_push_payload("org/pat-one", sha))  # patterns match case-insensitively, like the Hub
        assert r.status_code == 202, r.text
        job_id = r.json()["jobs"][0]["job_id"]
        assert ca.get(job_id).revision == sha
        with pytest.raises(NotFoundError):
            cb.get(job_id)
        other = hub.add_repo_from_dir("elsewhere/pat-one", model_root / "tiny-moe").sha
        assert st.hook(hub_push_payload("elsewhere/pat-one", other)).json()["status"] == "ignored"

        async def listed_async() -> list[str]:
            async with AsyncMopeqClient(st.url, api_key=alice) as ac:
                got = await ac.get_watch(w.id)
                return [got.id] + [x.id for x in await ac.list_watches()]

        assert asyncio.run(listed_async()) == [w.id, w.id]
        assert ca.delete_watch(w.id).deleted_at is not None
        assert ca.list_watches() == []
        with pytest.raises(NotFoundError):
            ca.get_watch(w.id)
        sha2 = hub._commit(hub.repos["org/pat-one"], "v2")
        r = st.hook(hub_push_payload("org/pat-one", sha2, sha))
        assert r.status_code == 200 and r.json()["status"] == "ignored", r.text


def test_the_watch_announces_its_jobs_end_signed_with_its_secret(sqlite_stack: Stack, receiver: Receiver, hub,
                                                                  model_root: Path) -> None:
    from standardwebhooks.webhooks import Webhook

    st = sqlite_stack
    repo = "org/announced"
    sha = hub.add_repo_from_dir(repo, model_root / "tiny-moe").sha
    r = st.watch(repo=repo, target_repo="{owner}/{name}-MoPEQ-{bits}b-{short_sha}", hf_token=HF_TOKEN,
                 webhook={"url": receiver.url("/watch")})
    assert r.status_code == 201, r.text
    w = r.json()
    secret = w["webhook_secret"]
    assert secret.startswith("whsec_") and w["webhook"] == {"url": receiver.url("/watch")}
    listed = st.c.get(f"/v1/watches/{w['id']}").json()
    assert "webhook_secret" not in listed and secret not in json.dumps(st.c.get("/v1/watches").json())

    job_id = st.hook(hub_push_payload(repo, sha)).json()["jobs"][0]["job_id"]
    job = st.c.get(f"/v1/jobs/{job_id}").json()
    assert job["push"] == {"repo_id": f"org/announced-MoPEQ-3b-{sha[:7]}", "private": True}
    with st.engine.connect() as conn:
        hook = conn.execute(select(JobWebhook).where(JobWebhook.job_id == job_id)).one()
    assert hook.watch_id == w["id"] and secret not in hook.secret_enc

    # no GPU worker here: the job waits; cancelling it (a final status reached in the API) is announced
    assert st.c.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    (got,) = receiver.wait("/watch", 1, timeout=60)
    event = Webhook(secret).verify(got.body, got.headers)
    assert event["type"] == "job.cancelled" and event["data"]["watch_id"] == w["id"]
    assert event["data"]["job"]["id"] == job_id and event["data"]["job"]["revision"] == sha
    assert wait_status(lambda: st.c.get(f"/v1/jobs/{job_id}").json(), ("cancelled",), 10)
    msgs = st.c.get(f"/v1/jobs/{job_id}/webhooks").json()
    assert [(m["event_type"], m["status"], [d["status_code"] for d in m["deliveries"]]) for m in msgs] == [
        ("job.cancelled", "delivered", [200])]
    assert msgs[0]["id"] == got.headers["webhook-id"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_unique_constraint_settles_a_delivery_that_passed_the_first_check(
        backend: str, request: pytest.FixtureRequest, hub, model_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministically, the race the concurrent deliveries above may or may not hit: a second delivery that found
    no job yet (the first had not committed) gets the first job from the unique constraint, and makes none."""
    import huggingface_hub.constants as hf_constants

    from app.core.security import Keyring
    from app.db.models import Watch
    from app.db.session import make_engine, make_sessionmaker
    from app.services import watches as svc

    st: Stack = request.getfixturevalue(f"{backend}_stack")
    monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    repo = f"org/raced-{backend}"
    sha = hub.add_repo_from_dir(repo, model_root / "tiny-moe").sha
    watch_id = st.watch(repo=repo).json()["id"]
    first = st.hook(hub_push_payload(repo, sha)).json()["jobs"][0]
    assert first["created"]

    real, calls = svc._existing, []

    def not_yet_committed(*a: Any) -> str | None:
        calls.append(a)
        return None if len(calls) == 1 else real(*a)

    monkeypatch.setattr(svc, "_existing", not_yet_committed)
    factory = make_sessionmaker(make_engine(st.settings.database_url))
    with factory() as db:
        watch = db.get(Watch, watch_id)
        db.expunge(watch)
    job_id, created = svc._trigger(factory, st.settings, Keyring(st.settings.secret_key()), watch, repo, sha, None)
    assert (job_id, created, len(calls)) == (first["job_id"], False, 2)
    assert st.count(repo) == 1
