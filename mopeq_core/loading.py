"""Resolves MODEL (local directory or Hub repo id) to files on disk and loads it safely.

Safety rules: safetensors only unless ``allow_pickle``; no remote code unless ``trust_remote_code``; only the files
a model needs are downloaded (weights, configs, tokenizer, generation config).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import (
    ModelNotFoundError,
    RemoteCodeRequiredError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
    UserInputError,
)

log = logging.getLogger(__name__)

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                  "tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "*.model",
                  "preprocessor_config.json", "processor_config.json", "chat_template.*", "video_preprocessor_config.json"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class ResolvedModel:
    path: Path
    repo_id: str | None
    revision: str | None  # resolved commit sha for Hub models


def _check_files(names: list[str], where: str, allow_pickle: bool) -> None:
    has_st = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n.endswith(PICKLE_SUFFIXES) for n in names)
    if not has_st:
        if has_pickle and not allow_pickle:
            raise UnsafeCheckpointError(
                f"{where} has only pickle weights (.bin/.pt); pickle can run arbitrary code, so MoPEQ loads "
                "safetensors only. Convert the checkpoint to safetensors (or use a repo revision that has them).")
        if not has_pickle:
            raise ModelNotFoundError(f"{where} has no weight files (*.safetensors)")


def check_config(config: dict, where: str, trust_remote_code: bool) -> None:
    from .models import is_native, register_all

    register_all()
    native = is_native(config)  # implemented here: the repo's auto_map (remote code) is never used
    if "auto_map" in config and not trust_remote_code and not native:
        raise RemoteCodeRequiredError(
            f"{where} needs remote code (its config.json has auto_map: {sorted(config['auto_map'])}). Remote code "
            "runs arbitrary Python from the repo; pass --trust-remote-code only if you trust it.")
    model_type = config.get("model_type")
    if not model_type:
        raise UnsupportedArchitectureError(f"{where}/config.json has no model_type")
    if "auto_map" not in config or native:
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            raise UnsupportedArchitectureError(
                f"transformers does not know model_type '{model_type}' ({where}); upgrade transformers or pick a "
                "supported MoE architecture")


def resolve_model(model: str, *, revision: str | None = None, token: str | None = None,
                  allow_pickle: bool = False, trust_remote_code: bool = False) -> ResolvedModel:
    """Local directory, or a Hub repo id downloaded at ``revision`` (offline from the HF cache when HF_HUB_OFFLINE)."""
    if not model.strip():  # Path("") is the working directory: an empty MODEL must not quantize whatever is there
        raise ModelNotFoundError(f"'{model}' is neither an existing directory nor a Hub repo id (org/name)")
    local = Path(model).expanduser()
    if local.exists() or model.startswith((".", "/", "~")):
        if not local.is_dir():
            raise ModelNotFoundError(f"{model} is not a directory holding a model (config.json + *.safetensors)")
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{model} has no config.json; point MODEL at a transformers model directory")
        _check_files([p.name for p in local.iterdir()], model, allow_pickle)
        check_config(_read_config(local / "config.json"), model, trust_remote_code)
        return ResolvedModel(local.resolve(), None, None)
    # huggingface_hub's own rules too (no '--' or '..', no trailing '.git'): its HFValidationError is a plain
    # ValueError that would otherwise escape as an internal error.
    if not REPO_ID_RE.match(model) or "--" in model or ".." in model or model.endswith((".git", ".", "-")):
        raise ModelNotFoundError(f"'{model}' is neither an existing directory nor a Hub repo id (org/name)")
    return _download(model, revision, token, allow_pickle, trust_remote_code)


def _read_config(path: Path) -> dict:
    # A malformed config.json is the user's input, not an internal error.
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelNotFoundError(f"{path} is not valid JSON ({exc}); point MODEL at a transformers model") from exc
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{path} does not hold a JSON object; point MODEL at a transformers model")
    return config


def _env_true(name: str) -> bool | None:
    v = os.environ.get(name)
    return None if v is None else v.strip().lower() in ("1", "true", "yes", "on")


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as it is now (huggingface_hub reads it once, at import), else huggingface_hub's view."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        v = _env_true(name)
        if v is not None:
            return v
    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache_dir() -> str | None:
    """The HF cache as the environment names it now. huggingface_hub fixes its default cache directory from
    HF_HUB_CACHE / HF_HOME at import time, so a later change (a worker setting HF_HOME per job, a test) would
    be ignored without passing cache_dir explicitly."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.path.expandvars(os.environ[name]))
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"])), "hub")
    return None


