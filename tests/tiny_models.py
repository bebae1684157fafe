"""Tiny random MoE models of many transformers-5 architectures, built from configs and saved like the Hub does.

Each builder writes a model directory (``save_pretrained``: the per-expert Hub checkpoint layout wherever
transformers converts to it on save) with the tokenizer of the shipped model (``models/mopeq-tiny-moe``), whose
length sets ``vocab_size``. Dimensions are chosen so that group sizes 16 and 32 divide every expert projection.

``ARCHS`` describes what discovery must find in each model (MoE layers, expert count, top-k, intermediate size,
shared expert, transposed/biased experts). ``build_standin`` builds a DeepSeek-VL2-style language model whose
routed experts are an ``nn.ModuleList`` of ``nn.Linear`` MLPs (as remote code holds them), registered with the
transformers Auto classes under its own ``model_type`` so that the whole pipeline and ``load_quantized`` run on it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "models" / "mopeq-tiny-moe"
HIDDEN = 32
MOE_FF = 32  # routed experts' intermediate size
DENSE_FF = 64  # dense MLPs / shared experts
INIT_STD = 0.1  # larger than the usual 0.02 so that routing is decisive (no near-ties between experts)


def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _common(vocab: int, **over) -> dict:
    d = {"vocab_size": vocab, "hidden_size": HIDDEN, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 128, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
         "pad_token_id": 0, "initializer_range": INIT_STD}
    d.update(over)
    return d


def _mla(vocab: int) -> dict:
    """DeepSeek multi-head latent attention at toy size (MLA has no grouped KV heads)."""
    return _common(vocab, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                   v_head_dim=8, head_dim=8)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    make_config: Callable[[int], transformers.PreTrainedConfig]
    moe_layers: tuple[int, ...]  # decoder layers with routed experts (the others are dense)
    num_layers: int
    num_experts: int
    top_k: int
    shared: str | None = None  # attribute of the MoE block holding the shared expert(s)
    transposed: bool = False  # gpt-oss: experts stored [in, out]
    bias: bool = False  # gpt-oss: expert biases
    gated: bool = True  # False: experts hold up_proj only (no gate), e.g. Nemotron-H
    dtype: torch.dtype = torch.float32  # checkpoint dtype (Hub MoE checkpoints are mostly bfloat16)
    hub_key: str = ""  # a key the saved checkpoint must contain (Hub layout)
    moe_ff: int = MOE_FF


ARCHS: dict[str, ArchSpec] = {s.name: s for s in [
    ArchSpec("mixtral", lambda v: transformers.MixtralConfig(
        **_common(v), intermediate_size=MOE_FF, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
        moe_layers=(0, 1), num_layers=2, num_experts=4, top_k=2,
        hub_key="model.layers.1.block_sparse_moe.experts.3.w2.weight"),
    ArchSpec("qwen2_moe", lambda v: transformers.Qwen2MoeConfig(
        **_common(v), intermediate_size=DENSE_FF, moe_intermediate_size=MOE_FF,
        shared_expert_intermediate_size=DENSE_FF, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
        mlp_only_layers=[1]),
        moe_layers=(0, 2), num_layers=3, num_experts=4, top_k=2, shared="shared_expert",
        hub_key="model.layers.2.mlp.experts.3.gate_proj.weight"),
    ArchSpec("qwen3_moe", lambda v: transformers.Qwen3MoeConfig(
        **_common(v, head_dim=8), intermediate_size=DENSE_FF, moe_intermediate_size=MOE_FF,
        num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[0]),
        moe_layers=(1, 2), num_layers=3, num_experts=6, top_k=2, dtype=torch.bfloat16,
        hub_key="model.layers.1.mlp.experts.5.up_proj.weight"),
    ArchSpec("olmoe", lambda v: transformers.OlmoeConfig(
        **_common(v), intermediate_size=MOE_FF, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2),
        moe_layers=(0, 1), num_layers=2, num_experts=8, top_k=2,
        hub_key="model.layers.0.mlp.experts.7.down_proj.weight"),
    ArchSpec("deepseek_v2", lambda v: transformers.DeepseekV2Config(
        **_mla(v), q_lora_rank=None, intermediate_size=DENSE_FF, moe_intermediate_size=MOE_FF,
        num_hidden_layers=3, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, topk_method="greedy"),
        moe_layers=(1, 2), num_layers=3, num_experts=4, top_k=2, shared="shared_experts",
        hub_key="model.layers.1.mlp.experts.0.gate_proj.weight"),
    ArchSpec("deepseek_v3", lambda v: transformers.DeepseekV3Config(
        **_mla(v), q_lora_rank=24, intermediate_size=DENSE_FF, moe_intermediate_size=MOE_FF,
        num_hidden_layers=3, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1),
        moe_layers=(1, 2), num_layers=3, num_experts=8, top_k=2, shared="shared_experts", dtype=torch.bfloat16,
        hub_key="model.layers.2.mlp.experts.7.down_proj.weight"),
    ArchSpec("gpt_oss", lambda v: transformers.GptOssConfig(
        **_common(v, head_dim=8), intermediate_size=MOE_FF, num_hidden_layers=2, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=16,
        rope_parameters={"rope_type": "yarn", "factor": 2.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 64, "rope_theta": 150000.0}),
        moe_layers=(0, 1), num_layers=2, num_experts=4, top_k=2, transposed=True, bias=True,
        hub_key="model.layers.1.mlp.experts.gate_up_proj_bias"),
    ArchSpec("qwen3_next", lambda v: transformers.Qwen3NextConfig(
        **_common(v, head_dim=8), intermediate_size=DENSE_FF, moe_intermediate_size=MOE_FF,
        shared_expert_intermediate_size=MOE_FF, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention"]),
        moe_layers=(0, 1), num_layers=2, num_experts=4, top_k=2, shared="shared_expert",
        hub_key="model.layers.0.mlp.experts.3.gate_proj.weight"),
    ArchSpec("ernie4_5_moe", lambda v: transformers.Ernie4_5_MoeConfig(
        **_common(v), intermediate_size=DENSE_FF, moe_intermediate_size=MOE_FF, num_hidden_layers=3,
        moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2),
        moe_layers=(1, 2), num_layers=3, num_experts=4, top_k=2, shared="shared_experts",
        hub_key="model.layers.1.mlp.experts.0.down_proj.weight"),
    ArchSpec("glm4_moe", lambda v: transformers.Glm4MoeConfig(
        **_common(v), intermediate_size=DENSE_FF, moe_intermediate_size=MOE_FF, num_hidden_layers=2,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1),
        moe_layers=(1,), num_layers=2, num_experts=4, top_k=2, shared="shared_experts",
        hub_key="model.layers.1.mlp.experts.3.up_proj.weight"),
    ArchSpec("phimoe", lambda v: transformers.PhimoeConfig(
        **_common(v), intermediate_size=MOE_FF, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
        moe_layers=(0, 1), num_layers=2, num_experts=4, top_k=2,
        hub_key="model.layers.0.block_sparse_moe.experts.2.w3.weight"),
    ArchSpec("granitemoe", lambda v: transformers.GraniteMoeConfig(  # tied embeddings, as Granite ships
        **_common(v, tie_word_embeddings=True), intermediate_size=MOE_FF, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
        moe_layers=(0, 1), num_layers=2, num_experts=4, top_k=2,
        hub_key="model.layers.0.block_sparse_moe.input_linear.weight"),
    ArchSpec("nemotron_h", lambda v: transformers.NemotronHConfig(  # non-gated experts (up_proj only, relu²)
        **_common(v, head_dim=8), intermediate_size=DENSE_FF, moe_intermediate_size=MOE_FF,
        moe_shared_expert_intermediate_size=MOE_FF, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, layers_block_type=["full_attention", "moe", "mlp", "moe"],
        use_mamba_kernels=False),
        moe_layers=(1, 3), num_layers=4, num_experts=4, top_k=2, shared="shared_experts", gated=False,
        hub_key="backbone.layers.1.mixer.experts.3.up_proj.weight"),
]}


def _save(model, tok, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_model(name: str, root: Path, *, seed: int = 0) -> Path:
    """Build ARCHS[name] at random (seeded), save it under ``root/name`` and return that directory."""
    spec = ARCHS[name]
    tok = tokenizer()
    config = spec.make_config(len(tok))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for mod in model.modules():
            if spec.bias and getattr(mod, "has_bias", False):
                # transformers initialises expert biases to zero; random ones make the bias path observable
                for p in ("gate_up_proj_bias", "down_proj_bias"):
                    getattr(mod, p).normal_(0.0, INIT_STD)
    if spec.dtype != torch.float32:
        model = model.to(spec.dtype)
        model.config.dtype = spec.dtype
    return _save(model, tok, root / name)


def build_dense(root: Path) -> Path:
    """A tiny Llama: a model with no MoE layer."""
    tok = tokenizer()
    cfg = transformers.LlamaConfig(**_common(len(tok)), intermediate_size=DENSE_FF, num_hidden_layers=2)
    torch.manual_seed(0)
    return _save(transformers.AutoModelForCausalLM.from_config(cfg), tok, root / "llama-dense")


# ---- ModuleList stand-in (DeepSeek-VL2's language model, as its remote code holds it) -------------------------
class StandInMLP(nn.Module):
    """DeepseekV2MLP of the remote code: gate_proj / up_proj / down_proj Linears, SiLU-gated."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class StandInMoEGate(nn.Module):
    """The remote code's MoEGate: softmax scores, greedy top-k, returns (topk_idx, topk_weight, aux_loss)."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_routed_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=config.initializer_range)

    def forward(self, hidden_states):
        h = hidden_states.shape[-1]
        logits = F.linear(hidden_states.reshape(-1, h).float(), self.weight.float())
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            topk_weight = topk_weight * self.routed_scaling_factor
        return topk_idx, topk_weight, None


class StandInMoE(nn.Module):
    """DeepSeekMoE block of the remote code: routed experts in an nn.ModuleList plus shared experts."""

    def __init__(self, config):
        super().__init__()
        self.experts = nn.ModuleList([StandInMLP(config.hidden_size, config.moe_intermediate_size)
                                      for _ in range(config.n_routed_experts)])
        self.gate = StandInMoEGate(config)
        self.shared_experts = StandInMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, hidden_states):
        identity, shape = hidden_states, hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        x = hidden_states.reshape(-1, shape[-1])
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):  # moe_infer: only the experts that got tokens run
            token, pos = torch.where(topk_idx == e)
            if token.numel():
                y.index_add_(0, token, expert(x[token]) * topk_weight[token, pos, None].to(x.dtype))
        return y.view(shape) + self.shared_experts(identity)


class StandInConfig(transformers.DeepseekV2Config):
    model_type = "mopeq_standin_deepseek_vl2"


class StandInForCausalLM(transformers.DeepseekV2ForCausalLM):
    config_class = StandInConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp = StandInMoE(config)
        self.post_init()


def register_standin() -> None:
    transformers.AutoConfig.register(StandInConfig.model_type, StandInConfig, exist_ok=True)
    transformers.AutoModelForCausalLM.register(StandInConfig, StandInForCausalLM, exist_ok=True)


STANDIN = ArchSpec("standin_deepseek_vl2", lambda v: None, moe_layers=(1, 2), num_layers=3, num_experts=4,
                   top_k=2, shared="shared_experts", hub_key="model.layers.1.mlp.experts.3.gate_proj.weight")


def copy_fused_to_standin(fused, standin) -> None:
    """Copy a DeepseekV2ForCausalLM's weights into the stand-in (fused experts split into per-expert Linears)."""
    src = fused.state_dict()
    dst = standin.state_dict()
    with torch.no_grad():
        for k, v in dst.items():
            if k in src and src[k].shape == v.shape:
                v.copy_(src[k])
        for i, layer in enumerate(standin.model.layers):
            if not isinstance(layer.mlp, StandInMoE):
                continue
            f = fused.model.layers[i].mlp
            layer.mlp.gate.weight.copy_(f.gate.weight)
            for e, expert in enumerate(layer.mlp.experts):
                g, u = f.experts.gate_up_proj[e].chunk(2, dim=0)
                expert.gate_proj.weight.copy_(g)
                expert.up_proj.weight.copy_(u)
                expert.down_proj.weight.copy_(f.experts.down_proj[e])


