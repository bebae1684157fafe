"""The small trained MoEs that ship in ``models/mopeq-tiny-moe`` and ``models/mopeq-tiny-olmoe`` (made by
``scripts/train_tiny_moe.py``).

Checks, for each, that it loads with plain transformers, that its checkpoint is small and in the Hub's per-expert layout,
that it has actually learned something (perplexity on held-out text far below the same architecture's random
init) and that routing on held-out text reaches every expert of every layer.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "mopeq-tiny-moe"
EVAL_FILE = REPO / "data" / "eval.txt"
MAX_BYTES = 15 * 1024 * 1024
EVAL_TOKENS = 8192
SEQ_LEN = 256
SEED = 0  # the seed scripts/train_tiny_moe.py initialises the model with

PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    m = transformers.AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def eval_ids(tokenizer):
    text = EVAL_FILE.read_text(encoding="utf-8")
    ids = tokenizer(text)["input_ids"][:EVAL_TOKENS]
    assert len(ids) == EVAL_TOKENS, "data/eval.txt is too short"
    return torch.tensor(ids, dtype=torch.long)


def perplexity(model, ids: torch.Tensor, seq_len: int = SEQ_LEN, batch: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq_len`` tokens."""
    n = (ids.numel() // seq_len) * seq_len
    windows = ids[:n].view(-1, seq_len)
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in windows.split(batch):
            logits = model(input_ids=b).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll -= logp.gather(-1, b[:, 1:, None]).sum().item()
            count += b[:, 1:].numel()
    return math.exp(nll / count)


def test_files_present():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md"):
        assert (MODEL_DIR / name).is_file(), name
    readme = (MODEL_DIR / "README.md").read_text()
    assert "PSF" in readme and "perplexity" in readme.lower()
    assert not list(MODEL_DIR.glob("*.bin")), "pickle weights must not ship"


def test_checkpoint_small_and_per_expert_layout():
    st = MODEL_DIR / "model.safetensors"
    assert st.stat().st_size <= MAX_BYTES
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "mixtral"
    L, E, F, H = (cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["intermediate_size"],
                  cfg["hidden_size"])
    with safe_open(str(st), "pt") as f:
        keys = set(f.keys())
        assert not [k for k in keys if k.endswith(("gate_up_proj", "down_proj"))], "fused experts in checkpoint"
        found = {(int(m[1]), int(m[2]), m[3]) for k in keys if (m := PER_EXPERT.match(k))}
        assert found == {(li, e, w) for li in range(L) for e in range(E) for w in ("w1", "w2", "w3")}
        for li in range(L):
            assert f"model.layers.{li}.block_sparse_moe.gate.weight" in keys
        assert tuple(f.get_slice("model.layers.0.block_sparse_moe.experts.0.w1.weight").get_shape()) == (F, H)
        assert tuple(f.get_slice("model.layers.0.block_sparse_moe.experts.0.w3.weight").get_shape()) == (F, H)
        assert tuple(f.get_slice("model.layers.0.block_sparse_moe.experts.0.w2.weight").get_shape()) == (H, F)
        assert all(f.get_slice(k).get_dtype() == "F32" for k in keys)


def test_loads_fused_and_tokenizer_round_trips(model, tokenizer):
    experts = model.model.layers[0].mlp.experts
    cfg = model.config
    assert tuple(experts.gate_up_proj.shape) == (cfg.num_local_experts, 2 * cfg.intermediate_size,
                                                 cfg.hidden_size)
    assert len(tokenizer) == cfg.vocab_size
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    src = "def f(x):\n    return x + 1  # comment é\n"
    ids = tokenizer(src)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == src


@pytest.fixture(scope="module")
def trained_pass(model, eval_ids):
    """One pass of the shipped model over the eval tokens: its perplexity and, per layer, the number of top-k
    slots routed to each expert (counted by a forward pre-hook on each layer's experts module, which is called as
    ``experts(hidden_states, top_k_index, top_k_weights)``)."""
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.long)
    hooks = []
    for li, layer in enumerate(model.model.layers):
        def pre_hook(module, args, li=li):
            _hidden, top_k_index, _top_k_weights = args
            counts[li] += torch.bincount(top_k_index.reshape(-1), minlength=cfg.num_local_experts)

        hooks.append(layer.mlp.experts.register_forward_pre_hook(pre_hook))
    try:
        ppl = perplexity(model, eval_ids)
    finally:
        for h in hooks:
            h.remove()
    return ppl, counts


