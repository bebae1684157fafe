"""Helpers of the service tests: tiny models on disk, environments for the service processes, subprocess
handling and polling."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from hubmock import HubMock  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("MOPEQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MOPEQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HF_TOKEN = "hf_mocktokenvalid0123456789"
BOOT_KEY = "boot-" + uuid.uuid4().hex
# Small, fast knobs for real pipeline runs on the tiny model.
FAST_JOB = {"budget": {"avg_bits": 3.0}, "sensitivity": "frequency", "quantizer": "rtn", "group_size": 64,
            "calibration": {"samples": 2, "seq_len": 16}}


# ---- models on disk -----------------------------------------------------------------------------------------------
def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], *, lie: bool = False) -> None:
    """A real safetensors file with zero-filled data (no numpy/torch needed)."""
    width = {"F32": 4, "F16": 2, "BF16": 2}
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = width[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) + (10**6 if lie else 0)))
        f.write(raw)
        f.write(b"\0" * offset)


def make_tiny_moe(dest: Path, seed: int = 0) -> Path:
    """A random 2-layer, 4-expert Mixtral with a small BPE tokenizer trained on the shipped calibration text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    dest.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (REPO / "mopeq_core" / "data" / "calib_default.txt").read_text()[:40_000].splitlines()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=384, show_progress=False,
                                                      special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(dest)
    cfg = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_local_experts=4,
                        num_experts_per_tok=2, vocab_size=len(fast), num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    MixtralForCausalLM(cfg).save_pretrained(dest)
    return dest



# ---- PostgreSQL and Redis --------------------------------------------------------------------------------------------
def _pg_admin():
    import psycopg

    url = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    return psycopg.connect(url, autocommit=True, connect_timeout=5)




def migrate(url: str) -> None:
    from app.db.migrate import upgrade

    upgrade(url)


def reset_pg(url: str) -> None:
    """Empty every table (the schema stays) so each module starts clean."""
    from sqlalchemy import create_engine, text

    eng = create_engine(url)
    with eng.begin() as conn:
        conn.execute(text("TRUNCATE api_keys, jobs, job_events, expert_allocations, artifacts, idempotency_keys, "
                          "workers RESTART IDENTITY CASCADE"))
    eng.dispose()


# ---- environments --------------------------------------------------------------------------------------------------
def service_env(home: Path, model_root: Path, *, database_url: str | None = None, broker_url: str | None = None,
                queue: str | None = None, redis_prefix: str = "", hub_url: str | None = None,
                **extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOPEQ_", "HF_"))}
    env.update({
        "MOPEQ_HOME": str(home), "MOPEQ_MODEL_ROOTS": str(model_root), "MOPEQ_BOOTSTRAP_API_KEY": BOOT_KEY,
        "MOPEQ_SECRET_KEY": "test-secret-" + home.name, "MOPEQ_QUEUE": queue or f"gpu-{uuid.uuid4().hex[:8]}",
        "MOPEQ_HEARTBEAT_INTERVAL_S": "0.5", "MOPEQ_HEARTBEAT_STALE_S": "20", "MOPEQ_SWEEP_INTERVAL_S": "1",
        "MOPEQ_WORKER_DEVICE": "cpu", "MOPEQ_RATE_LIMIT_PER_MINUTE": "100000", "MOPEQ_MAX_CONCURRENT_JOBS": "1000", "MOPEQ_MIN_FREE_DISK_GB": "0.01", "MOPEQ_LOG_LEVEL": "INFO",
        "HF_HOME": str(home / "hf"), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    })
    if hub_url:
        env["HF_ENDPOINT"] = hub_url
    else:
        env["HF_HUB_OFFLINE"] = "1"
    if database_url:
        env["MOPEQ_DATABASE_URL"] = database_url
    if broker_url:
        env["MOPEQ_BROKER_URL"] = broker_url
    if redis_prefix:
        env["MOPEQ_REDIS_KEY_PREFIX"] = redis_prefix
    env.update({k: str(v) for k, v in extra.items()})
    return env


def settings_from_env(env: dict[str, str]):
    from app.core.config import Settings

    return Settings(**{k[len("MOPEQ_"):]: v for k, v in env.items() if k.startswith("MOPEQ_")
                       and k not in ("MOPEQ_LOG_LEVEL",)})


# ---- processes -------------------------------------------------------------------------------------------------------
class Proc:
    """A subprocess whose output goes to a log file the test can read."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
        self.log_path = log
        self._offset = log.stat().st_size if log.exists() else 0  # earlier runs may share the log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd or REPO,
                                  start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def text(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if needle in self.text():
                return
            if self.p.poll() is not None:
                raise AssertionError(f"process exited ({self.p.returncode}) before '{needle}':\n{self.text()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for '{needle}':\n{self.text()[-4000:]}")

    def kill9(self) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait(10)
        self._log.close()
        return self.p.returncode


def start_worker(env: dict[str, str], log: Path) -> Proc:
    w = Proc([sys.executable, "-m", "worker"], env, log)
    w.wait_for("ready on queue")
    return w


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_status(get_job, statuses: tuple[str, ...], timeout: float = 180) -> dict:
    end = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < end:
        job = get_job()
        assert "status" in job, job
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job stayed {job.get('status')} / {job.get('stage')} (wanted {statuses}): {job}")


def wait_until(pred, timeout: float = 60, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")



def auth(key: str = BOOT_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def http(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=30)


def planted_settings() -> dict[str, Any]:
    """The settings document of a job row a test writes directly (a small, fast job)."""
    from app.services import job_settings
    from mopeq_core.config import QuantizeConfig

    return job_settings.document(QuantizeConfig(model="m", bits=(2, 4), sensitivity="frequency", quantizer="rtn",
                                                group_size=64, probes=1, calib_samples=1, seq_len=8, eval_samples=1))


def seed_key(conn: Any, key_id: str = "k1", name: str = "old") -> None:
    """An API key row written with raw SQL, as a schema older than the models would hold it (migration tests)."""
    from sqlalchemy import text

    conn.execute(text("INSERT INTO api_keys (id, name, key_hash, scope, created_at) "
                      "VALUES (:id, :name, 'h', 'user', '2026-01-01 00:00:00')"), {"id": key_id, "name": name})
