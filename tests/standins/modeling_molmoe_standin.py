"""A tiny stand-in for MolmoE-1B, shipped with a model directory as remote code (``auto_map``).

Written for MoPEQ's tests from a reading of MolmoE's public modeling code (``modeling_molmoe.py``: ``MolmoeBlock``,
``MolmoeMlpExpert``, ``MolmoeMLP``); not a copy of it. What is reproduced exactly is the language model's OLMoE-style
MoE: per block an ``mlp`` module holding ``ff_norm`` (RMS norm applied inside the MoE module), a router
``gate = nn.Linear(d_model, num_experts, bias=False)`` and ``experts = nn.ModuleList`` of SwiGLU ``MolmoeMLP``
(gate_proj / up_proj / down_proj ``nn.Linear``, hidden size ``mlp_hidden_size // 2``); routing is a float32 softmax,
top-k without renormalisation (OLMoE's ``norm_topk_prob = False``), weights cast back to the hidden dtype, and each
expert's outputs added with ``index_add_`` (64 experts, top-8 in MolmoE-1B; scaled down here). Attention follows the
block layout (fused ``att_proj``, ``q_norm`` / ``k_norm``, ``attn_out``, ``attn_norm``); embeddings are
``embedding`` + ``new_embedding`` as in Molmo.

Simplified (stand-ins, said so): no KV cache; the CLIP tower is one patch-embedding convolution, the attention
pooling is left out and the projector is Molmo's SwiGLU ``w1/w2/w3`` MLP; image features are added to the
embeddings of the ``<im_patch>`` tokens (Molmo adds them at its ``image_input_idx`` positions), one token per patch.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class MolmoeStandInConfig(PretrainedConfig):
    model_type = "mopeq_molmoe_standin"

    def __init__(self, vocab_size=4096, additional_vocab_size=8, d_model=32, n_heads=4, n_kv_heads=4, n_layers=2,
                 mlp_hidden_size=32, moe_num_experts=16, moe_top_k=4, layer_norm_eps=1e-5, rope_theta=10000.0,
                 initializer_range=0.1, image_patch_id=4096, patch_size=8, image_size=32,
                 vision_hidden_size=24, max_position_embeddings=512, **kwargs):
        self.vocab_size = vocab_size
        self.additional_vocab_size = additional_vocab_size
        self.d_model = d_model
        self.hidden_size = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.num_hidden_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.moe_num_experts = moe_num_experts
        self.moe_top_k = moe_top_k
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.image_patch_id = image_patch_id
        self.patch_size = patch_size
        self.image_size = image_size
        self.vision_hidden_size = vision_hidden_size
        self.max_position_embeddings = max_position_embeddings
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class RMSLayerNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return self.weight * x


class Embedding(nn.Module):
    def __init__(self, num_embeddings, num_new_embeddings, features):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(num_embeddings, features))
        self.new_embedding = nn.Parameter(torch.zeros(num_new_embeddings, features))

    def forward(self, x):
        return F.embedding(x, torch.cat([self.embedding, self.new_embedding], dim=0))


def _rope(x, theta):
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat((ang, ang), dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return (x * emb.cos().to(x.dtype) + torch.cat((-x2, x1), dim=-1) * emb.sin().to(x.dtype)).to(x.dtype)


class MolmoeAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        head = config.d_model // config.n_heads
        self.fused_dims = (config.d_model, config.n_kv_heads * head, config.n_kv_heads * head)
        self.att_proj = nn.Linear(config.d_model, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.attn_norm = RMSLayerNorm(config.d_model, config.layer_norm_eps)
        self.q_norm = RMSLayerNorm(config.d_model, config.layer_norm_eps)
        self.k_norm = RMSLayerNorm(config.n_kv_heads * head, config.layer_norm_eps)

    def forward(self, x, mask):
        b, t, c = x.shape
        q, k, v = self.att_proj(self.attn_norm(x)).split(self.fused_dims, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        nh, nkv = self.config.n_heads, self.config.n_kv_heads
        q = q.view(b, t, nh, c // nh).transpose(1, 2)
        k = k.view(b, t, nkv, c // nh).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
        v = v.view(b, t, nkv, c // nh).transpose(1, 2).repeat_interleave(nh // nkv, dim=1)
        q, k = _rope(q, self.config.rope_theta), _rope(k, self.config.rope_theta)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(c // nh) + mask
        out = att.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
        return self.attn_out(out.transpose(1, 2).reshape(b, t, c))


class MolmoeMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.mlp_hidden_size // 2
        self.gate_proj = nn.Linear(config.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.d_model, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MolmoeMlpExpert(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.moe_num_experts
        self.top_k = config.moe_top_k
        self.gate = nn.Linear(config.d_model, self.num_experts, bias=False)
        self.experts = nn.ModuleList([MolmoeMLP(config) for _ in range(self.num_experts)])
        self.ff_norm = RMSLayerNorm(config.d_model, config.layer_norm_eps)

    def forward(self, hidden_states):
        hidden_states = self.ff_norm(hidden_states)
        b, t, d = hidden_states.shape
        hidden_states = hidden_states.view(-1, d)
        router_logits = self.gate(hidden_states)
        weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights = weights.to(hidden_states.dtype)
        out = torch.zeros((b * t, d), dtype=hidden_states.dtype, device=hidden_states.device)
        mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            slot, tok = torch.where(mask[e])
            y = self.experts[e](hidden_states[None, tok].reshape(-1, d)) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(hidden_states.dtype))
        return out.reshape(b, t, d), router_logits


class MolmoeBlock(nn.Module):
    def __init__(self, layer_id, config):
        super().__init__()
        self.layer_id = layer_id
        self.attn = MolmoeAttention(config)
        self.mlp = MolmoeMlpExpert(config)

    def forward(self, x, mask):
        x = x + self.attn(x, mask)
        y, _ = self.mlp(x)
        return x + y


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = Embedding(config.vocab_size, config.additional_vocab_size, config.d_model)
        self.blocks = nn.ModuleList([MolmoeBlock(i, config) for i in range(config.n_layers)])
        self.ln_f = RMSLayerNorm(config.d_model, config.layer_norm_eps)
        self.ff_out = nn.Linear(config.d_model, config.vocab_size + config.additional_vocab_size, bias=False)


class ImageProjectorMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.vision_hidden_size, config.d_model, bias=False)
        self.w2 = nn.Linear(config.d_model, config.d_model, bias=False)
        self.w3 = nn.Linear(config.vision_hidden_size, config.d_model, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class VisionBackbone(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.image_vit = nn.Conv2d(3, config.vision_hidden_size, config.patch_size, config.patch_size)
        self.image_projector = ImageProjectorMLP(config)

    def forward(self, pixel_values):
        return self.image_projector(self.image_vit(pixel_values).flatten(2).transpose(1, 2))


class MolmoeModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transformer = Transformer(config)
        self.vision_backbone = VisionBackbone(config)


class MolmoeStandInForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MolmoeStandInConfig
    base_model_prefix = "mopeq_standin"
    main_input_name = "input_ids"

    def __init__(self, config):
        super().__init__(config)
        self.model = MolmoeModel(config)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Embedding):
            nn.init.normal_(module.embedding, std=std)
            nn.init.normal_(module.new_embedding, std=std)
        elif isinstance(module, RMSLayerNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, labels=None, **kwargs):
        tr = self.model.transformer
        x = tr.wte(input_ids)
        if pixel_values is not None:
            feats = self.model.vision_backbone(pixel_values.to(x.dtype))
            slots = input_ids == self.config.image_patch_id
            if int(slots.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"{int(slots.sum())} <im_patch> tokens for {feats.shape[0] * feats.shape[1]} "
                                 "image features")
            add = torch.zeros_like(x).masked_scatter(slots.unsqueeze(-1), feats.reshape(-1, x.shape[-1]).to(x.dtype))
            x = x + add
        t = x.shape[1]
        mask = torch.full((t, t), torch.finfo(x.dtype).min, device=x.device).triu(1)[None, None]
        if attention_mask is not None:
            mask = mask + (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for block in tr.blocks:
            x = block(x, mask.to(x.dtype))
        logits = tr.ff_out(tr.ln_f(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, pixel_values=None, **kwargs):
        if attention_mask is not None and attention_mask.shape[-1] != input_ids.shape[-1]:
            attention_mask = None
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