def test_perplexity_far_below_untrained(model, eval_ids, trained_pass):
    trained, _ = trained_pass
    torch.manual_seed(SEED)
    untrained_model = transformers.MixtralForCausalLM(model.config).eval()
    untrained = perplexity(untrained_model, eval_ids)
    assert untrained > 0.5 * model.config.vocab_size  # a random init is close to uniform
    assert trained < untrained / 5, (trained, untrained)
    assert trained < 80, trained


def test_routing_reaches_every_expert(model, trained_pass):
    cfg = model.config
    _, counts = trained_pass
    assert counts.sum(1).eq(EVAL_TOKENS * cfg.num_experts_per_tok).all()
    share = counts.float() / counts.sum(1, keepdim=True)
    assert (counts > 0).all(), counts
    assert (share >= 0.01).all(), share  # every expert of every layer gets real traffic


# ------------------------------------------------------------------------------------------------------------------
# The second shipped model, ``models/mopeq-tiny-olmoe``: another MoE family (OLMoE: 16 experts, top-4 routing, QK-norm,
# the Hub's ``mlp.experts.E.{gate,up,down}_proj`` layout), made by ``scripts/train_tiny_moe.py --family olmoe`` from
# the same corpus, split and tokenizer as the first, so that quality claims can be checked on two models.
OLMOE_DIR = REPO / "models" / "mopeq-tiny-olmoe"
OLMOE_MAX_BYTES = 16 * 1024 * 1024
OLMOE_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def readme_eval_ppl(model_dir: Path) -> float:
    """The held-out perplexity the model's README states (``windows): **52.16**``)."""
    m = re.search(r"windows\): \*\*([0-9.]+)\*\*", (model_dir / "README.md").read_text(encoding="utf-8"))
    assert m, "README states no eval perplexity"
    return float(m[1])


@pytest.fixture(scope="module")
def olmoe_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(OLMOE_DIR))


@pytest.fixture(scope="module")
def olmoe_model():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    m = transformers.AutoModelForCausalLM.from_pretrained(str(OLMOE_DIR), dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def olmoe_trained_pass(olmoe_model, eval_ids):
    """As ``trained_pass``, for the OLMoE model (same eval tokens: the two models share their tokenizer)."""
    cfg = olmoe_model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.long)
    hooks = []
    for li, layer in enumerate(olmoe_model.model.layers):
        def pre_hook(module, args, li=li):
            _hidden, top_k_index, _top_k_weights = args
            counts[li] += torch.bincount(top_k_index.reshape(-1), minlength=cfg.num_experts)

        hooks.append(layer.mlp.experts.register_forward_pre_hook(pre_hook))
    try:
        ppl = perplexity(olmoe_model, eval_ids)
    finally:
        for h in hooks:
            h.remove()
    return ppl, counts


def test_olmoe_files_present():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md", "training_info.json"):
        assert (OLMOE_DIR / name).is_file(), name
    readme = (OLMOE_DIR / "README.md").read_text()
    assert "PSF" in readme and "perplexity" in readme.lower() and "OlmoeForCausalLM" in readme
    assert not list(OLMOE_DIR.glob("*.bin")), "pickle weights must not ship"


def test_olmoe_shares_the_first_models_tokenizer():
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (OLMOE_DIR / name).read_bytes() == (MODEL_DIR / name).read_bytes(), name


def test_olmoe_config_is_a_different_family_with_16_experts_top4():
    cfg = json.loads((OLMOE_DIR / "config.json").read_text())
    assert cfg["model_type"] == "olmoe" and cfg["architectures"] == ["OlmoeForCausalLM"]
    assert cfg["num_experts"] >= 16
    assert cfg["num_experts_per_tok"] == 4
    assert cfg["vocab_size"] == json.loads((MODEL_DIR / "config.json").read_text())["vocab_size"]


