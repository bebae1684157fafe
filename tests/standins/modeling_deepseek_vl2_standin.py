"""A tiny stand-in for DeepSeek-VL2, shipped with a model directory as remote code (``auto_map``).

Written for MoPEQ's tests from a reading of DeepSeek-VL2's public modeling code (``deepseek_vl2/models/
modeling_deepseek.py``); not a copy of it. What is reproduced exactly is the language model's MoE: DeepSeekMoE with
fine-grained routed experts held as an ``nn.ModuleList`` of ``DeepseekV2MLP`` (gate_proj / up_proj / down_proj
``nn.Linear``), shared experts (one MLP of ``n_shared_experts × moe_intermediate_size``), a dense MLP in the first
``first_k_dense_replace`` layers, and ``MoEGate`` routing (softmax or sigmoid scores; greedy, group-limited greedy or
noaux_tc top-k; ``norm_topk_prob`` and ``routed_scaling_factor`` as in the VL2 code), including the eval-mode
dispatch ``moe_infer`` that runs under ``@torch.no_grad()``. Module paths follow VL2: ``vision``, ``projector``,
``language.model.layers.N.mlp.experts.E.*``.

Simplified (stand-ins, said so): attention is plain multi-head attention with RoPE (VL2-tiny's ``use_mla: false``
setting, no KV cache); the SigLIP tower is a patch-embedding convolution and the projector a Linear-GELU-Linear MLP;
the image features replace the embeddings of the ``<image>`` placeholder tokens, one token per patch (no dynamic
tiling).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class DeepseekVL2StandInConfig(PretrainedConfig):
    model_type = "mopeq_deepseek_vl2_standin"

    def __init__(self, vocab_size=4100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                 num_hidden_layers=3, num_attention_heads=4, n_routed_experts=16, n_shared_experts=2,
                 num_experts_per_tok=4, first_k_dense_replace=1, moe_layer_freq=1, topk_method="greedy",
                 scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1,
                 rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512, initializer_range=0.1,
                 image_token_id=4096, patch_size=8, image_size=32, vision_hidden_size=24, hidden_act="silu",
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_layer_freq = moe_layer_freq
        self.topk_method = topk_method
        self.scoring_func = scoring_func
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.n_group = n_group
        self.topk_group = topk_group
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.image_token_id = image_token_id
        self.patch_size = patch_size
        self.image_size = image_size
        self.vision_hidden_size = vision_hidden_size
        self.hidden_act = hidden_act
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rope(x, positions, theta):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions.float()[:, :, None] * inv[None, None, :]
    emb = torch.cat((ang, ang), dim=-1)[:, None]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, self.n = config.hidden_size, config.num_attention_heads
        self.hd = h // self.n
        self.theta = config.rope_theta
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x, positions, mask):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.n, self.hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _rope(q, positions, self.theta), _rope(k, positions, self.theta)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd) + mask
        out = att.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DeepseekV2MLP(nn.Module):
    def __init__(self, config, intermediate_size=None):
        super().__init__()
        inter = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """VL2's router: scores, top-k selection by ``topk_method``, weights normalised and scaled as in VL2."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = config.scoring_func
        self.topk_method = config.topk_method
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.n_routed_experts, config.hidden_size))
        if self.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(self.n_routed_experts))

    def _group_mask(self, scores, group_scores):
        n = scores.shape[0]
        idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, idx, 1)
        return mask.unsqueeze(-1).expand(n, self.n_group, self.n_routed_experts // self.n_group).reshape(n, -1)

    def forward(self, hidden_states):
        h = hidden_states.shape[-1]
        logits = F.linear(hidden_states.reshape(-1, h).float(), self.weight.float())
        if self.scoring_func == "softmax":
            scores = logits.softmax(dim=-1, dtype=torch.float32)
        elif self.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            raise NotImplementedError(self.scoring_func)
        n = scores.shape[0]
        if self.topk_method == "greedy":
            topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        elif self.topk_method == "group_limited_greedy":
            group_scores = scores.view(n, self.n_group, -1).max(dim=-1).values
            masked = scores.masked_fill(~self._group_mask(scores, group_scores).bool(), 0.0)
            topk_weight, topk_idx = torch.topk(masked, k=self.top_k, dim=-1, sorted=False)
        elif self.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.unsqueeze(0)
            group_scores = choice.view(n, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
            masked = choice.masked_fill(~self._group_mask(scores, group_scores).bool(), 0.0)
            topk_idx = torch.topk(masked, k=self.top_k, dim=-1, sorted=False)[1]
            topk_weight = scores.gather(1, topk_idx)
        else:
            raise NotImplementedError(self.topk_method)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20) * self.routed_scaling_factor
        else:
            topk_weight = topk_weight * self.routed_scaling_factor
        return topk_idx, topk_weight, None


class DeepseekV2MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_experts_per_tok = config.num_experts_per_tok
        self.experts = nn.ModuleList([DeepseekV2MLP(config, config.moe_intermediate_size)
                                      for _ in range(config.n_routed_experts)])
        self.gate = MoEGate(config)
        if config.n_shared_experts is not None:
            self.shared_experts = DeepseekV2MLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states):
        identity, shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        x = hidden_states.view(-1, shape[-1])
        if self.training:
            # training path of the VL2 code: every (token, slot) pair through its expert, then the weighted sum
            x = x.repeat_interleave(self.num_experts_per_tok, dim=0)
            flat = topk_idx.view(-1)
            y = torch.empty_like(x)
            for i, expert in enumerate(self.experts):
                y[flat == i] = expert(x[flat == i])
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1).to(x.dtype).view(*shape)
        else:
            y = self.moe_infer(x, topk_idx, topk_weight).view(*shape)
        if self.config.n_shared_experts is not None:
            y = y + self.shared_experts(identity)
        return y

    @torch.no_grad()
    def moe_infer(self, x, topk_ids, topk_weight):
        # Tokens sorted by expert, each expert run once on its contiguous slice, results scattered back and
        # weighted; as VL2's eval path (single device), under no_grad like it.
        counts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts))).scatter_(1, topk_ids, 1).sum(dim=0)
        order = topk_ids.view(-1).argsort()
        tokens = x[order // topk_ids.shape[1]]
        outputs, start = [], 0
        for i, num in enumerate(counts.tolist()):
            if num == 0:
                continue
            outputs.append(self.experts[i](tokens[start: start + num]))
            start += num
        outs = torch.cat(outputs, dim=0) if outputs else tokens.new_empty(0)
        unsorted = torch.empty_like(outs)
        unsorted[order] = outs
        return (unsorted.view(*topk_ids.shape, -1).type(topk_weight.dtype).mul_(topk_weight.unsqueeze(-1))
                .sum(dim=1).type(unsorted.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = Attention(config)
        moe = (config.n_routed_experts is not None and layer_idx >= config.first_k_dense_replace
               and layer_idx % config.moe_layer_freq == 0)
        self.mlp = DeepseekV2MoE(config) if moe else DeepseekV2MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, mask):
        x = x + self.self_attn(self.input_layernorm(x), positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV2Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds, attention_mask):
        b, t, _ = inputs_embeds.shape
        dtype = inputs_embeds.dtype
        causal = torch.full((t, t), torch.finfo(dtype).min, device=inputs_embeds.device).triu(1)
        mask = causal[None, None].expand(b, 1, t, t)
        if attention_mask is not None:
            mask = mask + (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) if attention_mask is not None else \
            torch.arange(t, device=inputs_embeds.device)[None].expand(b, t)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, positions, mask.to(dtype))
        return self.norm(x)


class DeepseekV2ForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.model = DeepseekV2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class VisionStub(nn.Module):
    """Stands in for the SigLIP tower: one patch-embedding convolution (``patch_size`` × ``patch_size``)."""

    def __init__(self, config):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, config.vision_hidden_size, config.patch_size, config.patch_size)
        self.norm = nn.LayerNorm(config.vision_hidden_size)

    def forward(self, pixel_values):
        return self.norm(self.patch_embed(pixel_values).flatten(2).transpose(1, 2))


