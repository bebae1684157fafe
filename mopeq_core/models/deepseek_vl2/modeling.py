"""DeepSeek-VL2 for transformers 5, written for MoPEQ from a reading of the published model (deepseek-ai/DeepSeek-VL2).

Module and parameter names are the checkpoints' (``vision.*``, ``projector.layers.*``, ``image_newline``,
``view_seperator``, ``language.model.layers.N.{self_attn,mlp}.*``, ``language.lm_head``), so Hub checkpoints load
key for key. Pieces:

- language model: DeepSeek-V2 decoder with multi-head attention (``use_mla: false``, VL2-tiny) or multi-head latent
  attention (MLA, optional ``q_lora_rank``, YaRN rope scaling), dense MLPs in the first ``first_k_dense_replace``
  layers and DeepSeekMoE elsewhere (``moe_layer_freq``): routed experts as an ``nn.ModuleList`` of gated MLPs, shared
  experts, ``MoEGate`` with softmax or sigmoid scores and greedy / group-limited greedy / noaux_tc top-k;
- vision: timm's SigLIP ViT (``ignore_head``: the patch features after the final norm), the downsampling MLP
  projector, and the 2D tile layout (global view with a newline column, ``view_seperator``, local tiles with a newline
  column) that replaces the ``<image>`` token embeddings.

Rotary tables are computed in the forward from the config: there are no non-persistent buffers that loading on the
meta device could leave uninitialised. The routed experts run with autograd in every mode (MoPEQ's sensitivity
needs their gradients); the published code runs them under ``torch.no_grad()`` when not training.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration import DeepseekVL2LanguageConfig, DeepseekVLV2Config


# ---- rotary embeddings ----------------------------------------------------------------------------------------
def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_params(config: DeepseekVL2LanguageConfig) -> dict:
    p = dict(getattr(config, "rope_parameters", None) or {})
    p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
    p.setdefault("rope_theta", config.rope_theta)
    return p


def rope_inv_freq(config: DeepseekVL2LanguageConfig, dim: int, device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2], cos/sin multiplier) of the rotary embedding (default or YaRN)."""
    p = _rope_params(config)
    base = float(p["rope_theta"])
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    extra = 1.0 / (base ** exponents)
    if p["rope_type"] in ("default", None):
        return extra, 1.0
    if p["rope_type"] != "yarn":
        raise NotImplementedError(f"DeepSeek-VL2 rope scaling {p['rope_type']!r}")
    factor = float(p["factor"])
    orig = p.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = p.get("beta_fast", 32), p.get("beta_slow", 1)

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1 where the original frequency is kept (extrapolation), 0 where it is interpolated
    inv_freq = extra / factor * (1 - keep) + extra * keep
    mscale = _yarn_mscale(factor, p.get("mscale", 1)) / _yarn_mscale(factor, p.get("mscale_all_dim", 0))
    return inv_freq, float(mscale)


def rotary_cos_sin(config, dim: int, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, L, dim] for ``position_ids`` [B, L]."""
    inv_freq, mscale = rope_inv_freq(config, dim, position_ids.device)
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * mscale).to(dtype), (emb.sin() * mscale).to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x, cos, sin):
    """x [B, heads, L, d]; cos/sin [B, L, d]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _deinterleave(x):
    """MLA's rope dims come as (re, im) pairs; rotate_half wants the halves: [x0, x2, ..., x1, x3, ...]."""
    b, h, s, d = x.shape
    return x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)


# ---- layers ---------------------------------------------------------------------------------------------------
class DeepseekVL2RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def _attend(q, k, v, mask, scale, dropout, training):
    """Eager attention (double backward works, unlike SDPA): softmax in float32."""
    w = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        w = w + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    w = F.dropout(w, p=dropout, training=training)
    return torch.matmul(w, v)


