"""/v1/admin: API keys (admin scope only)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import select

from app.api.deps import DB, AdminPrincipal, Factory, KeyringDep
from app.db.models import ApiKey, utcnow
from app.schemas.common import error_responses
from app.schemas.keys import KeyCreate, KeyCreated, KeyOut, KeyUpdate
from app.services.errors import not_found
from app.services.keys import create_key, set_storage_quota

router = APIRouter(prefix="/admin", tags=["admin"])


def _out(k: ApiKey) -> KeyOut:
    return KeyOut(id=k.id, name=k.name, scope=k.scope, rate_limit_per_minute=k.rate_limit_per_minute,
                  max_concurrent_jobs=k.max_concurrent_jobs, storage_quota_bytes=k.storage_quota_bytes,
                  created_at=k.created_at, revoked_at=k.revoked_at)


@router.post("/keys", status_code=201, response_model=KeyCreated,
             responses=error_responses(400, 401, 403, 413, 422, 429))
def new_key(body: KeyCreate, who: AdminPrincipal, factory: Factory, keyring: KeyringDep) -> KeyCreated:
    row, secret = create_key(factory, keyring, name=body.name, scope=body.scope,
                             rate_limit_per_minute=body.rate_limit_per_minute,
                             max_concurrent_jobs=body.max_concurrent_jobs,
                             storage_quota_bytes=body.storage_quota_bytes)
    return KeyCreated(**_out(row).model_dump(), api_key=secret)


@router.get("/keys", response_model=list[KeyOut], responses=error_responses(401, 403, 429))
def list_keys(who: AdminPrincipal, db: DB) -> list[KeyOut]:
    return [_out(k) for k in db.scalars(select(ApiKey).order_by(ApiKey.created_at))]


@router.delete("/keys/{key_id}", response_model=KeyOut, responses=error_responses(401, 403, 404, 429))
def revoke_key(key_id: str, who: AdminPrincipal, factory: Factory, request: Request) -> KeyOut:
    with factory() as db, db.begin():
        row = db.get(ApiKey, key_id)
        if row is None:
            raise not_found("key")
        row.revoked_at = row.revoked_at or utcnow()
    request.app.state.principals.forget(key_id)  # refused by this process at once (others: MOPEQ_AUTH_CACHE_TTL_S)
    return _out(row)


@router.patch("/keys/{key_id}", response_model=KeyOut, responses=error_responses(400, 401, 403, 404, 413, 422, 429))
def update_key(key_id: str, body: KeyUpdate, who: AdminPrincipal, factory: Factory) -> KeyOut:
    """Change a key's storage quota (``{"storage_quota_bytes": N}``; null removes it). Jobs already admitted keep
    running; the next submit is checked against the new quota."""
    row = set_storage_quota(factory, key_id, body.storage_quota_bytes) if len(key_id) <= 32 else None
    if row is None:
        raise not_found("key")
    return _out(row)
