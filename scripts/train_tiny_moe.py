#!/usr/bin/env python
"""Train the small Mixtral-architecture MoE that ships in ``models/mopeq-tiny-moe``.

Everything comes from what every CPython 3.11 install has: the corpus is the standard library's own ``*.py``
source (``sysconfig.get_paths()["stdlib"]``), split by FILE into train / calibration / evaluation sets that never
overlap. The script

1. builds the corpus and the split (deterministic: sorted paths, a hash of each relative path picks its split),
2. trains a byte-level BPE tokenizer (``tokenizers``) on the train split and saves it as a transformers fast
   tokenizer,
3. trains a ``MixtralForCausalLM`` from a seeded random init with AdamW, a cosine schedule and the router's
   load-balancing loss, printing train / eval loss curves, and stops at ``--max-steps`` or at the wall-clock limit,
4. saves the model with ``save_pretrained(safe_serialization=True)``, checks the checkpoint is in the Hub's
   per-expert layout (rewriting it so if transformers did not), that it reloads to identical logits and that it
   fits the size limit,
5. writes the data files used by the package and the tests: ``mopeq_core/data/calib_default.txt``,
   ``data/calib.jsonl`` and ``data/eval.txt``, and a README with the model's numbers.

Regenerate the shipped model (from the repository root; ~20 min on one busy CPU core):

    .venv/bin/python scripts/train_tiny_moe.py

``--family`` picks the architecture: ``mixtral`` (the default: ``models/mopeq-tiny-moe``, 8 experts, top-2),
``olmoe`` (``OlmoeForCausalLM``: ``models/mopeq-tiny-olmoe``, 16 experts, top-4) or ``qwen2_moe``
(``Qwen2MoeForCausalLM`` with a shared expert: ``models/mopeq-tiny-qwen2moe``, 16 experts, top-4). Each family has its
own defaults for ``--out``, ``--experts``, ``--top-k``, ``--intermediate`` and ``--max-bytes``; the corpus, split,
data files and tokenizer do not depend on the family (so all families share the vocabulary and write byte-identical
data files; ``--no-data-files`` leaves those files alone). The second model is made with

    .venv/bin/python scripts/train_tiny_moe.py --family olmoe

Use ``--max-steps`` / ``--time-limit-min`` to change the budget; ``--threads`` sets torch's intra-op threads.
The result is deterministic for a given seed, step count and thread count (up to float summation order).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Special tokens: ids 0/1/2 as in Mixtral's config defaults (pad / bos / eos).
PAD, BOS, EOS = "<pad>", "<s>", "</s>"

# Paths (relative to the stdlib root) that are left out of the corpus: third-party packages, machine-specific or
# generated files, the (huge) test suites, codec tables and the pydoc topic dump.
EXCLUDE_PARTS = {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__",
                 "turtledemo", "ensurepip"}
EXCLUDE_PREFIX = ("_sysconfigdata", "config-3")
MAX_FILE_BYTES = 400_000


# --------------------------------------------------------------------------------------------------- corpus
def stdlib_files(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in EXCLUDE_PARTS for part in rel.parts[:-1]):
            continue
        if any(part.startswith(EXCLUDE_PREFIX) for part in rel.parts):
            continue
        if not p.is_file() or p.stat().st_size > MAX_FILE_BYTES or p.stat().st_size < 200:
            continue
        out.append(p)
    return out


def split_of(rel: str) -> str:
    """Split by file, from a hash of the relative path: ~6 % eval, ~6 % calibration, the rest train."""
    h = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 100
    if h < 6:
        return "eval"
    if h < 12:
        return "calib"
    return "train"


def read_text(p: Path) -> str | None:
    try:
        t = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    t = t.replace("\r\n", "\n").replace("\t", "    ")
    return t


def build_corpus(root: Path) -> dict[str, list[tuple[str, str]]]:
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "calib": [], "eval": []}
    for p in stdlib_files(root):
        rel = p.relative_to(root).as_posix()
        t = read_text(p)
        if t is None:
            continue
        splits[split_of(rel)].append((rel, t))
    return splits


def take_text(docs: list[tuple[str, str]], target_bytes: int, per_file_cap: int) -> tuple[str, list[str]]:
    """Concatenate whole files (each cut at a line boundary to ``per_file_cap`` bytes) until ``target_bytes``."""
    parts, used, total = [], [], 0
    for rel, t in docs:
        if total >= target_bytes:
            break
        t = t.strip("\n")
        if len(t) > per_file_cap:
            t = t[: t.rfind("\n", 0, per_file_cap)]
        room = target_bytes - total
        if len(t) > room:
            cut = t.rfind("\n", 0, room)
            if cut < 2000:
                break
            t = t[:cut]
        parts.append(t)
        used.append(rel)
        total += len(t) + 2
    return "\n\n".join(parts) + "\n", used


def jsonl_chunks(docs: list[tuple[str, str]], n: int, chunk_chars: int, per_file: int) -> list[str]:
    """``n`` chunks of ~``chunk_chars`` characters (cut at line boundaries), at most ``per_file`` per file."""
    out: list[str] = []
    for _rel, t in docs:
        lines = t.strip("\n").split("\n")
        k, cur = 0, []
        for line in lines:
            cur.append(line)
            if sum(len(x) + 1 for x in cur) >= chunk_chars:
                chunk = "\n".join(cur).strip("\n")
                if chunk.strip():
                    out.append(chunk)
                    k += 1
                cur = []
                if k >= per_file or len(out) >= n:
                    break
        if len(out) >= n:
            break
    return out[:n]


# ------------------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path, model_max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    assert (tok.token_to_id(PAD), tok.token_to_id(BOS), tok.token_to_id(EOS)) == (0, 1, 2)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def encode_docs(tok, docs: list[tuple[str, str]]):
    import torch

    ids: list[int] = []
    enc = tok.backend_tokenizer.encode_batch([t for _, t in docs], add_special_tokens=False)
    for e in enc:
        ids.append(tok.bos_token_id)
        ids.extend(e.ids)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------------------- model
def make_config(a, vocab_size: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.hidden // a.heads,
        num_local_experts=a.experts,
        num_experts_per_tok=a.top_k,
        max_position_embeddings=a.seq_len,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        router_aux_loss_coef=a.aux_coef,
        router_jitter_noise=0.0,
        output_router_logits=False,  # turned on explicitly in the training forward only
        tie_word_embeddings=a.tie,
        initializer_range=0.02,
        attention_dropout=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=True,
    )


def make_olmoe_config(a, vocab_size: int):
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,  # per expert
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        num_experts=a.experts,
        num_experts_per_tok=a.top_k,
        norm_topk_prob=False,  # as OLMoE-1B-7B
        max_position_embeddings=a.seq_len,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        rms_norm_eps=1e-5,
        router_aux_loss_coef=a.aux_coef,
        output_router_logits=False,
        tie_word_embeddings=a.tie,
        initializer_range=0.02,
        attention_dropout=0.0,
        attention_bias=False,
        clip_qkv=None,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=True,
    )


def make_qwen2_moe_config(a, vocab_size: int):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=vocab_size,
        hidden_size=a.hidden,
        intermediate_size=a.shared_intermediate,  # dense MLP size (unused: every layer is sparse)
        moe_intermediate_size=a.intermediate,
        shared_expert_intermediate_size=a.shared_intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        num_experts=a.experts,
        num_experts_per_tok=a.top_k,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=a.seq_len,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        rms_norm_eps=1e-5,
        router_aux_loss_coef=a.aux_coef,
        output_router_logits=False,
        tie_word_embeddings=a.tie,
        initializer_range=0.02,
        attention_dropout=0.0,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=True,
    )


# Per family: config builder, model class name, defaults for the family-specific arguments, the README's words.
FAMILIES = {
    "mixtral": {
        "make_config": make_config, "cls": "MixtralForCausalLM", "name": "Mixtral",
        "defaults": {"out": "mopeq-tiny-moe", "experts": 8, "top_k": 2, "intermediate": 224,
                     "max_bytes": 15 * 1024 * 1024},
        "layout": "`model.layers.L.block_sparse_moe.experts.E.w1/w2/w3.weight`",
    },
    "olmoe": {
        "make_config": make_olmoe_config, "cls": "OlmoeForCausalLM", "name": "OLMoE",
        "defaults": {"out": "mopeq-tiny-olmoe", "experts": 16, "top_k": 4, "intermediate": 128,
                     "max_bytes": 16 * 1024 * 1024},
        "layout": "`model.layers.L.mlp.experts.E.gate_proj/up_proj/down_proj.weight`",
    },
    "qwen2_moe": {
        "make_config": make_qwen2_moe_config, "cls": "Qwen2MoeForCausalLM", "name": "Qwen2-MoE",
        "defaults": {"out": "mopeq-tiny-qwen2moe", "experts": 16, "top_k": 4, "intermediate": 112,
                     "max_bytes": 16 * 1024 * 1024},
        "layout": "`model.layers.L.mlp.experts.E.gate_proj/up_proj/down_proj.weight`",
    },
}


def family_of(config) -> str:
    return {"mixtral": "mixtral", "olmoe": "olmoe", "qwen2_moe": "qwen2_moe"}[config.model_type]


def num_experts(config) -> int:
    """Routed experts per layer (``num_local_experts`` in Mixtral, ``num_experts`` in OLMoE / Qwen2-MoE)."""
    n = getattr(config, "num_local_experts", None)
    return n if n is not None else config.num_experts


def expert_intermediate(config) -> int:
    return config.moe_intermediate_size if config.model_type == "qwen2_moe" else config.intermediate_size


def build_model(config, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    m = getattr(transformers, FAMILIES[family_of(config)]["cls"])(config)
    return m


def per_layer_aux_loss(router_logits, config):
    """Switch-Transformer load-balancing loss computed for each layer separately, averaged over layers.

    transformers' ``load_balancing_loss_func`` concatenates all layers' router logits before balancing, so an
    expert can die in one layer while its namesakes in other layers make up for it; balancing each layer on its own
    keeps every expert of every layer in use. Equal to ``top_k`` when a layer is perfectly balanced.
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    losses = [load_balancing_loss_func((lg,), num_experts(config), config.num_experts_per_tok)
              for lg in router_logits]
    return sum(losses) / len(losses)


