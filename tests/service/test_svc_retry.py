"""Retry and engine results through the embedded service (``python -m app.serve``, real pipeline, tiny MoE):

A job with an evaluation suite fails after calibration (the fault hooks: MOPEQ_JOB_TIMEOUT_S with a long pause at
the start of ``sensitivity``). The service restarts without the fault; ``POST /v1/jobs/{id}/retry`` makes a new
linked job that reuses the finished stages (its events and report.json say so), runs the rest, and ends with the
same bit map as a fresh job with the same settings. Its ``result`` carries the evaluation suite's numbers, equal to
report.json's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from svc_util import free_port, service_env, wait_status, wait_until
from test_svc_embedded import Server

TIMEOUT_S = 45  # covers the worker's imports, fetch and calibrate on a busy machine; then sensitivity pauses
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_root: Path, hub) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("retry")
    port = free_port()
    env = service_env(home / ".mopeq", model_root, hub_url=hub.url, MOPEQ_PORT=port,
                      MOPEQ_JOB_TIMEOUT_S=TIMEOUT_S, MOPEQ_DEBUG_STAGE_DELAY="sensitivity:600")
    env.pop("MOPEQ_QUEUE")
    srv = Server(home, env, port)
    srv.start()
    yield srv
    if srv.proc is not None:
        srv.proc.stop()


def _report(server: Server, job_id: str) -> dict:
    return json.loads((server.home / ".mopeq" / "artifacts" / job_id / "report.json").read_text())


def test_a_failed_job_is_retried_reusing_calibration(server: Server, model_root: Path) -> None:
    body = {"evaluation": {"file": str(model_root / "calib.txt"), "samples": 2,
                           "suites": ["lm-eval:mopeq_next_line"], "suite_limit": 4}}
    old = server.submit(**body)
    wait_until(lambda: server.job(old["id"])["stage"] == "sensitivity", TIMEOUT_S, "stage sensitivity")
    failed = wait_status(lambda: server.job(old["id"]), TERMINAL, timeout=TIMEOUT_S + 60)
    assert (failed["status"], failed["error_code"]) == ("failed", "timeout"), failed
    assert {"fetch", "calibrate"} <= set(failed["timings"])

    server.proc.stop(timeout=60)  # the fault goes away
    for k in ("MOPEQ_JOB_TIMEOUT_S", "MOPEQ_DEBUG_STAGE_DELAY"):
        server.env.pop(k)
    server.start()

    r = server.post(f"/v1/jobs/{old['id']}/retry")
    assert r.status_code == 202, r.text
    new = r.json()
    assert (new["retry_of"], new["settings"], new["status"]) == (old["id"], old["settings"], "queued")
    done = wait_status(lambda: server.job(new["id"]), TERMINAL, timeout=300)
    assert done["status"] == "succeeded", done

    # events and report.json: fetch's copy is new (the job has its own snapshot), calibrate is reused, the rest ran
    events = server.sse(new["id"])
    logs = [e["data"]["message"] for e in events if e["event"] == "log"]
    assert any(m.startswith(f"retry of job {old['id']}: its finished stages (fetch, calibrate)") for m in logs), logs
    reused = {e["data"]["stage"] for e in events if e["event"] == "progress"
              and e["data"]["message"] == "reused from its stage files"}
    assert reused == {"calibrate"}, reused
    timings = _report(server, new["id"])["stages"]
    assert timings["calibrate"].get("resumed") is True
    assert not any(timings[s].get("resumed") for s in ("fetch", "sensitivity", "allocate", "quantize", "evaluate"))

    # the engine's results on the job: the evaluation suite's numbers, as report.json has them
    report = _report(server, new["id"])
    suites = done["result"]["eval_suites"]
    assert suites == report["eval_suites"] and suites is not None
    assert json.dumps(suites).count("acc") >= 2  # full precision and quantized accuracy of mopeq_next_line

    # an independent reference: the same settings from scratch give the same bit map
    fresh = server.submit(**body)
    fresh_done = wait_status(lambda: server.job(fresh["id"]), TERMINAL, timeout=300)
    assert fresh_done["status"] == "succeeded", fresh_done
    assert not any(t.get("resumed") for t in _report(server, fresh["id"])["stages"].values())
    bits = [server.get(f"/v1/jobs/{j}/allocations").json() for j in (new["id"], fresh["id"])]
    assert bits[0] == bits[1] and len(bits[0]) == 8
    assert done["result"]["avg_bits"] == fresh_done["result"]["avg_bits"]

    r = server.post(f"/v1/jobs/{new['id']}/retry")
    assert r.status_code == 409 and r.json()["code"] == "not_retryable"
