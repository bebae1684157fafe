"""Native transformers-5 implementations of MoE models whose Hub repos ship only remote code.

``register_all()`` registers each with transformers' Auto classes for its checkpoints' ``model_type``, so that
``AutoConfig`` / ``AutoModel*`` / ``AutoProcessor`` resolve to our code and no repo code runs. It is idempotent and
is called wherever a config is resolved or a model is built. Importing this package (and the subpackages' own
``__init__``) imports neither torch nor transformers; ``register_all()`` does.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# Subpackages, each with a ``register()`` and a ``MODEL_TYPES`` tuple.
NATIVE = ("deepseek_vl2",)
_done = False


def register_all() -> None:
    global _done
    if _done:
        return
    for name in NATIVE:
        importlib.import_module(f"{__name__}.{name}").register()
    _done = True


def native_model_types() -> frozenset[str]:
    """config.json ``model_type`` values implemented here: their checkpoints never need remote code."""
    return frozenset(t for name in NATIVE for t in importlib.import_module(f"{__name__}.{name}").MODEL_TYPES)


def is_native(config: dict | None) -> bool:
    return isinstance(config, dict) and config.get("model_type") in native_model_types()


def trust_remote_code_for(path: str | Path, trust_remote_code: bool) -> bool:
    """Registers the native models and returns the ``trust_remote_code`` to load ``path`` with: False for a native
    model type (our classes, never the repository's code, whatever its ``auto_map``), else the caller's choice."""
    register_all()
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return trust_remote_code
    return False if is_native(config) else trust_remote_code