class DeepseekVL2MHA(nn.Module):
    """Plain multi-head attention with rotary embeddings over the whole head (``use_mla: false``)."""

    def __init__(self, config: DeepseekVL2LanguageConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    @property
    def rope_dim(self) -> int:
        return self.head_dim

    def forward(self, x, mask, cos, sin, cache: Cache | None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = _attend(q, k, v, mask, self.head_dim ** -0.5, self.config.attention_dropout, self.training)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class DeepseekVL2MLA(nn.Module):
    """Multi-head latent attention: keys and values come from a shared low-rank latent (``kv_lora_rank``) plus a
    single rotary key (``qk_rope_head_dim``); queries optionally through a low-rank ``q_lora_rank`` bottleneck.
    The KV cache holds the latent and the rotary key; attention is computed in the latent space (the up-projection
    of keys and values is absorbed into the query and the output)."""

    def __init__(self, config: DeepseekVL2LanguageConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.nope, self.rope = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.q_head_dim = self.nope + self.rope
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        h = config.hidden_size
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * self.q_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = DeepseekVL2RMSNorm(config.q_lora_rank)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.rope, bias=config.attention_bias)
        self.kv_a_layernorm = DeepseekVL2RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, h, bias=config.attention_bias)
        self.softmax_scale = self.q_head_dim ** -0.5
        p = _rope_params(config)
        if p["rope_type"] == "yarn" and p.get("mscale_all_dim"):
            m = _yarn_mscale(float(p["factor"]), p["mscale_all_dim"])
            self.softmax_scale *= m * m

    @property
    def rope_dim(self) -> int:
        return self.rope

    def forward(self, x, mask, cos, sin, cache: Cache | None):
        b, s, _ = x.shape
        q = self.q_proj(x) if self.config.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, self.num_heads, self.q_head_dim).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.nope, self.rope], dim=-1)
        latent, k_pe = torch.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = k_pe.view(b, s, 1, self.rope).transpose(1, 2)
        q_pe = _apply_rope(_deinterleave(q_pe), cos, sin)
        k_pe = _apply_rope(_deinterleave(k_pe), cos, sin)
        latent = latent.unsqueeze(1)  # [B, 1, L, rank]: one "head" shared by all heads
        if cache is not None:
            k_pe, latent = cache.update(k_pe, latent, self.layer_idx)
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_head_dim, self.kv_lora_rank)
        w_k, w_v = w[:, : self.nope], w[:, self.nope:]
        q_latent = torch.matmul(q_nope, w_k)  # [B, heads, L, rank]
        scores = (torch.matmul(q_pe, k_pe.mT) + torch.matmul(q_latent, latent.mT)) * self.softmax_scale
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q_pe.dtype)
        probs = F.dropout(probs, p=self.config.attention_dropout, training=self.training)
        out = torch.matmul(torch.matmul(probs, latent), w_v.mT)  # [B, heads, L, v_head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.v_head_dim))


