"""Watches and the Hub's webhook: every new commit on the main branch of a watched Hub repo (or on the refs the
watch follows: another branch, or tags and releases by a glob such as ``refs/tags/*``) gets one job, pinned to
that commit, made from the watch's template. The (watch, repo, commit) unique constraint of ``watch_triggers``
is written in the job's own transaction, so a retried or concurrent delivery finds the first job instead of making
a second one."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import re
import string
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.core.security import Keyring
from app.db.models import ApiKey, Job, JobWebhook, Watch, WatchTrigger, utcnow
from app.schemas.jobs import REPO_PATTERN, JobCreate, PushIn
from app.schemas.watches import MAIN_REF, WatchCreate, WatchCreated, WatchOut
from app.schemas.webhooks import HubError, HubHookOut, HubPayload, HubTriggered, WebhookOut
from app.services import jobs as job_svc
from app.services import webhooks as webhook_svc
from app.services.errors import ServiceError, not_found
from app.services.jobs import Principal

log = logging.getLogger("mopeq.api")

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
TARGET_FIELDS = ("owner", "name", "bits", "sha", "short_sha")
GLOB_CHARS = set("*?[")


# ---- the target repo rule ------------------------------------------------------------------------------------------
def _bits_label(avg_bits: float | None) -> str | None:
    return None if avg_bits is None else f"{round(float(avg_bits), 1):g}"


def render_target(rule: str, *, repo: str, sha: str, avg_bits: float | None) -> str:
    """``rule`` with {owner}, {name}, {bits}, {sha}, {short_sha} filled in; a 422 when it is not a valid repo id."""
    owner, name = repo.split("/", 1)
    values = {"owner": owner, "name": name, "bits": _bits_label(avg_bits), "sha": sha, "short_sha": sha[:7]}
    out = []
    try:
        for literal, fld, spec, conv in string.Formatter().parse(rule):
            out.append(literal)
            if fld is None:
                continue
            if fld not in TARGET_FIELDS or spec or conv:
                raise ServiceError(422, "invalid_input",
                                   f"target_repo: unknown placeholder {{{fld}}}; use "
                                   + ", ".join(f"{{{f}}}" for f in TARGET_FIELDS))
            if values[fld] is None:
                raise ServiceError(422, "invalid_input",
                                   "target_repo: {bits} needs a template budget in avg_bits (this one is in gb)")
            out.append(values[fld])
    except ValueError as exc:  # unbalanced braces
        raise ServiceError(422, "invalid_input", f"target_repo: {exc}") from None
    target = "".join(out)
    if not re.match(REPO_PATTERN, target) or ".." in target or "--" in target:
        raise ServiceError(422, "invalid_input",
                           f"target_repo: '{rule}' gives '{target}', which is not a Hub repo id ('owner/name')")
    return target


# ---- CRUD ----------------------------------------------------------------------------------------------------------
def watch_out(w: Watch) -> WatchOut:
    return WatchOut(id=w.id, owner_key_id=w.owner_key_id, repo=w.repo, ref=w.ref_pattern or MAIN_REF,
                    template=dict(w.template or {}),
                    target_repo=w.target_repo, private=w.push_private, has_hf_token=w.hf_token_enc is not None,
                    webhook=WebhookOut(url=w.webhook_url) if w.webhook_url else None, created_at=w.created_at,
                    deleted_at=w.deleted_at)


def _sample_repo(pattern: str) -> str:
    owner, name = pattern.split("/", 1)
    sample = re.sub(r"\[[^\]]*\]", "x", name).replace("*", "x").replace("?", "x")
    return f"{owner}/{sample}"


def create_watch(factory: sessionmaker[Session], settings: Settings, keyring: Keyring, who: Principal,
                 body: WatchCreate) -> WatchCreated:
    """Checks the template exactly as POST /v1/jobs checks a job's knobs (ranges, the engine's validation,
    calibration and evaluation files), the target rule, the token and the webhook, before anything is written.
    The model itself is checked when a commit arrives (the job is made then, with the checkpoint at that commit)."""
    sample = _sample_repo(body.repo)
    token = body.hf_token.get_secret_value() if body.hf_token else None
    job = JobCreate(**body.template.model_dump(), model=sample)
    job_svc.quantize_config(job)
    job_svc._data_file(job.calibration.file, settings, "calibration file")
    job_svc._data_file(job.evaluation.file if job.evaluation else None, settings, "evaluation file")
    if body.target_repo is not None:
        if not token:
            raise ServiceError(422, "invalid_input",
                               "target_repo (push) needs an hf_token with write access to the target namespace")
        render_target(body.target_repo, repo=sample, sha="0" * 40, avg_bits=job.budget.avg_bits)
    hook = webhook_svc.prepare(body.webhook, settings, keyring, generate=True) if body.webhook else None
    row = Watch(owner_key_id=who.key_id, repo=body.repo, ref_pattern=body.ref,
                template=body.template.model_dump(mode="json", exclude_none=True),
                target_repo=body.target_repo, push_private=body.private,
                hf_token_enc=keyring.encrypt(token) if token else None,
                webhook_url=hook.url if hook else None, webhook_secret_enc=hook.secret_enc if hook else None)
    with factory() as db, db.begin():
        db.add(row)
    return WatchCreated(**watch_out(row).model_dump(), webhook_secret=hook.secret if hook else None)


def get_owned(db: Session, who: Principal, watch_id: str) -> Watch:
    w = db.get(Watch, watch_id) if len(watch_id) <= 64 else None
    if w is None or w.deleted_at is not None or (w.owner_key_id != who.key_id and not who.is_admin):
        raise not_found("watch")
    return w


def list_watches(db: Session, who: Principal) -> list[Watch]:
    q = select(Watch).where(Watch.deleted_at.is_(None))
    if not who.is_admin:
        q = q.where(Watch.owner_key_id == who.key_id)
    return list(db.scalars(q.order_by(Watch.created_at.desc(), Watch.id)))


def delete_watch(factory: sessionmaker[Session], who: Principal, watch_id: str) -> Watch:
    """Stops the watch (its jobs and their history stay); its stored token and webhook secret are erased."""
    with factory() as db, db.begin():
        w = get_owned(db, who, watch_id)
        w.deleted_at = utcnow()
        w.hf_token_enc = None  # jobs already made keep their own copies until they end
        w.webhook_secret_enc = None
    return w


# ---- the Hub's webhook ---------------------------------------------------------------------------------------------
def secret_ok(presented: str | None, settings: Settings) -> bool:
    """Constant-time comparison of the X-Webhook-Secret header with MOPEQ_HUB_WEBHOOK_SECRET (unset: refuse)."""
    expected = settings.HUB_WEBHOOK_SECRET.get_secret_value() if settings.HUB_WEBHOOK_SECRET else ""
    if not expected or presented is None:
        return False
    return hmac.compare_digest(hashlib.sha256(presented.encode()).digest(),
                               hashlib.sha256(expected.encode()).digest())


def watch_matches(pattern: str, repo: str) -> bool:
    p, r = pattern.lower(), repo.lower()
    if not GLOB_CHARS & set(p):
        return p == r
    if p.split("/", 1)[0] != r.split("/", 1)[0]:
        return False
    return fnmatch.fnmatchcase(r, p)


@dataclass
class Triggered:
    out: HubHookOut
    publish: list[str]  # new job ids to publish to the broker (after commit)
    status_code: int


def _ignored(reason: str, **kw: Any) -> Triggered:
    return Triggered(HubHookOut(status="ignored", reason=reason, **kw), [], 200)


def updates_of(payload: HubPayload) -> tuple[list[tuple[str, str | None]], str]:
    """(every updated ref with its new sha, None when deleted; or [] and why the event is ignored)."""
    ev = payload.event
    if payload.repo.type != "model":
        return [], f"not a model repo (type {payload.repo.type})"
    scope_ok = ev.scope == "repo.content" or ev.scope.startswith("repo.content.")
    if not scope_ok or ev.action != "update":
        return [], (f"event {ev.scope}/{ev.action} is not a new commit (subscribe to repo updates: scope "
                    "repo.content, action update)")
    refs = [(r.ref, (r.newSha or "").lower() or None) for r in payload.updatedRefs or []]
    if not refs:
        return [], "no updated refs"
    return refs, ""


def ref_matches(pattern: str | None, ref: str) -> bool:
    """A watch's ref pattern (a full ref name, or a glob such as ``refs/tags/*``) against an updated ref."""
    pattern = pattern or MAIN_REF
    return fnmatch.fnmatchcase(ref, pattern) if GLOB_CHARS & set(pattern) else ref == pattern


