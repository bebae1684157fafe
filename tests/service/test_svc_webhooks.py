"""Outgoing webhooks against the real embedded service (``python -m app.serve``: API, a GPU worker and the webhook
worker on SQLite and the filesystem broker) and a real HTTP receiver on 127.0.0.1: a job's success, failure and
cancellation each arrive signed as Standard Webhooks, verified here with the independent ``standardwebhooks``
package (and a tampered body, id or secret fails verification); a receiver that answers 500 once gets the same
message again; every attempt is recorded. In process: private, loopback, link-local and reserved targets are
refused at creation without the operator's flag, and again at delivery when the name re-resolves to one (DNS
rebinding); the request goes to the address that was checked."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hookrecv import Receiver
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from svc_util import (
    BOOT_KEY,
    FAST_JOB,
    Proc,
    auth,
    free_port,
    migrate,
    service_env,
    settings_from_env,
    wait_status,
    wait_until,
)

from app.core.security import Keyring
from app.db.models import JobWebhook, WebhookDelivery, WebhookMessage
from app.db.session import make_engine, make_sessionmaker
from app.main import create_app
from app.services import webhooks as svc
from mopeq_client import MopeqClient

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the Standard Webhooks documentation's example secret
DELAY_STAGE = "calibrate"


class Server:
    def __init__(self, home: Path, env: dict[str, str], root: Path):
        self.home, self.env, self.root = home, env, root
        self.c = httpx.Client(base_url=f"http://127.0.0.1:{env['MOPEQ_PORT']}", timeout=60, headers=auth())
        self.proc = Proc([sys.executable, "-m", "app.serve"], env, home.parent / "serve.log", cwd=home.parent)
        self.proc.wait_for("Uvicorn running", timeout=90)
        self.proc.wait_for("webhook deliveries ready", timeout=90)
        self.proc.wait_for("ready on queue", timeout=90)

    def submit(self, url: str, secret: str = SECRET, **body: Any) -> str:
        r = self.c.post("/v1/jobs", json={"model": "tiny-moe", **FAST_JOB, "webhook": {"url": url, "secret": secret},
                                          **body})
        assert r.status_code == 202, r.text
        assert secret not in r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.c.get(f"/v1/jobs/{job_id}").json()

    def messages(self, job_id: str) -> list[dict]:
        return self.c.get(f"/v1/jobs/{job_id}/webhooks").json()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("webhooks")
    root = base / "models"
    root.mkdir()
    shutil.copytree(model_root / "tiny-moe", root / "tiny-moe")
    (root / "short.txt").write_text("too short")  # passes the API's checks, fails calibration in the worker
    home = base / ".mopeq"
    env = service_env(home, root, MOPEQ_PORT=free_port(), MOPEQ_WEBHOOK_ALLOW_PRIVATE="true",
                      MOPEQ_WEBHOOK_RETRY_BASE_S="0.5", MOPEQ_WEBHOOK_SWEEP_INTERVAL_S="0.3",
                      MOPEQ_DEBUG_STAGE_DELAY=f"{DELAY_STAGE}:3")
    srv = Server(home, env, root)
    yield srv
    srv.proc.stop()
    srv.c.close()


def _verify(got, secret: str = SECRET) -> dict:
    return Webhook(secret).verify(got.body, got.headers)


def test_success_arrives_signed_and_a_tampered_body_fails(server: Server, receiver: Receiver) -> None:
    job_id = server.submit(receiver.url("/ok"))
    (got,) = receiver.wait("/ok", 1, timeout=120)
    event = _verify(got)
    assert event["type"] == "job.succeeded" and event["data"]["job"]["id"] == job_id
    assert event["data"]["job"]["status"] == "succeeded" and event["data"]["job"]["result"]["avg_bits"] > 0
    assert event["data"]["links"]["bitmap"] == f"/v1/jobs/{job_id}/bitmap" and event["data"]["watch_id"] is None
    h = got.headers
    assert h["content-type"] == "application/json" and h["webhook-id"].startswith("msg_")
    assert abs(int(h["webhook-timestamp"]) - time.time()) < 300 and h["webhook-signature"].startswith("v1,")

    tampered = got.body.replace(b'"succeeded"', b'"failed"', 1)
    assert tampered != got.body
    for body, headers, secret in [
        (tampered, h, SECRET),
        (got.body + b" ", h, SECRET),
        (got.body, {**h, "webhook-id": h["webhook-id"] + "x"}, SECRET),
        (got.body, {**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, SECRET),
        (got.body, h, "whsec_" + "A" * 43 + "="),
    ]:
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(body, headers)

    with MopeqClient(str(server.c.base_url), api_key=BOOT_KEY) as sdk:
        (msg,) = wait_until(lambda: [m for m in sdk.webhooks(job_id) if m["status"] == "delivered"], 10, "recorded")
    assert msg["id"] == h["webhook-id"] and msg["event_type"] == "job.succeeded" and msg["attempts"] == 1
    assert [(d["attempt"], d["status_code"], d["error"]) for d in msg["deliveries"]] == [(1, 200, None)]
    # the secret is write-only: not in the job, not in the database in plain text
    assert SECRET not in json.dumps(server.job(job_id)) and SECRET not in json.dumps(msg)
    con = sqlite3.connect(server.home / "mopeq.db")
    try:
        dump = "\n".join(con.iterdump())
    finally:
        con.close()
    assert SECRET not in dump and SECRET[6:] not in dump


def test_failure_is_retried_after_a_500(server: Server, receiver: Receiver) -> None:
    receiver.fail("/flaky", 500)
    job_id = server.submit(receiver.url("/flaky"), calibration={"file": "short.txt", "samples": 2, "seq_len": 16})
    first, second = receiver.wait("/flaky", 2, timeout=120)
    assert first.body == second.body and first.headers["webhook-id"] == second.headers["webhook-id"]
    for got in (first, second):
        event = _verify(got)
        assert event["type"] == "job.failed" and event["data"]["job"]["status"] == "failed"
        assert event["data"]["job"]["error"]
    (msg,) = wait_until(lambda: [m for m in server.messages(job_id) if m["status"] == "delivered"], 10, "recorded")
    assert msg["attempts"] == 2
    assert [(d["attempt"], d["status_code"], d["error"]) for d in msg["deliveries"]] == [
        (1, 500, "HTTP 500"), (2, 200, None)]
    d1, d2 = msg["deliveries"]
    assert d1["finished_at"] <= d2["started_at"]
    time.sleep(1.5)
    assert len(receiver.at("/flaky")) == 2  # delivered: no more attempts


def test_cancellation_mid_run_is_announced(server: Server, receiver: Receiver) -> None:
    job_id = server.submit(receiver.url("/cancel"))
    wait_until(lambda: server.job(job_id)["stage"] == DELAY_STAGE, 120, f"stage {DELAY_STAGE}")
    assert server.c.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    (got,) = receiver.wait("/cancel", 1, timeout=60)
    event = _verify(got)
    assert event["type"] == "job.cancelled" and event["data"]["job"]["id"] == job_id
    assert wait_status(lambda: server.job(job_id), ("cancelled",), 10)


# ---- in process: the operator's flag, and the address check at delivery -----------------------------------------
@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Iterator[tuple[TestClient, Any]]:
    home = tmp_path_factory.mktemp("webhooks-strict")
    settings = settings_from_env(service_env(home, model_root))  # MOPEQ_WEBHOOK_ALLOW_PRIVATE unset: refuse
    assert settings.WEBHOOK_ALLOW_PRIVATE is False
    migrate(settings.database_url)
    with TestClient(create_app(settings)) as client:
        yield client, settings


PRIVATE = ["http://127.0.0.1:8080/h", "http://localhost/h", "http://10.1.2.3/h", "http://192.168.0.7/h",
           "http://172.16.0.1/h", "http://169.254.169.254/latest/meta-data", "http://[::1]/h", "http://[fd00::1]/h",
           "http://[::ffff:10.0.0.1]/h", "http://0.0.0.0/h", "http://100.64.0.1/h", "http://240.0.0.1/h"]


def test_private_targets_are_refused_without_the_operator_flag(strict: tuple[TestClient, Any], receiver: Receiver,
                                                               model_root: Path) -> None:
    client, _ = strict
    base = {"model": str(model_root / "tiny-moe"), **FAST_JOB}
    for url in [*PRIVATE, receiver.url("/never")]:
        r = client.post("/v1/jobs", json={**base, "webhook": {"url": url, "secret": SECRET}}, headers=auth())
        assert r.status_code == 422 and r.json()["code"] == "url_not_allowed", (url, r.text)
        r = client.post("/v1/watches", json={"repo": "org/m", "webhook": {"url": url}}, headers=auth())
        assert r.status_code == 422 and r.json()["code"] == "url_not_allowed", (url, r.text)
    assert client.get("/v1/jobs", headers=auth()).json()["total"] == 0
    assert client.get("/v1/watches", headers=auth()).json() == []
    r = client.post("/v1/jobs", json={**base, "webhook": {"url": "https://hooks.example.com/h"}}, headers=auth())
    assert r.status_code == 422 and "webhook.secret is required" in r.json()["detail"]


def test_delivery_rechecks_the_address_and_connects_to_the_checked_one(strict: tuple[TestClient, Any],
                                                                       model_root: Path) -> None:
    client, settings = strict
    factory = make_sessionmaker(make_engine(settings.database_url))
    keyring = Keyring(settings.secret_key())

    def finished_job_with_hook(url: str) -> str:
        r = client.post("/v1/jobs", json={"model": str(model_root / "tiny-moe"), **FAST_JOB}, headers=auth())
        job_id = r.json()["id"]
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth()).json()["status"] == "cancelled"
        with factory() as db, db.begin():  # as if the name had resolved to a public address at creation
            db.add(JobWebhook(job_id=job_id, url=url, secret_enc=keyring.encrypt(SECRET)))
        (msg_id,) = svc.announce_finished(factory)
        return msg_id

    # the name now resolves to a loopback address (DNS rebinding): refused, recorded, not retried
    msg_id = finished_job_with_hook("http://hooks.example.test:8080/h")
    out = svc.deliver(factory, keyring, settings, msg_id, resolver=lambda host, port: ["203.0.113.9", "127.0.0.1"])
    assert out.status == "failed" and out.error.startswith("refused:") and "127.0.0.1" in out.error
    with factory() as db:
        (d,) = db.scalars(select(WebhookDelivery).where(WebhookDelivery.message_id == msg_id)).all()
        assert (d.attempt, d.status_code, d.error) == (1, None, out.error)
        assert db.get(WebhookMessage, msg_id).status == "failed"

    # a public address: the request goes to it, with the original Host and TLS name; 410 Gone stops at once
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(410)

    msg_id = finished_job_with_hook("https://hooks.example.test/h?x=1")
    out = svc.deliver(factory, keyring, settings, msg_id, resolver=lambda host, port: ["93.184.216.34"],
                      transport=httpx.MockTransport(handler))
    assert out.status == "failed" and out.status_code == 410
    (req,) = seen
    assert str(req.url) == "https://93.184.216.34/h?x=1" and req.headers["host"] == "hooks.example.test"
    assert req.extensions["sni_hostname"] == "hooks.example.test"
    event = Webhook(SECRET).verify(req.content, dict(req.headers))
    assert event["type"] == "job.cancelled"
    assert svc.deliver(factory, keyring, settings, msg_id).status == "skipped"  # finished messages stay finished


def test_signature_matches_the_spec_by_hand() -> None:
    """The scheme written out from the spec, independently of both the service and the standardwebhooks package."""
    import base64
    import hashlib
    import hmac

    body = b'{"type":"job.succeeded"}'
    sig = svc.sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    want = base64.b64encode(hmac.new(key, b"msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330." + body,
                                     hashlib.sha256).digest()).decode()
    assert sig == "v1," + want
    new = svc.new_secret()
    assert new.startswith("whsec_") and len(base64.b64decode(new[6:])) == 32
