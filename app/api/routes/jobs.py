"""/v1/jobs: submit, list, read, cancel, follow (SSE), bit map, allocations, artifacts."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, ServerSentEvent
from sqlalchemy import select

from app.api.deps import DB, CurrentPrincipal, Factory, KeyringDep, SettingsDep
from app.core.celery_conf import enqueue
from app.db.models import TERMINAL, ApiKey, Artifact, Job, utcnow
from app.schemas.common import error_responses
from app.schemas.jobs import (
    AllocationOut,
    ArtifactOut,
    JobCreate,
    JobEventOut,
    JobList,
    JobOut,
    JobRetry,
    JobStatus,
)
from app.services import jobs as svc
from app.services.errors import ServiceError
from app.services.events import events_after
from app.services.job_reads import JobReader
from app.services.storage import get_store
from app.services.streams import Slot, StreamSlots

log = logging.getLogger("mopeq.api")
router = APIRouter(prefix="/jobs", tags=["jobs"])
AUTH_ERRORS = (401, 403, 429)


@router.post("", status_code=202, response_model=JobOut,
             responses=error_responses(400, *AUTH_ERRORS, 413, 422, 503),
             summary="Submit a quantization job",
             description="Validates everything (model, knobs, budget feasibility, paths) before anything is written; "
                         "the job is queued after the row is committed. `Idempotency-Key` replays the first "
                         "response for the same body; the same key with another body is a 422.")
def submit_job(request: Request, body: JobCreate, who: CurrentPrincipal, factory: Factory, settings: SettingsDep,
               keyring: KeyringDep,
               idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200,
                                                             pattern=r"^[ -~]+$")] = None) -> JSONResponse:
    created = svc.create_job(factory, settings, keyring, who, body, idempotency_key)
    return _accepted(request, factory, settings, created)


@router.post("/{job_id}/retry", status_code=202, response_model=JobOut,
             responses=error_responses(400, *AUTH_ERRORS, 404, 409, 413, 422, 503),
             summary="Retry a failed or cancelled job as a new job",
             description="The new job (`retry_of` = this job) has the same model, commit and settings; it reuses "
                         "the finished stages of this job where its worker still has them and the inputs are "
                         "unchanged. 409 for a job that is not failed or cancelled.")
def retry_job(request: Request, job_id: str, who: CurrentPrincipal, factory: Factory, settings: SettingsDep,
              keyring: KeyringDep, body: JobRetry | None = None) -> JSONResponse:
    token = body.hf_token.get_secret_value() if body is not None and body.hf_token else None
    return _accepted(request, factory, settings, svc.retry_job(factory, keyring, who, job_id, token))


def _accepted(request: Request, factory: Factory, settings: SettingsDep, created: svc.Created) -> JSONResponse:
    """202 with the new job; it is published to the broker after its row was committed."""
    headers = {"Location": f"/v1/jobs/{created.job_id}"}
    if created.replayed:
        headers["Idempotent-Replayed"] = "true"
    if created.enqueue:
        try:
            enqueue(request.app.state.celery, settings, created.job_id, created.queue)
            with factory() as db, db.begin():
                job = db.get(Job, created.job_id)
                if job is not None:
                    job.enqueued_at = utcnow()
        except Exception as exc:  # noqa: BLE001 - the worker sweep republishes jobs that were never enqueued
            log.warning("could not publish job %s to the broker (%s); a worker will pick it up when the broker "
                        "is back", created.job_id, type(exc).__name__)
    return JSONResponse(created.body, status_code=created.status_code, headers=headers)


@router.get("", response_model=JobList, responses=error_responses(*AUTH_ERRORS, 422),
            summary="List jobs (newest first)")
def list_jobs(who: CurrentPrincipal, db: DB, status: JobStatus | None = None,
              model: Annotated[str | None, Query(max_length=500)] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> JobList:
    rows, total = svc.list_jobs(db, who, status=status, model=model, limit=limit, offset=offset)
    return JobList(items=[svc.job_out(j) for j in rows], total=total, limit=limit, offset=offset)


def owned_job(job_id: str, who: CurrentPrincipal, factory: Factory) -> Job:
    with factory() as db:  # closed at once: a long SSE stream must not hold a pooled connection
        return svc.get_owned(db, who, job_id)


OwnedJob = Annotated[Job, Depends(owned_job)]


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(*AUTH_ERRORS, 404))
async def get_job(job_id: str, who: CurrentPrincipal, request: Request) -> Response:
    # The hottest route: authentication is cached on the event loop (deps.current_principal), and the reader chosen
    # at start-up answers the job's JSON from one SELECT without a thread hop (app.services.job_reads).
    reader: JobReader = request.app.state.job_reader
    return Response(await reader.body(who, job_id), media_type="application/json")


def read_route() -> APIRoute:
    """``get_job``'s route: app.api.job_read_lane answers it before routing."""
    return next(r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is get_job)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut,
             responses=error_responses(*AUTH_ERRORS, 404, 409),
             description="A queued job is cancelled at once; a running one stops at the worker's next check "
                         "(between stages and inside long loops) and its files are removed.")
