"""mopeq_core: per-expert mixed-precision quantization of Mixture-of-Experts models (MoPEQ).

The package imports torch lazily so that torch-free modules (``sizing``, ``estimate``, ``config``, ``errors``)
can be used by the web API without pulling torch in.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "run": ("mopeq_core.engine", "run"),
    "RunSummary": ("mopeq_core.engine", "RunSummary"),
    "load_quantized": ("mopeq_core.loader", "load_quantized"),
    "QuantizeConfig": ("mopeq_core.config", "QuantizeConfig"),
    "Budget": ("mopeq_core.config", "Budget"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(name)


__all__ = list(_LAZY)
