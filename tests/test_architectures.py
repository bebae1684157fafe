"""MoE discovery, calibration, expert recomputation and the whole pipeline on tiny random models of every supported
architecture (built from configs, saved in the Hub's per-expert checkpoint layout) and on a ModuleList stand-in
for remote-code DeepSeek-VL2 (routed experts as ``nn.ModuleList`` of ``nn.Linear`` MLPs, DeepSeek routing).

The packed artifact is checked against an independently built fake-quantized model: the original checkpoint with
each expert's weights replaced by the dequantized matrices read back from the artifact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tiny_models as tm
from safetensors import safe_open

from mopeq_core import engine
from mopeq_core.apply import apply_fake_quant
from mopeq_core.calibrate import calibrate
from mopeq_core.config import Budget, QuantizeConfig
from mopeq_core.loader import PackedLinear, load_packed_matrices, load_quantized
from mopeq_core.loading import load_model
from mopeq_core.moe import expert_param_names, find_expert_groups

SPECS = {**tm.ARCHS, tm.STANDIN.name: tm.STANDIN}
NAMES = list(SPECS)
GROUP_SIZE = 16
SEQ_LEN, N_SAMPLES = 32, 4


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Lazily built model directories, one per architecture (plus the stand-in's fused twin)."""
    root = tmp_path_factory.mktemp("tiny-moe")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            if name in (tm.STANDIN.name, "standin_reference"):
                built[tm.STANDIN.name], built["standin_reference"] = tm.build_standin(root)
            else:
                built[name] = tm.build_model(name, root)
        return built[name]

    tm.register_standin()
    return get


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from mopeq_core.data import DEFAULT_CALIB

    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(DEFAULT_CALIB.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return p


def _load(path: Path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **kw).eval()


def _ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, len(tm.tokenizer()), (n, length), generator=torch.Generator().manual_seed(seed))


def _moe_block(model, group):
    return model.get_submodule(group.path.rsplit(".", 1)[0])


def _saved_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as s:
            keys |= set(s.keys())
    return keys


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", NAMES)
def test_checkpoint_is_in_hub_layout(arch, model_dirs):
    keys = _saved_keys(model_dirs(arch))
    spec = SPECS[arch]
    assert spec.hub_key in keys, sorted(k for k in keys if "expert" in k)[:8]
    if arch not in ("gpt_oss", "granitemoe"):  # these two keep fused tensors on the Hub as well
        assert not any(re.search(r"experts\.(gate_up_proj|up_proj|down_proj)$", k) for k in keys), "saved fused"


@pytest.mark.parametrize("arch", NAMES)
def test_discovery_finds_exactly_the_routed_experts(arch, model_dirs):
    spec = SPECS[arch]
    model = load_model(model_dirs(arch))
    groups = find_expert_groups(model)
    H, F = tm.HIDDEN, spec.moe_ff
    assert [g.layer for g in groups] == list(spec.moe_layers)
    for g in groups:
        assert g.num_experts == spec.num_experts
        assert g.path == f"{_block_path(model, g.layer)}.experts"
        shapes = {p.name: (p.out_features, p.in_features, p.role) for p in g.projections}
        if arch == tm.STANDIN.name:
            assert g.kind == "modulelist"
            assert shapes == {"gate_proj": (F, H, "in"), "up_proj": (F, H, "in"), "down_proj": (H, F, "out")}
        else:
            assert g.kind == "fused"
            first, width = ("gate_up_proj", 2 * F) if spec.gated else ("up_proj", F)
            assert shapes == {first: (width, H, "in"), "down_proj": (H, F, "out")}
            assert g.transposed == spec.transposed
            for e in (0, g.num_experts - 1):  # weight() gives [out, in] whatever the storage orientation
                assert tuple(g.weight(e, first).shape) == (width, H)
                assert tuple(g.weight(e, "down_proj").shape) == (H, F)
        assert g.expert_params == _expert_params(spec)
        block = _moe_block(model, g)
        if spec.shared:
            assert isinstance(getattr(block, spec.shared), torch.nn.Module), f"no {spec.shared} on {g.path}"
    # nothing else is claimed: the expert tensors are exactly the routed experts' weights
    names = expert_param_names(model, groups)
    params = dict(model.named_parameters())
    assert names <= set(params)
    assert not any("shared" in n for n in names)
    dense = set(range(spec.num_layers)) - set(spec.moe_layers)
    assert not any(re.search(rf"\.layers\.{i}\.", n) for n in names for i in dense)
    assert sum(params[n].numel() for n in names) == len(spec.moe_layers) * spec.num_experts * _expert_params(spec)


