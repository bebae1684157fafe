"""Native transformers-5 implementations of MoE models whose Hub repos ship only remote code.

``register_all()`` registers each with transformers' Auto classes for its checkpoints' ``model_type``, so that
``AutoConfig`` / ``AutoModel*`` / ``AutoProcessor`` resolve to our code and no repo code runs. It is idempotent and
is called wherever a config is resolved or a model is built.
"""

from __future__ import annotations

import importlib

# Subpackages, each with a ``register()`` and a ``MODEL_TYPES`` tuple.
NATIVE = ()
_done = False


def register_all() -> None:
    global _done
    if _done:
        return
    for name in NATIVE:
        importlib.import_module(f"{__name__}.{name}").register()
    _done = True
