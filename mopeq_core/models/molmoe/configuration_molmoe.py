"""MolmoE-1B's configuration (``model_type: "molmo"``), field for field as in the checkpoint's ``config.json``.

The checkpoint keeps OLMo's names (``d_model``, ``n_heads``, ``n_layers``, ``moe_num_experts``, ...) and a nested
``vision_backbone`` dict; the usual transformers names (``hidden_size``, ``num_hidden_layers``, ...) are aliases.
Fields this implementation does not read are kept as given so that ``save_pretrained`` writes them back.
"""

from __future__ import annotations

from transformers import PretrainedConfig

VISION_DEFAULTS = {
    "image_default_input_size": [336, 336], "image_patch_size": 14, "image_pos_patch_size": 14,
    "image_emb_dim": 1024, "image_num_heads": 16, "image_num_key_value_heads": 16, "image_num_layers": 23,
    "image_head_dim": 64, "image_mlp_dim": 4096, "image_mlp_activations": "quick_gelu", "image_num_pos": 577,
    "image_norm_eps": 1e-5, "image_model_type": "openai", "initializer_range": 0.02, "attention_dropout": 0.0,
    "residual_dropout": 0.0, "image_dropout_rate": 0.0, "resize_mode": "default", "fsdp_wrap": False,
}

# Variants the real code has that MolmoE-1B does not use; refused rather than silently computed wrong.
_REQUIRED = {"block_type": "moe", "layer_norm_type": "rms", "norm_after": False, "rope": True, "rope_impl": "llama",
             "use_cls_feature": False, "image_projector": "mlp", "activation_type": "swiglu", "alibi": False,
             "normalize_input_embeds": False, "scale_logits": False, "moe_shared_expert": False,
             "image_pooling_2d": "attention-meanq", "image_padding_embed": "pad_and_partial_pad"}


class MolmoConfig(PretrainedConfig):
    model_type = "molmo"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers",
                     "num_experts": "moe_num_experts", "num_experts_per_tok": "moe_top_k",
                     "rms_norm_eps": "layer_norm_eps"}

    def __init__(self, d_model=2048, n_heads=16, n_kv_heads=None, n_layers=16, mlp_ratio=1, mlp_hidden_size=None,
                 vocab_size=50280, embedding_size=50304, additional_vocab_size=128, moe_num_experts=64, moe_top_k=8,
                 layer_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=32768, max_sequence_length=4096,
                 attention_layer_norm=True, clip_qkv=None, include_bias=False, qkv_bias=False, weight_tying=False,
                 float32_attention=True, vit_layers=(-2, -9), image_pooling_h=2, image_pooling_w=2,
                 vision_backbone=None, initializer_range=0.02, new_embedding_init_range=0.02, use_cache=True,
                 pad_token_id=1, **kwargs):
        self.d_model, self.n_heads, self.n_kv_heads, self.n_layers = d_model, n_heads, n_kv_heads, n_layers
        self.mlp_ratio, self.mlp_hidden_size = mlp_ratio, mlp_hidden_size
        self.vocab_size, self.embedding_size, self.additional_vocab_size = vocab_size, embedding_size, \
            additional_vocab_size
        self.moe_num_experts, self.moe_top_k = moe_num_experts, moe_top_k
        self.layer_norm_eps, self.rope_theta = layer_norm_eps, rope_theta
        self.max_position_embeddings, self.max_sequence_length = max_position_embeddings, max_sequence_length
        self.attention_layer_norm, self.clip_qkv = attention_layer_norm, clip_qkv
        self.include_bias, self.qkv_bias, self.weight_tying = include_bias, qkv_bias, weight_tying
        self.float32_attention = float32_attention
        self.vit_layers = list(vit_layers) if vit_layers is not None else None
        self.image_pooling_h, self.image_pooling_w = image_pooling_h, image_pooling_w
        self.vision_backbone = None if vision_backbone is None else {**VISION_DEFAULTS, **dict(vision_backbone)}
        self.initializer_range, self.new_embedding_init_range = initializer_range, new_embedding_init_range
        self.use_cache = use_cache
        for key, value in _REQUIRED.items():
            kwargs.setdefault(key, value)
        kwargs.setdefault("tie_word_embeddings", bool(weight_tying))
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        for key, value in _REQUIRED.items():
            if getattr(self, key, value) != value:
                raise ValueError(f"MolmoConfig: {key}={getattr(self, key)!r} is not supported (only {value!r}, "
                                 "as in MolmoE-1B)")

    # -- derived sizes (as the real code computes them) ----------------------------------------------------------
    @property
    def num_key_value_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        """The SwiGLU width before halving: expert and projector hidden size is half of it."""
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def full_vocab_size(self) -> int:
        return (self.embedding_size or self.vocab_size) + (self.additional_vocab_size or 0)

    @property
    def image_num_patch(self) -> tuple[int, int]:
        v = self.vision_backbone
        h, w = v["image_default_input_size"]
        return h // v["image_patch_size"], w // v["image_patch_size"]

    @property
    def llm_patches_per_crop(self) -> tuple[int, int]:
        h, w = self.image_num_patch
        return (h + self.image_pooling_h - 1) // self.image_pooling_h, (w + self.image_pooling_w - 1) // \
            self.image_pooling_w
