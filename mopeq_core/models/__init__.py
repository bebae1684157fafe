"""Models MoPEQ implements natively for transformers 5 (their Hub checkpoints otherwise need remote code).

Importing this package imports no torch; ``register_all()`` does, and registers every model with transformers'
Auto classes."""

from __future__ import annotations

# config.json model_type values served by these packages: their checkpoints need no trust_remote_code
NATIVE_MODEL_TYPES = frozenset({"deepseek_vl_v2"})


def register_all() -> None:
    from . import deepseek_vl2

    deepseek_vl2.register()
