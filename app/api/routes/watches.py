"""/v1/watches: Hub repos whose new commits are quantized automatically (POST /v1/hooks/hub makes the jobs)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import DB, CurrentPrincipal, Factory, KeyringDep, SettingsDep
from app.schemas.common import error_responses
from app.schemas.watches import WatchCreate, WatchCreated, WatchOut
from app.services import watches as svc

router = APIRouter(prefix="/watches", tags=["watches"])
AUTH_ERRORS = (401, 403, 429)


@router.post("", status_code=201, response_model=WatchCreated, responses=error_responses(400, *AUTH_ERRORS, 413, 422),
             summary="Watch a Hub repo (or an owner's repos by pattern)",
             description="Every new commit on the main branch of a matching repo, announced by the Hub's webhook to "
                         "`POST /v1/hooks/hub`, gets one job made from `template` (the knobs of `POST /v1/jobs`, "
                         "checked the same way now), pinned to that commit, pushed to `target_repo` when set. The "
                         "webhook secret is returned here only (generated when left out).")
def create_watch(body: WatchCreate, who: CurrentPrincipal, factory: Factory, settings: SettingsDep,
                 keyring: KeyringDep) -> WatchCreated:
    return svc.create_watch(factory, settings, keyring, who, body)


@router.get("", response_model=list[WatchOut], responses=error_responses(*AUTH_ERRORS),
            summary="List watches (a user key sees its own, an admin key all)")
def list_watches(who: CurrentPrincipal, db: DB) -> list[WatchOut]:
    return [svc.watch_out(w) for w in svc.list_watches(db, who)]


@router.get("/{watch_id}", response_model=WatchOut, responses=error_responses(*AUTH_ERRORS, 404))
def get_watch(watch_id: str, who: CurrentPrincipal, db: DB) -> WatchOut:
    return svc.watch_out(svc.get_owned(db, who, watch_id))


@router.delete("/{watch_id}", response_model=WatchOut, responses=error_responses(*AUTH_ERRORS, 404),
               summary="Stop watching (the watch's jobs stay; its stored token is erased)")
def delete_watch(watch_id: str, who: CurrentPrincipal, factory: Factory) -> WatchOut:
    return svc.watch_out(svc.delete_watch(factory, who, watch_id))
