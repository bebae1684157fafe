"""Hostile inputs against the running API process (real HTTP, PostgreSQL): each gets a 4xx with a stable code,
nothing is written (no job row, no broker message), and no 5xx. docs/RELIABILITY.md has the table; its rows are the
ids of these tests."""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest
from rel_util import BOOT_KEY, FAST_JOB, HF_TOKEN, Cluster, auth
from svc_util import _write_safetensors

EXPERTS = {"model.layers.0.mlp.experts.0.w1.weight": ("F16", [16, 8]),
           "model.layers.0.mlp.experts.1.w1.weight": ("F16", [16, 8])}


def _raw_header(header: Any, data: bytes = b"\0" * 8, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.fixture(scope="module")
def hostile(model_root: Path) -> Path:
    """Hostile model folders next to the service tests' ones (remote-code, pickle-only, escape, sneaky, bad-header)."""
    root = model_root

    def mk(name: str, config: Any, tensors: dict | None = None, raw: bytes | None = None) -> None:
        d = root / name
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if raw is not None:
            (d / "model.safetensors").write_bytes(raw)
        elif tensors is not None:
            _write_safetensors(d / "model.safetensors", tensors)

    mk("absurd-config", {"model_type": "mixtral", "num_local_experts": 10**12, "hidden_size": 10**15,
                         "num_hidden_layers": 10**9, "vocab_size": 10**12}, EXPERTS)
    mk("absurd-nested-config", {"model_type": "qwen2_vl", "text_config": {"hidden_size": 2**62}}, EXPERTS)
    mk("absurd-shape", {"model_type": "mixtral"}, raw=_raw_header(
        {"model.layers.0.mlp.experts.0.w1.weight": {"dtype": "F16", "shape": [10**9, 10**9],
                                                    "data_offsets": [0, 8]}}))
    mk("header-length-2^63", {"model_type": "mixtral"}, raw=struct.pack("<Q", 2**63) + b"{}")
    mk("header-not-json", {"model_type": "mixtral"}, raw=_raw_header(b"\xff\xfe{{{{{{"))
    mk("header-truncated", {"model_type": "mixtral"}, raw=b"\x01\x02\x03")
    mk("header-unknown-dtype", {"model_type": "mixtral"}, raw=_raw_header(
        {"model.layers.0.mlp.experts.0.w1.weight": {"dtype": "X99", "shape": [2, 2], "data_offsets": [0, 8]}}))
    mk("header-negative-offsets", {"model_type": "mixtral"}, raw=_raw_header(
        {"model.layers.0.mlp.experts.0.w1.weight": {"dtype": "F16", "shape": [2, 2], "data_offsets": [-8, 0]}}))
    mk("header-deep-json", {"model_type": "mixtral"}, raw=_raw_header(b"[" * 50_000 + b"]" * 50_000))
    mk("config-deep-json", "[" * 100_000 + "]" * 100_000, EXPERTS)
    if not (root / "calib-escape.txt").exists():
        (root / "calib-escape.txt").symlink_to("/etc/hostname")
    return root


# (id, request body overrides, status, code) -- "{root}" is the model root
SUBMIT_CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("model path traversal ../", {"model": "{root}/../../../../etc"}, 422, "path_not_allowed"),
    ("model path traversal, relative", {"model": "../../../../../etc"}, 422, "path_not_allowed"),
    ("model absolute path outside the roots", {"model": "/etc"}, 422, "path_not_allowed"),
    ("model path ~user", {"model": "~root/.ssh"}, 422, "path_not_allowed"),
    ("model dir symlink out of the roots", {"model": "escape"}, 422, "path_not_allowed"),
    ("model weights symlinked out of the roots", {"model": "{root}/sneaky"}, 422, "path_not_allowed"),
    ("model name with NUL", {"model": "tiny-moe\x00/../../etc"}, 422, "invalid_request"),
    ("calibration file outside the roots", {"calibration": {"file": "/etc/passwd"}}, 422, "path_not_allowed"),
    ("calibration file symlinked out", {"calibration": {"file": "{root}/calib-escape.txt"}}, 422,
     "path_not_allowed"),
    ("remote-code model", {"model": "{root}/remote-code"}, 422, "remote_code"),
    ("remote-code model, trust_remote_code not allowed by the operator",
     {"model": "{root}/remote-code", "trust_remote_code": True}, 422, "remote_code"),
    ("pickle-only checkpoint", {"model": "{root}/pickle-only"}, 422, "pickle_only"),
    ("config claims absurd sizes", {"model": "{root}/absurd-config"}, 422, "invalid_input"),
    ("nested config claims absurd sizes", {"model": "{root}/absurd-nested-config"}, 422, "invalid_input"),
    ("header claims a 10^18-element tensor", {"model": "{root}/absurd-shape"}, 422, "invalid_input"),
    ("header claims more data than the file", {"model": "{root}/bad-header"}, 422, "invalid_input"),
    ("header length 2^63", {"model": "{root}/header-length-2^63"}, 422, "invalid_input"),
    ("header not JSON", {"model": "{root}/header-not-json"}, 422, "invalid_input"),
    ("file shorter than 8 bytes", {"model": "{root}/header-truncated"}, 422, "invalid_input"),
    ("header with an unknown dtype", {"model": "{root}/header-unknown-dtype"}, 422, "invalid_input"),
    ("header with negative offsets", {"model": "{root}/header-negative-offsets"}, 422, "invalid_input"),
    ("header nested 50k deep", {"model": "{root}/header-deep-json"}, 422, "invalid_input"),
    ("config.json nested 100k deep", {"model": "{root}/config-deep-json"}, 422, "invalid_input"),
    ("absurd knobs (10^9 calibration samples)", {"calibration": {"samples": 10**9, "seq_len": 10**9}}, 422,
     "invalid_request"),
    ("absurd group size", {"group_size": 2**40}, 422, "invalid_request"),
    ("push repo id traversal", {"push": {"repo_id": "../../etc"}, "hf_token": HF_TOKEN}, 422, "invalid_request"),
    ("unknown Hub repo", {"model": "nobody/nothing-here"}, 422, "model_not_found"),
    ("hf_token with non-ASCII characters", {"model": "org/tiny-moe", "hf_token": "hf_\ue0e4\u00e9x"}, 422,
     "invalid_request"),
    ("hf_token with a newline (header injection)", {"model": "org/tiny-moe", "hf_token": "hf_x\r\nX-Evil: 1"}, 422,
     "invalid_request"),
]