def _expert_params(spec) -> int:
    return (3 if spec.gated else 2) * spec.moe_ff * tm.HIDDEN


def _block_path(model, layer: int) -> str:
    for name, mod in model.named_modules():
        if hasattr(mod, "experts") and re.fullmatch(rf"model\.layers\.{layer}\.(mlp|block_sparse_moe|mixer)", name):
            return name
    raise AssertionError(f"layer {layer} has no MoE block")


def _router(block):
    for name in ("router", "gate"):  # (Qwen2-MoE's shared_expert_gate is not a router)
        mod = getattr(block, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    raise AssertionError(f"no router on {type(block).__name__}")


@pytest.mark.parametrize("arch", NAMES)
def test_calibration_counts_match_the_router(arch, model_dirs):
    spec = SPECS[arch]
    model = load_model(model_dirs(arch))
    groups = find_expert_groups(model)
    routed: dict[int, torch.Tensor] = {g.layer: torch.zeros(g.num_experts, dtype=torch.long) for g in groups}
    handles = []
    for g in groups:
        def hook(mod, args, out, g=g):
            # transformers routers return (logits, weights, indices); the remote-code gate (indices, weights, aux)
            idx = out[0] if arch == tm.STANDIN.name else out[2]
            assert idx.shape[-1] == spec.top_k and not idx.is_floating_point()
            routed[g.layer] += torch.bincount(idx.reshape(-1), minlength=g.num_experts)
        handles.append(_router(_moe_block(model, g)).register_forward_hook(hook))
    samples = _ids(N_SAMPLES, SEQ_LEN, seed=3)
    try:
        stats = calibrate(model, groups, samples, collect_hessians=True, min_tokens=0)
    finally:
        for h in handles:
            h.remove()
    tokens = N_SAMPLES * SEQ_LEN
    assert stats.tokens == tokens
    for g in groups:
        c = stats.counts[g.layer]
        assert int(c.sum()) == tokens * spec.top_k
        assert torch.equal(c, routed[g.layer])
        assert stats.top_k[g.layer] == spec.top_k
        assert abs(float(stats.frequency(g.layer).sum()) - 1.0) < 1e-9
        for p in g.projections:
            sq, h = stats.sq_norms[(g.layer, p.name)], stats.hessians[(g.layer, p.name)]
            assert tuple(h.shape) == (g.num_experts, p.in_features, p.in_features)
            assert bool(((sq > 0) == (c > 0)).all())
            # tr(Σ x xᵀ) = Σ‖x‖²
            torch.testing.assert_close(torch.diagonal(h, dim1=1, dim2=2).sum(-1).double(), sq, rtol=1e-4,
                                       atol=1e-6)
    cov = stats.coverage()
    assert cov["experts"] == len(groups) * spec.num_experts

    # all-experts mode: every token through every expert, so the "in" projections of one layer see the same sums
    full = calibrate(model, groups, samples, collect_hessians=False, all_experts=True)
    assert full.mode == "all" and not full.fallback
    for g in groups:
        assert torch.equal(full.counts[g.layer], stats.counts[g.layer])  # counts stay the routed ones
        for p in g.projections:
            sq = full.sq_norms[(g.layer, p.name)]
            assert bool((sq > 0).all())
            if p.role == "in":
                torch.testing.assert_close(sq, sq[:1].expand_as(sq), rtol=1e-6, atol=0)


def _recompute(g, x, idx, w):
    """Σ_j w_tj · down_e(intermediate_e(x_t)) from ExpertGroup.intermediate, token by expert."""
    out = torch.zeros_like(x)
    for e in range(g.num_experts):
        tok, pos = torch.where(idx == e)
        if not tok.numel():
            continue
        h = g.intermediate(e, x[tok])
        bias = g.module.down_proj_bias[e] if g.kind == "fused" and getattr(g.module, "has_bias", False) else None
        y = torch.nn.functional.linear(h, g.weight(e, "down_proj"), bias)
        out.index_add_(0, tok, y * w[tok, pos, None])
    return out


# fused experts under the eager loop the pipeline uses and under transformers' default grouped_mm kernel
@pytest.mark.parametrize(("arch", "impl"), [(a, "eager") for a in NAMES] + [(a, "grouped_mm") for a in tm.ARCHS])
def test_intermediate_reproduces_the_experts_module(arch, impl, model_dirs):
    spec = SPECS[arch]
    model = _load(model_dirs(arch), experts_implementation=impl)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for g in find_expert_groups(model):
            T, k = 13, spec.top_k
            x = torch.randn(T, tm.HIDDEN, generator=gen)
            idx = torch.stack([torch.randperm(g.num_experts, generator=gen)[:k] for _ in range(T)])
            w = torch.rand(T, k, generator=gen)
            if g.kind == "fused":
                got = g.module(x, idx, w)
            else:  # each expert MLP on its own tokens, combined like the block does
                got = torch.zeros_like(x)
                for e in range(g.num_experts):
                    tok, pos = torch.where(idx == e)
                    if tok.numel():
                        got.index_add_(0, tok, g.module[e](x[tok]) * w[tok, pos, None])
            torch.testing.assert_close(_recompute(g, x, idx, w), got, rtol=1e-5, atol=1e-6)
            if spec.bias:  # the bias path is live: dropping the biases changes the result
                assert float(g.module.gate_up_proj_bias.abs().max()) > 0
                assert float(g.module.down_proj_bias.abs().max()) > 0


def test_standin_matches_its_fused_twin(model_dirs):
    """The ModuleList stand-in computes what the equivalent fused DeepseekV2 model computes, after a disk trip."""
    a = _load(model_dirs(tm.STANDIN.name))
    b = _load(model_dirs("standin_reference"), experts_implementation="eager")
    assert type(a.model.layers[1].mlp).__name__ == "StandInMoE"
    assert isinstance(a.model.layers[1].mlp.experts, torch.nn.ModuleList)
    ids = _ids(2, 20, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", NAMES)
def test_pipeline_end_to_end(arch, model_dirs, calib_file, tmp_path):
    spec = SPECS[arch]
    src = model_dirs(arch)
    out = tmp_path / "out"
    cfg = QuantizeConfig(model=str(src), budget=Budget(avg_bits=3.0), bits=(2, 3, 4), sensitivity="hutchinson",
                         quantizer="rtn", group_size=GROUP_SIZE, probes=3, calib_file=str(calib_file),
                         calib_samples=N_SAMPLES, seq_len=SEQ_LEN)
    res = engine.run(cfg, out)

    bitmap = json.loads((out / "bitmap.json").read_text())
    assert bitmap == json.loads(json.dumps(res.bitmap))
    assert [entry["layer"] for entry in bitmap["layers"]] == list(spec.moe_layers)
    for entry in bitmap["layers"]:
        assert [x["expert"] for x in entry["experts"]] == list(range(spec.num_experts))
        assert all(x["bits"] in (2, 3, 4) and x["params"] == _expert_params(spec) for x in entry["experts"])
        assert abs(sum(x["frequency"] for x in entry["experts"]) - 1.0) < 1e-6
        assert all(x["sensitivity"] == x["sensitivity"] for x in entry["experts"])  # no NaN
    assert bitmap["avg_bits"] <= 3.0 + 1e-9
    assert bitmap["sensitivity"]["method"] == "hutchinson" and bitmap["sensitivity"]["probes"] == 3
    assert bitmap["sensitivity"]["calib_tokens"] == N_SAMPLES * SEQ_LEN

    # the packed model, loaded on its own
    q = load_quantized(out, attn_implementation="eager")
    if spec.name == tm.STANDIN.name:
        assert isinstance(q.model.layers[1].mlp.experts[0].down_proj, PackedLinear)
    assert not any(re.search(r"experts\.(gate_up_proj|up_proj|down_proj)$", n) for n, _ in q.named_parameters())

    # independent reference: the original checkpoint with the artifact's dequantized experts written in
    ref = _load(src, experts_implementation="eager")
    orig = _load(src, experts_implementation="eager")
    groups = find_expert_groups(ref)
    apply_fake_quant(groups, load_packed_matrices(out, groups))

    ids = _ids(2, 24, seed=11)
    with torch.no_grad():
        lq, lr, lo = q(input_ids=ids).logits, ref(input_ids=ids).logits, orig(input_ids=ids).logits
    assert lq.dtype == torch.float32
    assert _rel(lq, lr) <= 1e-5
    assert _rel(lr, lo) > 1e-4  # the experts really were quantized

    if spec.dtype == torch.bfloat16:  # the artifact also runs in the checkpoint's own dtype
        q16 = load_quantized(out, dtype=torch.bfloat16, attn_implementation="eager")
        with torch.no_grad():
            l16 = q16(input_ids=ids).logits
        assert l16.dtype == torch.bfloat16 and _rel(l16.float(), lq) < 0.05

    prompt = ids[:1, :5]
    gq = q.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    gr = ref.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gq.shape == (1, 9)
    assert torch.equal(gq, gr)


# ---------------------------------------------------------------------------------------------------------------
def test_standin_stages_in_memory(tmp_path):
    """The stages on an in-memory stand-in (no Auto registration, no disk model): what a remote-code model gets."""
    from mopeq_core.allocate import ExpertItem, allocate, budget_for_avg_bits
    from mopeq_core.apply import QuantSettings, build_candidates, expert_cost
    from mopeq_core.artifact import matrices_for_layer, write_mopeq_artifact
    from mopeq_core.sensitivity import SensitivityContext, compute_sensitivity

    tok = tm.tokenizer()
    cfg = tm.ARCHS["deepseek_v2"].make_config(len(tok))
    torch.manual_seed(0)
    fused = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager",
                                                          experts_implementation="eager").eval()
    scfg = tm.StandInConfig(**{k: v for k, v in cfg.to_dict().items() if k not in ("model_type", "architectures")})
    model = tm.StandInForCausalLM(scfg).eval()
    tm.copy_fused_to_standin(fused, model)
    model.set_attn_implementation("eager")

    groups = find_expert_groups(model)
    assert [(g.layer, g.kind, g.num_experts) for g in groups] == [(1, "modulelist", 4), (2, "modulelist", 4)]
    samples = _ids(N_SAMPLES, SEQ_LEN, seed=2)
    stats = calibrate(model, groups, samples, collect_hessians=False)
    assert all(int(stats.counts[g.layer].sum()) == samples.numel() * 2 for g in groups)
    sens = compute_sensitivity("hutchinson", SensitivityContext(model, groups, stats, samples, probes=2))
    assert set(sens.scores) == {1, 2} and all(len(v) == 4 for v in sens.scores.values())

    qs = QuantSettings("rtn", GROUP_SIZE, True)
    cands = build_candidates(groups, (2, 3, 4), stats, qs)
    items = [ExpertItem(layer=g.layer, expert=e, params=g.expert_params, sensitivity=sens.scores[g.layer][e],
                        error=cands.errors[(g.layer, e)], cost={b: expert_cost(g, b, qs) for b in (2, 3, 4)})
             for g in groups for e in range(g.num_experts)]
    alloc = allocate(items, budget_for_avg_bits(items, 3.0), allocator="knapsack")
    chosen = {k: cands.matrices[(k[0], k[1], b)] for k, b in alloc.bits.items()}
    write_mopeq_artifact(tmp_path, model, groups, matrices_for_layer(chosen), alloc.bits, group_size=GROUP_SIZE,
                         symmetric=True, quantizer="rtn")
    back = load_packed_matrices(tmp_path, groups)
    for key, per in chosen.items():
        for proj, qm in per.items():
            torch.testing.assert_close(back[key][proj].dequantize(torch.float32), qm.dequantize(torch.float32))
    # non-expert tensors only in the base shard; routed expert Linears only as packed tensors
    keys = _saved_keys(tmp_path)
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in keys
    assert not any(re.search(r"mlp\.experts\.\d+\.\w+\.weight$", k) for k in keys)


@pytest.mark.parametrize("method", ["hutchinson", "fisher"])
def test_loss_scores_with_an_unrouted_modulelist_expert(method, model_dirs, monkeypatch):
    from mopeq_core.sensitivity import SensitivityContext, compute_sensitivity

    model = _load(model_dirs(tm.STANDIN.name))
    original = tm.StandInMoEGate.forward

    def never_expert_3(self, hidden_states):  # top-2: a slot routed to expert 3 goes to 0 (or 1 if 0 is taken)
        idx, w, aux = original(self, hidden_states)
        other = idx.flip(-1)
        return torch.where(idx == 3, (other == 0).long(), idx), w, aux

    monkeypatch.setattr(tm.StandInMoEGate, "forward", never_expert_3)
    groups = find_expert_groups(model)
    samples = _ids(2, 16, seed=4)
    stats = calibrate(model, groups, samples, collect_hessians=False, min_tokens=0)
    assert all(int(stats.counts[g.layer][3]) == 0 for g in groups)
    res = compute_sensitivity(method, SensitivityContext(model, groups, stats, samples, probes=2))
    assert all(v[3] == 0.0 for v in res.scores.values())
