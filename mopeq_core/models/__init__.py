"""Models MoPEQ implements natively for transformers 5 (their Hub checkpoints otherwise need remote code).

Importing this package imports neither torch nor transformers; ``register_all()`` does, and registers every model
with transformers' Auto classes. A checkpoint whose config.json ``model_type`` is in ``NATIVE_MODEL_TYPES`` loads
with these classes and never runs the repository's remote code, whatever its ``auto_map`` says."""

from __future__ import annotations

import json
from pathlib import Path

# config.json model_type values served by these packages
NATIVE_MODEL_TYPES = frozenset({"deepseek_vl_v2"})


def register_all() -> None:
    from . import deepseek_vl2

    deepseek_vl2.register()


def is_native(config: dict | None) -> bool:
    return isinstance(config, dict) and config.get("model_type") in NATIVE_MODEL_TYPES


def trust_remote_code_for(path: str | Path, trust_remote_code: bool) -> bool:
    """Registers the native models and returns the ``trust_remote_code`` to load ``path`` with: False for a native
    model type (its own classes, not the repository's code), else the caller's choice."""
    register_all()
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return trust_remote_code
    return False if is_native(config) else trust_remote_code
