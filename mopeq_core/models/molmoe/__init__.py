"""Native MolmoE-1B (``allenai/MolmoE-1B-0924``, ``model_type: "molmo"``) for transformers 5: config, model,
image processor and processor, registered with the Auto classes so the checkpoint loads without remote code."""

from __future__ import annotations

MODEL_TYPES = ("molmo",)


def register() -> None:
    """Register config, model and processor classes with transformers' Auto classes (idempotent)."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    from .configuration_molmoe import MolmoConfig
    from .modeling_molmoe import MolmoForCausalLM
    from .processing_molmoe import MolmoImageProcessor, MolmoProcessor

    AutoConfig.register(MODEL_TYPES[0], MolmoConfig, exist_ok=True)
    AutoModelForCausalLM.register(MolmoConfig, MolmoForCausalLM, exist_ok=True)
    AutoModelForImageTextToText.register(MolmoConfig, MolmoForCausalLM, exist_ok=True)
    AutoImageProcessor.register(MolmoConfig, slow_image_processor_class=MolmoImageProcessor, exist_ok=True)
    AutoProcessor.register(MolmoConfig, MolmoProcessor, exist_ok=True)
