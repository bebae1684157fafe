"""Size a model from its ``config.json`` alone: build it on the meta device and read its parameters' shapes.

``estimate.inspect_local`` reads safetensors headers, which needs the weights' files. A config without weights (a
release that is not uploaded yet, a published config of a model too big to download for a quick look) still tells
every tensor's shape once its classes build it; on the meta device that costs no memory. The result is a
``estimate.Checkpoint`` whose tensors are the model's own (transformers 5 layout: fused experts as 3-D tensors),
stored at the config's dtype, so ``estimate.estimate_checkpoint`` sizes it like any other checkpoint.

Needs torch and the model's classes (native transformers ones, or ours in ``mopeq_core.models``); the web API does
not import this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .errors import ModelNotFoundError, UnsupportedArchitectureError, UserInputError
from .estimate import (
    PICKLE_SUFFIXES,
    Checkpoint,
    ModelEstimate,
    Tensor,
    _check_config,
    estimate_checkpoint,
    inspect_local,
)
from .loading import _read_config

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def stored_dtype(config: dict) -> str:
    """The dtype the checkpoint's weights would be stored in (``dtype``, older ``torch_dtype``; bf16 if unset)."""
    for sub in [config, config.get("text_config") or {}, config.get("language_config") or {}]:
        name = sub.get("dtype") or sub.get("torch_dtype") if isinstance(sub, dict) else None
        if isinstance(name, str) and name.removeprefix("torch.") in _DTYPE_BYTES:
            return name.removeprefix("torch.")
    return "bfloat16"


def inspect_config_only(path: Path, *, trust_remote_code: bool = False, label: str | None = None) -> Checkpoint:
    """The tensors a model directory's ``config.json`` implies, from the model built on the meta device.

    Tied parameters count once, as ``save_pretrained`` stores them once; non-persistent buffers (RoPE tables) are
    not weights and are not counted."""
    import torch
    from transformers import AutoConfig

    from .models import trust_for
    from .multimodal import auto_model_class

    where = label or str(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{where} has no config.json; point the model at a transformers model directory")
    raw = _check_config(_read_config(path / "config.json"), where, trust_remote_code)
    trust_remote_code = trust_for(raw, trust_remote_code)  # registers the native models; they win over auto_map
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = auto_model_class(config).from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:
        if "Unrecognized" in str(exc) or "does not recognize" in str(exc):
            raise UnsupportedArchitectureError(f"transformers cannot build a model from {where}: {exc}") from exc
        raise UserInputError(f"could not build the model of {where} from its config.json: {exc}") from exc
    dtype = stored_dtype(raw)
    elem = _DTYPE_BYTES[dtype]
    tensors = [Tensor(name, _SAFETENSORS_DTYPE[dtype], tuple(p.shape), p.numel() * elem)
               for name, p in model.named_parameters()]  # remove_duplicate=True: tied weights once
    return Checkpoint(label or str(path), "local", None, raw, ["config.json"], tensors)


def estimate_local(path: Path, *, bits: Iterable[int] = (2, 3, 4), group_size: int = 128, symmetric: bool = True,
                   trust_remote_code: bool = False) -> ModelEstimate:
    """A local directory on this machine: from its safetensors headers, or, when it holds only ``config.json``, from
    the model built on the meta device (needs torch, so the web API never takes this path)."""
    if path.is_dir() and (path / "config.json").is_file() and not any(
            p.suffix in (".safetensors", *PICKLE_SUFFIXES) for p in path.iterdir()):
        ck = inspect_config_only(path, trust_remote_code=trust_remote_code)
    else:
        ck = inspect_local(path, trust_remote_code=trust_remote_code)
    return estimate_checkpoint(ck, bits=bits, group_size=group_size, symmetric=symmetric)