def _download(repo_id: str, revision: str | None, token: str | None, allow_pickle: bool,
              trust_remote_code: bool) -> ResolvedModel:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:  # huggingface_hub >= 1.0 talks over httpx2 (older: httpx)
        import httpx2 as _http
    except ImportError:  # pragma: no cover
        import httpx as _http

    offline = _hub_offline()
    cache_dir = _hub_cache_dir()
    # Remote code lives in the repo's *.py files: fetch them only when the caller allows running them.
    patterns = ALLOW_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        if not offline:
            try:
                info = HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=False)
            except (_http.ConnectError, _http.TimeoutException, OfflineModeIsEnabled) as exc:
                # The Hub cannot be reached: a filled HF cache still serves the model (as snapshot_download
                # would); without one, LocalEntryNotFoundError below says so.
                log.warning("the Hub cannot be reached (%s); using the local HF cache", exc.__class__.__name__)
                offline = True
            else:
                names = [s.rfilename for s in (info.siblings or [])]
                _check_files(names, repo_id, allow_pickle)
                # Refuse remote code before downloading gigabytes, when the Hub shows the config.
                if isinstance(getattr(info, "config", None), dict) and "auto_map" in info.config:
                    check_config({"model_type": "?", **info.config}, repo_id, trust_remote_code)
                revision = info.sha or revision
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token,
                                      local_files_only=offline, cache_dir=cache_dir))
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"Hub repo '{repo_id}' does not exist or is private (pass a token that can read "
                                 "it)") from exc
    except GatedRepoError as exc:
        raise ModelNotFoundError(f"Hub repo '{repo_id}' is gated: accept its terms and pass a token") from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"revision '{revision}' not found in '{repo_id}'") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelNotFoundError(f"'{repo_id}' is not in the local HF cache and the Hub is offline") from exc
    except HfHubHTTPError as exc:
        # A bare 401/403/404 (no X-Error-Code header, e.g. from a mirror behind HF_ENDPOINT) is still the
        # caller's problem, not an internal error; other statuses (5xx) propagate for the worker to retry.
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403, 404):
            raise ModelNotFoundError(f"Hub repo '{repo_id}' cannot be read (HTTP {status}): check the repo id, "
                                     "the revision and the token") from exc
        raise
    _check_files([p.name for p in path.iterdir()], repo_id, allow_pickle)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"Hub repo '{repo_id}' has no config.json")
    check_config(_read_config(path / "config.json"), repo_id, trust_remote_code)
    # The snapshot folder is named by the commit sha it holds.
    return ResolvedModel(path, repo_id, path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else revision)


def load_model(path: Path, *, device: str = "cpu", dtype=None, trust_remote_code: bool = False,
               allow_pickle: bool = False):
    """Load a causal LM for calibration: eager attention and eager experts (both support double backward).

    Vision-language models load with their image-text Auto class (``multimodal.auto_model_class``) so the vision
    tower and projector come with the language model."""
    import torch
    from transformers import AutoConfig

    from .models import trust_for
    from .multimodal import auto_model_class

    dtype = dtype or torch.float32
    trust_remote_code = trust_for(path, trust_remote_code)  # a native model_type wins over auto_map
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model, info = auto_model_class(config).from_pretrained(
            path, config=config, dtype=dtype, attn_implementation="eager", experts_implementation="eager",
            trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle, output_loading_info=True)
    except (ValueError, KeyError) as exc:
        if "Unrecognized" in str(exc) or "does not recognize" in str(exc):
            raise UnsupportedArchitectureError(f"transformers cannot build a causal LM from {path}: {exc}") from exc
        raise UserInputError(f"could not load the model from {path}: {exc}") from exc
    except RuntimeError as exc:
        if "mismatched" not in str(exc) and "size mismatch" not in str(exc):
            raise
        raise ModelNotFoundError(f"{path}: the checkpoint does not match its config.json (weights with another "
                                 f"shape than the config implies): {str(exc)[:300]}") from exc
    # transformers initialises weights the checkpoint lacks at random and only warns: quantizing such a model
    # would measure and ship noise. A config that disagrees with its weights (e.g. more experts) is refused.
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        what = missing[:4] or [str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in mismatched[:4]]
        raise ModelNotFoundError(
            f"{path}: the checkpoint does not match its config.json ({len(missing)} weights missing, "
            f"{len(mismatched)} with another shape, e.g. {what}); fix the config or the weights")
    model.to(device)
    model.eval()
    return model


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