def cancel_job(job_id: str, who: CurrentPrincipal, factory: Factory) -> JobOut:
    return svc.job_out(svc.cancel_job(factory, who, job_id))


async def event_stream(request: Request, who: CurrentPrincipal, settings: SettingsDep,
                       poll: Annotated[float, Query(gt=0, le=10, description="Seconds between database reads while "
                                                    "nothing happens; at least MOPEQ_SSE_MIN_POLL_S")] = 0.5
                       ) -> AsyncIterator[Slot]:
    """One of the key's stream slots (at most MOPEQ_SSE_MAX_STREAMS_PER_KEY open at once, over every API process
    when Redis is configured: app.services.streams), held until the response has been sent."""
    if poll < settings.SSE_MIN_POLL_S:
        raise ServiceError(422, "limit_exceeded", f"poll {poll:g} s is below this server's floor of "
                                                  f"{settings.SSE_MIN_POLL_S:g} s (MOPEQ_SSE_MIN_POLL_S); poll less "
                                                  "often: events are pushed as they happen anyway")
    slots: StreamSlots = request.app.state.streams
    slot = await slots.acquire(who.key_id, settings.SSE_MAX_STREAMS_PER_KEY, poll)
    if slot is None:
        raise ServiceError(429, "too_many_streams",
                           f"this key already has {settings.SSE_MAX_STREAMS_PER_KEY} open event streams "
                           "(MOPEQ_SSE_MAX_STREAMS_PER_KEY); close one first", headers={"Retry-After": "5"})
    try:
        yield slot
    finally:
        await slots.release(slot)


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={**error_responses(*AUTH_ERRORS, 404, 422),
                       200: {"description": "Server-Sent Events: `event` is the kind (status, stage, progress, log), "
                                            "`id` the event id, `data` a JobEvent JSON object. The stream ends after "
                                            "the job's final status event, or with an `error` event when the key "
                                            "is revoked."}},
            summary="Follow a job's events (SSE), resuming after Last-Event-ID")
async def job_events(request: Request, job: OwnedJob, who: CurrentPrincipal, factory: Factory,
                     slot: Annotated[Slot, Depends(event_stream, scope="request")],
                     last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
                     after: Annotated[int | None, Query(ge=0, description="Same as Last-Event-ID")] = None,
                     ) -> AsyncIterator[ServerSentEvent]:
    cursor = after or 0
    if last_event_id:
        cursor = int(last_event_id) if last_event_id.strip().isdigit() else cursor
    job_id, key_id = job.id, who.key_id

    def fetch(cur: int) -> tuple[list[JobEventOut], str | None, bool]:
        with factory() as db:
            evs = events_after(db, job_id, cur)
            status = db.scalar(select(Job.status).where(Job.id == job_id))
            key_ok = db.scalar(select(ApiKey.id).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)))
            return [JobEventOut.model_validate(e, from_attributes=True) for e in evs], status, key_ok is not None

    yield ServerSentEvent(comment="mopeq job events", retry=2000)
    while True:
        evs, status, key_ok = await anyio.to_thread.run_sync(fetch, cursor)
        if not key_ok:  # revoked while the stream was open: it ends now
            yield ServerSentEvent(event="error", data={"code": "unauthorized", "detail": "the API key was revoked"})
            return
        for ev in evs:
            cursor = ev.id
            yield ServerSentEvent(id=str(ev.id), event=ev.kind, data=ev)
        if not evs and (status is None or status in TERMINAL):
            # One last read after the terminal status so nothing written just before it is lost.
            evs, _, _ = await anyio.to_thread.run_sync(fetch, cursor)
            for ev in evs:
                cursor = ev.id
                yield ServerSentEvent(id=str(ev.id), event=ev.kind, data=ev)
            yield ServerSentEvent(event="end", data={"status": status})
            return
        if await request.is_disconnected():
            return
        await slot.keep()
        if not evs:
            await anyio.sleep(slot.poll)


