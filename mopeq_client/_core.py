"""What the sync and the async client share: typed results, request bodies, the retry policy (tenacity), SSE
events (httpx-sse), the progress display and the download helpers. The clients themselves are
``mopeq_client/_async_client.py`` and its generated sync copy ``_sync_client.py``; the public names are in
:mod:`mopeq_client.sdk`. Never imports torch."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import inspect
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent
from httpx_sse._decoders import SSEDecoder as _LineDecoder  # the decoder behind EventSource, for feed()
from tenacity import retry_if_exception, stop_after_attempt

from mopeq_client.errors import (
    ChecksumError,
    MopeqAPIError,
    NotFoundError,
    ServiceUnreachableError,
    StreamError,
    WaitTimeoutError,
    error_class,
    parse_retry_after,
)

__version__ = "0.1.0"
DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


# ---- typed results --------------------------------------------------------------------------------------------------
def _dt(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    try:
        return dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None


class _Model:
    """Dataclass mixin: build from the server's JSON, keep the whole object in ``raw`` (new fields stay reachable)."""

    raw: dict[str, Any]
    _dates: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}  # type: ignore[arg-type]
        kw = {k: data.get(k) for k in names}
        for k in cls._dates:
            kw[k] = _dt(kw.get(k))
        return cls(**kw, raw=dict(data))  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)


@dataclass
class Job(_Model):
    """A quantization job (``GET /v1/jobs/{id}``)."""

    id: str
    status: str
    stage: str | None = None
    progress: float = 0.0
    model: str | None = None
    revision: str | None = None
    resolved_revision: str | None = None
    retry_of: str | None = None
    settings: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    bits: list[int] | None = None
    sensitivity: str | None = None
    allocator: str | None = None
    scope: str | None = None
    granularity: str | None = None
    quantizer: str | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    probes: int | None = None
    format: str | None = None
    trust_remote_code: bool | None = None
    calibration: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    push: dict[str, Any] | None = None
    cancel_requested: bool = False
    attempts: int = 0
    error: str | None = None
    error_code: str | None = None
    timings: dict[str, float] | None = None
    result: dict[str, Any] | None = None
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    _dates = ("created_at", "started_at", "finished_at")

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def perplexity(self) -> dict[str, Any] | None:
        """``result.perplexity`` (``fp_perplexity``, ``quantized_perplexity``, ``increase_pct``) when measured."""
        ppl = (self.result or {}).get("perplexity")
        return ppl if isinstance(ppl, dict) else None

    @property
    def ppl_increase_pct(self) -> float | None:
        """How much the quantized model's perplexity rose over full precision, in %; None when not measured
        (a job measures perplexity only with an evaluation file)."""
        ppl = self.perplexity or {}
        inc = ppl.get("increase_pct")
        if isinstance(inc, (int, float)):
            return float(inc)
        fp, q = ppl.get("fp_perplexity"), ppl.get("quantized_perplexity")
        if isinstance(fp, (int, float)) and isinstance(q, (int, float)) and fp > 0:
            return 100.0 * (q / fp - 1.0)
        return None


@dataclass
class JobList(_Model):
    """A page of ``GET /v1/jobs`` (newest first)."""

    items: list[Job]
    total: int = 0
    limit: int = 50
    offset: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobList:
        return cls(items=[Job.from_dict(j) for j in data.get("items", [])], total=int(data.get("total", 0)),
                   limit=int(data.get("limit", 50)), offset=int(data.get("offset", 0)), raw=dict(data))

    @property
    def next_offset(self) -> int | None:
        """The ``offset`` (or ``cursor``) of the next page, None on the last one."""
        nxt = self.offset + len(self.items)
        return nxt if self.items and nxt < self.total else None

    def __iter__(self) -> Iterator[Job]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Event(_Model):
    """One Server-Sent Event of ``GET /v1/jobs/{id}/events``.

    ``event`` is the SSE event name (the kind: ``status``, ``stage``, ``progress``, ``log``; ``end`` closes the
    stream), ``id`` the event id (for ``Last-Event-ID``) and ``data`` the decoded JSON payload."""

    event: str
    id: int | None = None
    data: Any = None
    retry: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def _get(self, key: str) -> Any:
        return self.data.get(key) if isinstance(self.data, dict) else None

    @property
    def kind(self) -> str:
        return self._get("kind") or self.event

    @property
    def status(self) -> str | None:
        return self._get("status")

    @property
    def stage(self) -> str | None:
        return self._get("stage")

    @property
    def progress(self) -> float | None:
        p = self._get("progress")
        return float(p) if isinstance(p, (int, float)) else None

    @property
    def message(self) -> str | None:
        return self._get("message")

    @property
    def ts(self) -> dt.datetime | None:
        return _dt(self._get("ts"))


