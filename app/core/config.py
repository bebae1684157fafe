"""Service settings, read from the environment (prefix ``MOPEQ_``).

Defaults are the embedded setup of ``make serve``: SQLite and a filesystem message broker under ``./.mopeq``, a
local artifact store, no external services. Production points ``MOPEQ_DATABASE_URL`` at PostgreSQL and
``MOPEQ_BROKER_URL`` at Redis and sets ``MOPEQ_SECRET_KEY`` to the same value on every API and worker machine.
"""

from __future__ import annotations

import os
import re
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    text = str(value).strip()
    if not text:
        return []
    if text.startswith("["):
        import json

        return [str(v) for v in json.loads(text)]
    return [p.strip() for p in re.split(r"[,\n" + re.escape(os.pathsep) + "]", text) if p.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOPEQ_", extra="ignore", case_sensitive=False)

    # Where embedded state lives (SQLite file, filesystem broker, work dirs, generated secret).
    HOME: Path = Path(".mopeq")
    DATABASE_URL: str | None = None  # default sqlite:///{HOME}/mopeq.db
    BROKER_URL: str | None = None  # default: kombu filesystem transport under {HOME}/broker
    ARTIFACT_DIR: Path | None = None  # default {HOME}/artifacts
    # Artifact store: unset = the local ARTIFACT_DIR; "s3://BUCKET/PREFIX" = S3-compatible object storage configured
    # by the standard AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION (app.services.storage)
    ARTIFACT_STORE: str = ""
    S3_MULTIPART_THRESHOLD_MB: int = 64  # files from this size are uploaded in parts (boto3 TransferConfig)
    S3_MULTIPART_CHUNK_MB: int = 64
    S3_PRESIGN_EXPIRES_S: int = 900  # lifetime of the presigned download URLs the API redirects to
    S3_PUBLIC_ENDPOINT_URL: str = ""  # presign with this endpoint when clients reach the store at another address
    WORK_DIR: Path | None = None  # per-job stage files; default {HOME}/work
    # Directories from which local model paths (and calibration/eval files) are allowed.
    MODEL_ROOTS: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["models"])
    BOOTSTRAP_API_KEY: SecretStr | None = None
    SECRET_KEY: SecretStr | None = None  # auto-generated and persisted under HOME when unset
    HOST: str = "127.0.0.1"
    PORT: int = 8000
    # Hub repos (or "org/*") whose remote code a job may run when it also asks for trust_remote_code.
    ALLOW_REMOTE_CODE_REPOS: Annotated[list[str], NoDecode] = Field(default_factory=list)
    ALLOW_PICKLE: bool = False

    # Per API key (a key row may override): requests per minute and queued+running jobs.
    RATE_LIMIT_PER_MINUTE: int = 120
    # Redis that API processes share rate limits and event-stream slots through (docs/SCALING.md); unset: the
    # broker's Redis when MOPEQ_BROKER_URL is redis://, else each process counts on its own (the embedded default).
    REDIS_URL: str = ""
    # Seconds a verified API key is remembered by an API process: a key revoked through another process (or the
    # admin CLI) is refused by this one at most this long after; the process that revokes it forgets it at once.
    AUTH_CACHE_TTL_S: float = 5.0
    MAX_CONCURRENT_JOBS: int = 4
    MAX_BODY_BYTES: int = 1 << 20

    # Bounds on what a tenant's job may ask for (app.services.limits checks them at submit; 422 names the bound).
    MAX_CALIB_TOKENS: int = 1 << 20  # calibration samples x seq_len per job (evaluation: the same bound)
    MAX_SAMPLES: int = 8192  # calibration and evaluation samples per job
    MAX_PROBES: int = 1024  # Hutchinson probes per job
    MAX_CALIB_MEMORY_GB: float = 8.0  # estimated calibration activations (tokens x hidden size, fp32, in + out)
    # Event streams (GET /v1/jobs/{id}/events): the fastest poll a client may ask for, open streams per key.
    SSE_MIN_POLL_S: float = 0.25
    SSE_MAX_STREAMS_PER_KEY: int = 8

    # Queues by GPU memory: "name:GB,..." (e.g. "cpu:16,gpu-24g:24,gpu-80g:80,gpu-141g:141"). At submit a job goes to
    # the smallest queue whose GB covers its estimated memory (app.services.queues); one that fits none is refused.
    # Unset: every job goes to QUEUE.
    QUEUES: str = ""

    # Worker
    QUEUE: str = "gpu"  # the queue this worker serves (python -m worker --queue NAME); "auto": from its GPU memory
    JOB_TIMEOUT_S: int = 6 * 3600
    HEARTBEAT_INTERVAL_S: float = 5.0
    HEARTBEAT_STALE_S: float = 60.0  # a running job whose heartbeat is older than this is orphaned
    SWEEP_INTERVAL_S: float = 30.0
    MAX_RECOVERIES: int = 2  # times a job is resumed after its worker died before it fails
    TRANSIENT_RETRIES: int = 5
    WORKER_DEVICE: str = "auto"  # auto | cpu | cuda | cuda:N
    MIN_FREE_DISK_GB: float = 1.0
    # a failed or cancelled job's stage files stay on its worker this long, for a retry to reuse (0: not kept)
    RETRY_STATE_HOURS: float = 72.0
    RETENTION_DAYS: float = 0.0  # finished jobs older than this are deleted with their files by the sweep; 0 = kept
    ARTIFACT_MAX_BYTES: int = 0  # artifact store quota (bytes, all jobs together); 0 = only the disk's free space
    WATCHDOG_GRACE_S: float = 0.0  # stuck past JOB_TIMEOUT_S + this: fail the job, restart; 0 = max(60, 10%)
    REDIS_KEY_PREFIX: str = ""  # kombu global_keyprefix, to share one Redis between deployments
    # Fault injection for tests: "stage:seconds,..." sleeps (polling cancel) when a stage starts.
    DEBUG_STAGE_DELAY: str = ""

    # Hub webhooks in (POST /v1/hooks/hub) and signed webhooks out (app.services.webhooks, worker.webhooks)
    HUB_WEBHOOK_SECRET: SecretStr | None = None  # the Hub's X-Webhook-Secret; unset: the route refuses everything
    WEBHOOK_ALLOW_PRIVATE: bool = False  # allow webhook URLs on private/loopback/link-local/reserved addresses
    WEBHOOK_QUEUE: str = "webhooks"  # Celery queue of deliveries (served by python -m worker.webhooks)
    WEBHOOK_CONCURRENCY: int = 4  # delivery threads per webhook worker
    WEBHOOK_MAX_ATTEMPTS: int = 8
    WEBHOOK_RETRY_BASE_S: float = 5.0  # attempt n waits base * 4**(n-1) (jittered), at most WEBHOOK_RETRY_MAX_S
    WEBHOOK_RETRY_MAX_S: float = 6 * 3600.0
    WEBHOOK_TIMEOUT_S: float = 15.0
    WEBHOOK_SWEEP_INTERVAL_S: float = 2.0  # how often webhook workers look for finished jobs to announce

    @field_validator("MODEL_ROOTS", "ALLOW_REMOTE_CODE_REPOS", mode="before")
    @classmethod
    def _lists(cls, v: object) -> list[str]:
        return _split_list(v)

    @field_validator("ARTIFACT_STORE")
    @classmethod
    def _store(cls, v: str) -> str:
        v = (v or "").strip()
        if v in ("", "local"):
            return ""
        if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/[^\s]*)?", v):
            raise ValueError(f"MOPEQ_ARTIFACT_STORE must be empty, 'local' or s3://BUCKET/PREFIX, not {v!r}")
        return v

    @field_validator("QUEUES")
    @classmethod
    def _queues(cls, v: str) -> str:
        from app.core.queue_classes import parse_queues

        parse_queues(v)  # raises on a malformed list
        return v

    # ---- derived values -------------------------------------------------------------------------------------------
    @property
    def home(self) -> Path:
        return self.HOME.expanduser().absolute()

    @property
    def database_url(self) -> str:
        return self.DATABASE_URL or f"sqlite:///{self.home / 'mopeq.db'}"

    @property
    def broker_url(self) -> str:
        return self.BROKER_URL or "filesystem://"

    @property
    def broker_is_filesystem(self) -> bool:
        return self.broker_url.startswith("filesystem:")

    @property
    def redis_url(self) -> str | None:
        """The Redis shared by API processes (MOPEQ_REDIS_URL, else a redis:// broker), or None."""
        if self.REDIS_URL.strip():
            return self.REDIS_URL.strip()
        return self.broker_url if self.broker_url.startswith(("redis://", "rediss://")) else None

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def artifact_dir(self) -> Path:
        return (self.ARTIFACT_DIR or self.home / "artifacts").expanduser().absolute()

    @property
    def artifact_store_is_s3(self) -> bool:
        return self.ARTIFACT_STORE.strip().lower().startswith("s3://")

    @property
    def work_dir(self) -> Path:
        return (self.WORK_DIR or self.home / "work").expanduser().absolute()

    @property
    def model_roots(self) -> list[Path]:
        return [Path(r).expanduser().resolve() for r in self.MODEL_ROOTS]

    def secret_key(self) -> bytes:
        """The server secret: MOPEQ_SECRET_KEY, or a random one generated once and kept in HOME/secret_key."""
        if self.SECRET_KEY is not None and self.SECRET_KEY.get_secret_value():
            return self.SECRET_KEY.get_secret_value().encode()
        path = self.home / "secret_key"
        if not path.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(48))
        for _ in range(50):  # another process may be writing it right now
            text = path.read_text().strip()
            if text:
                return text.encode()
            import time

            time.sleep(0.02)
        raise RuntimeError(f"{path} is empty; delete it or set MOPEQ_SECRET_KEY")

    def ensure_dirs(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if not self.artifact_store_is_s3:
            self.artifact_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.broker_is_filesystem:
            for sub in ("queue", "control", "processed"):
                (self.broker_dir / sub).mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