def _fill(v: Any, root: Path) -> Any:
    if isinstance(v, str):
        return v.replace("{root}", str(root))
    if isinstance(v, dict):
        return {k: _fill(x, root) for k, x in v.items()}
    return v


def _counts(cl: Cluster) -> tuple[int, int]:
    import redis
    from sqlalchemy import func, select

    from app.db.models import Job

    with cl.factory() as db:
        jobs = db.scalar(select(func.count()).select_from(Job))
    r = redis.Redis.from_url(cl.redis.url)
    try:
        msgs = sum(r.llen(k) for k in r.scan_iter(match=f"*{cl.settings.QUEUE}*") if r.type(k) == b"list")
    finally:
        r.close()
    return jobs, msgs


@pytest.mark.parametrize(("case", "body", "status", "code"), SUBMIT_CASES, ids=[c[0] for c in SUBMIT_CASES])
def test_hostile_submit(cluster: Cluster, hostile: Path, case: str, body: dict, status: int, code: str) -> None:
    before = _counts(cluster)
    payload = {"model": str(hostile / "tiny-moe"), **FAST_JOB, **_fill(body, hostile)}
    r = cluster.http.post("/v1/jobs", json=payload)
    assert (r.status_code, r.json().get("code")) == (status, code), r.text
    assert HF_TOKEN not in r.text and "root:x:0:0" not in r.text  # no secret, no file content echoed
    assert _counts(cluster) == before, "nothing is written or queued"
    if "model" in body and status == 422:  # the estimate route refuses the same inputs the same way
        e = cluster.http.post("/v1/estimate", json={k: v for k, v in payload.items() if k in ("model", "hf_token")})
        assert e.status_code in (422,) and e.json()["code"] == code, e.text


