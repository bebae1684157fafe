"""The push stage: upload a finished job's artifact folder (weights, bitmap.json, report.json, README.md model
card) to the Hugging Face Hub with the job's own token."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mopeq.worker")


@dataclass
class PushResult:
    repo_id: str
    commit: str | None
    url: str


def _bits_label(avg_bits: float | None) -> str:
    if avg_bits is None:
        return "mixed"
    return format(round(float(avg_bits), 1), "g")


def default_repo_name(model: str, avg_bits: float | None) -> str:
    base = Path(model.rstrip("/")).name or "model"
    base = re.sub(r"[^A-Za-z0-9._-]", "-", base).strip(".-") or "model"
    return f"{base}-MoPEQ-{_bits_label(avg_bits)}b"[:96]


def push_folder(folder: Path, *, model: str, avg_bits: float | None, token: str, repo_id: str | None = None,
                private: bool = False, endpoint: str | None = None, commit_message: str | None = None) -> PushResult:
    """Create the repo (private if asked; kept as is if it exists) and commit the folder to it in one commit."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    if repo_id is None:
        owner = api.whoami()["name"]
        repo_id = f"{owner}/{default_repo_name(model, avg_bits)}"
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message or f"MoPEQ quantization of {model}")
    commit = getattr(info, "oid", None)
    log.info("pushed %s to %s (commit %s)", folder.name, repo_id, commit)
    return PushResult(repo_id=repo_id, commit=commit, url=str(getattr(info, "commit_url", None) or url))