def commits_for(pattern: str | None, refs: list[tuple[str, str | None]]) -> tuple[list[tuple[str, str]], str]:
    """The (ref, sha) pairs this watch makes jobs of (one per commit), or [] and why none."""
    matched = [(ref, sha) for ref, sha in refs if ref_matches(pattern, ref)]
    if not matched:
        return [], f"no update of {pattern or MAIN_REF} (updated refs: {', '.join(r for r, _ in refs) or 'none'})"
    out: list[tuple[str, str]] = []
    why = ""
    for ref, sha in matched:
        if sha is None:
            why = f"{ref} was deleted"
        elif not SHA_RE.match(sha):
            why = f"'{sha[:80]}' is not a commit sha"
        elif sha not in {s for _, s in out}:
            out.append((ref, sha))
    return out, why


def _principal(db: Session, key_id: str, settings: Settings) -> Principal | None:
    row = db.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None:
        return None
    return Principal(row.id, row.scope, row.name, row.rate_limit_per_minute or settings.RATE_LIMIT_PER_MINUTE,
                     row.max_concurrent_jobs or settings.MAX_CONCURRENT_JOBS)


def _existing(factory: sessionmaker[Session], watch_id: str, repo: str, sha: str) -> str | None:
    with factory() as db:
        return db.scalar(select(WatchTrigger.job_id).where(WatchTrigger.watch_id == watch_id,
                                                           WatchTrigger.repo == repo, WatchTrigger.sha == sha))


