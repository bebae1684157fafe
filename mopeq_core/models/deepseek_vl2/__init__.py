"""Native DeepSeek-VL2 (tiny / small / base) for transformers 5: no remote code. See ``modeling.py``."""

from __future__ import annotations

MODEL_TYPES = ("deepseek_vl_v2",)
_registered = False


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForImageTextToText`` / ``AutoModelForCausalLM`` / ``AutoImageProcessor`` /
    ``AutoProcessor`` resolve ``model_type`` "deepseek_vl_v2" to this package (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    from .configuration import (
        DeepseekVL2LanguageConfig,
        DeepseekVL2ProjectorConfig,
        DeepseekVL2VisionConfig,
        DeepseekVLV2Config,
    )
    from .modeling import DeepseekVLV2ForCausalLM
    from .processing import DeepseekVL2ImageProcessor, DeepseekVLV2Processor

    for cfg in (DeepseekVLV2Config, DeepseekVL2LanguageConfig, DeepseekVL2VisionConfig, DeepseekVL2ProjectorConfig):
        AutoConfig.register(cfg.model_type, cfg, exist_ok=True)
    AutoModelForImageTextToText.register(DeepseekVLV2Config, DeepseekVLV2ForCausalLM, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekVLV2Config, DeepseekVLV2ForCausalLM, exist_ok=True)
    AutoImageProcessor.register(DeepseekVLV2Config, slow_image_processor_class=DeepseekVL2ImageProcessor,
                                exist_ok=True)
    AutoProcessor.register(DeepseekVLV2Config, DeepseekVLV2Processor, exist_ok=True)
    _registered = True
