"""POST /v1/hooks/hub (the Hugging Face Hub's webhook) and GET /v1/jobs/{id}/webhooks (outgoing deliveries)."""

from __future__ import annotations

import json
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.api.deps import DB, CurrentPrincipal, Factory, KeyringDep, SettingsDep
from app.core.celery_conf import enqueue
from app.schemas.common import error_responses
from app.schemas.webhooks import DeliveryOut, HubHookOut, HubPayload, MessageOut
from app.services import jobs as job_svc
from app.services import watches as svc
from app.services.errors import ServiceError
from app.services.webhooks import messages_of_job

log = logging.getLogger("mopeq.api")
router = APIRouter(tags=["webhooks"])


async def raw_body(request: Request) -> bytes:
    return await request.body()


@router.post("/hooks/hub", response_model=HubHookOut,
             responses={**error_responses(400, 401, 413, 422, 503),
                        202: {"model": HubHookOut, "description": "A job was queued for at least one watch"}},
             summary="Receive a Hugging Face Hub webhook",
             description="Authenticated by the `X-Webhook-Secret` header the Hub sends (compared in constant time "
                         "with `MOPEQ_HUB_WEBHOOK_SECRET`), not by an API key. A new commit on the main branch of a "
                         "watched model repo (`event.scope` `repo.content`, `updatedRefs[].ref` `refs/heads/main`) "
                         "queues one job per matching watch, pinned to `newSha` (202). A repeated or concurrent "
                         "delivery of the same commit answers 200 with the existing jobs; other events answer 200 "
                         "`ignored` with the reason.")
def hub_hook(request: Request, raw: Annotated[bytes, Depends(raw_body)], factory: Factory, settings: SettingsDep,
             keyring: KeyringDep,
             x_webhook_secret: Annotated[str | None, Header(alias="X-Webhook-Secret")] = None) -> JSONResponse:
    if not svc.secret_ok(x_webhook_secret, settings):
        detail = ("missing or wrong X-Webhook-Secret" if settings.HUB_WEBHOOK_SECRET else
                  "Hub webhooks are disabled on this server (MOPEQ_HUB_WEBHOOK_SECRET is unset)")
        raise ServiceError(401, "unauthorized", detail)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, a 5000-digit number, nesting past the stack
        raise ServiceError(400, "malformed_json", "the request body is not valid JSON (or nests too deep, or holds "
                                                  "a number too long to read)") from None
    try:
        payload = HubPayload.model_validate(data)
    except ValidationError as exc:
        msg = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ServiceError(422, "invalid_request", f"not a Hub webhook payload: {msg}") from None
    res = svc.handle_hub_event(factory, settings, keyring, payload)
    for job_id in res.publish:
        try:
            enqueue(request.app.state.celery, settings, job_id, job_svc.queue_of(factory, job_id))
            svc.mark_published(factory, job_id)
        except Exception as exc:  # noqa: BLE001 - the worker sweep publishes jobs that were never enqueued
            log.warning("could not publish job %s to the broker (%s); a worker will pick it up when the broker is "
                        "back", job_id, type(exc).__name__)
    return JSONResponse(res.out.model_dump(mode="json"), status_code=res.status_code)


@router.get("/jobs/{job_id}/webhooks", response_model=list[MessageOut], responses=error_responses(401, 403, 404, 429),
            summary="The job's outgoing webhook messages and every delivery attempt")
def job_webhooks(job_id: str, who: CurrentPrincipal, db: DB) -> list[MessageOut]:
    job = job_svc.get_owned(db, who, job_id)
    out = []
    for m, deliveries in messages_of_job(db, job.id):
        out.append(MessageOut(id=m.id, job_id=m.job_id, event_type=m.event_type, url=m.url, status=m.status,
                              attempts=m.attempts, next_attempt_at=m.next_attempt_at if m.status == "pending" else None,
                              last_status_code=m.last_status_code, last_error=m.last_error, created_at=m.created_at,
                              delivered_at=m.delivered_at,
                              deliveries=[DeliveryOut.model_validate(d, from_attributes=True) for d in deliveries]))
    return out
