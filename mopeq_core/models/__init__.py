"""Native transformers-5 implementations of MoE models whose Hub repos ship only remote code.

``register_all()`` registers each with transformers' Auto classes for its checkpoints' ``model_type``, so that
``AutoConfig`` / ``AutoModel*`` / ``AutoProcessor`` resolve to our code and no repo code runs. It is idempotent and
is called wherever a config is resolved or a model is built. A registered ``model_type`` wins over a checkpoint's
``auto_map`` (``trust_for``): such checkpoints load without ``trust_remote_code``.
"""

from __future__ import annotations

import importlib

# Subpackages, each with a ``register()`` and a ``MODEL_TYPES`` tuple.
NATIVE = ("molmoe",)
_done = False


def register_all() -> None:
    global _done
    if _done:
        return
    for name in NATIVE:
        importlib.import_module(f"{__name__}.{name}").register()
    _done = True


def native_model_types() -> set[str]:
    """``model_type`` values served by the native implementations (importing them needs no torch)."""
    return {t for name in NATIVE for t in importlib.import_module(f"{__name__}.{name}").MODEL_TYPES}


def is_native(config: dict) -> bool:
    """True when the config's ``model_type`` has a native implementation here (its ``auto_map`` is then ignored)."""
    return isinstance(config, dict) and config.get("model_type") in native_model_types()


def trust_for(config, trust_remote_code: bool) -> bool:
    """Registers the native models and returns the ``trust_remote_code`` to load ``config`` with: False when its
    ``model_type`` is native (remote code is then never run, even if allowed), else ``trust_remote_code``.
    ``config``: a config dict, or a model directory holding config.json."""
    import json
    from pathlib import Path

    register_all()
    if isinstance(config, (str, Path)):
        f = Path(config) / "config.json"
        try:
            config = json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, ValueError):
            config = {}
    return False if is_native(config) else trust_remote_code
