"""Where a job's model comes from: a local directory inside MOPEQ_MODEL_ROOTS or a Hub repo; its safety checks
and its size estimate, all before anything is queued."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from app.core.config import Settings
from app.schemas.common import control_char_error
from app.services import tenant_files
from app.services.errors import ServiceError, from_user_error
from mopeq_core.errors import RemoteCodeRequiredError, UserInputError
from mopeq_core.estimate import (
    REPO_ID_RE,
    Checkpoint,
    HubUnavailableError,
    ModelEstimate,
    estimate_checkpoint,
    inspect_hub,
    inspect_local,
)

_PATHLIKE = ("/", "./", "../", "~", ".\\")


@dataclass
class ModelRef:
    source: str  # local | hub
    name: str  # as given
    path: Path | None = None  # resolved directory for local models
    repo_id: str | None = None


def _inside(p: Path, roots: list[Path]) -> bool:
    return any(p == r or p.is_relative_to(r) for r in roots)


def resolve_local_path(value: str, settings: Settings, *, what: str = "model path") -> Path | None:
    err = control_char_error(value)
    if err:
        raise ServiceError(422, "invalid_input", f"{what} {err}")
    try:
        return _resolve_local_path(value, settings, what=what)
    except OSError as exc:  # e.g. ENAMETOOLONG from a name with hundreds of bytes in one component
        raise ServiceError(422, "invalid_input", f"{what} '{value[:80]}…' is not a usable path "
                           f"({exc.strerror or type(exc).__name__}); give a Hub repo id or a directory "
                           "under the server's model roots") from exc


def _resolve_local_path(value: str, settings: Settings, *, what: str = "model path") -> Path | None:
    """The resolved path if ``value`` names an existing file or directory inside a model root.

    Returns None when ``value`` does not name a local path at all (then it may be a Hub id). Raises a 422 when it
    names a path outside the roots, after resolving symlinks and '..' (whether or not that path exists, so the
    answer tells nothing about the server's files)."""
    roots = settings.model_roots
    outside = ServiceError(422, "path_not_allowed",
                           f"{what} '{value}' is outside the server's allowed model roots (MOPEQ_MODEL_ROOTS); "
                           "paths that leave them through '..' or symlinks are refused. Put the model under a "
                           "model root or use a Hub repo id.")
    try:
        raw = Path(value).expanduser()
    except RuntimeError:  # '~name' of no user on this server: no path (was a 500, found by schemathesis)
        raise outside from None
    pathlike = raw.is_absolute() or value.startswith(_PATHLIKE) or ".." in Path(value).parts
    if pathlike:
        cands = [raw] if raw.is_absolute() else [Path.cwd() / raw]
        real = cands[0].resolve()
        if not _inside(real, roots):
            raise outside
        if not real.exists():
            raise ServiceError(422, "model_not_found" if what == "model path" else "invalid_input",
                               f"{what} '{value}' does not exist under the server's model roots (MOPEQ_MODEL_ROOTS)")
        return real
    # A bare relative name: a directory under a root (or under the working directory, inside a root), else a Hub id.
    for root in roots:
        cand = root / raw
        if cand.exists() or cand.is_symlink():
            real = cand.resolve()
            if not _inside(real, roots) or not real.exists():
                raise outside
            return real
    real = (Path.cwd() / raw).resolve()
    if _inside(real, roots) and real.exists():
        return real
    return None


def resolve_model(model: str, settings: Settings) -> ModelRef:
    local = resolve_local_path(model, settings)
    if local is not None:
        if not local.is_dir():
            raise ServiceError(422, "model_not_found", f"'{model}' is a file; a model is a directory holding "
                                                       "config.json and *.safetensors")
        return ModelRef("local", model, path=local)
    if not REPO_ID_RE.match(model) or ".." in model or "--" in model:
        raise ServiceError(422, "invalid_input",
                           f"'{model}' is neither a Hub repo id ('org/name': letters, digits, '.', '_', '-') nor a "
                           "directory under the server's model roots")
    return ModelRef("hub", model, repo_id=model)


def remote_code_allowed(ref: ModelRef, settings: Settings) -> bool:
    target = ref.repo_id or (str(ref.path) if ref.path else ref.name)
    return any(fnmatch.fnmatchcase(target, pat) or fnmatch.fnmatchcase(ref.name, pat)
               for pat in settings.ALLOW_REMOTE_CODE_REPOS)


def inspect(ref: ModelRef, settings: Settings, *, revision: str | None, token: str | None,
            trust_remote_code: bool) -> Checkpoint:
    if trust_remote_code and not remote_code_allowed(ref, settings):
        raise ServiceError(422, "remote_code",
                           f"this server does not run remote code for '{ref.name}'; its operator must list the repo "
                           "in MOPEQ_ALLOW_REMOTE_CODE_REPOS. Use a model that transformers supports natively.")
    try:
        if ref.source == "local":
            assert ref.path is not None
            tenant_files.model_files(ref.path, settings.model_roots, where=ref.name)  # the worker checks again
            return inspect_local(ref.path, roots=settings.model_roots, allow_pickle=settings.ALLOW_PICKLE,
                                 trust_remote_code=trust_remote_code, label=ref.name)
        return inspect_hub(ref.name, revision=revision, token=token, allow_pickle=settings.ALLOW_PICKLE,
                           trust_remote_code=trust_remote_code)
    except RemoteCodeRequiredError as exc:
        allowed = remote_code_allowed(ref, settings)
        hint = ("set trust_remote_code: true in the job to run it" if allowed else
                "this server does not allow remote code for it (MOPEQ_ALLOW_REMOTE_CODE_REPOS)")
        raise ServiceError(422, "remote_code", f"{exc} Here: {hint}.") from exc
    except UserInputError as exc:
        raise from_user_error(exc) from exc
    except HubUnavailableError as exc:
        raise ServiceError(503, "hub_unavailable", str(exc), headers={"Retry-After": "30"}) from exc


def estimate(ck: Checkpoint, *, bits: list[int], group_size: int, symmetric: bool) -> ModelEstimate:
    try:
        return estimate_checkpoint(ck, bits=bits, group_size=group_size, symmetric=symmetric)
    except UserInputError as exc:
        raise from_user_error(exc) from exc
