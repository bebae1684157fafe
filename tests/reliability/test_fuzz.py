"""Schemathesis over the OpenAPI document against the running API (``python -m app.serve --no-worker`` on
PostgreSQL and Redis, its own database and queue so that no worker runs what it submits), with a valid admin key,
a valid user key, a wrong key and no key. Every response: no 5xx, a documented status code, content type, headers
and body schema; schema-violating requests are refused.

Bounded: ``MOPEQ_FUZZ_EXAMPLES`` examples per operation and phase (default 12) and ``--max-time`` per run."""

from __future__ import annotations

import json
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
from rel_util import BOOT_KEY, HF_TOKEN, Proc, auth, free_port, service_env, settings_from_env

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
    yield {"base": base, "user_key": user_key, "proc": proc, "home": home, "spec": spec, "env": env}
    proc.stop()


def _st() -> str:
    exe = Path(sys.executable).with_name("st")
    if exe.exists():
        return str(exe)
    found = shutil.which("st") or shutil.which("schemathesis")
    if not found:
        pytest.fail("schemathesis is not installed: pip install -e '.[dev]'")
    return found


def _run(api: dict[str, Any], name: str, key: str | None, examples: int, max_time: int,
         config: Path | None = None, only: list[str] | None = None, hooks: str = "",
         phases: str = "examples,coverage,fuzzing", workers: int = 1) -> dict[str, Any]:
    out = api["home"] / f"st-{name}"
    spec = [str(api["home"] / "openapi-test-data.json"), "--url", api["base"]] if config else [f"{api['base']}/openapi.json"]
    # One worker by default: CPython 3.11.7's ast.parse is not thread-safe (gh-106905) and hypothesis calls it
    # from schemathesis' worker threads ("AST constructor recursion depth mismatch").
    cmd = [_st(), *(["--config-file", str(config)] if config else []), "run", *spec,
           *(only or []), "--checks", CHECKS, "--max-examples", str(examples),
           "--seed", "8", "--workers", str(workers), "--request-timeout", "15", "--max-time", str(max_time), "--no-color",
           "--phases", phases, "--generation-database", "none",
           "--suppress-health-check", "all", "--report", "ndjson", "--report-dir", str(out), "--max-failures", "20"]
    if key is not None:
        cmd += ["-H", f"Authorization: Bearer {key}"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, cwd=api["home"],
                         env={**os.environ, "SCHEMATHESIS_HOOKS": hooks})
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


def _test_data_config(api: dict[str, Any], model_root: Path) -> Path:
    """schemathesis.toml: the models and data files that exist on this server (test data, like the ids a path
    parameter needs), and ``validation_mismatch`` ("mostly rejected generated data") made a failure."""
    data = {  # body path -> values that exist on this server (or fit its one test model)
        "model": [str(model_root / "tiny-moe"), "org/tiny-moe"],
        "calibration.file": [str(model_root / "calib.txt")], "evaluation.file": [str(model_root / "calib.txt")],
        "calibration.seq_len": [8, 64, 128],  # the model's context is 128
        "budget.gb": [0.0004],  # inside the feasible range of its size for most bits
        "revision": ["main"], "hf_token": [HF_TOKEN], "push.repo_id": ["tester/fuzzed"],
        "webhook.url": ["https://1.1.1.1/mopeq-fuzz"],  # a public address; jobs never end here, nothing is sent
        "webhook.secret": ["whsec_" + "A" * 43 + "="],
    }
    text = "".join(f"[dictionaries.{name.replace('.', '_')}]\nvalues = {json.dumps(values)}\n\n"
                   for name, values in data.items())
    text += "[parameters]\n" + "".join(f'"body.{name}" = {{ dictionary = "{name.replace(".", "_")}" }}\n'
                                        for name in data)
    text += '\n[warnings]\nfail-on = ["validation_mismatch"]\n'
    path = api["home"] / "st-test-data.toml"
    path.write_text(text)
    # The examples phase takes no dictionaries: it sends the bodies' examples, here a job this server can take (in
    # a copy of the server's document; its own schema is unchanged).
    spec = json.loads(json.dumps(api["spec"]))
    example = {"model": data["model"][0], "budget": {"avg_bits": 2.5}, "calibration": {"samples": 16, "seq_len": 64}}
    for body in ("JobCreate", "EstimateIn"):
        spec["components"]["schemas"][body]["examples"] = [example]
    (api["home"] / "openapi-test-data.json").write_text(json.dumps(spec))
    return path


def test_job_body_schema_states_what_the_server_accepts(api: dict[str, Any], model_root: Path, hub: Any,
                                                        figures: list) -> None:
    """Issue 12: bodies generated from the schema of POST /v1/jobs and POST /v1/estimate are not mostly refused
    (schemathesis' validation_mismatch warning fails the run), and none gets a server error. Bounded well under 60 s."""
    t0 = time.monotonic()
    hub.add_repo_from_dir("org/tiny-moe", model_root / "tiny-moe")
    from app.core.security import Keyring
    from app.db.session import make_engine, make_sessionmaker
    from app.services.keys import create_key

    # Its own key, made in the database: the admin run may have revoked any key it saw, the bootstrap one included.
    settings = settings_from_env(api["env"])
    _, key = create_key(make_sessionmaker(make_engine(settings.database_url)), Keyring(settings.secret_key()),
                        name="fuzz-job-body")
    since = len(api["proc"].text())
    # Not the coverage phase: its boundary values ("0" for the model) name nothing that exists on any server.
    res = _run(api, "job-body", key, EXAMPLES, 30, config=_test_data_config(api, model_root),
               phases="examples,fuzzing",
               only=["--include-name", "POST /v1/jobs", "--include-name", "POST /v1/estimate"],
               hooks=str(Path(__file__).with_name("st_hooks.py")))
    log = res["log"]
    assert res["rc"] == 0, log[-6000:]
    assert "mostly rejected generated data" not in log, log[-6000:]
    assert not _server_errors(api, since), _server_errors(api, since)[:20]
    rates = _positive_outcomes(res["reports"])
    for op, ok in (("POST /v1/jobs", 202), ("POST /v1/estimate", 200)):
        codes = rates.get(op, [])
        accepted = sum(c == ok for c in codes)
        assert len(codes) >= 10 and accepted >= len(codes) / 2, (op, sorted(codes))
    figures.append({"fault": "schemathesis, job and estimate bodies", "jobs": 0, "lost": 0, "stuck_running": 0,
                    "duplicate_artifacts": 0, "seconds": round(time.monotonic() - t0, 1),
                    "outcome": "; ".join(f"{op}: {sum(c < 300 for c in codes)}/{len(codes)} generated bodies accepted"
                                         for op, codes in sorted(rates.items()))})


def _positive_outcomes(reports: Path) -> dict[str, list[int]]:
    """Status codes of the schema-conforming (positive) cases per operation, from schemathesis' NDJSON report."""
    out: dict[str, list[int]] = {}
    for report in reports.glob("*.ndjson"):
        for line in report.read_text().splitlines():
            rec = json.loads(line).get("ScenarioFinished", {}).get("recorder")
            if not rec:
                continue
            for case_id, it in rec.get("interactions", {}).items():
                meta = (rec.get("cases", {}).get(case_id, {}).get("value") or {}).get("meta") or {}
                if (meta.get("generation") or {}).get("mode") == "positive" and it.get("response"):
                    out.setdefault(rec["label"], []).append(it["response"]["status_code"])
    return out
