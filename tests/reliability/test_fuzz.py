"""Schemathesis over the OpenAPI document against the running API (``python -m app.serve --no-worker`` on
PostgreSQL and Redis, its own database and queue so that no worker runs what it submits), with a valid admin key,
a valid user key, a wrong key and no key. Every response: no 5xx, a documented status code, content type, headers
and body schema; schema-violating requests are refused.

Bounded: ``MOPEQ_FUZZ_EXAMPLES`` examples per operation and phase (default 12) and ``--max-time`` per run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rel_util import BOOT_KEY, Proc, auth, free_port, service_env

EXAMPLES = int(os.environ.get("MOPEQ_FUZZ_EXAMPLES", "12"))
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,negative_data_rejection,missing_required_header,unsupported_method")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, model_root: Path, pg_url: str, redis_server: Any,
        hub: Any) -> Iterator[dict[str, Any]]:
    from app.db.migrate import upgrade

    home = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    env = service_env(home, model_root, database_url=pg_url, broker_url=redis_server.url, hub_url=hub.url,
                      queue=f"fuzz-{uuid.uuid4().hex[:8]}", MOPEQ_PORT=port)
    env.pop("HF_HUB_OFFLINE", None)
    upgrade(pg_url)
    proc = Proc([sys.executable, "-m", "app.serve", "--no-worker"], env, home / "api.log")
    proc.wait_for("Uvicorn running", timeout=90)
    import httpx

    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=30) as c:
        r = c.post("/v1/admin/keys", json={"name": "fuzz-user"}, headers=auth())
        assert r.status_code == 201, r.text
        user_key = r.json()["api_key"]
        spec = c.get("/openapi.json").json()
    yield {"base": base, "user_key": user_key, "proc": proc, "home": home, "spec": spec}
    proc.stop()


def _st() -> str:
    exe = Path(sys.executable).with_name("st")
    if exe.exists():
        return str(exe)
    found = shutil.which("st") or shutil.which("schemathesis")
    if not found:
        pytest.fail("schemathesis is not installed: pip install -e '.[dev]'")
    return found


def _run(api: dict[str, Any], name: str, key: str | None, examples: int, max_time: int) -> dict[str, Any]:
    out = api["home"] / f"st-{name}"
    cmd = [_st(), "run", f"{api['base']}/openapi.json", "--checks", CHECKS, "--max-examples", str(examples),
           "--seed", "8", "--workers", "2", "--request-timeout", "15", "--max-time", str(max_time), "--no-color",
           "--phases", "examples,coverage,fuzzing", "--generation-database", "none",
           "--suppress-health-check", "all", "--report", "ndjson", "--report-dir", str(out), "--max-failures", "20"]
    if key is not None:
        cmd += ["-H", f"Authorization: Bearer {key}"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, cwd=api["home"],
                         env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    log = res.stdout + res.stderr
    (api["home"] / f"st-{name}.log").write_text(log)
    return {"rc": res.returncode, "log": log, "reports": out}


def _server_errors(api: dict[str, Any], since: int = 0) -> list[str]:
    text = api["proc"].text()[since:]
    return [line for line in text.splitlines() if "internal error on" in line or "Traceback" in line]


# (who, examples per operation, time budget in s): a bad or missing key only ever gets 401s, so fewer cases
RUNS = [("admin", EXAMPLES, 45), ("user", EXAMPLES, 35), ("bad-key", max(2, EXAMPLES // 4), 15),
        ("no-key", max(2, EXAMPLES // 4), 15)]


@pytest.mark.parametrize(("who", "examples", "max_time"), RUNS, ids=[r[0] for r in RUNS])
def test_schemathesis(api: dict[str, Any], who: str, examples: int, max_time: int, figures: list) -> None:
    t0 = time.monotonic()
    key = {"admin": BOOT_KEY, "user": api["user_key"], "bad-key": "mpq_AAAAAAAAAAAA_" + "x" * 43,
           "no-key": None}[who]
    since = len(api["proc"].text())
    res = _run(api, who, key, examples, max_time)
    tail = res["log"][-6000:]
    assert res["rc"] == 0, tail
    assert not _server_errors(api, since), _server_errors(api, since)[:20]
    cases = next((m.group(0) for m in re.finditer(r"\d+ generated, [^\n]*", res["log"])), "?")
    figures.append({"fault": f"schemathesis, {who} key", "jobs": 0, "lost": 0, "stuck_running": 0,
                    "duplicate_artifacts": 0, "seconds": round(time.monotonic() - t0, 1),
                    "outcome": f"{cases}; 0 server errors, 0 non-conforming responses"})


def test_every_operation_was_fuzzed(api: dict[str, Any]) -> None:
    """The OpenAPI document lists every route of the app (so schemathesis reaches all of them)."""
    from rel_util import app_routes

    spec_ops = {(m.upper(), p) for p, ops in api["spec"]["paths"].items() for m in ops}
    routes = app_routes(include_hidden=False)
    assert len(routes) > 20 and routes <= spec_ops, routes - spec_ops