# ---- bodies ------------------------------------------------------------------------------------------------------
def test_huge_body_with_content_length_is_413(cluster: Cluster) -> None:
    r = cluster.http.post("/v1/jobs", content=b'{"model": "' + b"a" * (2 << 20) + b'"}',
                          headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "too_large"


def test_huge_chunked_body_is_413(cluster: Cluster) -> None:
    """No Content-Length: the server stops reading at the limit instead of buffering the whole stream."""

    def chunks():
        yield b'{"model": "'
        for _ in range(64):  # 4 MiB in 64 KiB chunks
            yield b"a" * 65536
        yield b'"}'

    r = cluster.http.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "too_large"


def test_deeply_nested_json_body_is_400(cluster: Cluster) -> None:
    body = b'{"model": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    r = cluster.http.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "malformed_json", r.text


def test_oversized_header_is_refused(cluster: Cluster) -> None:
    with socket.create_connection(("127.0.0.1", int(cluster.base.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        answer = s.recv(200)
    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")) or answer == b"", answer


def test_overlong_api_key_is_401(cluster: Cluster) -> None:
    r = cluster.http.get("/v1/jobs", headers=auth("mpq_" + "A" * 5000))
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"


# ---- artifact downloads --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted_job(cluster: Cluster) -> str:
    """A succeeded job (a row, not a run) with one real file, one artifact row whose name climbs out of the job's
    folder (as if the database had been tampered with) and a symlink in its folder that points outside the store."""
    from app.db.models import Artifact, Job

    with cluster.factory() as db, db.begin():
        job = Job(owner_key_id="bootstrap", model="m", bits=[2, 4], sensitivity="frequency", allocator="knapsack",
                  scope="model", granularity="expert", quantizer="rtn", group_size=64, probes=1, calib_samples=1,
                  seq_len=8, eval_samples=1, format="mopeq", options={}, timings={}, budget_avg_bits=3.0,
                  status="succeeded", model_source="local")
        db.add(job)
        db.flush()
        job_id = job.id
        art = cluster.settings.artifact_dir / job_id
        art.mkdir(parents=True)
        (art / "bitmap.json").write_text("{}")
        (art / "leak.txt").symlink_to("/etc/hostname")
        for name in ("bitmap.json", "../../secret_key", "leak.txt"):
            db.add(Artifact(job_id=job_id, kind="file", name=name, uri="file:///x", sha256="0" * 64, bytes=2))
    return job_id


DOWNLOADS = ["../../secret_key", "%2e%2e/%2e%2e/secret_key", "..%2F..%2Fsecret_key", "%2Fetc%2Fpasswd",
             "bitmap.json/../../../secret_key", "leak.txt"]


def raw_get(cl: Cluster, path: str, key: str = BOOT_KEY) -> tuple[int, bytes]:
    """A GET with the path sent byte for byte (HTTP clients remove '..' segments before sending)."""
    port = int(cl.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                  "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("name", DOWNLOADS)
def test_artifact_download_traversal_is_404(cluster: Cluster, planted_job: str, name: str) -> None:
    status, body = raw_get(cluster, f"/v1/jobs/{planted_job}/artifacts/{name}")
    assert status == 404 and json.loads(body)["code"] == "not_found", (name, status, body[:200])
    secret = cluster.settings.home / "secret_key"
    if secret.exists():
        assert secret.read_bytes().strip() not in body
    assert b"localhost" not in body and Path("/etc/hostname").read_bytes().strip() not in body
    assert raw_get(cluster, f"/v1/jobs/{planted_job}/artifacts/bitmap.json")[0] == 200


# ---- another user's job --------------------------------------------------------------------------------------------
def test_another_users_job_id_is_404(cluster: Cluster, planted_job: str) -> None:
    r = cluster.http.post("/v1/admin/keys", json={"name": f"mallory-{uuid.uuid4().hex[:6]}"})
    mallory = r.json()["api_key"]
    for path in ("", "/bitmap", "/artifacts", "/artifacts/bitmap.json", "/allocations", "/events"):
        r = cluster.http.get(f"/v1/jobs/{planted_job}{path}", headers=auth(mallory))
        assert r.status_code == 404 and r.json()["code"] == "not_found", (path, r.text)
    r = cluster.http.post(f"/v1/jobs/{planted_job}/cancel", headers=auth(mallory))
    assert r.status_code == 404
    assert cluster.http.get(f"/v1/jobs/{planted_job}", headers=auth(BOOT_KEY)).status_code == 200


# ---- webhooks --------------------------------------------------------------------------------------------------------
PRIVATE_URLS = ["http://127.0.0.1:9/hook", "http://10.0.0.1/hook", "http://172.16.5.4/hook", "http://192.168.1.1/",
                "http://169.254.169.254/latest/meta-data/", "http://[::1]/hook", "http://[fd00::1]/hook",
                "http://[::ffff:10.0.0.1]/hook", "http://0.0.0.0/hook", "http://localhost:8000/hook",
                "http://2130706433/hook", "http://0x7f000001/hook", "file:///etc/passwd",
                "http://user:pw@203.0.113.9/hook"]


@pytest.mark.parametrize("url", PRIVATE_URLS)
def test_webhook_url_to_a_private_range_is_refused(cluster: Cluster, url: str) -> None:
    """Refused when the job is submitted: nothing is ever sent there. (No traffic leaves the machine: the API only
    parses and, for 'localhost', resolves the name.)"""
    spec = cluster.http.get("/openapi.json").json()
    if "webhook" not in spec["components"]["schemas"].get("JobCreate", {}).get("properties", {}):
        pytest.skip("job webhooks are not part of this build")
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    before = _counts(cluster)
    r = cluster.http.post("/v1/jobs", json={"model": str(cluster.model_root / "tiny-moe"), **FAST_JOB,
                                            "webhook": {"url": url, "secret": secret}})
    assert r.status_code == 422 and r.json()["code"] in ("url_not_allowed", "invalid_request"), r.text
    assert secret not in r.text and _counts(cluster) == before
    assert os.environ.get("MOPEQ_WEBHOOK_ALLOW_PRIVATE") is None