class DeepseekVL2MLP(nn.Module):
    def __init__(self, config, intermediate_size: int | None = None):
        super().__init__()
        inter = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeepseekVL2MoEGate(nn.Module):
    """Scores (softmax or sigmoid over float32 logits), top-k by ``topk_method``, then weights normalised
    (``norm_topk_prob``) and scaled by ``routed_scaling_factor``."""

    def __init__(self, config: DeepseekVL2LanguageConfig):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(self.n_experts))

    def _group_masked(self, choice, group_scores):
        c = self.config
        n = choice.shape[0]
        top_groups = torch.topk(group_scores, k=c.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores).scatter_(1, top_groups, 1.0)
        keep = keep.unsqueeze(-1).expand(n, c.n_group, self.n_experts // c.n_group).reshape(n, -1)
        return choice.masked_fill(~keep.bool(), 0.0)

    def forward(self, x):
        c = self.config
        logits = F.linear(x.reshape(-1, x.shape[-1]).to(torch.float32), self.weight.to(torch.float32))
        if c.scoring_func == "softmax":
            scores = logits.softmax(dim=-1, dtype=torch.float32)
        elif c.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            raise NotImplementedError(f"MoE scoring function {c.scoring_func!r}")
        n = scores.shape[0]
        if c.topk_method == "greedy":
            weight, idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        elif c.topk_method == "group_limited_greedy":
            group_scores = scores.view(n, c.n_group, -1).max(dim=-1).values
            weight, idx = torch.topk(self._group_masked(scores, group_scores), k=self.top_k, dim=-1, sorted=False)
        elif c.topk_method == "noaux_tc":
            # the bias steers the choice only; the weights are the unbiased scores
            choice = scores + self.e_score_correction_bias.unsqueeze(0)
            group_scores = choice.view(n, c.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
            idx = torch.topk(self._group_masked(choice, group_scores), k=self.top_k, dim=-1, sorted=False)[1]
            weight = scores.gather(1, idx)
        else:
            raise NotImplementedError(f"MoE top-k method {c.topk_method!r}")
        if self.top_k > 1 and c.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, weight * c.routed_scaling_factor


class DeepseekVL2MoE(nn.Module):
    def __init__(self, config: DeepseekVL2LanguageConfig):
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList([DeepseekVL2MLP(config, config.moe_intermediate_size)
                                      for _ in range(config.n_routed_experts)])
        self.gate = DeepseekVL2MoEGate(config)
        if config.n_shared_experts is not None:
            self.shared_experts = DeepseekVL2MLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        idx, weight = self.gate(hidden_states)
        x = hidden_states.reshape(-1, shape[-1])
        # Tokens sorted by expert: each expert runs once on its contiguous slice (its forward hooks see exactly its
        # routed tokens), then the slices go back to (token, slot) order and are summed with the gate weights.
        order = idx.reshape(-1).argsort()
        counts = torch.bincount(idx.reshape(-1), minlength=len(self.experts)).tolist()
        tokens = x[order // idx.shape[1]]
        outs, start = [], 0
        for e, num in enumerate(counts):
            if num:
                outs.append(self.experts[e](tokens[start: start + num]))
                start += num
        out = torch.cat(outs, dim=0) if outs else tokens.new_empty(0, shape[-1])
        out = out[order.argsort()].view(*idx.shape, -1)
        y = (out.to(weight.dtype) * weight.unsqueeze(-1)).sum(dim=1).to(x.dtype).view(shape)
        if self.config.n_shared_experts is not None:
            y = y + self.shared_experts(hidden_states)
        return y


class DeepseekVL2DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekVL2LanguageConfig, layer_idx: int):
        super().__init__()
        self.self_attn = (DeepseekVL2MLA if config.use_mla else DeepseekVL2MHA)(config, layer_idx)
        self.mlp = DeepseekVL2MoE(config) if config.is_moe_layer(layer_idx) else DeepseekVL2MLP(config)
        self.input_layernorm = DeepseekVL2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekVL2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None,
                **kwargs):
        cos, sin = position_embeddings
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask, cos, sin,
                                           past_key_values)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekVL2TextModel(nn.Module):
    def __init__(self, config: DeepseekVL2LanguageConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DeepseekVL2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DeepseekVL2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None):
        b, s, _ = inputs_embeds.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=inputs_embeds.device)[None].expand(b, s)
        mask = causal_mask(attention_mask, b, s, past, inputs_embeds.dtype, inputs_embeds.device)
        rope_dim = self.layers[0].self_attn.rope_dim
        cos_sin = rotary_cos_sin(self.config, rope_dim, position_ids, inputs_embeds.dtype)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_embeddings=cos_sin, past_key_values=past_key_values)
        return self.norm(h)


def causal_mask(attention_mask, b, s, past, dtype, device) -> torch.Tensor:
    """Additive mask [B, 1, s, past + s]: causal, plus the padding positions of a 2-D ``attention_mask``."""
    total = past + s
    q = torch.arange(past, total, device=device)[:, None]
    k = torch.arange(total, device=device)[None, :]
    blocked = (k > q)[None, None].expand(b, 1, s, total)
    if attention_mask is not None and attention_mask.dim() == 2:
        blocked = blocked | (attention_mask[:, None, None, -total:] == 0)
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)


class DeepseekVL2TextForCausalLM(nn.Module):
    def __init__(self, config: DeepseekVL2LanguageConfig):
        super().__init__()
        self.model = DeepseekVL2TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