@dataclass
class Estimate(_Model):
    """``POST /v1/estimate``: size, experts and the feasible budget range of a model, from its headers only."""

    model: str
    source: str | None = None
    revision: str | None = None
    model_type: str | None = None
    architectures: list[str] | None = None
    moe_layers: int | None = None
    experts_per_layer: list[int] | None = None
    num_experts: int | None = None
    expert_params: int | None = None
    non_expert_params: int | None = None
    total_params: int | None = None
    stored_bytes: int | None = None
    min_bytes: int | None = None
    max_bytes: int | None = None
    min_gb: float | None = None
    max_gb: float | None = None
    bits: list[int] | None = None
    group_size: int | None = None
    feasible: dict[str, Any] | None = None
    layers: list[dict[str, Any]] | None = None
    budget_feasible: bool | None = None
    budget_message: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Artifact(_Model):
    """One artifact of a job: a stored file (``kind == "file"``, downloadable) or a Hub push (``kind == "hub"``)."""

    kind: str
    name: str
    uri: str | None = None
    sha256: str | None = None
    bytes: int | None = None
    hub_repo: str | None = None
    hub_commit: str | None = None
    download_url: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Watch(_Model):
    """A watch (``/v1/watches``): every new commit on the main branch of ``repo`` (or of an owner's repos matching
    it) is quantized with ``template``; ``ref`` names other refs to follow instead: a branch, or tags and releases by
    a glob (``refs/tags/*``). ``webhook_secret`` is set only on the answer to ``create_watch``."""

    id: str
    repo: str
    ref: str | None = None
    template: dict[str, Any] | None = None
    target_repo: str | None = None
    private: bool | None = None
    has_hf_token: bool | None = None
    webhook: dict[str, Any] | None = None
    owner_key_id: str | None = None
    webhook_secret: str | None = None
    created_at: dt.datetime | None = None
    deleted_at: dt.datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    _dates = ("created_at", "deleted_at")


Bitmap = dict  # bitmap.json (format_version 1), as a plain dict