def test_olmoe_checkpoint_small_and_per_expert_layout():
    st = OLMOE_DIR / "model.safetensors"
    assert st.stat().st_size <= OLMOE_MAX_BYTES
    cfg = json.loads((OLMOE_DIR / "config.json").read_text())
    L, E, F, H = cfg["num_hidden_layers"], cfg["num_experts"], cfg["intermediate_size"], cfg["hidden_size"]
    with safe_open(str(st), "pt") as f:
        keys = set(f.keys())
        assert not [k for k in keys if k.endswith(("gate_up_proj", "down_proj"))], "fused experts in checkpoint"
        found = {(int(m[1]), int(m[2]), m[3]) for k in keys if (m := OLMOE_PER_EXPERT.match(k))}
        assert found == {(li, e, w) for li in range(L) for e in range(E)
                         for w in ("gate_proj", "up_proj", "down_proj")}
        for li in range(L):
            assert f"model.layers.{li}.mlp.gate.weight" in keys
            assert tuple(f.get_slice(f"model.layers.{li}.mlp.gate.weight").get_shape()) == (E, H)
        assert tuple(f.get_slice("model.layers.0.mlp.experts.0.gate_proj.weight").get_shape()) == (F, H)
        assert tuple(f.get_slice("model.layers.0.mlp.experts.0.up_proj.weight").get_shape()) == (F, H)
        assert tuple(f.get_slice("model.layers.0.mlp.experts.0.down_proj.weight").get_shape()) == (H, F)
        assert all(f.get_slice(k).get_dtype() == "F32" for k in keys)


def test_olmoe_loads_with_stock_transformers(olmoe_model, olmoe_tokenizer):
    assert type(olmoe_model) is transformers.OlmoeForCausalLM
    cfg = olmoe_model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (16, 4)
    experts = olmoe_model.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (cfg.num_experts, 2 * cfg.intermediate_size, cfg.hidden_size)
    assert len(olmoe_tokenizer) == cfg.vocab_size
    assert (olmoe_tokenizer.pad_token_id, olmoe_tokenizer.bos_token_id, olmoe_tokenizer.eos_token_id) == (0, 1, 2)
    ids = olmoe_tokenizer("def f(x):\n    return x\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = olmoe_model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_olmoe_perplexity_matches_readme_and_far_below_untrained(olmoe_model, eval_ids, olmoe_trained_pass):
    trained, _ = olmoe_trained_pass
    stated = readme_eval_ppl(OLMOE_DIR)
    assert trained == pytest.approx(stated, rel=2e-3, abs=0.01), (trained, stated)
    info = json.loads((OLMOE_DIR / "training_info.json").read_text())
    assert trained == pytest.approx(info["eval_ppl"], rel=2e-3)
    torch.manual_seed(SEED)
    untrained_model = transformers.OlmoeForCausalLM(olmoe_model.config).eval()
    untrained = perplexity(untrained_model, eval_ids)
    assert untrained > 0.5 * olmoe_model.config.vocab_size  # a random init is close to uniform
    assert untrained == pytest.approx(info["untrained_eval_ppl"], rel=2e-3)
    assert trained < untrained / 5, (trained, untrained)
    assert trained < 80, trained


def test_olmoe_routing_reaches_every_expert(olmoe_model, olmoe_trained_pass):
    cfg = olmoe_model.config
    _, counts = olmoe_trained_pass
    assert counts.sum(1).eq(EVAL_TOKENS * cfg.num_experts_per_tok).all()
    share = counts.float() / counts.sum(1, keepdim=True)
    assert (counts > 0).all(), counts
    assert (share >= 0.01).all(), share  # every expert of every layer gets real traffic


def test_perplexity_matches_readme(trained_pass):
    """The first model's README figure holds too (the same check as for the OLMoE model)."""
    trained, _ = trained_pass
    assert trained == pytest.approx(readme_eval_ppl(MODEL_DIR), rel=2e-3, abs=0.01)