# ---- vision ---------------------------------------------------------------------------------------------------
def build_vision_tower(vc) -> nn.Module:
    """SigLIP ViT as DeepSeek-VL2 configures timm's VisionTransformer: no class token, attention-pool head module
    present (its weights are in the checkpoints) but unused, LayerNorm eps 1e-6, tanh-approximated GELU."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=vc.image_size, patch_size=vc.patch_size, embed_dim=vc.width, depth=vc.layers, num_heads=vc.heads,
        mlp_ratio=vc.mlp_ratio, class_token=vc.class_token, global_pool=vc.global_pool, num_classes=0,
        weight_init="skip", norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=partial(nn.GELU, approximate="tanh"))


class DeepseekVL2Projector(nn.Module):
    """``downsample_mlp_gelu``: every ``downsample_ratio`` × ``downsample_ratio`` block of patch features
    (zero-padded to a multiple) is concatenated, then an MLP maps it to the language model's width."""

    def __init__(self, pc):
        super().__init__()
        self.config = pc
        if pc.projector_type == "downsample_mlp_gelu":
            r, inner = pc.downsample_ratio, pc.n_embed * pc.mlp_ratio
            mods = [nn.Linear(pc.input_dim * r * r, inner)]
            for _ in range(1, pc.depth - 1):
                mods += [nn.GELU(), nn.Linear(inner, inner)]
            mods += [nn.GELU(), nn.Linear(inner, pc.n_embed)]
        elif pc.projector_type == "mlp_gelu":
            mods = [nn.Linear(pc.input_dim, pc.n_embed)]
            for _ in range(1, pc.depth):
                mods += [nn.GELU(), nn.Linear(pc.n_embed, pc.n_embed)]
        elif pc.projector_type == "linear":
            mods = [nn.Linear(pc.input_dim, pc.n_embed)]
        else:
            raise NotImplementedError(f"projector type {pc.projector_type!r}")
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        if self.config.projector_type == "downsample_mlp_gelu":
            b, hw, c = x.shape
            side = int(hw ** 0.5)
            r = self.config.downsample_ratio
            pad = (r - side % r) % r
            x = x.reshape(b, side, side, c)
            if pad:
                x = F.pad(x, (0, 0, 0, pad, 0, pad))
            x = F.unfold(x.permute(0, 3, 1, 2), kernel_size=r, stride=r).permute(0, 2, 1)  # [B, hw/r², c·r²]
        return self.layers(x)


# ---- the model ------------------------------------------------------------------------------------------------
class DeepseekVLV2PreTrainedModel(PreTrainedModel):
    config_class = DeepseekVLV2Config
    base_model_prefix = "deepseek_vl_v2"
    main_input_name = "input_ids"
    _no_split_modules = ["DeepseekVL2DecoderLayer"]
    _supports_attention_backend = False

    def _init_weights(self, module):
        from transformers import initialization as init

        std = self.config.language_config.initializer_range
        if isinstance(module, DeepseekVL2MoEGate):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "e_score_correction_bias", None) is not None:
                init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, DeepseekVLV2ForCausalLM):
            init.normal_(module.image_newline, mean=0.0, std=module.config.projector_config.n_embed ** -0.5)
            init.normal_(module.view_seperator, mean=0.0, std=module.config.projector_config.n_embed ** -0.5)
        elif type(module).__name__ == "VisionTransformer":
            init.trunc_normal_(module.pos_embed, std=0.02)
            if getattr(module, "attn_pool", None) is not None:
                init.trunc_normal_(module.attn_pool.latent, std=module.attn_pool.latent.shape[-1] ** -0.5)
        else:
            super()._init_weights(module)