class MlpProjector(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(config.vision_hidden_size, config.hidden_size), nn.GELU(),
                                    nn.Linear(config.hidden_size, config.hidden_size))

    def forward(self, x):
        return self.layers(x)


class DeepseekVL2StandInForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DeepseekVL2StandInConfig
    base_model_prefix = "mopeq_standin"
    main_input_name = "input_ids"

    def __init__(self, config):
        super().__init__(config)
        self.vision = VisionStub(config)
        self.projector = MlpProjector(config)
        self.language = DeepseekV2ForCausalLM(config)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, MoEGate)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.language.model.embed_tokens

    def get_output_embeddings(self):
        return self.language.lm_head

    def prepare_inputs_embeds(self, input_ids, pixel_values=None):
        embeds = self.language.model.embed_tokens(input_ids)
        if pixel_values is not None:
            feats = self.projector(self.vision(pixel_values.to(embeds.dtype)))  # [n_images, patches, hidden]
            slots = input_ids == self.config.image_token_id
            if int(slots.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"{int(slots.sum())} <image> tokens for {feats.shape[0] * feats.shape[1]} "
                                 "image features")
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
        return embeds

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, labels=None, **kwargs):
        embeds = self.prepare_inputs_embeds(input_ids, pixel_values)
        hidden = self.language.model(embeds, attention_mask)
        logits = self.language.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, pixel_values=None, **kwargs):
        # no KV cache: every step reruns the whole sequence (the image placeholders stay in input_ids)
        if attention_mask is not None and attention_mask.shape[-1] != input_ids.shape[-1]:
            attention_mask = None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
