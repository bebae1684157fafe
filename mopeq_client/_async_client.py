"""The client, written once: :class:`AsyncMopeqClient` here, and :class:`MopeqClient` in ``_sync_client.py``,
generated from this file by unasync (``python client/gen_sync_client.py``; a test checks that the copy is up to
date). Edit this file only, then regenerate. Shared logic lives in :mod:`mopeq_client._core`."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import EventSource
from tenacity import AsyncRetrying

from mopeq_client._core import (
    Artifact,
    Bitmap,
    Estimate,
    Event,
    Job,
    JobList,
    Watch,
    _Base,
    _dest_plan,
    _header_sha256,
    _install,
    _Reporter,
    _safe_target,
    apause,
    check_deadline,
    check_event_stream,
    estimate_body,
    give_up_waiting,
    job_body,
    stream_broken,
    to_event,
    watch_body,
)
from mopeq_client.errors import MopeqAPIError, ServiceUnreachableError, StreamError


class AsyncMopeqClient(_Base):
    """The MoPEQ service over HTTP. Use it as a context manager, or close it when done.

    Retries (tenacity): connection failures and 429/502/503/504 answers, with exponential backoff and jitter,
    honouring ``Retry-After``."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None, **kw: Any):
        super().__init__(url, api_key, **kw)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self.timeout,
                                       transport=transport, follow_redirects=False)

    async def __aenter__(self) -> AsyncMopeqClient:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _sleep(self, seconds: float) -> None:
        await apause(self._sleep_fn, seconds)

    # transport with retries ----------------------------------------------------------------------------------------
    async def _send_once(self, method: str, path: str, stream: bool, kw: dict[str, Any]) -> httpx.Response:
        resp = await self._http.send(self._http.build_request(method, path, **kw), stream=stream)
        if resp.status_code >= 400:
            if stream:
                await resp.aread()
                await resp.aclose()
            raise self._api_error(resp, method, path)
        return resp

    async def _send(self, method: str, path: str, *, stream: bool = False, **kw: Any) -> httpx.Response:
        try:
            async for attempt in AsyncRetrying(**self._policy()):
                with attempt:
                    return await self._send_once(method, path, stream, kw)
        except httpx.TransportError as exc:
            raise self._unreachable(exc, method, path) from exc
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        return (await self._send(method, path, **kw)).json()

    # API ----------------------------------------------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        return await self._json("GET", "/healthz")

    async def ready(self) -> dict[str, Any]:
        return await self._json("GET", "/readyz")

    async def submit(self, model: str, *, idempotency_key: str | None = None, **knobs: Any) -> Job:
        """Submit a job (``POST /v1/jobs``). Knobs: see :func:`job_body` (``avg_bits``/``budget_gb``, ``bits``,
        ``sensitivity``, ``allocator``, ``scope``, ``granularity``, ``quantizer``, ``group_size``, ``calib_file``,
        ``calib_samples``, ``seq_len``, ``eval_file``, ``eval_samples``, ``revision``, ``push_repo``, ``private``,
        ``hf_token``, ...). One ``Idempotency-Key`` is used for all retries of this call."""
        key = idempotency_key or str(uuid.uuid4())
        data = await self._json("POST", "/v1/jobs", json=job_body(model, **knobs), headers={"Idempotency-Key": key})
        return Job.from_dict(data)

    async def get(self, job_id: str) -> Job:
        return Job.from_dict(await self._json("GET", self._job_path(job_id)))

    async def list(self, status: str | None = None, model: str | None = None, limit: int = 50,
                   offset: int | None = None, cursor: str | int | None = None) -> JobList:
        """A page of jobs, newest first; ``cursor`` is the previous page's ``next_offset``."""
        return JobList.from_dict(await self._json("GET", "/v1/jobs",
                                                  params=self._list_params(status, model, limit, offset, cursor)))

    async def iter_jobs(self, status: str | None = None, model: str | None = None,
                        page_size: int = 100) -> AsyncIterator[Job]:
        """Every job, page after page."""
        cursor: int | None = 0
        while cursor is not None:
            page = await self.list(status=status, model=model, limit=page_size, cursor=cursor)
            for job in page.items:
                yield job
            cursor = page.next_offset

    async def cancel(self, job_id: str) -> Job:
        return Job.from_dict(await self._json("POST", self._job_path(job_id, "/cancel")))

    async def retry(self, job_id: str, *, hf_token: str | None = None) -> Job:
        """Retry a failed or cancelled job as a new job (``POST /v1/jobs/{id}/retry``): same model, commit and
        settings, ``retry_of`` = this job, its finished stages reused. ``hf_token`` when the job pushes."""
        body = {"hf_token": hf_token} if hf_token else None
        return Job.from_dict(await self._json("POST", self._job_path(job_id, "/retry"), json=body))

    async def delete(self, job_id: str) -> None:
        """Delete a finished job, its rows and its stored files (``DELETE /v1/jobs/{id}``; 409 while it runs)."""
        await self._send("DELETE", self._job_path(job_id))

    async def bitmap(self, job_id: str) -> Bitmap:
        return await self._json("GET", self._job_path(job_id, "/bitmap"))

    async def allocations(self, job_id: str) -> list[dict[str, Any]]:
        return await self._json("GET", self._job_path(job_id, "/allocations"))

    async def artifacts(self, job_id: str) -> list[Artifact]:
        return [Artifact.from_dict(a) for a in await self._json("GET", self._job_path(job_id, "/artifacts"))]

    async def estimate(self, model: str, **knobs: Any) -> Estimate:
        """Size MODEL and its feasible budget range (``revision``, ``bits``, ``group_size``, ``avg_bits`` or
        ``budget_gb`` to ask whether that budget is feasible)."""
        return Estimate.from_dict(await self._json("POST", "/v1/estimate", json=estimate_body(model, **knobs)))

    # watches: quantize every new commit or tag of a Hub repo (the Hub's webhook calls POST /v1/hooks/hub)
    async def create_watch(self, repo: str, **kw: Any) -> Watch:
        """``POST /v1/watches``; keywords: see :func:`watch_body`. The answer carries ``webhook_secret`` (once)."""
        return Watch.from_dict(await self._json("POST", "/v1/watches", json=watch_body(repo, **kw)))

    async def list_watches(self) -> list[Watch]:
        return [Watch.from_dict(w) for w in await self._json("GET", "/v1/watches")]

    async def get_watch(self, watch_id: str) -> Watch:
        return Watch.from_dict(await self._json("GET", f"/v1/watches/{quote(watch_id, safe='')}"))

    async def delete_watch(self, watch_id: str) -> Watch:
        return Watch.from_dict(await self._json("DELETE", f"/v1/watches/{quote(watch_id, safe='')}"))

    async def webhooks(self, job_id: str) -> list[dict[str, Any]]:
        """The job's outgoing webhook messages, each with its delivery attempts."""
        return await self._json("GET", self._job_path(job_id, "/webhooks"))

    # downloads -----------------------------------------------------------------------------------------------------------
    async def _follow(self, resp: httpx.Response) -> httpx.Response:
        """The service's redirect to its object store (a presigned URL): fetched without this client's API key,
        which the store would refuse beside the URL's own signature and must never see."""
        target = resp.url.join(resp.headers["location"])
        await resp.aclose()
        req = httpx.Request("GET", target, headers={"Accept": "*/*"})  # not build_request: no default headers
        out = await self._http.send(req, stream=True)
        if out.status_code >= 400:
            await out.aread()
            await out.aclose()
            raise self._api_error(out, "GET", str(target.copy_with(query=None)))
        return out

    async def _fetch_once(self, url: str, art: Artifact, folder: Path, verify: bool) -> Path:
        """Stream one file to a temporary file in ``folder``; return it once its SHA-256 checks out. A redirect
        (the service's S3 store) is followed to the presigned URL; the service's checksum header still holds."""
        fd, tmp_name = tempfile.mkstemp(prefix=".mopeq-dl-", suffix=".part", dir=folder)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                resp = await self._send("GET", url, stream=True, headers={"Accept": "*/*"})
                announced = _header_sha256(resp.headers)
                if resp.is_redirect and "location" in resp.headers:
                    resp = await self._follow(resp)
                    announced = announced or resp.headers.get("x-amz-meta-sha256")
                try:
                    h = hashlib.sha256()
                    async for chunk in resp.aiter_bytes(1 << 20):
                        h.update(chunk)
                        out.write(chunk)
                finally:
                    await resp.aclose()
                out.flush()
                os.fsync(out.fileno())
            self._check_sha(art.name, h.hexdigest(), announced, art.sha256, verify)
            return tmp
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def _fetch(self, job_id: str, art: Artifact, folder: Path, verify: bool) -> Path:
        url = self._artifact_url(job_id, art.name)
        try:  # cut off mid-body: start this file again
            async for attempt in AsyncRetrying(**self._policy(lambda e: isinstance(e, httpx.TransportError))):
                with attempt:
                    return await self._fetch_once(url, art, folder, verify)
        except httpx.TransportError as exc:
            raise self._unreachable(exc, "GET", url) from exc
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def download(self, job_id: str, dest: str | os.PathLike[str], name: str | None = None, *,
                       verify: bool = True) -> list[Path]:
        """Download the job's files into the folder ``dest`` (or only the file ``name``; then ``dest`` may be the
        target file path). Each file is streamed, its SHA-256 compared with the ``X-Checksum-SHA256`` header and the
        artifact listing (:class:`ChecksumError` on a mismatch), and nothing is written under its final name before
        every requested file has been verified."""
        folder, single = _dest_plan(dest, name)
        arts = self._select(await self.artifacts(job_id), job_id, name)
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".mopeq-dl-", dir=folder))
        try:
            staged = []
            for art in arts:
                target = single if single is not None else _safe_target(folder, art.name)
                staged.append((await self._fetch(job_id, art, staging, verify), target))
            _install(staged, folder)
            return [t for _, t in staged]
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # events and waiting ----------------------------------------------------------------------------------------------
    async def events(self, job_id: str, last_event_id: int | str | None = None, *,
                     read_timeout: float | None = None) -> AsyncIterator[Event]:
        """The job's events (SSE, decoded by httpx-sse) from after ``last_event_id``; ends after the ``end`` event
        (which follows the final status). A cut-off connection raises :class:`StreamError` (``.last_event_id`` says
        where to resume)."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        path = self._job_path(job_id, "/events")
        resp = await self._send("GET", path, stream=True, headers=headers, timeout=self._sse_timeout(read_timeout))
        last = str(last_event_id) if last_event_id is not None else None
        retry: int | None = None  # the latest retry: field, as browsers keep it
        try:
            check_event_stream(resp, path)
            try:
                async for sse in EventSource(resp).aiter_sse():
                    last, retry = sse.id or last, sse.retry if sse.retry is not None else retry
                    ev = to_event(sse, retry)
                    if ev is not None:
                        yield ev
                        if ev.event == "end":
                            return
            except httpx.TransportError as exc:
                raise stream_broken(job_id, last, exc) from exc
            raise stream_broken(job_id, last, None)
        finally:
            await resp.aclose()

    async def wait(self, job_id: str, progress: bool | Callable[[Event], Any] = True, timeout: float | None = None,
                   poll_interval: float | None = None) -> Job:
        """Follow the job until it is succeeded, failed or cancelled and return it (whatever the final status).

        Follows the SSE stream (``progress=True``: a progress bar with stage and percent on stderr; a callable gets
        every :class:`Event`), reconnects with ``Last-Event-ID`` after a dropped connection, and falls back to polling
        ``GET /v1/jobs/{id}`` after ``sse_max_failures`` failed connections in a row. ``timeout`` (seconds) raises
        :class:`WaitTimeoutError`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = self.poll_interval if poll_interval is None else poll_interval
        rep = _Reporter(job_id, progress)
        try:
            job = await self.get(job_id)
            rep.job(job)
            if job.is_terminal:
                return job
            last_id: str | None = None
            failures = 0
            while failures < self.sse_max_failures:
                check_deadline(deadline, job)
                try:
                    async for ev in self.events(job_id, last_id, read_timeout=self._remaining(deadline)):
                        if ev.raw.get("id") is not None:
                            last_id = ev.raw["id"]
                        failures = 0
                        rep.event(ev)
                        if ev.event == "end":
                            break
                        check_deadline(deadline, job)
                    job = await self.get(job_id)
                    if job.is_terminal:
                        return job
                    failures += 1  # an end event for a job that is not final: odd, try again
                except StreamError as exc:
                    last_id = getattr(exc, "last_event_id", None) or last_id
                    if getattr(exc, "timed_out", False):  # a quiet stage, not a failure: check and reconnect
                        job = await self.get(job_id)
                        rep.job(job)
                        if job.is_terminal:
                            return job
                        continue
                    failures += 1
                except (ServiceUnreachableError, MopeqAPIError) as exc:  # a failed connection, unless final
                    if give_up_waiting(exc):
                        raise
                    failures += 1
                if failures and failures < self.sse_max_failures:
                    await self._sleep(min(self._backoff_delay(failures - 1),
                                          max(0.0, self._remaining(deadline) or 5.0)))
            rep.note(f"event stream unavailable after {failures} tries; polling job {job_id} every {interval:g} s")
            while True:
                job = await self.get(job_id)
                rep.job(job)
                if job.is_terminal:
                    return job
                check_deadline(deadline, job)
                rem = self._remaining(deadline)
                await self._sleep(interval if rem is None else max(0.0, min(interval, rem)))
        finally:
            rep.close()
