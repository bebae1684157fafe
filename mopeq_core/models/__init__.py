"""Native transformers-5 implementations of MoE models whose Hub repos ship only remote code.

``register_all()`` registers each with transformers' Auto classes for its checkpoints' ``model_type``, so that
``AutoConfig`` / ``AutoModel*`` / ``AutoProcessor`` resolve to our code and no repo code runs. It is idempotent and
is called wherever a config is resolved or a model is built. A registered ``model_type`` wins over a checkpoint's
``auto_map`` (``trust_for``): such checkpoints load without ``trust_remote_code``. Importing this package (and the
subpackages' own ``__init__``) imports neither torch nor transformers; ``register_all()`` does.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# Subpackages, each with a ``register()`` and a ``MODEL_TYPES`` tuple.
NATIVE = ("deepseek_vl2", "molmoe")
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
    """True when the config's ``model_type`` has a native implementation here (its ``auto_map`` is then ignored)."""
    return isinstance(config, dict) and config.get("model_type") in native_model_types()


def trust_for(config: dict | str | Path, trust_remote_code: bool) -> bool:
    """Registers the native models and returns the ``trust_remote_code`` to load ``config`` with: False when its
    ``model_type`` is native (our classes, never the repository's code, even where remote code is allowed), else
    the caller's choice. ``config``: a config dict, or a model directory holding config.json."""
    register_all()
    if isinstance(config, (str, Path)):
        try:
            config = json.loads((Path(config) / "config.json").read_text())
        except (OSError, ValueError):
            return trust_remote_code
    return False if is_native(config) else trust_remote_code