def handle_hub_event(factory: sessionmaker[Session], settings: Settings, keyring: Keyring,
                     payload: HubPayload) -> Triggered:
    refs, reason = updates_of(payload)
    repo = payload.repo.name
    if not refs:
        return _ignored(reason, repo=repo)
    if not re.match(REPO_PATTERN, repo):
        return _ignored(f"'{repo[:200]}' is not a repo id", repo=repo)
    with factory() as db:
        watches = [w for w in db.scalars(select(Watch).where(Watch.deleted_at.is_(None)).order_by(Watch.created_at))
                   if watch_matches(w.repo, repo)]
        for w in watches:
            db.expunge(w)
    if not watches:
        return _ignored(f"no watch matches {repo}", repo=repo)
    wanted: list[tuple[Watch, str, str]] = []  # (watch, ref, sha): one job per watch and commit
    reasons: list[str] = []
    for w in watches:
        commits, why = commits_for(w.ref_pattern, refs)
        wanted += [(w, ref, sha) for ref, sha in commits]
        if not commits and why not in reasons:
            reasons.append(why)
    if not wanted:
        return _ignored("; ".join(reasons), repo=repo)
    hub_id = payload.webhook.id if payload.webhook else None
    out = HubHookOut(status="duplicate", repo=repo, sha=wanted[0][2])
    publish: list[str] = []
    for w, ref, sha in wanted:
        try:
            job_id, created = _trigger(factory, settings, keyring, w, repo, sha, hub_id, ref)
        except ServiceError as exc:
            log.warning("hub webhook: watch %s, %s@%s: %s (%s)", w.id, repo, sha[:12], exc.code, exc.detail[:300])
            out.errors.append(HubError(watch_id=w.id, code=exc.code, detail=exc.detail))
            continue
        out.jobs.append(HubTriggered(watch_id=w.id, job_id=job_id, created=created))
        if created:
            publish.append(job_id)
    if publish:
        out.status = "queued"
    elif not out.jobs:
        out.status = "error"
    status_code = 202 if publish else 200
    # A dependency that was down (the Hub, the database, the owner's job limit): say so, so that the Hub's
    # activity tab shows a failure to replay (a replay never makes a second job).
    if out.errors and any(e.code in ("hub_unavailable", "database_unavailable", "too_many_jobs", "rate_limited")
                          for e in out.errors):
        status_code = 503
    return Triggered(out, publish, status_code)


def _trigger(factory: sessionmaker[Session], settings: Settings, keyring: Keyring, w: Watch, repo: str, sha: str,
             hub_id: str | None, ref: str = MAIN_REF) -> tuple[str, bool]:
    """(job id, created): the job of (watch, repo, sha), made now unless it exists."""
    existing = _existing(factory, w.id, repo, sha)
    if existing is not None:
        return existing, False
    with factory() as db:
        who = _principal(db, w.owner_key_id, settings)
    if who is None:
        raise ServiceError(403, "owner_revoked", f"the API key that owns watch {w.id} was revoked")
    token = keyring.decrypt(w.hf_token_enc) if w.hf_token_enc else None
    knobs = dict(w.template or {})
    push = None
    if w.target_repo:
        avg = (knobs.get("budget") or {}).get("avg_bits")
        push = PushIn(repo_id=render_target(w.target_repo, repo=repo, sha=sha, avg_bits=avg), private=w.push_private)
    body = JobCreate(**knobs, model=repo, revision=sha, push=push, hf_token=token)

    def rows(db: Session, job: Job) -> None:
        db.add(WatchTrigger(watch_id=w.id, repo=repo, sha=sha, job_id=job.id, hub_webhook_id=hub_id))
        if w.webhook_url and w.webhook_secret_enc:
            db.add(JobWebhook(job_id=job.id, url=w.webhook_url, secret_enc=w.webhook_secret_enc, watch_id=w.id))
        from app.services.events import add_event

        add_event(db, job.id, "log", message=f"made by watch {w.id} for {repo}@{sha} ({ref})")

    try:
        created = job_svc.create_job(factory, settings, keyring, who, body, None, on_insert=rows)
    except IntegrityError:
        existing = _existing(factory, w.id, repo, sha)  # a concurrent delivery won the race
        if existing is None:
            raise
        return existing, False
    log.info("hub webhook: watch %s queued job %s for %s@%s", w.id, created.job_id, repo, sha[:12])
    return created.job_id, True


def mark_published(factory: sessionmaker[Session], job_id: str) -> None:
    with factory() as db, db.begin():
        db.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(enqueued_at=utcnow()))