def perplexity(model, ids, seq_len: int, max_tokens: int) -> float:
    """Perplexity over non-overlapping windows of ``seq_len`` tokens from the first ``max_tokens`` of ``ids``."""
    import torch

    ids = ids[:max_tokens]
    n = (ids.numel() // seq_len) * seq_len
    x = ids[:n].view(-1, seq_len)
    nll, cnt = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, x.shape[0], 8):
            b = x[i:i + 8]
            logits = model(input_ids=b).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b[:, 1:, None]).squeeze(-1)
            nll -= lp.sum().item()
            cnt += lp.numel()
    return math.exp(nll / cnt)


def routing_counts(model, ids, seq_len: int, max_tokens: int):
    """Per layer, the number of top-k slots routed to each expert (forward pre-hook on each experts module)."""
    import torch

    cfg = model.config
    ne = num_experts(cfg)
    counts = torch.zeros(cfg.num_hidden_layers, ne, dtype=torch.long)
    hooks = []
    for li, layer in enumerate(model.model.layers):
        def hook(mod, args, li=li):
            idx = args[1]
            counts[li] += torch.bincount(idx.reshape(-1), minlength=ne)[:ne]
        hooks.append(layer.mlp.experts.register_forward_pre_hook(hook))
    try:
        ids = ids[:max_tokens]
        n = (ids.numel() // seq_len) * seq_len
        with torch.no_grad():
            model.eval()
            for b in ids[:n].view(-1, seq_len).split(8):
                model(input_ids=b)
    finally:
        for h in hooks:
            h.remove()
    return counts


# --------------------------------------------------------------------------------------------------- saving
PER_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
FUSED_RE = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


PER_EXPERT_MLP_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def ensure_per_expert_layout(path: Path, config) -> str:
    """Check ``model.safetensors`` holds one tensor per expert and projection (Hub Mixtral layout).

    If transformers wrote the fused ``experts.gate_up_proj`` / ``experts.down_proj`` instead, split them into
    ``model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight`` (and rename ``mlp.gate`` to
    ``block_sparse_moe.gate``) ourselves. Returns a description of what was found.

    OLMoE and Qwen2-MoE checkpoints are checked (and if need be rewritten) the same way against their Hub layout,
    ``model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight`` (router ``mlp.gate`` unchanged).
    """
    if family_of(config) != "mixtral":
        return _ensure_per_expert_mlp_layout(path, config)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata() or {}
        fused = [k for k in keys if FUSED_RE.search(k)]
        if not fused:
            per = [k for k in keys if PER_EXPERT_RE.match(k)]
            want = config.num_hidden_layers * config.num_local_experts * 3
            assert len(per) == want, f"expected {want} per-expert tensors, found {len(per)}"
            return "per-expert (as written by save_pretrained)"
        tensors = {k: f.get_tensor(k) for k in keys}
    out = {}
    F = config.intermediate_size
    for k, v in tensors.items():
        m = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", k)
        if m:
            li, which = m.groups()
            base = f"model.layers.{li}.block_sparse_moe.experts"
            for e in range(v.shape[0]):
                if which == "gate_up_proj":
                    out[f"{base}.{e}.w1.weight"] = v[e, :F].contiguous()
                    out[f"{base}.{e}.w3.weight"] = v[e, F:].contiguous()
                else:
                    out[f"{base}.{e}.w2.weight"] = v[e].contiguous()
            continue
        out[k.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = v
    save_file(out, str(path), metadata={"format": "pt", **meta})
    return "fused on save by transformers; rewritten per expert by this script"


def _ensure_per_expert_mlp_layout(path: Path, config) -> str:
    """``ensure_per_expert_layout`` for OLMoE / Qwen2-MoE (``mlp.experts.E.{gate,up,down}_proj.weight``)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    E, F, L = num_experts(config), expert_intermediate(config), config.num_hidden_layers
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata() or {}
        fused = [k for k in keys if FUSED_RE.search(k)]
        if not fused:
            found = {(int(m[1]), int(m[2]), m[3]) for k in keys if (m := PER_EXPERT_MLP_RE.match(k))}
            want = {(li, e, w) for li in range(L) for e in range(E) for w in ("gate_proj", "up_proj", "down_proj")}
            assert found == want, f"expected {len(want)} per-expert tensors, found {len(found)}"
            return "per-expert (as written by save_pretrained)"
        tensors = {k: f.get_tensor(k) for k in keys}
    out = {}
    for k, v in tensors.items():
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$", k)
        if m:
            base, which = m.groups()
            for e in range(v.shape[0]):
                if which == "gate_up_proj":  # rows [:F] are the gate (chunk(2) in the experts' forward)
                    out[f"{base}.{e}.gate_proj.weight"] = v[e, :F].contiguous()
                    out[f"{base}.{e}.up_proj.weight"] = v[e, F:].contiguous()
                else:
                    out[f"{base}.{e}.down_proj.weight"] = v[e].contiguous()
            continue
        out[k] = v
    save_file(out, str(path), metadata={"format": "pt", **meta})
    return "fused on save by transformers; rewritten per expert by this script"


# ----------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="mixtral",
                    help="architecture: mixtral (models/mopeq-tiny-moe), olmoe (models/mopeq-tiny-olmoe) or "
                         "qwen2_moe (models/mopeq-tiny-qwen2moe); sets the defaults of --out, --experts, --top-k, "
                         "--intermediate and --max-bytes")
    ap.add_argument("--out", default=None, help="default: models/<the family's model name>")
    ap.add_argument("--calib-default", default=str(REPO / "mopeq_core" / "data" / "calib_default.txt"))
    ap.add_argument("--data-dir", default=str(REPO / "data"))
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=None,
                    help="expert intermediate size (mixtral 224, olmoe 128, qwen2_moe 112)")
    ap.add_argument("--shared-intermediate", type=int, default=64,
                    help="qwen2_moe only: the shared expert's intermediate size")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=None, help="experts per layer (mixtral 8, others 16)")
    ap.add_argument("--top-k", type=int, default=None, help="experts per token (mixtral 2, others 4)")
    ap.add_argument("--tie", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--max-steps", type=int, default=1000)
    ap.add_argument("--time-limit-min", type=float, default=25.0,
                    help="stop training after this many minutes of wall time, even before --max-steps "
                         "(<= 0: no limit)")
    ap.add_argument("--fit-to-time", action=argparse.BooleanOptionalAction, default=True,
                    help="during warm-up, measure the step time and shorten --max-steps (the cosine horizon) so "
                         "that the schedule ends within --time-limit-min; the run then equals one started with "
                         "the reduced --max-steps, which is recorded")
    ap.add_argument("--stop-after-steps", type=int, default=None,
                    help="stop after this many steps without changing the --max-steps schedule (replays a run "
                         "that the wall-clock limit stopped)")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--max-bytes", type=int, default=None,
                    help="checkpoint size limit (mixtral 15 MiB, others 16 MiB)")
    ap.add_argument("--no-data-files", action="store_true", help="do not (re)write the data files")
    ap.add_argument("--readme-only", action="store_true",
                    help="only rewrite --out/README.md from its config.json and training_info.json")
    a = ap.parse_args(argv)
    fam = FAMILIES[a.family]
    for k, v in fam["defaults"].items():
        if getattr(a, k) is None:
            setattr(a, k, str(REPO / "models" / v) if k == "out" else v)

    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t_start = time.time()
    out = Path(a.out)
    if a.readme_only:
        from transformers import AutoConfig

        splits = build_corpus(Path(a.stdlib))
        info = json.loads((out / "training_info.json").read_text())
        write_readme(out, AutoConfig.from_pretrained(str(out)), info,
                     {k: sum(len(t) for _, t in v) for k, v in splits.items()}, {k: len(v) for k, v in splits.items()})
        return 0

    # ---- corpus
    root = Path(a.stdlib)
    splits = build_corpus(root)
    sizes = {k: sum(len(t) for _, t in v) for k, v in splits.items()}
    print(f"[corpus] stdlib={root}  files: " + ", ".join(f"{k}={len(v)} ({sizes[k] / 1e6:.2f} MB)"
                                                         for k, v in splits.items()), flush=True)
    assert not ({r for r, _ in splits["train"]} & {r for r, _ in splits["eval"]})

    eval_text, eval_files = take_text(splits["eval"], 160_000, per_file_cap=24_000)
    calib_text, calib_files = take_text(splits["calib"], 300_000, per_file_cap=24_000)
    used_in_txt = set(calib_files)
    rest = [d for d in splits["calib"] if d[0] not in used_in_txt] or splits["calib"]
    calib_lines = jsonl_chunks(rest + splits["calib"], n=256, chunk_chars=600, per_file=6)
    if not a.no_data_files:
        data_dir = Path(a.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "eval.txt").write_text(eval_text, encoding="utf-8")
        with open(data_dir / "calib.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in calib_lines)
        Path(a.calib_default).parent.mkdir(parents=True, exist_ok=True)
        Path(a.calib_default).write_text(calib_text, encoding="utf-8")
        print(f"[data] eval.txt {len(eval_text) / 1e3:.0f} KB from {len(eval_files)} files; "
              f"calib_default.txt {len(calib_text) / 1e3:.0f} KB from {len(calib_files)} files; "
              f"calib.jsonl {len(calib_lines)} lines", flush=True)

    # ---- tokenizer
    t0 = time.time()
    tok = train_tokenizer([t for _, t in splits["train"]], a.vocab, out, model_max_length=a.seq_len)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    train_ids = encode_docs(tok, splits["train"])
    eval_ids = torch.tensor(tok(eval_text, add_special_tokens=True)["input_ids"], dtype=torch.long)
    print(f"[tokenizer] vocab={len(tok)} in {time.time() - t0:.1f}s; train tokens={train_ids.numel():,} "
          f"({sizes['train'] / train_ids.numel():.2f} chars/token); eval tokens={eval_ids.numel():,}", flush=True)

    # ---- model
    config = fam["make_config"](a, len(tok))
    model = build_model(config, a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"[model] params={n_params:,} (experts {n_expert:,}) ~{n_params * 4 / 2**20:.2f} MiB fp32", flush=True)
    untrained_ppl = perplexity(model, eval_ids, a.seq_len, a.eval_tokens)
    print(f"[model] untrained eval ppl={untrained_ppl:.1f}", flush=True)

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        prog = min(1.0, (step - a.warmup) / max(1, a.max_steps - a.warmup))
        return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))

    gen = torch.Generator().manual_seed(a.seed + 1)
    n_windows = train_ids.numel() - a.seq_len - 1
    t_train = time.time()
    limit_s = a.time_limit_min * 60
    hist = []
    step = 0
    ema = None
    stopped = "max-steps"
    requested_steps = a.max_steps
    fit_at = max(5, a.warmup // 2)
    for step in range(a.max_steps):
        if a.fit_to_time and limit_s > 0 and step == fit_at:
            # lr before the end of warm-up does not depend on max_steps, so this equals a fixed --max-steps run
            per_step = (time.time() - t_train) / step * (1 + 2 / a.eval_every)  # + eval overhead
            fit = step + int(0.92 * (limit_s - (time.time() - t_train)) / per_step)
            if fit < a.max_steps:
                a.max_steps = max(a.warmup + 20, fit)
                print(f"[fit] {per_step:.2f}s/step: cosine horizon set to {a.max_steps} steps "
                      f"(asked {requested_steps}) to end within {a.time_limit_min} min", flush=True)
        if step >= a.max_steps:
            break
        if a.stop_after_steps is not None and step >= a.stop_after_steps:
            stopped = f"--stop-after-steps {a.stop_after_steps}"
            break
        if limit_s > 0 and time.time() - t_train > limit_s:
            stopped = f"time limit ({a.time_limit_min} min)"
            break
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, n_windows, (a.batch,), generator=gen)
        x = torch.stack([train_ids[s:s + a.seq_len] for s in starts.tolist()])
        outp = model(input_ids=x, output_router_logits=True)
        lm_loss = torch.nn.functional.cross_entropy(outp.logits[:, :-1].reshape(-1, config.vocab_size),
                                                    x[:, 1:].reshape(-1))
        aux = per_layer_aux_loss(outp.router_logits, config)
        loss = lm_loss + a.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lm = lm_loss.item()
        ema = lm if ema is None else 0.95 * ema + 0.05 * lm
        if step % a.log_every == 0 or step == a.max_steps - 1:
            el = time.time() - t_train
            print(f"step {step:5d}  lm_loss {lm:.4f}  ema {ema:.4f}  aux {aux.item():.4f}  "
                  f"gnorm {gn.item():.2f}  lr {lr_at(step):.2e}  {el / (step + 1):.2f}s/step  {el / 60:.1f} min",
                  flush=True)
        if (step + 1) % a.eval_every == 0:
            ppl = perplexity(model, eval_ids, a.seq_len, a.eval_tokens)
            hist.append({"step": step + 1, "train_lm_loss_ema": round(ema, 4), "eval_ppl": round(ppl, 3)})
            print(f"[eval] step {step + 1}  eval loss {math.log(ppl):.4f}  ppl {ppl:.2f}", flush=True)
    steps_done = step if stopped != "max-steps" else a.max_steps
    train_min = (time.time() - t_train) / 60
    print(f"[train] stopped at step {steps_done} ({stopped}) after {train_min:.1f} min", flush=True)

    # ---- final numbers
    model.eval()
    eval_ppl = perplexity(model, eval_ids, a.seq_len, a.eval_tokens)
    counts = routing_counts(model, eval_ids, a.seq_len, a.eval_tokens)
    share = counts.float() / counts.sum(1, keepdim=True)
    print(f"[final] eval ppl={eval_ppl:.3f} (untrained {untrained_ppl:.1f}); final train lm loss ema={ema:.4f}")
    for li in range(config.num_hidden_layers):
        print(f"[route] layer {li}: " + " ".join(f"{s:.3f}" for s in share[li].tolist())
              + f"  (min {share[li].min():.3f} max {share[li].max():.3f})")

    # ---- save + checks
    model.config.use_cache = True
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(str(out), safe_serialization=True)
    st = out / "model.safetensors"
    layout = ensure_per_expert_layout(st, config)
    size = st.stat().st_size
    print(f"[save] {st} {size / 2**20:.2f} MiB, layout: {layout}", flush=True)
    assert size <= a.max_bytes, f"checkpoint {size} bytes > limit {a.max_bytes}"

    from transformers import AutoModelForCausalLM

    re_m = AutoModelForCausalLM.from_pretrained(str(out))
    re_m.eval()
    x = eval_ids[: 2 * a.seq_len].view(2, a.seq_len)
    with torch.no_grad():
        d = (re_m(input_ids=x).logits - model(input_ids=x).logits).abs().max().item()
    print(f"[save] reload max |logit diff| = {d:.3g}", flush=True)
    assert d == 0.0, "reloaded model differs"

    reproduce = (f".venv/bin/python scripts/train_tiny_moe.py --seed {a.seed} --threads {a.threads} "
                 f"--max-steps {a.max_steps} --no-fit-to-time --time-limit-min 0")
    if a.family != "mixtral":
        reproduce = reproduce.replace(" --seed", f" --family {a.family} --seed", 1)
    if steps_done < a.max_steps:
        reproduce += f" --stop-after-steps {steps_done}"
    info = {
        "reproduce": reproduce,
        "seed": a.seed, "threads": a.threads, "steps": steps_done, "stopped": stopped, "train_minutes": round(train_min, 1),
        "tokens_seen": steps_done * a.batch * a.seq_len, "train_tokens": int(train_ids.numel()),
        "final_train_lm_loss_ema": round(ema, 4), "eval_ppl": round(eval_ppl, 3),
        "untrained_eval_ppl": round(untrained_ppl, 1), "eval_tokens": min(a.eval_tokens, int(eval_ids.numel())),
        "params": n_params, "expert_params": n_expert, "checkpoint_bytes": size,
        "routing_share_min": [round(v, 4) for v in share.min(1).values.tolist()],
        "routing_share_max": [round(v, 4) for v in share.max(1).values.tolist()],
        "history": hist, "python": sys.version.split()[0], "torch": torch.__version__,
        "args": vars(a) | {"out": os.path.relpath(a.out, REPO), "stdlib": "<sysconfig stdlib>",
                           "calib_default": os.path.relpath(a.calib_default, REPO),
                           "data_dir": os.path.relpath(a.data_dir, REPO)},
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    write_readme(out, config, info, sizes, {k: len(v) for k, v in splits.items()})
    print(f"[done] total {(time.time() - t_start) / 60:.1f} min", flush=True)
    return 0


def write_readme(out: Path, cfg, info: dict, sizes: dict, nfiles: dict) -> None:
    share_lines = "\n".join(
        f"| {i} | {lo:.3f} | {hi:.3f} |" for i, (lo, hi) in
        enumerate(zip(info["routing_share_min"], info["routing_share_max"])))
    family = family_of(cfg)
    fam = FAMILIES[family]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    extra_arch = {
        "mixtral": "",
        "olmoe": "\nOLMoE specifics: RMS-normed queries and keys (QK-norm); the router's softmax is over all experts\n"
                 "and the top-k weights are not renormalised (`norm_topk_prob: false`, as in OLMoE-1B-7B).",
        "qwen2_moe": f"\nQwen2-MoE specifics: every layer also has a sigmoid-gated shared expert (intermediate size "
                     f"{getattr(cfg, 'shared_expert_intermediate_size', 0)})\nnext to the routed ones, and q/k/v "
                     "biases.",
    }[family]
    extra_tok = "" if family == "mixtral" else (
        "\nThe corpus split and the tokenizer training do not depend on the architecture, so this tokenizer\n"
        "(`tokenizer.json`) is byte-identical to that of `models/mopeq-tiny-moe`, and both models share the data\n"
        "files.")
    text = f"""---
license: other
license_name: psf-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [{cfg.model_type}, moe, tiny, mopeq]
---

# {out.name}

A tiny {fam['name']}-architecture Mixture-of-Experts causal language model, trained from scratch on CPU on the Python
standard library's source code. It exists so that MoPEQ's demo and quality tests have a small *trained* MoE (with
experts that differ in how much they matter) that needs no network. It is not useful for anything else.

## Architecture
`{fam['cls']}`: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads
({cfg.num_key_value_heads} KV heads, head dim {head_dim}), {num_experts(cfg)} experts per layer, top-{cfg.num_experts_per_tok}
routing, expert intermediate size {expert_intermediate(cfg)}, vocabulary {cfg.vocab_size} (byte-level BPE), context
{cfg.max_position_embeddings} tokens, tied input/output embeddings: {cfg.tie_word_embeddings}.
{info['params']:,} parameters ({info['expert_params']:,} in experts), stored in **float32**;
`model.safetensors` is {info['checkpoint_bytes'] / 2**20:.2f} MiB ({info['checkpoint_bytes']:,} bytes), in the Hub's
per-expert layout ({fam['layout']}), which transformers 5 fuses into
`experts.gate_up_proj` / `experts.down_proj` on load.{extra_arch}

## Data
The `*.py` files of the CPython {info['python']} standard library (`sysconfig.get_paths()["stdlib"]`, without
`site-packages`, the test suites, `encodings`, `pydoc_data` and generated files), split **by file** with a hash of
each relative path into train ({nfiles['train']} files, {sizes['train'] / 1e6:.1f} MB), calibration
({nfiles['calib']} files) and evaluation ({nfiles['eval']} files) sets that do not overlap. `data/eval.txt` (held
out), `data/calib.jsonl` and `mopeq_core/data/calib_default.txt` (calibration) come from the latter two.
The corpus is © Python Software Foundation, under the **PSF License Agreement** (PSF-2.0); this model is a
derivative of it and is distributed under the same terms.

## Training
Tokenizer: byte-level BPE trained with `tokenizers` on the train split (`<pad>`=0, `<s>`=1, `</s>`=2; `<s>` is
prepended by the tokenizer).{extra_tok} Model: seed {info['seed']}, AdamW (lr {info['args']['lr']}, betas 0.9/0.95, weight decay
{info['args']['weight_decay']}), {info['args']['warmup']} warm-up steps then cosine decay, gradient clipping 1.0,
batch {info['args']['batch']} × {info['args']['seq_len']} tokens, router load-balancing loss (Switch
Transformer's, computed per layer and averaged over layers) with coefficient {info['args']['aux_coef']}; {info['steps']} steps ({info['tokens_seen']:,} tokens) in {info['train_minutes']} min on
{info['threads']} CPU thread(s) (torch {info['torch']}). Final training LM loss (EMA): {info['final_train_lm_loss_ema']}.

## Evaluation
Perplexity on the first {info['eval_tokens']:,} tokens of `data/eval.txt` (non-overlapping {info['args']['seq_len']}-token
windows): **{info['eval_ppl']:.2f}**; the same architecture at its seed-{info['seed']} random init: {info['untrained_eval_ppl']:.0f}.

Share of routed top-{cfg.num_experts_per_tok} slots per expert on that text (uniform would be {1 / num_experts(cfg):.3f}):

| layer | min share | max share |
|---|---|---|
{share_lines}

## Reproduce
From the repository root (the other arguments at their defaults; `training_info.json` lists every argument used):

    {info.get('reproduce', '.venv/bin/python scripts/train_tiny_moe.py')}

{'The wall-clock limit stopped this run at step ' + str(info['steps']) + ' of a ' + str(info['args']['max_steps']) + '-step cosine schedule; the command above replays exactly those steps. ' if info['steps'] < info['args']['max_steps'] else ''}Results are deterministic for a given seed, step count and thread count (up to floating-point summation order).
"""
    (out / "README.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