def bitmap_rows(bitmap: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per expert: layer, module, expert, bits, sensitivity, frequency, params."""
    rows = []
    for layer in bitmap.get("layers", []):
        for e in layer.get("experts", []):
            rows.append({"layer": layer.get("layer"), "module": layer.get("module"), "expert": e.get("expert"),
                         "bits": e.get("bits"), "sensitivity": e.get("sensitivity"),
                         "frequency": e.get("frequency"), "params": e.get("params")})
    return rows


# ---- request bodies ---------------------------------------------------------------------------------------------------
def _bits(value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [int(x) for x in value.split(",") if x.strip()]
    return [int(x) for x in value]


def _budget(avg_bits: float | None, budget_gb: float | None, budget: dict[str, Any] | None) -> dict[str, Any] | None:
    if budget is not None:
        return dict(budget)
    if avg_bits is None and budget_gb is None:
        return None
    out: dict[str, Any] = {}
    if avg_bits is not None:
        out["avg_bits"] = float(avg_bits)
    if budget_gb is not None:
        out["gb"] = float(budget_gb)  # both given: the server answers 422 "exactly one"
    return out


def job_body(model: str, *, revision: str | None = None, avg_bits: float | None = None,
             budget_gb: float | None = None, budget: dict[str, Any] | None = None, bits: Any = None,
             sensitivity: str | None = None, allocator: str | None = None, scope: str | None = None,
             granularity: str | None = None, quantizer: str | None = None, group_size: int | None = None,
             symmetric: bool | None = None, act_order: bool | None = None, probes: int | None = None,
             calib_file: str | None = None, calib_samples: int | None = None, seq_len: int | None = None,
             calibration: dict[str, Any] | None = None, eval_file: str | None = None,
             eval_samples: int | None = None, evaluation: dict[str, Any] | None = None, format: str | None = None,
             low_memory: bool | None = None, seed: int | None = None, trust_remote_code: bool | None = None,
             push: bool | dict[str, Any] | None = None, push_repo: str | None = None, private: bool | None = None,
             hf_token: str | None = None, **extra: Any) -> dict[str, Any]:
    """The ``POST /v1/jobs`` body for these knobs; knobs left at None take the server's defaults. ``extra`` keys are
    sent as they are (for fields this SDK does not know yet)."""
    body: dict[str, Any] = {"model": model}
    simple = {"revision": revision, "bits": _bits(bits), "sensitivity": sensitivity, "allocator": allocator,
              "scope": scope, "granularity": granularity, "quantizer": quantizer, "group_size": group_size,
              "symmetric": symmetric, "act_order": act_order, "probes": probes, "format": format,
              "low_memory": low_memory, "seed": seed, "trust_remote_code": trust_remote_code, "hf_token": hf_token,
              "budget": _budget(avg_bits, budget_gb, budget)}
    body.update({k: v for k, v in simple.items() if v is not None})
    calib = dict(calibration or {})
    for k, v in (("file", calib_file), ("samples", calib_samples), ("seq_len", seq_len)):
        if v is not None:
            calib[k] = str(v) if k == "file" else v
    if calib:
        body["calibration"] = calib
    ev = dict(evaluation or {})
    for k, v in (("file", eval_file), ("samples", eval_samples)):
        if v is not None:
            ev[k] = str(v) if k == "file" else v
    if ev:
        body["evaluation"] = ev
    if isinstance(push, dict):
        body["push"] = dict(push)
    elif push or push_repo is not None or private is not None:
        p: dict[str, Any] = {}
        if push_repo is not None:
            p["repo_id"] = push_repo
        if private is not None:
            p["private"] = bool(private)
        body["push"] = p
    body.update(extra)
    return body


def watch_body(repo: str, *, template: dict[str, Any] | None = None, target_repo: str | None = None,
               private: bool | None = None, hf_token: str | None = None, webhook_url: str | None = None,
               webhook_secret: str | None = None, ref: str | None = None, **knobs: Any) -> dict[str, Any]:
    """The ``POST /v1/watches`` body. ``ref``: the refs to follow (default ``refs/heads/main``; ``refs/tags/*`` for
    every tag). ``knobs`` are those of :func:`job_body` (``avg_bits``, ``quantizer``, ``eval_file``, ...) and fill
    the job template (``template`` given as a dict is merged under them)."""
    tmpl = dict(template or {})
    tmpl.update({k: v for k, v in job_body("-", **knobs).items() if k != "model"})
    body: dict[str, Any] = {"repo": repo, "template": tmpl}
    for k, v in (("ref", ref), ("target_repo", target_repo), ("private", private), ("hf_token", hf_token)):
        if v is not None:
            body[k] = v
    if webhook_url is not None:
        body["webhook"] = {"url": webhook_url, **({"secret": webhook_secret} if webhook_secret else {})}
    return body


def estimate_body(model: str, *, revision: str | None = None, bits: Any = None, group_size: int | None = None,
                  symmetric: bool | None = None, avg_bits: float | None = None, budget_gb: float | None = None,
                  budget: dict[str, Any] | None = None, trust_remote_code: bool | None = None,
                  hf_token: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model}
    simple = {"revision": revision, "bits": _bits(bits), "group_size": group_size, "symmetric": symmetric,
              "budget": _budget(avg_bits, budget_gb, budget), "trust_remote_code": trust_remote_code,
              "hf_token": hf_token}
    body.update({k: v for k, v in simple.items() if v is not None})
    body.update(extra)
    return body


# ---- SSE ---------------------------------------------------------------------------------------------------------------
def to_event(sse: ServerSentEvent, retry: int | None = None) -> Event | None:
    """An httpx-sse event as an :class:`Event` (``data`` decoded from JSON when it is JSON); None for a block
    without data (a bare ``retry:`` or ``id:``), which dispatches nothing."""
    if not sse.data:
        return None
    try:
        payload: Any = json.loads(sse.data)
    except ValueError:
        payload = sse.data
    eid = sse.id or None
    num = int(eid) if eid is not None and eid.strip().isdigit() else None
    event = sse.event or "message"
    return Event(event=event, id=num, data=payload, retry=sse.retry if sse.retry is not None else retry,
                 raw={"event": event, "id": eid, "data": sse.data})


class SSEDecoder:
    """Line-at-a-time SSE decoding (httpx-sse's decoder) that returns :class:`Event` objects; ``retry`` is the
    latest ``retry:`` field seen."""

    def __init__(self) -> None:
        self._dec = _LineDecoder()
        self.retry: int | None = None

    @property
    def last_event_id(self) -> str | None:
        return self._dec._last_event_id or None

    def feed(self, line: str) -> Event | None:
        sse = self._dec.decode(line.rstrip("\r\n"))
        if sse is None:
            return None
        self.retry = sse.retry if sse.retry is not None else self.retry
        return to_event(sse, self.retry)


def stream_broken(job_id: str, last_event_id: str | None, exc: Exception | None) -> StreamError:
    """The error for an event stream that ended without its end event (cut off, or closed by the server)."""
    if exc is None:
        err = StreamError(f"event stream of job {job_id} closed before its end event")
    else:
        err = StreamError(f"event stream of job {job_id} cut off after event {last_event_id}: {type(exc).__name__}")
    err.last_event_id = last_event_id  # type: ignore[attr-defined]
    err.timed_out = isinstance(exc, httpx.ReadTimeout)  # type: ignore[attr-defined]
    return err


def check_event_stream(resp: httpx.Response, path: str) -> None:
    ctype = resp.headers.get("content-type", "")
    if not ctype.startswith("text/event-stream"):
        raise StreamError(f"{path} answered {ctype or 'no content type'}, not text/event-stream")


# ---- progress display -------------------------------------------------------------------------------------------------
class _Reporter:
    """Shows a job's progress: a rich bar on a terminal, one line per stage/status change otherwise (CI logs), or
    a user callback (called with every :class:`Event`; polling produces events of kind ``poll``)."""

    def __init__(self, job_id: str, progress: bool | Callable[[Event], Any]):
        self.job_id = job_id
        self.callback = progress if callable(progress) else None
        self.enabled = bool(progress) and self.callback is None
        self.bar = self.task = self.console = None
        self.last: tuple[Any, ...] = ()
        self.stage: str | None = None
        self.status: str | None = None
        self.pct = 0.0
        if self.enabled:
            from rich.console import Console

            self.console = Console(stderr=True)
            if self.console.is_terminal:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

                self.bar = Progress(TextColumn("[bold]{task.description:<12}"), BarColumn(),
                                    TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[status]}"),
                                    TimeElapsedColumn(), console=self.console, transient=False)
                self.bar.start()
                self.task = self.bar.add_task("queued", total=1.0, status="")

    def event(self, ev: Event) -> None:
        if self.callback is not None:
            self.callback(ev)
            return
        if not self.enabled:
            return
        if ev.stage:
            self.stage = ev.stage
        if ev.status:
            self.status = ev.status
        if ev.progress is not None:
            self.pct = max(0.0, min(1.0, ev.progress))
        if ev.event == "end" and isinstance(ev.data, dict) and ev.data.get("status"):
            self.status = ev.data["status"]
        if self.status == "succeeded":
            self.pct = 1.0
        desc = self.stage or self.status or "queued"
        if self.bar is not None:
            self.bar.update(self.task, description=desc, completed=self.pct, status=self.status or "")
            return
        key = (self.stage, self.status)
        if key != self.last:
            self.last = key
            msg = f" — {ev.message}" if ev.message and ev.kind in ("status", "poll") else ""
            self.console.print(f"[mopeq] job {self.job_id}: {self.status or 'running'} "  # type: ignore[union-attr]
                               f"stage={self.stage or '-'} {self.pct * 100:5.1f}%{msg}", highlight=False, markup=False,
                               soft_wrap=True)

    def job(self, job: Job) -> None:
        self.event(Event(event="poll", id=None, data={"kind": "poll", "status": job.status, "stage": job.stage,
                                                       "progress": job.progress, "message": job.error}))

    def note(self, text: str) -> None:
        if self.enabled and self.console is not None:
            self.console.print(f"[mopeq] {text}", highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


# ---- shared client logic --------------------------------------------------------------------------------------------------
def _header_sha256(headers: httpx.Headers) -> str | None:
    """The SHA-256 the server announced: ``X-Checksum-SHA256`` (hex) or ``Repr-Digest: sha-256=:<base64>:``."""
    hexd = headers.get("x-checksum-sha256")
    if hexd:
        return hexd.strip().lower()
    for part in (headers.get("repr-digest") or "").split(","):
        name, _, val = part.strip().partition("=")
        if name.strip().lower() == "sha-256" and val.startswith(":") and val.endswith(":"):
            try:
                return base64.b64decode(val[1:-1]).hex()
            except (binascii.Error, ValueError):
                return None
    return None


def _safe_target(dest_dir: Path, name: str) -> Path:
    target = (dest_dir / name).resolve()
    if not target.is_relative_to(dest_dir.resolve()) or name.startswith("/"):
        raise ChecksumError(f"artifact name {name!r} leaves the destination folder; refused", name=name)
    return target


class _Base:
    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 max_retries: int | None = None, backoff: float = 0.5, max_backoff: float = 30.0,
                 max_retry_after: float = 300.0, sse_read_timeout: float = 60.0, sse_max_failures: int = 3,
                 poll_interval: float = 2.0, headers: dict[str, str] | None = None,
                 sleep: Callable[[float], Any] | None = None):
        base = (url or os.environ.get("MOPEQ_URL") or DEFAULT_URL).strip().rstrip("/")
        base = base.removesuffix("/v1")
        if "://" not in base:
            base = "http://" + base
        self.base_url = base
        self.api_key = api_key if api_key is not None else (os.environ.get("MOPEQ_API_KEY") or None)
        if max_retries is None:
            env = os.environ.get("MOPEQ_MAX_RETRIES", "").strip()
            max_retries = int(env) if env.isdigit() else 4
        self.max_retries = max(0, int(max_retries))
        self.timeout = timeout
        self.backoff, self.max_backoff, self.max_retry_after = backoff, max_backoff, max_retry_after
        self.sse_read_timeout, self.sse_max_failures = sse_read_timeout, max(1, sse_max_failures)
        self.poll_interval = poll_interval
        self._sleep_fn = sleep
        self._headers = {"User-Agent": f"mopeq-client/{__version__}", "Accept": "application/json",
                         **(headers or {})}
        if self.api_key:
            self._headers["Authorization"] = f"Bearer {self.api_key}"

    # retry policy (tenacity) ------------------------------------------------------------------------------------------
    def _backoff_delay(self, attempt: int) -> float:
        """Exponential backoff with 'equal jitter': half the capped delay fixed, half random."""
        cap = min(self.max_backoff, self.backoff * (2 ** attempt))
        return cap / 2 + random.uniform(0, cap / 2)

    def _retryable(self, exc: BaseException) -> bool:
        """Connection failures, and 429/502/503/504 answers unless their Retry-After is longer than we wait."""
        if isinstance(exc, MopeqAPIError):
            ra = parse_retry_after(exc.headers.get("retry-after"))
            return exc.status in RETRY_STATUSES and (ra is None or ra <= self.max_retry_after)
        return isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.UnsupportedProtocol)

    def _wait(self, state: Any) -> float:
        """The server's Retry-After (plus up to 10 % jitter, at most 1 s) when it sent one, else the backoff."""
        exc = state.outcome.exception()
        ra = parse_retry_after(exc.headers.get("retry-after")) if isinstance(exc, MopeqAPIError) else None
        if ra is not None:
            return ra + random.uniform(0, min(1.0, 0.1 * ra))
        return self._backoff_delay(state.attempt_number - 1)

    def _policy(self, retry: Callable[[BaseException], bool] | None = None) -> dict[str, Any]:
        """Keywords of tenacity's ``Retrying`` / ``AsyncRetrying`` (the last error is raised as it is)."""
        return {"stop": stop_after_attempt(self.max_retries + 1), "wait": self._wait, "reraise": True,
                "retry": retry_if_exception(retry or self._retryable), "sleep": self._sleep}

    def _unreachable(self, exc: Exception, method: str, path: str) -> ServiceUnreachableError:
        return ServiceUnreachableError(f"cannot reach the MoPEQ service at {self.base_url} ({method} {path}): "
                                       f"{type(exc).__name__}: {exc}".rstrip(": "), url=self.base_url)

    @staticmethod
    def _api_error(resp: httpx.Response, method: str, path: str) -> MopeqAPIError:
        try:
            body = resp.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            detail: Any = body.get("detail")
            code = body.get("code")
        else:
            detail, code, body = None, None, {}
        if isinstance(detail, list):
            detail = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []) if x != 'body')}: {d.get('msg')}"
                               if isinstance(d, dict) else str(d) for d in detail)
        if not detail:
            detail = (resp.text or "").strip()[:500] or resp.reason_phrase or f"HTTP {resp.status_code}"
        cls = error_class(resp.status_code)
        return cls(resp.status_code, str(detail), code, body, method=method, url=path,
                   headers={k.lower(): v for k, v in resp.headers.items()})

    @staticmethod
    def _job_path(job_id: str, tail: str = "") -> str:
        return f"/v1/jobs/{quote(str(job_id), safe='')}{tail}"

    @staticmethod
    def _list_params(status: str | None, model: str | None, limit: int, offset: int | None,
                     cursor: str | int | None) -> dict[str, Any]:
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        params: dict[str, Any] = {"limit": limit, "offset": int(cursor if cursor is not None else (offset or 0))}
        if status:
            params["status"] = status
        if model:
            params["model"] = model
        return params

    def _sse_timeout(self, remaining: float | None) -> httpx.Timeout:
        read = self.sse_read_timeout if remaining is None else max(0.5, min(self.sse_read_timeout, remaining))
        return httpx.Timeout(self.timeout, read=read)

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else deadline - time.monotonic()

    @staticmethod
    def _artifact_url(job_id: str, name: str) -> str:
        return f"/v1/jobs/{quote(str(job_id), safe='')}/artifacts/{quote(name, safe='/')}"

    @staticmethod
    def _check_sha(name: str, digest: str, announced: str | None, listed: str | None, verify: bool) -> None:
        if not verify:
            return
        if announced is None and listed is None:
            raise ChecksumError(f"the service sent no checksum for {name!r}; cannot verify it "
                                "(pass verify=False to accept it unchecked)", name=name, actual=digest)
        for what, want in (("X-Checksum-SHA256 header", announced), ("artifact listing", listed)):
            if want is not None and want.lower() != digest:
                raise ChecksumError(f"checksum mismatch for {name!r}: the {what} says {want}, the downloaded bytes "
                                    f"hash to {digest}; the file was not written", name=name, expected=want,
                                    actual=digest)

    @staticmethod
    def _select(arts: list[Artifact], job_id: str, name: str | None) -> list[Artifact]:
        files = [a for a in arts if a.kind == "file"]
        if name is None:
            if not files:
                raise NotFoundError(404, f"job {job_id} has no files to download (has it succeeded?)", "not_found")
            return files
        pick = [a for a in files if a.name == name]
        if not pick:
            raise NotFoundError(404, f"job {job_id} has no artifact named {name!r}; it has: "
                                f"{', '.join(a.name for a in files) or 'none'}", "not_found")
        return pick


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _install(staged: list[tuple[Path, Path]], dest: Path) -> None:
    """Move verified temporary files into place (each ``os.replace`` is atomic), with the usual permissions
    (temporary files are created 0600)."""
    mode = 0o666 & ~_umask()
    for tmp, target in staged:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, mode)
        os.replace(tmp, target)


def _dest_plan(dest: str | os.PathLike[str], name: str | None) -> tuple[Path, Path | None]:
    """(folder, single-file target or None)."""
    d = Path(dest)
    if name is not None and not (d.is_dir() or str(dest).endswith(("/", os.sep))):
        return d.parent if str(d.parent) else Path("."), d
    return d, None




def check_deadline(deadline: float | None, job: Job) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise WaitTimeoutError(f"job {job.id} is still {job.status} (stage {job.stage or '-'}) after the wait "
                               "timeout", job=job)


def give_up_waiting(exc: BaseException) -> bool:
    """Errors that end ``wait`` at once instead of counting as a failed event-stream connection."""
    return isinstance(exc, MopeqAPIError) and exc.status in (400, 401, 403, 404, 409, 413, 422)


async def apause(fn: Callable[[float], Any] | None, seconds: float) -> None:
    """Sleep (``fn``: the client's ``sleep=`` hook, sync or async)."""
    if seconds > 0:
        if fn is None:
            import asyncio

            await asyncio.sleep(seconds)
        elif inspect.isawaitable(r := fn(seconds)):
            await r


def pause(fn: Callable[[float], Any] | None, seconds: float) -> None:
    if seconds > 0:
        (fn or time.sleep)(seconds)
