"""Request-scoped dependencies: settings, database sessions, the authenticated key, rate limiting."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from functools import partial
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.core.security import Keyring, parse_api_key
from app.db.models import ApiKey
from app.services.errors import ServiceError
from app.services.jobs import Principal
from app.services.keys import PrincipalCache
from app.services.ratelimit import RateLimiter

BOOTSTRAP_KEY_ID = "bootstrap"
bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer mpq_...`")


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


def get_factory(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessionmaker


def get_keyring(request: Request) -> Keyring:
    return request.app.state.keyring


def get_db(factory: Annotated[sessionmaker[Session], Depends(get_factory)]) -> Iterator[Session]:
    with factory() as db:
        yield db


def _unauthorized(msg: str) -> ServiceError:
    return ServiceError(401, "unauthorized", msg, headers={"WWW-Authenticate": "Bearer"})


def _bootstrap_usable(factory: sessionmaker[Session], keyring: Keyring, key: str) -> bool:
    """The bootstrap key's row, made on first use. Revoking it (DELETE /v1/admin/keys/bootstrap) holds until the
    operator sets another MOPEQ_BOOTSTRAP_API_KEY: a row whose hash is of an older key is renewed, unrevoked."""
    digest = keyring.hash_key(key)
    try:
        with factory() as db, db.begin():
            row = db.get(ApiKey, BOOTSTRAP_KEY_ID)
            if row is None:
                db.add(ApiKey(id=BOOTSTRAP_KEY_ID, name="bootstrap (MOPEQ_BOOTSTRAP_API_KEY)", key_hash=digest,
                              scope="admin"))
                return True
            if not hmac.compare_digest(row.key_hash, digest):  # the operator changed the key
                row.key_hash, row.revoked_at = digest, None
            return row.revoked_at is None
    except IntegrityError:
        return True  # created concurrently, unrevoked


def _authenticate(settings: Settings, keyring: Keyring, factory: sessionmaker[Session], presented: str,
                  digest: str) -> Principal:
    """The key's principal from the database (a thread-pool call: it blocks)."""
    boot = settings.BOOTSTRAP_API_KEY.get_secret_value() if settings.BOOTSTRAP_API_KEY else ""
    if boot and hmac.compare_digest(digest, keyring.hash_key(boot)):
        if not _bootstrap_usable(factory, keyring, boot):
            raise _unauthorized("invalid or revoked API key")
        return Principal(BOOTSTRAP_KEY_ID, "admin", "bootstrap", settings.RATE_LIMIT_PER_MINUTE,
                         settings.MAX_CONCURRENT_JOBS)
    key_id = parse_api_key(presented)
    row = None
    if key_id is not None:
        with factory() as db:
            row = db.get(ApiKey, key_id)
    if row is None or not hmac.compare_digest(digest, row.key_hash) or row.revoked_at is not None:
        raise _unauthorized("invalid or revoked API key")
    return Principal(row.id, row.scope, row.name, row.rate_limit_per_minute or settings.RATE_LIMIT_PER_MINUTE,
                     row.max_concurrent_jobs or settings.MAX_CONCURRENT_JOBS)


async def authenticate(state: Any, presented: str | None) -> Principal:
    """The principal of the API key ``presented`` (the bearer token), with the key's rate limit applied; raises the
    401 or 429 ``ServiceError``. Async on purpose: a key verified within MOPEQ_AUTH_CACHE_TTL_S costs one HMAC on
    the event loop (no thread hop, no database read); only a key not in the cache waits for the database (in the
    thread pool). ``state`` is the application's state."""
    if not presented:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>' (create one with "
                            "'mopeq admin create-key')")
    presented = presented.strip()
    if len(presented) > 300:
        raise _unauthorized("invalid API key")
    digest = state.keyring.hash_key(presented)
    cache: PrincipalCache = state.principals
    who = await cache.principal(digest, partial(_authenticate, state.settings, state.keyring, state.sessionmaker,
                                                presented, digest))
    limiter: RateLimiter = state.ratelimiter
    wait = await limiter.hit(who.key_id, who.rate_limit_per_minute)
    if wait is not None:
        raise ServiceError(429, "rate_limited",
                           f"rate limit of {who.rate_limit_per_minute} requests per minute reached; retry in {wait} s",
                           headers={"Retry-After": str(wait)})
    return who


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, parsed as ``HTTPBearer`` parses it."""
    scheme, token = get_authorization_scheme_param(authorization)
    return token if authorization and scheme.lower() == "bearer" and token else None


async def current_principal(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    return await authenticate(request.app.state, creds.credentials if creds is not None else None)


async def require_admin(who: Annotated[Principal, Depends(current_principal)]) -> Principal:
    if not who.is_admin:
        raise ServiceError(403, "forbidden", "this route needs an admin key")
    return who


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
DB = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
Factory = Annotated[sessionmaker[Session], Depends(get_factory)]
KeyringDep = Annotated[Keyring, Depends(get_keyring)]
