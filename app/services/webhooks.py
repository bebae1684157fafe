"""Outgoing webhooks, signed as Standard Webhooks (https://www.standardwebhooks.com, spec 1.0.0).

A job that has a webhook (its body's ``webhook``, or its watch's) gets one *message* when it reaches a final
status: ``job.succeeded``, ``job.failed`` or ``job.cancelled``. Messages are created by the webhook workers' sweep
(an outbox: whatever path finished the job, the worker, the API's cancel, the recovery sweep, the sweep sees the
final status in the database) and delivered by the Celery task of ``worker.webhooks`` on its own queue.

Each attempt POSTs the same body with the headers

- ``webhook-id``: the message id (``msg_…``), the same on every attempt (the receiver's idempotency key),
- ``webhook-timestamp``: the attempt's time, integer Unix seconds,
- ``webhook-signature``: ``v1,`` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), where the key is the
  base64-decoded part of the ``whsec_…`` secret,

is recorded in ``webhook_deliveries``, and on anything but a 2xx is retried with exponential backoff (410 Gone and
refused addresses stop at once). Target addresses are checked when the webhook is created and again at every
attempt, and the connection goes to the address that was checked (no DNS rebinding)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import json
import logging
import random
import re
import secrets
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import false, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from app.core.config import Settings
from app.core.security import Keyring, redact
from app.db.models import TERMINAL, Job, JobWebhook, WebhookDelivery, WebhookMessage, utcnow
from app.services.errors import ServiceError

log = logging.getLogger("mopeq.webhooks")

SECRET_PREFIX = "whsec_"
USER_AGENT = "mopeq-webhooks/0.1"
_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
Resolver = Callable[[str, int], list[str]]


# ---- secrets and signatures ----------------------------------------------------------------------------------------
def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret; ValueError when it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with 'whsec_'")
    b64 = secret[len(SECRET_PREFIX):]
    if not _B64.match(b64):
        raise ValueError("a webhook secret is 'whsec_' followed by standard base64")
    try:
        key = base64.b64decode(b64 + "=" * (-len(b64) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("a webhook secret is 'whsec_' followed by standard base64") from exc
    if not 24 <= len(key) <= 64:
        raise ValueError(f"a webhook secret holds 24 to 64 random bytes (this one {len(key)})")
    return key


def check_secret(secret: str) -> None:
    try:
        secret_key(secret)
    except ValueError as exc:
        raise ServiceError(422, "invalid_input",
                           f"webhook.secret: {exc}; make one with: python -c \"import base64, secrets; "
                           "print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\"") from None


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one attempt, made by the ``standardwebhooks`` package."""
    when = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    return Webhook(secret_key(secret)).sign(msg_id, when, body.decode())


# ---- target addresses ----------------------------------------------------------------------------------------------
class UrlRefused(Exception):
    """The URL is malformed, does not resolve, or resolves to an address webhooks may not reach."""


_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries: IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d), 6to4
    (2002:AABB:CCDD::/16), Teredo (2001::/32: server and client) and NAT64 (64:ff9b::/96, 64:ff9b:1::/48). A
    gateway or the kernel may deliver a packet to any of them, so each must be public."""
    out: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        out.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in net for net in _NAT64) or (int(ip) >> 32 == 0 and int(ip) > 1):  # NAT64, IPv4-compatible
        out.append(low32)
    return out


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    inner = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else []
    if inner and not all(_public(v4) for v4 in inner):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return True  # the IPv4 address it maps to is the address (checked just above)
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved
                                 or ip.is_multicast or ip.is_unspecified)


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass
class Target:
    """Where one attempt connects: ``url`` (the checked address when pinned), the Host header and TLS name."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


def parse_url(url: str) -> httpx.URL:
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise UrlRefused(f"'{url[:200]}' is not a valid URL") from exc
    if u.scheme not in ("http", "https"):
        raise UrlRefused("webhook URLs are http:// or https://")
    if not u.host:
        raise UrlRefused("the webhook URL has no host")
    if u.userinfo:
        raise UrlRefused("the webhook URL may not carry credentials (user:password@)")
    return u


def resolve_target(url: str, *, allow_private: bool, resolver: Resolver | None = None) -> Target:
    """Check ``url`` and return where to connect. Unless private addresses are allowed, every address the host
    resolves to must be public, and the request goes to the first of them with the original Host header and TLS
    server name, so a second DNS answer (rebinding) cannot redirect it."""
    u = parse_url(url)
    if allow_private:
        return Target(str(u))
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        addrs = (resolver or system_resolver)(u.host, port)
    except (OSError, UnicodeError) as exc:
        raise UrlRefused(f"the webhook host '{u.host}' does not resolve ({type(exc).__name__})") from exc
    if not addrs:
        raise UrlRefused(f"the webhook host '{u.host}' does not resolve")
    ips = [ipaddress.ip_address(a.split("%", 1)[0]) for a in addrs]
    bad = [str(ip) for ip in ips if not _public(ip)]
    if bad:
        raise UrlRefused(f"the webhook host '{u.host}' resolves to {', '.join(bad[:3])}: private, loopback, "
                         "link-local and reserved addresses are refused (the operator can allow them with "
                         "MOPEQ_WEBHOOK_ALLOW_PRIVATE=true)")
    pinned = u.copy_with(host=str(ips[0]))
    headers = {"Host": u.netloc.decode("ascii")}
    ext = {"sni_hostname": u.host} if u.scheme == "https" else {}
    return Target(str(pinned), headers, ext)


