"""Configs of DeepSeek-VL2 (``model_type`` "deepseek_vl_v2"), read from the checkpoints' config.json as they are.

The checkpoint nests three sections: ``language_config`` (DeepSeek-V2-style decoder with DeepSeekMoE; its own
``model_type`` says "deepseek_v2", which transformers 5 maps to its native DeepSeek-V2 -- a different layout -- so
the section is read into :class:`DeepseekVL2LanguageConfig` with a model type of its own), ``vision_config`` (the
SigLIP ViT) and ``projector_config`` (the downsampling MLP). Defaults are those of the published code.
"""

from __future__ import annotations

from transformers import PretrainedConfig


def _section(cls, value):
    if isinstance(value, cls):
        return value
    value = dict(value or {})
    value.pop("model_type", None)  # the checkpoint's names ("deepseek_v2", "vision", ...) are not ours
    return cls(**value)


class DeepseekVL2LanguageConfig(PretrainedConfig):
    model_type = "deepseek_vl_v2_language"

    def __init__(self, vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
                 num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32, n_shared_experts=None,
                 n_routed_experts=None, ep_size=1, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=1536,
                 qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="greedy", n_group=None,
                 topk_group=None, num_experts_per_tok=None, moe_layer_freq=1, first_k_dense_replace=0,
                 norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True,
                 hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6,
                 use_cache=True, pad_token_id=None, bos_token_id=100000, eos_token_id=100001,
                 tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None, rope_parameters=None,
                 attention_bias=False, attention_dropout=0.0, use_mla=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.ep_size = ep_size
        self.routed_scaling_factor = routed_scaling_factor
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.topk_method = topk_method
        self.n_group = n_group
        self.topk_group = topk_group
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        # the checkpoints' "rope_scaling" ({"type": "yarn", ...}); transformers standardises it into rope_parameters
        self.rope_parameters = dict(rope_parameters or rope_scaling or {}) or None
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.use_mla = use_mla
        kwargs.pop("auto_map", None)  # the checkpoint's pointer to DeepSeek's remote code; this class replaces it
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i``'s MLP is DeepSeekMoE (the published rule)."""
        return (self.n_routed_experts is not None and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)


class DeepseekVL2VisionConfig(PretrainedConfig):
    model_type = "deepseek_vl_v2_vision"

    def __init__(self, model_name="siglip_large_patch16_384", image_size=384, patch_size=16, width=1024, layers=24,
                 heads=16, mlp_ratio=4, global_pool="map", ignore_head=True, class_token=False, num_classes=0,
                 use_checkpoint=False, **kwargs):
        self.model_name = model_name
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.layers = layers
        self.heads = heads
        self.mlp_ratio = mlp_ratio
        self.global_pool = global_pool
        self.ignore_head = ignore_head
        self.class_token = class_token
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        super().__init__(**kwargs)


class DeepseekVL2ProjectorConfig(PretrainedConfig):
    model_type = "deepseek_vl_v2_projector"

    def __init__(self, projector_type="downsample_mlp_gelu", input_dim=1152, n_embed=2048, depth=2, mlp_ratio=1,
                 downsample_ratio=2, token_pooling=False, **kwargs):
        self.projector_type = projector_type
        self.input_dim = input_dim
        self.n_embed = n_embed
        self.depth = depth
        self.mlp_ratio = mlp_ratio
        self.downsample_ratio = downsample_ratio
        self.token_pooling = token_pooling
        super().__init__(**kwargs)


class DeepseekVLV2Config(PretrainedConfig):
    model_type = "deepseek_vl_v2"
    sub_configs = {"vision_config": DeepseekVL2VisionConfig, "projector_config": DeepseekVL2ProjectorConfig,
                   "language_config": DeepseekVL2LanguageConfig}

    def __init__(self, vision_config=None, projector_config=None, language_config=None, tile_tag="2D",
                 global_view_pos="head", candidate_resolutions=((384, 384),), image_token_id=None, **kwargs):
        self.vision_config = _section(DeepseekVL2VisionConfig, vision_config)
        self.projector_config = _section(DeepseekVL2ProjectorConfig, projector_config)
        self.language_config = _section(DeepseekVL2LanguageConfig, language_config)
        self.tile_tag = tile_tag
        self.global_view_pos = global_view_pos
        self.candidate_resolutions = [list(r) for r in candidate_resolutions]
        # not in the published config (the processor knows it); used when images_seq_mask is not passed
        self.image_token_id = image_token_id
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.pop("auto_map", None)  # implemented natively: never the repository's remote code
        super().__init__(**kwargs)

    def get_text_config(self, decoder=None, encoder=None):
        return self.language_config