class DeepseekVLV2ForCausalLM(DeepseekVLV2PreTrainedModel, GenerationMixin):
    """DeepSeek-VL2: SigLIP tower + downsampling projector + DeepSeek-V2 MoE language model."""

    def __init__(self, config: DeepseekVLV2Config):
        super().__init__(config)
        if config.tile_tag != "2D":
            raise NotImplementedError(f"tile_tag {config.tile_tag!r} (the published checkpoints use '2D')")
        self.vision = build_vision_tower(config.vision_config)
        self.projector = DeepseekVL2Projector(config.projector_config)
        n = config.projector_config.n_embed
        self.image_newline = nn.Parameter(torch.zeros(n))
        self.view_seperator = nn.Parameter(torch.zeros(n))  # sic: the checkpoints' name
        self.language = DeepseekVL2TextForCausalLM(config.language_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language.model.embed_tokens

    def set_input_embeddings(self, value):
        self.language.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.language.lm_head

    def set_output_embeddings(self, value):
        self.language.lm_head = value

    # -- images ---------------------------------------------------------------------------------------------------
    def image_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """Projected features [tiles, h·w, D] of image tiles [tiles, 3, H, W]."""
        return self.projector(self.vision.forward_features(tiles.to(self.image_newline.dtype)))

    def _layout(self, feats: torch.Tensor, n_wide: int, n_high: int) -> torch.Tensor:
        """One image's token sequence: global view rows (each + newline), the view separator, then the local tiles
        stitched into one grid whose rows each end in a newline (``global_view_pos`` "head"; else local first)."""
        _, hw, d = feats.shape
        side = int(hw ** 0.5)
        nl = self.image_newline
        glob = torch.cat([feats[0].view(side, side, d), nl.expand(side, 1, d)], dim=1).reshape(-1, d)
        local = feats[1: 1 + n_wide * n_high].view(n_high, n_wide, side, side, d)
        local = local.permute(0, 2, 1, 3, 4).reshape(n_high * side, n_wide * side, d)
        local = torch.cat([local, nl.expand(n_high * side, 1, d)], dim=1).reshape(-1, d)
        sep = self.view_seperator[None]
        parts = [glob, sep, local] if self.config.global_view_pos == "head" else [local, sep, glob]
        return torch.cat(parts, dim=0)

    def prepare_inputs_embeds(self, input_ids, images=None, images_seq_mask=None, images_spatial_crop=None):
        """Token embeddings with the image positions (``images_seq_mask``) replaced by the image features.

        ``images`` [B, max_tiles, 3, H, W] (global view then local tiles of each image, zero-padded),
        ``images_spatial_crop`` [B, max_images, 2] (tiles wide, tiles high; zeros after the last image)."""
        embeds = self.get_input_embeddings()(input_ids)
        if images is None or images_spatial_crop is None or int(images_spatial_crop.sum()) == 0:
            return embeds
        if images_seq_mask is None:
            if self.config.image_token_id is None:
                raise ValueError("images_seq_mask is required (the config names no image_token_id)")
            images_seq_mask = input_ids == self.config.image_token_id
        crops = images_spatial_crop.tolist()
        per_row = [[(w, h) for w, h in row if w and h] for row in crops]
        tiles = [images[b, : sum(1 + w * h for w, h in row)] for b, row in enumerate(per_row)]
        feats = self.image_features(torch.cat(tiles, dim=0)).to(embeds.dtype)
        out, t = [], 0
        for b, row in enumerate(per_row):
            seqs = []
            for w, h in row:
                seqs.append(self._layout(feats[t: t + 1 + w * h], w, h))
                t += 1 + w * h
            e = embeds[b]
            if seqs:
                seq = torch.cat(seqs, dim=0)
                slots = images_seq_mask[b].bool()
                if int(slots.sum()) != seq.shape[0]:
                    raise ValueError(f"{int(slots.sum())} image positions for {seq.shape[0]} image features")
                e = e.masked_scatter(slots.unsqueeze(-1), seq)
            out.append(e)
        return torch.stack(out)

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                images=None, images_seq_mask=None, images_spatial_crop=None, labels=None, use_cache=None,
                logits_to_keep=0, past_key_values=None, **kwargs):
        """``cache`` (transformers 5.24's name; ``past_key_values`` is the older one): a ``Cache`` whose layer i
        holds (rotary keys, latents) for MLA or (keys, values) for MHA."""
        if inputs_embeds is None:
            inputs_embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = cache is not None
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden = self.language.model(inputs_embeds, attention_mask, position_ids, cache if use_cache else None)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.language.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, is_first_iteration=False, images=None,
                                      images_seq_mask=None, images_spatial_crop=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or cache is None or cache.get_seq_length() == 0:
            # the image features enter with the prompt; later steps only extend the cache
            inputs.update(images=images, images_seq_mask=images_seq_mask, images_spatial_crop=images_spatial_crop)
        return inputs