def check_url(url: str, settings: Settings, resolver: Resolver | None = None) -> str:
    """At creation: the URL (normalised) when webhooks may reach it, else a 422."""
    try:
        resolve_target(url, allow_private=settings.WEBHOOK_ALLOW_PRIVATE, resolver=resolver)
        return str(parse_url(url))
    except UrlRefused as exc:
        raise ServiceError(422, "url_not_allowed", f"webhook.url: {exc}") from None


@dataclass
class PreparedHook:
    url: str
    secret_enc: str
    secret: str


def prepare(hook: Any, settings: Settings, keyring: Keyring, *, generate: bool = False) -> PreparedHook:
    """Validate a WebhookIn (URL and secret); the secret is generated when missing and ``generate``."""
    secret = hook.secret.get_secret_value() if hook.secret is not None else None
    if secret is None:
        if not generate:
            raise ServiceError(422, "invalid_input",
                               "webhook.secret is required: 'whsec_' + base64 of 24..64 random bytes; make one with: "
                               "python -c \"import base64, secrets; print('whsec_' + "
                               "base64.b64encode(secrets.token_bytes(32)).decode())\"")
        secret = new_secret()
    check_secret(secret)
    url = check_url(hook.url, settings)
    return PreparedHook(url, keyring.encrypt(secret), secret)


# ---- messages (the outbox) ---------------------------------------------------------------------------------------
def new_message_id() -> str:
    return "msg_" + uuid.uuid4().hex


def _iso(t: dt.datetime | None) -> str:
    return (t or utcnow()).astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def payload_for(job: Job, event_type: str, watch_id: str | None) -> str:
    """The message body: ``{"type", "timestamp", "data": {"job": <GET /v1/jobs/{id}>, "watch_id", "links"}}``,
    minified JSON (the exact bytes that are signed)."""
    from app.services.job_view import job_out

    body = {"type": event_type, "timestamp": _iso(job.finished_at),
            "data": {"job": job_out(job).model_dump(mode="json"), "watch_id": watch_id,
                     "links": {"job": f"/v1/jobs/{job.id}", "artifacts": f"/v1/jobs/{job.id}/artifacts",
                               "bitmap": f"/v1/jobs/{job.id}/bitmap"}}}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def announce_finished(factory: sessionmaker[Session], limit: int = 200) -> list[str]:
    """Create the message of every finished job whose webhook was not announced yet. Safe to run in many processes
    at once (a conditional update claims each job, and a job has one message per event type). Returns new ids."""
    with factory() as db:
        rows = db.execute(select(JobWebhook, Job).join(Job, Job.id == JobWebhook.job_id)
                          .where(JobWebhook.announced == false(), Job.status.in_(TERMINAL))
                          .limit(limit)).all()
        for hook, job in rows:
            db.expunge(hook)
            db.expunge(job)
    created: list[str] = []
    for hook, job in rows:
        event = f"job.{job.status}"
        msg = WebhookMessage(id=new_message_id(), job_id=job.id, event_type=event, url=hook.url,
                             secret_enc=hook.secret_enc, payload=payload_for(job, event, hook.watch_id),
                             status="pending", attempts=0, next_attempt_at=utcnow())
        try:
            with factory() as db, db.begin():
                res = db.execute(update(JobWebhook).where(JobWebhook.job_id == job.id,
                                                          JobWebhook.announced == false())
                                 .values(announced=True, secret_enc=""))  # the message keeps the only copy
                if res.rowcount != 1:
                    continue  # another sweep took it
                db.add(msg)
        except IntegrityError:
            continue
        created.append(msg.id)
    return created


def messages_to_publish(factory: sessionmaker[Session], stale_s: float = 60.0, limit: int = 200) -> list[str]:
    """Pending messages with no task in flight: never published, or due long ago with no attempt running (their
    task was lost with a worker). A task published twice is harmless: each attempt claims the message first."""
    now = utcnow()
    stale = now - dt.timedelta(seconds=stale_s)
    with factory() as db:
        return list(db.scalars(select(WebhookMessage.id).where(
            WebhookMessage.status == "pending",
            or_(WebhookMessage.enqueued_at.is_(None),
                (WebhookMessage.next_attempt_at < stale) & (WebhookMessage.enqueued_at < stale)
                & or_(WebhookMessage.lease_until.is_(None), WebhookMessage.lease_until < now)))
            .order_by(WebhookMessage.created_at).limit(limit)))


def mark_enqueued(factory: sessionmaker[Session], message_id: str) -> None:
    with factory() as db, db.begin():
        db.execute(update(WebhookMessage).where(WebhookMessage.id == message_id).values(enqueued_at=utcnow()))


