"""A job's settings: one versioned JSON document (``jobs.settings``), the public form of the engine's
``QuantizeConfig`` under its own field names. The API writes it from the validated config; the worker turns it
back into a config here and nowhere else. ``mopeq_core.config`` is torch-free, so the API may import it."""

from __future__ import annotations

import dataclasses
from typing import Any

from mopeq_core.config import Budget, QuantizeConfig

VERSION = 1
# QuantizeConfig fields that are no setting of the job: its identity (columns of their own), what the worker's
# machine decides, and the secret.
NOT_SETTINGS = ("model", "revision", "device", "allow_pickle", "eval_suite_include", "token")
FIELDS = tuple(f.name for f in dataclasses.fields(QuantizeConfig) if f.name not in NOT_SETTINGS)


def document(cfg: QuantizeConfig) -> dict[str, Any]:
    d = cfg.to_public_dict()
    return {"version": VERSION, **{k: d[k] for k in FIELDS}}


def check(doc: dict[str, Any]) -> dict[str, Any]:
    """The document's settings without the version; refuses versions this code does not know."""
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError(f"job settings document version {doc.get('version') if isinstance(doc, dict) else doc!r} "
                         f"is not {VERSION}")
    unknown = set(doc) - set(FIELDS) - {"version"}
    if unknown:
        raise ValueError(f"job settings document has unknown fields {sorted(unknown)}")
    return {k: v for k, v in doc.items() if k != "version"}


def to_config(doc: dict[str, Any], *, model: str, revision: str | None, **machine: Any) -> QuantizeConfig:
    """The engine config of a job: its document plus its identity and the worker's own choices (``device``,
    ``allow_pickle``, ``token``). Fields missing from the document take the engine's defaults."""
    d = check(doc)
    budget = d.pop("budget", None)
    if budget is not None:
        d["budget"] = Budget(**budget)
    for name in ("bits", "eval_suites"):
        if name in d:
            d[name] = tuple(d[name])
    return QuantizeConfig(model=model, revision=revision, **d, **machine)