def build_standin(root: Path) -> tuple[Path, Path]:
    """(stand-in dir, dir of the equivalent fused DeepseekV2 model). Asserts both compute the same logits."""
    register_standin()
    tok = tokenizer()
    cfg = ARCHS["deepseek_v2"].make_config(len(tok))
    torch.manual_seed(0)
    fused = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager",
                                                          experts_implementation="eager").eval()
    scfg = StandInConfig(**{k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures")})
    standin = StandInForCausalLM(scfg).eval()
    copy_fused_to_standin(fused, standin)
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = fused(input_ids=ids).logits, standin(input_ids=ids).logits
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), float((a - b).abs().max())
    return _save(standin, tok, root / STANDIN.name), _save(fused, tok, root / "standin_reference_deepseek_v2")


def build_remote_code_standin(root: Path) -> Path:
    """The stand-in as a remote-code repo: its modeling code in ``modeling_standin.py`` named by ``auto_map``
    (what DeepSeek-VL2 / MolmoE checkpoints look like); loads only with ``trust_remote_code=True``."""
    import inspect

    src_dir, _ = build_standin(root / "remote-src")
    out = root / "remote-code-standin"
    shutil.copytree(src_dir, out)
    code = "\n\n".join(inspect.getsource(c) for c in (StandInMLP, StandInMoEGate, StandInMoE, StandInConfig,
                                                        StandInForCausalLM))
    code = code.replace(StandInConfig.model_type, "mopeq_remote_standin")
    header = "import torch\nimport transformers\nfrom torch import nn\nfrom torch.nn import functional as F\n\n\n"
    (out / "modeling_standin.py").write_text(header + code)
    cfg = config_json(out)
    cfg["model_type"] = "mopeq_remote_standin"
    cfg["architectures"] = ["StandInForCausalLM"]
    cfg["auto_map"] = {"AutoConfig": "modeling_standin.StandInConfig",
                       "AutoModelForCausalLM": "modeling_standin.StandInForCausalLM"}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def write_hf_cache(hf_home: Path, repo_id: str, model_dir: Path, sha: str = "0123456789abcdef" * 2 + "01234567"
                   ) -> Path:
    """Pre-fill an HF cache (huggingface_hub's layout: blobs, snapshots/<sha> symlinks, refs/main) with a model."""
    import hashlib
    import os

    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(model_dir.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return snap


def config_json(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())
