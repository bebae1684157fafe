"""MolmoE-1B for transformers 5: the OLMoE-style language model, the CLIP ViT-L/14 vision backbone with multi-layer
features, 2×2 attention pooling and the SwiGLU connector.

Module names and shapes follow the checkpoint (``model.transformer.blocks.N.attn.att_proj``,
``model.transformer.blocks.N.mlp.experts.E.gate_proj``, ``model.vision_backbone.image_vit...``, ``lm_head``), so
its safetensors load key for key. The computation follows the public ``modeling_molmoe.py`` (see docs/VLM.md for
the copy that was compared and how): pre-norm blocks, fused ``att_proj`` with q/k RMS norms over the whole
projection, rotate-half RoPE at float32 from ``position_ids``, a float32 softmax router over ``moe_num_experts``
with top-``moe_top_k`` weights that are *not* renormalised, and per-expert SwiGLU MLPs.

Written for MoPEQ: decoder layers take and return a tensor (the engine runs them one at a time), attention is
eager (double backward for Hessian-vector products), rotary tables are computed from positions on every call (no
buffer to leave uninitialised after ``from_pretrained``), and generation uses a transformers ``DynamicCache``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_molmoe import MolmoConfig


class RMSLayerNorm(nn.Module):
    """RMS norm computed in float32, scaled in the input dtype (as OLMo's ``RMSLayerNorm``)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return self.weight * x


class Embedding(nn.Module):
    """The base vocabulary (``embedding``) and Molmo's added tokens (``new_embedding``) as one table."""

    def __init__(self, num_embeddings: int, num_new_embeddings: int, features: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(num_embeddings, features))
        self.new_embedding = nn.Parameter(torch.zeros(num_new_embeddings, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, torch.cat([self.embedding, self.new_embedding], dim=0))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_tables(position_ids: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [B, 1, T, dim] in float32 for integer positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float) / dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos(), emb.sin()


class MolmoAttention(nn.Module):
    def __init__(self, config: MolmoConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        d, kv = config.d_model, config.num_key_value_heads * config.attn_head_dim
        self.fused_dims = (d, kv, kv)
        self.att_proj = nn.Linear(d, sum(self.fused_dims), bias=config.include_bias or config.qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=config.include_bias)
        self.attn_norm = RMSLayerNorm(d, config.layer_norm_eps)
        if config.attention_layer_norm:
            # Both norms span d_model, as in the real code (MolmoE has as many kv heads as heads).
            self.q_norm = RMSLayerNorm(d, config.layer_norm_eps)
            self.k_norm = RMSLayerNorm(d, config.layer_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, attention_mask, position_embeddings, past_key_values: Cache | None = None):
        cfg = self.config
        b, t, c = x.shape
        qkv = self.att_proj(self.attn_norm(x))
        if cfg.clip_qkv is not None:
            qkv = qkv.clamp(min=-cfg.clip_qkv, max=cfg.clip_qkv)
        q, k, v = qkv.split(self.fused_dims, dim=-1)
        dtype = k.dtype
        if self.q_norm is not None:
            q, k = self.q_norm(q).to(dtype), self.k_norm(k).to(dtype)
        hd, nh, nkv = cfg.attn_head_dim, cfg.n_heads, cfg.num_key_value_heads
        q = q.view(b, t, nh, hd).transpose(1, 2)
        k = k.view(b, t, nkv, hd).transpose(1, 2)
        v = v.view(b, t, nkv, hd).transpose(1, 2)
        cos, sin = position_embeddings
        qf, kf = q.float(), k.float()  # rope at full precision
        q = (qf * cos + _rotate_half(qf) * sin).to(q.dtype)
        k = (kf * cos + _rotate_half(kf) * sin).to(k.dtype)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        # the additive mask stays float32: in bfloat16 its minimum would round to -inf (NaN on all-masked rows)
        scores = ((q @ k.transpose(-1, -2)) / math.sqrt(hd)).float() + attention_mask
        att = scores.softmax(-1).to(v.dtype) @ v
        return self.attn_out(att.transpose(1, 2).reshape(b, t, c))


class MolmoeMLP(nn.Module):
    """One routed expert: SwiGLU with hidden size ``mlp_hidden // 2``."""

    def __init__(self, config: MolmoConfig):
        super().__init__()
        hidden = config.mlp_hidden // 2
        self.gate_proj = nn.Linear(config.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.d_model, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MolmoeSparseMoeBlock(nn.Module):
    """``ff_norm`` then the router: float32 softmax, top-k, weights not renormalised, experts summed per token."""

    def __init__(self, config: MolmoConfig):
        super().__init__()
        self.num_experts, self.top_k = config.moe_num_experts, config.moe_top_k
        self.gate = nn.Linear(config.d_model, self.num_experts, bias=False)
        self.experts = nn.ModuleList([MolmoeMLP(config) for _ in range(self.num_experts)])
        self.ff_norm = RMSLayerNorm(config.d_model, config.layer_norm_eps)

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits, top-k weights in the hidden dtype, top-k expert indices) for normed tokens [N, H]."""
        logits = self.gate(hidden)
        weights, index = torch.topk(F.softmax(logits, dim=1, dtype=torch.float), self.top_k, dim=-1)
        return logits, weights.to(hidden.dtype), index

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.ff_norm(hidden_states)
        shape = hidden.shape
        hidden = hidden.reshape(-1, shape[-1])
        logits, weights, index = self.route(hidden)
        out = torch.zeros_like(hidden)
        mask = F.one_hot(index, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            slot, tok = torch.where(mask[e])
            if tok.numel():
                y = self.experts[e](hidden[tok]) * weights[tok, slot, None]
                out = out.index_add(0, tok, y.to(hidden.dtype))
        return out.reshape(shape), logits


class MolmoDecoderLayer(nn.Module):
    def __init__(self, config: MolmoConfig, layer_idx: int):
        super().__init__()
        self.attn = MolmoAttention(config, layer_idx)
        self.mlp = MolmoeSparseMoeBlock(config)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None,
                **kwargs) -> torch.Tensor:
        x = hidden_states + self.attn(hidden_states, attention_mask, position_embeddings, past_key_values)
        moe_out, _ = self.mlp(x)
        return x + moe_out


# ---- vision --------------------------------------------------------------------------------------------------
class MultiHeadDotProductAttention(nn.Module):
    """ViT self-attention, and (``in_layers`` > 1) the 2×2 pooling attention over concatenated ViT layers."""

    def __init__(self, config: MolmoConfig, in_layers: int = 1):
        super().__init__()
        v = config.vision_backbone
        self.config = config
        self.num_heads, self.num_kv_heads, self.head_dim = v["image_num_heads"], v["image_num_key_value_heads"], \
            v["image_head_dim"]
        d_in = in_layers * v["image_emb_dim"]
        self.wq = nn.Linear(d_in, self.num_heads * self.head_dim)
        self.wk = nn.Linear(d_in, self.num_kv_heads * self.head_dim)
        self.wv = nn.Linear(d_in, self.num_kv_heads * self.head_dim)
        self.wo = nn.Linear(self.num_heads * self.head_dim, v["image_emb_dim"])

    def forward(self, inputs_q: torch.Tensor, inputs_kv: torch.Tensor | None = None) -> torch.Tensor:
        kv = inputs_q if inputs_kv is None else inputs_kv
        q, k, v = self.wq(inputs_q), self.wk(kv), self.wv(kv)
        q = q.reshape(q.shape[:2] + (self.num_heads, self.head_dim))
        k = k.reshape(k.shape[:2] + (self.num_kv_heads, self.head_dim))
        v = v.reshape(v.shape[:2] + (self.num_kv_heads, self.head_dim))
        if self.num_heads != self.num_kv_heads:
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=2)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=2)
        dtype = q.dtype
        if self.config.float32_attention:
            q, k, v = q.float(), k.float(), v.float()
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)).softmax(-1, dtype=torch.float32).to(v.dtype)
        out = (att @ v).transpose(1, 2).to(dtype)
        return self.wo(out.reshape(out.shape[:2] + (-1,)))


class ViTMLP(nn.Module):
    def __init__(self, config: MolmoConfig):
        super().__init__()
        v = config.vision_backbone
        self.w1 = nn.Linear(v["image_emb_dim"], v["image_mlp_dim"])
        self.w2 = nn.Linear(v["image_mlp_dim"], v["image_emb_dim"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        return self.w2(h * torch.sigmoid(1.702 * h))  # quick GELU, as CLIP


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: MolmoConfig):
        super().__init__()
        v = config.vision_backbone
        self.attention = MultiHeadDotProductAttention(config)
        self.feed_forward = ViTMLP(config)
        self.attention_norm = nn.LayerNorm(v["image_emb_dim"], eps=v["image_norm_eps"])
        self.ffn_norm = nn.LayerNorm(v["image_emb_dim"], eps=v["image_norm_eps"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class BlockCollection(nn.Module):
    def __init__(self, config: MolmoConfig):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(config)
                                        for _ in range(config.vision_backbone["image_num_layers"])])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        hidden = []
        for block in self.resblocks:
            x = block(x)
            hidden.append(x)
        return hidden


class VisionTransformer(nn.Module):
    """CLIP ViT on flattened 14×14 patches: class token, learned positions (bicubic-resized when the crop grid
    differs), pre-LayerNorm, and every block's output."""

    def __init__(self, config: MolmoConfig):
        super().__init__()
        v = config.vision_backbone
        self.config = config
        self.class_embedding = nn.Parameter(torch.zeros(v["image_emb_dim"]))
        self.positional_embedding = nn.Parameter(torch.zeros(v["image_num_pos"], v["image_emb_dim"]))
        self.patch_embedding = nn.Linear(v["image_patch_size"] ** 2 * 3, v["image_emb_dim"], bias=False)
        self.pre_ln = nn.LayerNorm(v["image_emb_dim"], eps=v["image_norm_eps"])
        self.transformer = BlockCollection(config)

    def add_pos_emb(self, x: torch.Tensor, patch_num: tuple[int, int]) -> torch.Tensor:
        cls_emb, pos_emb = self.positional_embedding[0:1], self.positional_embedding[1:]
        side = int(math.sqrt(pos_emb.shape[0]))
        pos_emb = pos_emb.reshape(side, side, pos_emb.shape[1])
        if (side, side) != tuple(patch_num):
            pos_emb = F.interpolate(pos_emb.unsqueeze(0).permute(0, 3, 1, 2), size=tuple(patch_num), mode="bicubic",
                                    align_corners=False, antialias=True).permute(0, 2, 3, 1).squeeze(0)
        pos_emb = pos_emb.reshape(-1, pos_emb.shape[-1])
        return x + torch.cat([cls_emb[None], pos_emb[None]], dim=1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embedding(x)
        x = torch.cat([self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.pre_ln(self.add_pos_emb(x, self.config.image_num_patch))
        return self.transformer(x)


class ImageProjectorMLP(nn.Module):
    """The connector: SwiGLU ``w2(silu(w1 x) * w3 x)`` to ``d_model``."""

    def __init__(self, config: MolmoConfig, input_dim: int):
        super().__init__()
        hidden = config.mlp_hidden // 2
        self.w1 = nn.Linear(input_dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.d_model, bias=False)
        self.w3 = nn.Linear(input_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MolmoVisionBackbone(nn.Module):
    def __init__(self, config: MolmoConfig):
        super().__init__()
        v = config.vision_backbone
        self.config = config
        n_layers = len(config.vit_layers) if config.vit_layers else 1
        self.image_vit = VisionTransformer(config)
        self.image_pooling_2d = MultiHeadDotProductAttention(config, in_layers=n_layers)
        self.image_projector = ImageProjectorMLP(config, v["image_emb_dim"])
        self.pad_embed = nn.Parameter(torch.zeros(2, v["image_emb_dim"] * n_layers))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, T, N, D] patches of T crops -> [B, T, N, n_layers*emb] ViT features (all -1 crops zeroed)."""
        b, t, n, d = images.shape
        valid = torch.all(images.view(b * t, n, d) != -1, dim=(1, 2), keepdim=True)
        hidden = self.image_vit(images.view(b * t, n, d))
        layers = self.config.vit_layers
        feats = torch.cat([hidden[i] for i in layers], dim=-1) if layers else hidden[-1]
        return (feats[:, 1:] * valid).view(b, t, n, -1)  # drop the class token

    def forward(self, images: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        b, t = images.shape[:2]
        feats = self.encode_image(images)
        dtype = feats.dtype
        # pad_and_partial_pad: one learned vector for all-padding patches, one for partly padded ones
        all_pad = image_masks == 0
        partial = torch.logical_and(image_masks < 1, ~all_pad).to(torch.float32)
        feats = feats + self.pad_embed[0] * all_pad.to(torch.float32).unsqueeze(-1)
        feats = (feats + self.pad_embed[1] * partial.unsqueeze(-1)).to(dtype)
        ph, pw = cfg.image_num_patch
        feats = feats.reshape(b, t, ph, pw, -1)
        if ph % cfg.image_pooling_h == 1:  # odd grid: pad bottom/right so 2x2 windows tile it
            feats = F.pad(feats, (0, 0, 0, 1, 0, 1))
        dh, dw = cfg.image_pooling_h, cfg.image_pooling_w
        h, w = feats.shape[2] // dh, feats.shape[3] // dw
        feats = feats.reshape(b, t, h, dh, w, dw, -1).permute(0, 1, 2, 4, 3, 5, 6).reshape(b * t * h * w, dh * dw, -1)
        feats = self.image_pooling_2d(feats.mean(-2, keepdim=True), feats)
        lh, lw = cfg.llm_patches_per_crop
        return self.image_projector(feats.reshape(b, t, lh * lw, -1))


# ---- the model -----------------------------------------------------------------------------------------------
class MolmoPreTrainedModel(PreTrainedModel):
    config_class = MolmoConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MolmoDecoderLayer", "ResidualAttentionBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Embedding):
            nn.init.normal_(module.embedding, std=std)
            nn.init.normal_(module.new_embedding, std=self.config.new_embedding_init_range)
        elif isinstance(module, (RMSLayerNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, VisionTransformer):
            scale = module.class_embedding.shape[0] ** -0.5
            nn.init.normal_(module.class_embedding, std=scale)
            nn.init.normal_(module.positional_embedding, std=scale)
        elif isinstance(module, MolmoVisionBackbone):
            nn.init.zeros_(module.pad_embed)


class MolmoModel(nn.Module):
    def __init__(self, config: MolmoConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": Embedding(config.embedding_size or config.vocab_size, config.additional_vocab_size or 0,
                             config.d_model),
            "ln_f": RMSLayerNorm(config.d_model, config.layer_norm_eps),
            "blocks": nn.ModuleList([MolmoDecoderLayer(config, i) for i in range(config.n_layers)]),
        })
        self.vision_backbone = MolmoVisionBackbone(config) if config.vision_backbone is not None else None

    def forward(self, input_ids, attention_mask=None, images=None, image_masks=None, image_input_idx=None,
                position_ids=None, past_key_values: Cache | None = None) -> torch.Tensor:
        cfg = self.config
        b, t = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=input_ids.device)
            attention_mask[:, past:] = input_ids != -1
        if position_ids is None:
            position_ids = torch.clamp(torch.cumsum(attention_mask.to(torch.int32), dim=-1) - 1, min=0)[:, -t:]
        input_ids = input_ids * (input_ids != -1).to(input_ids.dtype)
        x = self.transformer.wte(input_ids)
        if images is not None and self.vision_backbone is not None:
            feats = self.vision_backbone(images.to(x.dtype), image_masks)
            feats = feats.reshape(b, -1, feats.shape[-1]).to(x.device)
            idx = image_input_idx.reshape(b, -1)
            valid = idx >= 0
            rows = torch.arange(b, device=x.device)[:, None].expand_as(idx)
            x = x.index_put((rows[valid], idx[valid]), feats[valid], accumulate=True)
        # additive float32 mask: causal, plus padding keys
        s = past + t
        neg = torch.finfo(torch.float32).min
        causal = torch.full((t, s), neg, device=x.device).triu(past + 1)
        pad = (1.0 - attention_mask[:, None, None, :s].to(torch.float32)) * neg
        mask = (causal[None, None] + pad).clamp(min=neg)
        rope = rotary_tables(position_ids, cfg.attn_head_dim, cfg.rope_theta)
        for block in self.transformer.blocks:
            x = block(x, attention_mask=mask, position_embeddings=rope, past_key_values=past_key_values)
        return self.transformer.ln_f(x)


class MolmoForCausalLM(MolmoPreTrainedModel, GenerationMixin):
    def __init__(self, config: MolmoConfig):
        super().__init__(config)
        self.model = MolmoModel(config)
        if not config.weight_tying:
            self.lm_head = nn.Linear(config.d_model, config.embedding_size or config.vocab_size,
                                     bias=config.include_bias)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def get_output_embeddings(self):
        return None if self.config.weight_tying else self.lm_head

    def forward(self, input_ids=None, attention_mask=None, images=None, image_masks=None, image_input_idx=None,
                position_ids=None, past_key_values=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        x = self.model(input_ids, attention_mask=attention_mask, images=images, image_masks=image_masks,
                       image_input_idx=image_input_idx, position_ids=position_ids, past_key_values=past_key_values)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        if self.config.weight_tying:
            logits = F.linear(x, self.model.transformer.wte.embedding)
        else:
            logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, images=None,
                                      image_masks=None, image_input_idx=None, use_cache=True, **kwargs):
        past = past_key_values.get_seq_length() if isinstance(past_key_values, Cache) else 0
        inputs = {"input_ids": input_ids[:, past:], "attention_mask": attention_mask,
                  "past_key_values": past_key_values, "use_cache": use_cache}
        if past == 0:  # the image goes in with the prompt only; later steps read it from the cache
            inputs.update(images=images, image_masks=image_masks, image_input_idx=image_input_idx)
        return inputs