# ---- delivery --------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str  # delivered | pending (retry in retry_in s) | failed | skipped
    retry_in: float = 0.0
    status_code: int | None = None
    error: str | None = None


def backoff(attempt: int, settings: Settings, retry_after: float | None = None) -> float:
    """Seconds before attempt ``attempt + 1``: base * 4**(attempt-1), jittered by ±20 %, capped; at least the
    receiver's Retry-After (capped too)."""
    delay = min(settings.WEBHOOK_RETRY_MAX_S, settings.WEBHOOK_RETRY_BASE_S * 4 ** (attempt - 1))
    delay *= random.uniform(0.8, 1.2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, settings.WEBHOOK_RETRY_MAX_S))
    return max(0.05, delay)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        import email.utils

        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def deliver(factory: sessionmaker[Session], keyring: Keyring, settings: Settings, message_id: str, *,
            resolver: Resolver | None = None, transport: httpx.BaseTransport | None = None) -> Outcome:
    """One attempt at a message: claim it (a lease, so two workers never send it at once), POST it signed, record
    the attempt, and say whether and when to retry."""
    now = utcnow()
    lease = now + dt.timedelta(seconds=2 * settings.WEBHOOK_TIMEOUT_S + 30)
    with factory() as db, db.begin():
        res = db.execute(update(WebhookMessage).where(
            WebhookMessage.id == message_id, WebhookMessage.status == "pending",
            or_(WebhookMessage.lease_until.is_(None), WebhookMessage.lease_until < now),
            WebhookMessage.next_attempt_at <= now + dt.timedelta(seconds=2)).values(lease_until=lease))
        msg = db.get(WebhookMessage, message_id) if res.rowcount == 1 else None
        if msg is not None:
            db.expunge(msg)
    if msg is None:
        return Outcome("skipped")
    attempt = msg.attempts + 1
    started, t0 = utcnow(), time.monotonic()
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None
    final = False
    try:
        secret = keyring.decrypt(msg.secret_enc)
        target = resolve_target(msg.url, allow_private=settings.WEBHOOK_ALLOW_PRIVATE, resolver=resolver)
        body = msg.payload.encode()
        ts = int(time.time())
        headers = {**target.headers, "Content-Type": "application/json", "User-Agent": USER_AGENT,
                   "webhook-id": msg.id, "webhook-timestamp": str(ts),
                   "webhook-signature": sign(secret, msg.id, ts, body)}
        with httpx.Client(timeout=settings.WEBHOOK_TIMEOUT_S, follow_redirects=False, transport=transport,
                          trust_env=False) as client:
            resp = client.post(target.url, content=body, headers=headers, extensions=target.extensions)
        status_code = resp.status_code
        retry_after = _retry_after(resp.headers.get("retry-after"))
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}" + (" (redirects are not followed)" if 300 <= status_code < 400 else "")
        if status_code == 410:
            error, final = "HTTP 410 Gone: the receiver asked for no more deliveries", True
    except UrlRefused as exc:
        error, final = f"refused: {exc}", True
    except ValueError as exc:  # an undecryptable or malformed secret
        error, final = f"cannot sign: {exc}", True
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    error = redact(error) if error else None
    ok = status_code is not None and 200 <= status_code < 300
    if ok:
        outcome = Outcome("delivered", status_code=status_code)
    elif final or attempt >= settings.WEBHOOK_MAX_ATTEMPTS:
        outcome = Outcome("failed", status_code=status_code, error=error)
    else:
        outcome = Outcome("pending", backoff(attempt, settings, retry_after), status_code, error)
    finished = utcnow()
    with factory() as db, db.begin():
        db.add(WebhookDelivery(message_id=msg.id, attempt=attempt, url=msg.url, status_code=status_code, error=error,
                               started_at=started, finished_at=finished,
                               duration_ms=int((time.monotonic() - t0) * 1000)))
        values: dict[str, Any] = {"attempts": attempt, "status": outcome.status, "lease_until": None,
                                  "last_status_code": status_code, "last_error": error}
        if ok:
            values["delivered_at"] = finished
        if outcome.status != "pending":
            values["secret_enc"] = ""  # no attempt will sign this message again
        if outcome.status == "pending":
            values["next_attempt_at"] = finished + dt.timedelta(seconds=outcome.retry_in)
        db.execute(update(WebhookMessage).where(WebhookMessage.id == msg.id).values(**values))
    log.info("webhook %s (%s, job %s) attempt %d: %s%s", msg.id, msg.event_type, msg.job_id, attempt,
             outcome.status, f" ({error})" if error else "")
    return outcome


def messages_of_job(db: Session, job_id: str) -> list[tuple[WebhookMessage, list[WebhookDelivery]]]:
    msgs = list(db.scalars(select(WebhookMessage).where(WebhookMessage.job_id == job_id)
                           .order_by(WebhookMessage.created_at)))
    out = []
    for m in msgs:
        out.append((m, list(db.scalars(select(WebhookDelivery).where(WebhookDelivery.message_id == m.id)
                                       .order_by(WebhookDelivery.attempt, WebhookDelivery.id)))))
    return out
