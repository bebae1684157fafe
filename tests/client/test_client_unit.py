"""The SDK's own reactions to server answers, in-process with respx (the one place a mock is used: these test the
client's retry/backoff, Retry-After, idempotency-key reuse, error mapping, SSE parsing, reconnection with
Last-Event-ID and the polling fallback). Plus: mopeq_client and its CLI never import torch."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import httpx
import pytest
import respx
from client_util import REPO

from mopeq_client import (
    AsyncMopeqClient,
    AuthenticationError,
    ConflictError,
    MopeqClient,
    NotFoundError,
    RateLimitError,
    ServerError,
    ServiceUnreachableError,
    ValidationError,
)
from mopeq_client.sdk import SSEDecoder, parse_retry_after

URL = "http://mopeq.test"
JOB = {"id": "j1", "status": "queued", "stage": None, "progress": 0.0, "model": "m"}


def job(status: str = "queued", **kw) -> dict:
    return {**JOB, "status": status, **kw}


def sse(*events: tuple[int, str, dict], end: str | None = None) -> bytes:
    out = [": mopeq job events\nretry: 2000\n\n"]
    for eid, kind, data in events:
        out.append(f"event: {kind}\r\ndata: {json.dumps(data)}\r\nid: {eid}\r\n\r\n")
    if end:
        out.append(f'event: end\ndata: {{"status": "{end}"}}\n\n')
    return "".join(out).encode()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def c(sleeps: list[float]):
    with MopeqClient(URL, "k", max_retries=3, sleep=sleeps.append) as client:
        yield client


BLOCKED = ("torch", "transformers", "numpy", "safetensors", "fastapi", "sqlalchemy", "celery", "kombu",
           "pydantic_settings", "mopeq_core", "app", "worker")


def test_no_torch_and_the_client_runs_on_httpx_typer_rich_alone(tmp_path) -> None:
    """In a fresh interpreter: importing the client and the CLI imports no torch; and with the heavy packages made
    unimportable (a client-only install), `mopeq jobs` still runs and exits 5 on a closed port."""
    code = ("import sys, mopeq_client, mopeq_client.sdk, mopeq_client.errors, mopeq_client.remote_cli, "
            "mopeq_client.cli; assert 'torch' not in sys.modules, 'torch imported'; "
            "names = [c.name or c.callback.__name__ for c in mopeq_client.cli.app.registered_commands]; "
            "assert {'submit', 'wait', 'download', 'jobs'} <= set(names), names")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               f"        if name.split('.')[0] in {BLOCKED!r}: raise ModuleNotFoundError('blocked: ' + name, name=name)\n"
               "sys.meta_path.insert(0, Block())\n")
    (tmp_path / "sitecustomize.py").write_text(blocker)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "MOPEQ_MAX_RETRIES": "0"}
    p = subprocess.run([sys.executable, "-m", "mopeq_client.cli", "jobs", "--json", "--url",
                        "http://127.0.0.1:9"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 5, p.stdout + p.stderr
    assert json.loads(p.stdout)["error"]["code"] == "unreachable"


@pytest.mark.respx(base_url=URL)
def test_retry_after_is_honoured_and_one_idempotency_key_per_submit(respx_mock, c, sleeps) -> None:
    route = respx_mock.post("/v1/jobs").mock(side_effect=[
        httpx.Response(503, json={"detail": "broker down", "code": "unavailable"}, headers={"Retry-After": "2"}),
        httpx.ConnectError("refused"),
        httpx.Response(429, json={"detail": "slow down", "code": "rate_limited"}, headers={"Retry-After": "1"}),
        httpx.Response(202, json=job()),
        httpx.Response(202, json=job(id="j2")),
    ])
    assert c.submit("m", avg_bits=3, quantizer="rtn").id == "j1"
    keys = [r.request.headers["idempotency-key"] for r in route.calls]
    assert len(keys) == 4 and len(set(keys)) == 1  # the same key on every retry of one submit
    assert 2.0 <= sleeps[0] <= 2.2 and 0.5 <= sleeps[1] <= 1.0 and 1.0 <= sleeps[2] <= 1.1
    body = json.loads(route.calls[0].request.content)
    assert body == {"model": "m", "budget": {"avg_bits": 3.0}, "quantizer": "rtn"}
    assert route.calls[0].request.headers["authorization"] == "Bearer k"
    assert c.submit("m").id == "j2"
    assert route.calls[-1].request.headers["idempotency-key"] != keys[0]  # a new logical submit: a new key


@pytest.mark.respx(base_url=URL)
def test_backoff_grows_then_unreachable(respx_mock, c, sleeps) -> None:
    route = respx_mock.get("/v1/jobs/j1").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(ServiceUnreachableError, match="cannot reach the MoPEQ service"):
        c.get("j1")
    assert route.call_count == 4 and len(sleeps) == 3
    for i, s in enumerate(sleeps):  # equal jitter: between half and all of 0.5 * 2**i
        assert 0.25 * 2 ** i <= s <= 0.5 * 2 ** i


@pytest.mark.respx(base_url=URL)
def test_gives_up_after_retries_and_on_a_too_long_retry_after(respx_mock, c, sleeps) -> None:
    respx_mock.get("/v1/jobs/j1").mock(return_value=httpx.Response(503, json={"detail": "db down", "code": "x"}))
    with pytest.raises(ServerError, match="db down") as exc:
        c.get("j1")
    assert exc.value.status == 503 and len(sleeps) == 3
    sleeps.clear()
    respx_mock.get("/v1/jobs").mock(return_value=httpx.Response(
        429, json={"detail": "too many jobs", "code": "too_many_jobs"}, headers={"Retry-After": "3600"}))
    with pytest.raises(RateLimitError) as exc:
        c.list()
    assert exc.value.retry_after == 3600 and sleeps == []


@pytest.mark.respx(base_url=URL)
def test_errors_carry_the_servers_message(respx_mock, c, sleeps) -> None:
    cases = [(401, AuthenticationError), (403, AuthenticationError), (404, NotFoundError), (409, ConflictError),
             (400, ValidationError), (413, ValidationError), (422, ValidationError), (500, ServerError)]
    for status, cls in cases:
        respx_mock.get("/v1/jobs/x").mock(return_value=httpx.Response(
            status, json={"detail": f"message {status}", "code": f"c{status}"}))
        with pytest.raises(cls) as exc:
            c.get("x")
        assert exc.value.status == status and exc.value.detail == f"message {status}"
        assert exc.value.code == f"c{status}" and f"message {status}" in str(exc.value)
    assert sleeps == []  # none of these is retried (500 is not 502/503/504)
    respx_mock.post("/v1/jobs").mock(return_value=httpx.Response(422, json={
        "detail": [{"loc": ["body", "group_size"], "msg": "too small"}], "code": "invalid_request"}))
    with pytest.raises(ValidationError, match="group_size: too small"):
        c.submit("m")


def test_sse_decoder() -> None:
    d = SSEDecoder()
    lines = [": comment", "retry: 1500", "event: stage", "data: {\"a\":", "data: 1}", "id: 7", "", "data:plain",
             "", "id", "", "event: end", "data: {}", ""]
    evs = [e for e in (d.feed(x) for x in lines) if e is not None]
    assert [(e.event, e.id, e.data) for e in evs] == [("stage", 7, {"a": 1}), ("message", 7, "plain"),
                                                      ("end", None, {})]
    assert evs[0].retry == 1500
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0 and parse_retry_after("x") is None


@pytest.mark.respx(base_url=URL)
def test_wait_resumes_with_last_event_id_after_a_drop(respx_mock, c, sleeps) -> None:
    stream = {"content-type": "text/event-stream"}
    ev = respx_mock.get("/v1/jobs/j1/events").mock(side_effect=[
        httpx.Response(200, headers=stream, content=sse(
            (1, "status", {"kind": "status", "status": "running", "stage": None, "progress": 0.0}),
            (2, "stage", {"kind": "stage", "stage": "calibrate", "progress": 0.05}))),  # cut off: no end
        httpx.Response(200, headers=stream, content=sse(
            (3, "progress", {"kind": "progress", "stage": "calibrate", "progress": 0.2}),
            (4, "status", {"kind": "status", "status": "succeeded", "stage": "export"}), end="succeeded")),
    ])
    respx_mock.get("/v1/jobs/j1").mock(side_effect=[httpx.Response(200, json=job("running")),
                                                    httpx.Response(200, json=job("succeeded", progress=1.0))])
    seen = []
    final = c.wait("j1", progress=seen.append)
    assert final.status == "succeeded"
    assert "last-event-id" not in ev.calls[0].request.headers
    assert ev.calls[1].request.headers["last-event-id"] == "2"
    # (the end event carries no id of its own: per the SSE spec it keeps the last one)
    assert [e.id for e in seen if e.event != "poll"] == [1, 2, 3, 4, 4] and seen[-1].event == "end"


@pytest.mark.respx(base_url=URL)
def test_wait_falls_back_to_polling(respx_mock, sleeps, capsys) -> None:
    ev = respx_mock.get("/v1/jobs/j1/events").mock(return_value=httpx.Response(502, text="bad gateway"))
    respx_mock.get("/v1/jobs/j1").mock(side_effect=[
        httpx.Response(200, json=job("running", stage="calibrate", progress=0.1)),
        httpx.Response(200, json=job("running", stage="quantize", progress=0.8)),
        httpx.Response(200, json=job("failed", stage="quantize", error="boom", error_code="internal"))])
    with MopeqClient(URL, "k", max_retries=0, sleep=sleeps.append, sse_max_failures=3) as c:
        final = c.wait("j1", progress=True, poll_interval=1.5)
    assert final.status == "failed" and final.error == "boom" and ev.call_count == 3
    assert sleeps[-1] == 1.5
    err = capsys.readouterr().err  # the line-mode progress display (stderr is not a terminal here)
    assert "polling job j1" in err and "stage=quantize" in err and "failed" in err


def test_async_client_retries_and_reuses_the_key() -> None:
    sleeps: list[float] = []

    async def go() -> None:
        with respx.mock(base_url=URL) as m:
            route = m.post("/v1/jobs").mock(side_effect=[
                httpx.Response(503, headers={"Retry-After": "1"}), httpx.Response(202, json=job())])
            m.get("/v1/jobs/j1").mock(return_value=httpx.Response(200, json=job("cancelled")))
            async with AsyncMopeqClient(URL, "k", sleep=sleeps.append) as c:
                assert (await c.submit("m")).id == "j1"
                assert (await c.wait("j1", progress=False)).status == "cancelled"
            keys = {r.request.headers["idempotency-key"] for r in route.calls}
            assert route.call_count == 2 and len(keys) == 1

    asyncio.run(go())
    assert len(sleeps) == 1 and 1.0 <= sleeps[0] <= 1.1


def test_env_configuration(monkeypatch) -> None:
    monkeypatch.setenv("MOPEQ_URL", "http://h:9/v1/")
    monkeypatch.setenv("MOPEQ_API_KEY", "envkey")
    monkeypatch.setenv("MOPEQ_MAX_RETRIES", "7")
    with MopeqClient() as c:
        assert c.base_url == "http://h:9" and c.api_key == "envkey" and c.max_retries == 7
    with MopeqClient("h2:8", api_key="arg") as c:
        assert c.base_url == "http://h2:8" and c.api_key == "arg"
