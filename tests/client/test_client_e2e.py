"""The SDK and the remote CLI against the real running service (API + Celery worker + the real pipeline on a tiny
Mixtral): submit → wait with progress → bit map → download with checksum, SSE resume, idempotent submit, and every
CLI exit code produced by a real case."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from client_util import FAST, FAST_FLAGS, MODEL, REPO, Service
from svc_util import free_port
from typer.testing import CliRunner

from mopeq_client import (
    AsyncMopeqClient,
    ChecksumError,
    ConflictError,
    MopeqClient,
    NotFoundError,
    ValidationError,
)
from mopeq_client import cli as main_cli
from mopeq_client.remote_cli import EXIT_CHECKSUM, EXIT_PPL_REGRESSION, EXIT_TIMEOUT

STAGES = ["fetch", "calibrate", "sensitivity", "allocate", "quantize", "evaluate", "export"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def mopeq(service: Service, *args: str, key: str | None = None, url: str | None = None, retries: int = 1):
    """Run the top-level ``mopeq`` command (the lead's CLI with the remote commands mounted) in-process."""
    env = {"MOPEQ_URL": url or service.url, "MOPEQ_API_KEY": key or service.key, "MOPEQ_MAX_RETRIES": str(retries)}
    return CliRunner().invoke(main_cli.app, list(args), env=env, catch_exceptions=False)


# ---- SDK ----------------------------------------------------------------------------------------------------------------
def test_sdk_submit_wait_bitmap_download(service: Service, client: MopeqClient, done_job, tmp_path: Path) -> None:
    job = done_job
    # wait() followed the SSE stream: every stage in order, progress never going back, the final status last
    stages = [e.stage for e in job.seen if e.kind == "stage"]
    assert stages == STAGES, stages
    pct = [e.progress for e in job.seen if e.progress is not None and e.event != "poll"]
    assert pct == sorted(pct) and pct[-1] == 1.0
    assert job.seen[-1].event == "end" and job.seen[-1].data == {"status": "succeeded"}
    assert job.succeeded and job.progress == 1.0 and job.ppl_increase_pct is not None
    assert job.perplexity["fp_perplexity"] > 0 and job.finished_at is not None

    bitmap = client.bitmap(job.id)
    assert bitmap["format_version"] == 1 and bitmap["quantizer"] == "rtn" and len(bitmap["layers"]) == 2
    assert [len(la["experts"]) for la in bitmap["layers"]] == [4, 4]
    assert bitmap["avg_bits"] == pytest.approx(job.result["avg_bits"])

    arts = {a.name: a for a in client.artifacts(job.id)}
    assert {"bitmap.json", "report.json", "README.md", "config.json"} <= set(arts)
    paths = client.download(job.id, tmp_path / "all")
    assert {p.name for p in paths} == set(arts) and not [p for p in (tmp_path / "all").iterdir()
                                                         if p.name.startswith(".mopeq-dl-")]
    for p in paths:
        assert _sha(p) == arts[p.name].sha256 == _sha(service.artifact_dir(job.id) / p.name)
    assert json.loads((tmp_path / "all" / "bitmap.json").read_text()) == bitmap
    one = client.download(job.id, tmp_path / "bm.json", "bitmap.json")
    assert one == [tmp_path / "bm.json"] and json.loads(one[0].read_text()) == bitmap
    with pytest.raises(NotFoundError, match="no artifact named"):
        client.download(job.id, tmp_path, "nope.bin")

    page = client.list(status="succeeded", model=MODEL, limit=1)
    assert page.total >= 1 and page.items[0].status == "succeeded" and len(page.items) == 1
    est = client.estimate(MODEL, avg_bits=3)
    assert est.num_experts == 8 and est.moe_layers == 2 and est.budget_feasible is True
    with pytest.raises(ValidationError, match="not-here") as exc:  # the server's message is carried
        client.estimate("not-here")
    assert exc.value.status == 422 and exc.value.code == "model_not_found"


def test_sse_replay_and_resume(client: MopeqClient, done_job) -> None:
    evs = list(client.events(done_job.id))
    assert evs[-1].event == "end"
    ids = [e.id for e in evs if e.id is not None]
    assert ids == sorted(ids) and len(ids) >= 10
    tail = list(client.events(done_job.id, last_event_id=ids[4]))
    assert [e.id for e in tail if e.id is not None] == ids[5:] and tail[-1].event == "end"


def test_async_client(service: Service, done_job, tmp_path: Path) -> None:
    async def go() -> None:
        async with AsyncMopeqClient(service.url, service.key) as c:
            job = await c.get(done_job.id)
            assert job.status == "succeeded"
            assert (await c.wait(done_job.id, progress=False)).status == "succeeded"
            kinds = [e.event async for e in c.events(done_job.id)]
            assert kinds[-1] == "end" and "stage" in kinds
            assert (await c.list(limit=5)).total >= 1
            assert len((await c.bitmap(done_job.id))["layers"]) == 2
            [p] = await c.download(done_job.id, tmp_path, "report.json")
            assert json.loads(p.read_text())["perplexity"]["increase_pct"] == pytest.approx(
                done_job.ppl_increase_pct)

    asyncio.run(go())


def test_idempotent_submit_timeout_cancel(service: Service, client: MopeqClient) -> None:
    """The same Idempotency-Key returns the same job (no second row); `mopeq wait --timeout` exits 8 while it runs;
    `mopeq cancel` + `mopeq wait` exit 3."""
    before = client.list(limit=1).total
    a = client.submit(MODEL, idempotency_key="client-test-idem-1", **FAST)
    b = client.submit(MODEL, idempotency_key="client-test-idem-1", **FAST)
    assert a.id == b.id and client.list(limit=1).total == before + 1
    with pytest.raises(ValidationError, match="Idempotency-Key"):  # same key, another body: 422
        client.submit(MODEL, idempotency_key="client-test-idem-1", **{**FAST, "avg_bits": 2.5})

    r = mopeq(service, "wait", a.id, "--timeout", "0.3", "--no-progress", "--json")
    assert r.exit_code == EXIT_TIMEOUT, r.output
    assert json.loads(r.stdout)["error"]["code"] == "timeout"

    r = mopeq(service, "cancel", a.id, "--json")
    assert r.exit_code == main_cli.EXIT_OK, r.output
    assert json.loads(r.stdout)["cancel_requested"] is True
    r = mopeq(service, "wait", a.id, "--json")
    assert r.exit_code == main_cli.EXIT_CANCELLED, r.output + service.log_tail()
    assert json.loads(r.stdout)["status"] == "cancelled"

    # the SDK's retry: a new linked job with the same settings; a queued job cannot be retried
    c = client.retry(a.id)
    assert c.id != a.id and c.retry_of == a.id and c.settings == client.get(a.id).settings
    with pytest.raises(ConflictError, match="only a failed or cancelled job"):
        client.retry(c.id)
    client.cancel(c.id)


# ---- CLI: exit codes from real cases --------------------------------------------------------------------------------------
def test_cli_submit_wait_json_in_a_subprocess(service: Service, done_job) -> None:
    """The CI path, as a real process: `mopeq submit ... --wait --json --max-ppl-increase` exits 0."""
    env = {**os.environ, "MOPEQ_URL": service.url, "MOPEQ_API_KEY": service.key, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "mopeq_client.cli", "submit", MODEL, *FAST_FLAGS,
                        "--eval-file", service.eval_file, "--eval-samples", "4", "--wait", "--json",
                        "--max-ppl-increase", "1000"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == main_cli.EXIT_OK, p.stdout + p.stderr + service.log_tail()
    out = json.loads(p.stdout)
    assert out["status"] == "succeeded" and out["outcome"]["exit_code"] == 0
    assert out["outcome"]["ppl_increase_pct"] == pytest.approx(out["result"]["perplexity"]["increase_pct"])
    # the progress display (stderr; line mode when not a terminal) showed stages and percent
    assert "stage=quantize" in p.stderr and "100.0%" in p.stderr and "succeeded" in p.stderr


def test_cli_ppl_regression_exit_6(service: Service, done_job) -> None:
    r = mopeq(service, "wait", done_job.id, "--max-ppl-increase", "-100", "--json")
    assert r.exit_code == EXIT_PPL_REGRESSION, r.output
    out = json.loads(r.stdout)["outcome"]
    assert out["exit_code"] == 6 and "perplexity regression" in out["reason"]
    r = mopeq(service, "wait", done_job.id, "--max-ppl-increase", "1000")
    assert r.exit_code == main_cli.EXIT_OK and "within 1000 %" in r.stderr


def test_cli_failed_job_exit_1(service: Service) -> None:
    """A calibration file the API accepts (a .txt under the model root) but too short for one sample: the worker
    fails the job."""
    r = mopeq(service, "submit", MODEL, *FAST_FLAGS, "--calib-file", str(service.root / "short.txt"), "--wait",
              "--no-progress", "--json")
    assert r.exit_code == main_cli.EXIT_JOB_FAILED, r.output + service.log_tail()
    out = json.loads(r.stdout)
    assert out["status"] == "failed" and "seq-len" in out["error"] and out["outcome"]["exit_code"] == 1
    # `mopeq retry`: the same inputs fail the same way, in a new job linked to the first
    r = mopeq(service, "retry", out["id"], "--wait", "--no-progress", "--json")
    assert r.exit_code == main_cli.EXIT_JOB_FAILED, r.output + service.log_tail()
    again = json.loads(r.stdout)
    assert again["retry_of"] == out["id"] and again["id"] != out["id"] and "seq-len" in again["error"]


def test_cli_invalid_input_exit_2(service: Service) -> None:
    # a budget the schema admits but this model cannot meet: 422 from the estimate, with the feasible range
    r = mopeq(service, "submit", MODEL, *FAST_FLAGS[:-2], "--budget-gb", "0.000001", "--json")
    assert r.exit_code == main_cli.EXIT_INVALID, r.output
    err = json.loads(r.stdout)["error"]
    assert err["status"] == 422 and err["code"] == "infeasible_budget" and "feasible range" in err["message"]
    assert 0.000001 < err["feasible"]["min"] < err["feasible"]["max"]
    r = mopeq(service, "submit", MODEL, "--quantizer", "nope")  # schema: 422
    assert r.exit_code == main_cli.EXIT_INVALID and "quantizer" in r.stderr
    r = mopeq(service, "submit", MODEL, "--avg-bits", "3", "--budget-gb", "1")  # local check
    assert r.exit_code == main_cli.EXIT_INVALID
    r = mopeq(service, "status", "no-such-job")
    assert r.exit_code == main_cli.EXIT_INVALID and "no such job" in r.stderr
    r = mopeq(service, "estimate", MODEL, "--budget-gb", "0.000001")
    assert r.exit_code == main_cli.EXIT_INVALID and "infeasible" in r.stdout


def test_cli_bad_key_exit_4_and_unreachable_exit_5(service: Service, done_job) -> None:
    r = mopeq(service, "status", done_job.id, key="mpq_wrong_key", retries=0)
    assert r.exit_code == main_cli.EXIT_AUTH and "API key" in r.stderr
    r = mopeq(service, "jobs", "--json", url=f"http://127.0.0.1:{free_port()}", retries=1)
    assert r.exit_code == main_cli.EXIT_UNREACHABLE, r.output
    assert json.loads(r.stdout)["error"]["code"] == "unreachable"


def test_cli_read_commands_exit_0(service: Service, done_job, tmp_path: Path) -> None:
    r = mopeq(service, "status", done_job.id, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["id"] == done_job.id
    r = mopeq(service, "status", done_job.id)
    assert r.exit_code == 0 and "succeeded" in r.stdout and "perplexity" in r.stdout
    r = mopeq(service, "bitmap", done_job.id, "--csv")
    lines = r.stdout.strip().splitlines()
    assert r.exit_code == 0 and lines[0] == "layer,module,expert,bits,sensitivity,frequency,params"
    assert len(lines) == 1 + 8
    r = mopeq(service, "bitmap", done_job.id)
    assert r.exit_code == 0 and "e3" in r.stdout
    r = mopeq(service, "jobs", "--json", "--status", "succeeded")
    assert r.exit_code == 0 and done_job.id in [j["id"] for j in json.loads(r.stdout)["items"]]
    r = mopeq(service, "estimate", MODEL, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["num_experts"] == 8
    r = mopeq(service, "download", done_job.id, str(tmp_path / "d"), "--json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)["files"]) == len(list((tmp_path / "d").iterdir()))


def test_cli_download_checksum_mismatch_exit_7(service: Service, done_job, tmp_path: Path) -> None:
    """A stored file altered on the server after its checksum was recorded: the download is refused and nothing
    is written under the destination name."""
    stored = service.artifact_dir(done_job.id) / "README.md"
    original = stored.read_bytes()
    stored.write_bytes(original.replace(b"MoPEQ", b"MoPEq", 1) if b"MoPEQ" in original else original + b"!")
    try:
        r = mopeq(service, "download", done_job.id, str(tmp_path / "card.md"), "--file", "README.md", "--json")
        assert r.exit_code == EXIT_CHECKSUM, r.output
        assert json.loads(r.stdout)["error"]["code"] == "checksum_mismatch"
        assert not (tmp_path / "card.md").exists() and list(tmp_path.iterdir()) == []
        with MopeqClient(service.url, service.key) as c, pytest.raises(ChecksumError, match="mismatch"):
            c.download(done_job.id, tmp_path / "x", "README.md")
    finally:
        stored.write_bytes(original)