@router.delete("/{job_id}", status_code=204, responses=error_responses(*AUTH_ERRORS, 404, 409),
               summary="Delete a finished job: its rows and its stored artifact files",
               description="The owner's key or an admin key. Refused (409) while the job is queued or running: "
                           "cancel it first. The store's objects go first, then the rows, so a failure half-way "
                           "leaves the job listed and the DELETE can be repeated.")
def delete_job(job_id: str, who: CurrentPrincipal, factory: Factory, settings: SettingsDep) -> Response:
    svc.delete_job(factory, settings, who, job_id)
    return Response(status_code=204)


@router.get("/{job_id}/bitmap", responses=error_responses(*AUTH_ERRORS, 404, 409),
            summary="The job's bitmap.json (per-expert bit widths, sensitivities, frequencies)")
def get_bitmap(job: OwnedJob, db: DB, settings: SettingsDep) -> JSONResponse:
    row = db.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == "file",
                                           Artifact.name == "bitmap.json"))
    if job.status != "succeeded" or row is None:
        raise ServiceError(409, "not_ready", f"the bit map is available once the job has succeeded (it is "
                                             f"{job.status})")
    try:
        raw = get_store(settings).read_bytes(job.id, row.name, row.uri)
    except Exception as exc:  # noqa: BLE001 - missing file or object, store unreachable
        log.warning("job %s: bitmap.json unreadable from the store (%s)", job.id, type(exc).__name__)
        raise ServiceError(503, "store_unavailable", "the artifact store did not return bitmap.json; retry later",
                           headers={"Retry-After": "5"}) from None
    return JSONResponse(json.loads(raw))


@router.get("/{job_id}/allocations", response_model=list[AllocationOut],
            responses=error_responses(*AUTH_ERRORS, 404))
def get_allocations(job: OwnedJob, db: DB) -> list[AllocationOut]:
    return [AllocationOut.model_validate(a, from_attributes=True) for a in svc.allocations(db, job.id)]


def _artifact_out(a: Artifact) -> ArtifactOut:
    # A file's stored uri is a server path: tenants get its download URL instead (a Hub artifact's uri is public).
    download = f"/v1/jobs/{a.job_id}/artifacts/{a.name}" if a.kind == "file" else None
    return ArtifactOut(kind=a.kind, name=a.name, uri=download or a.uri, sha256=a.sha256, bytes=a.bytes,
                       hub_repo=a.hub_repo, hub_commit=a.hub_commit, download_url=download)


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut], responses=error_responses(*AUTH_ERRORS, 404))
def list_artifacts(job: OwnedJob, db: DB) -> list[ArtifactOut]:
    rows = db.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.kind, Artifact.name))
    return [_artifact_out(a) for a in rows]


@router.get("/{job_id}/artifacts/{name:path}", response_class=FileResponse,
            responses={**error_responses(*AUTH_ERRORS, 404),
                       200: {"description": "The file (local store); `X-Checksum-SHA256` and `Repr-Digest` carry "
                                            "its SHA-256"},
                       307: {"description": "S3 store: `Location` is a presigned URL of the object (valid "
                                            "MOPEQ_S3_PRESIGN_EXPIRES_S); `X-Checksum-SHA256` carries its SHA-256. "
                                            "Follow it without this API's Authorization header."}},
            summary="Download one artifact file (a redirect to the object store when it is S3)")
def download_artifact(name: str, job: OwnedJob, db: DB, settings: SettingsDep) -> Response:
    row = db.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == "file",
                                           Artifact.name == name))
    if row is None:
        raise ServiceError(404, "not_found", f"job {job.id} has no artifact named '{name}'")
    headers: dict[str, Any] = {}
    if row.sha256:
        b64 = base64.b64encode(bytes.fromhex(row.sha256)).decode()
        headers = {"X-Checksum-SHA256": row.sha256, "Repr-Digest": f"sha-256=:{b64}:", "ETag": f'"{row.sha256}"'}
    store = get_store(settings)
    if store.kind != "local":
        url = store.presigned_url(row.uri, Path(row.name).name)
        return RedirectResponse(url, status_code=307, headers={**headers, "Cache-Control": "no-store"})
    path = store.local_path(job.id, row.name)
    if path is None:
        raise ServiceError(404, "not_found", f"artifact '{name}' is missing from the store")
    return FileResponse(path, filename=Path(row.name).name, headers=headers)
