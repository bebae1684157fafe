"""--format gguf measured by llama.cpp itself: generation, perplexity vs our loader, vs uniform Q3_K_M at equal size.

    make engines   # builds .engines/llama.cpp/build/bin (llama-quantize, llama-perplexity, llama-simple)
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_gguf.py [--bin .engines/llama.cpp/build/bin] [--work DIR]

1. The pipeline quantizes the shipped model (hutchinson sensitivity, RTN, group size 32, widths 4/8, granularity
   layer, 5.0 mean bits) to a MoPEQ artifact. Its perplexity on data/eval.txt is computed with our loader
   (``load_quantized``) chunked exactly as llama-perplexity does (BOS + 255 tokens per 256-token chunk, the second half
   of each chunk scored), and by llama-perplexity on the ``--format gguf`` file of the same allocation (the same
   fake-quantized experts, re-encoded as Q4_0/Q8_0: the shipped model's rows of 128/224 weights admit no K-type).
   llama-simple generates from that file.
2. Equal size: ``llama-quantize Q3_K_M`` of the float model gives the uniform reference (on this model it falls back
   to Q4_0 for gate/up and Q5_0 for down). Two per layer x projection allocations (``allocate(...,
   granularity="layer-projection")`` with costs in GGUF bytes, ``gguf_projection_cost``) get exactly its expert
   bytes: MoPEQ's (hutchinson scores from step 1) and by routing frequency. Each is fake-quantized (RTN, group 32),
   written as a float GGUF and passed through the same ``llama-quantize Q3_K_M`` with per-tensor overrides for the
   expert tensors, so the non-expert tensors are identical to the reference's. llama-perplexity scores all three.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mopeq_core.allocate import ExpertItem, allocate  # noqa: E402
from mopeq_core.apply import apply_fake_quant  # noqa: E402
from mopeq_core.config import Budget, QuantizeConfig  # noqa: E402
from mopeq_core.exporters import export  # noqa: E402
from mopeq_core.gguf_export import ggml_tensor_bytes, ggml_type_for_width, gguf_projection_cost, write_gguf  # noqa: E402
from mopeq_core.loader import load_packed_matrices, load_quantized  # noqa: E402
from mopeq_core.loading import load_model, load_tokenizer  # noqa: E402
from mopeq_core.moe import find_expert_groups  # noqa: E402
from mopeq_core import engine  # noqa: E402
from mopeq_core.quantize import QuantSpec, quantization_error, quantize_rtn  # noqa: E402

MODEL = REPO / "models" / "mopeq-tiny-moe"
EVAL = REPO / "data" / "eval.txt"
N_CTX = 256
GS = 32


def llama_style_ppl(model, tok, text: str, n_ctx: int = N_CTX) -> float:
    """llama-perplexity's estimate: BOS + text tokenized, chunks of n_ctx with the first token set to BOS, the
    second half of each chunk scored."""
    bos = tok.bos_token_id
    ids = [bos] + tok(text, add_special_tokens=False).input_ids
    first = n_ctx // 2
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in range(len(ids) // n_ctx):
            x = torch.tensor([ids[c * n_ctx:(c + 1) * n_ctx]])
            x[0, 0] = bos
            lp = torch.log_softmax(model(x).logits[0, first:n_ctx - 1].float(), dim=-1)
            nll -= float(lp.gather(1, x[0, first + 1:n_ctx, None]).sum())
            count += n_ctx - 1 - first
    return math.exp(nll / count)


def llama_ppl(bin_dir: Path, gguf: Path) -> float:
    r = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(EVAL), "-c", str(N_CTX),
                        "-b", str(N_CTX), "-t", "1"], capture_output=True, text=True, check=True)
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr).group(1))


def quantize_q3km(bin_dir: Path, src: Path, dst: Path, overrides: dict[str, str]) -> None:
    cmd = [str(bin_dir / "llama-quantize")]
    for name, t in sorted(overrides.items()):
        cmd += ["--tensor-type", f"{name}={t.lower()}"]
    subprocess.run(cmd + [str(src), str(dst), "Q3_K_M", "1"], capture_output=True, text=True, check=True)


def expert_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if "_exps" in t.name}


def expert_bytes(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors if "_exps" in t.name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(REPO / ".engines" / "llama.cpp" / "build" / "bin"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--probes", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bin_dir = Path(args.bin)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-gguf-"))
    text = EVAL.read_text()
    tok = load_tokenizer(MODEL)
    rows = []

    # ---- 1. same allocation: our loader vs llama.cpp ------------------------------------------------------------
    art = work / "mopeq"
    cfg = QuantizeConfig(model=str(MODEL), budget=Budget(avg_bits=5.0), bits=(4, 8), granularity="layer",
                         quantizer="rtn", sensitivity="hutchinson", probes=args.probes, group_size=GS,
                         calib_file=str(REPO / "data" / "calib.jsonl"))
    if not (art / "bitmap.json").exists():
        engine.run(cfg, art)
    bitmap = json.loads((art / "bitmap.json").read_text())
    ours = llama_style_ppl(load_quantized(art), tok, text)
    fp = load_model(MODEL)
    fp_ppl = llama_style_ppl(fp, tok, text)
    model = load_model(MODEL)
    groups = find_expert_groups(model)
    chosen = load_packed_matrices(art, groups)
    apply_fake_quant(groups, chosen)
    bits = {(g.layer, e): chosen[(g.layer, e)]["down_proj"].spec.bits for g in groups for e in range(g.num_experts)}
    (gfile,) = export("gguf", work / "gguf", model, groups, chosen, bits,
                      QuantizeConfig(model=str(MODEL), format="gguf", bits=(4, 8), granularity="layer"))
    llama_same = llama_ppl(bin_dir, gfile)
    gen = subprocess.run([str(bin_dir / "llama-simple"), "-m", str(gfile), "-n", "40", "def main(args):\n"],
                         capture_output=True, text=True, check=True).stdout
    f32 = work / "f32.gguf"
    write_gguf(f32, fp, find_expert_groups(fp), None)
    llama_f32 = llama_ppl(bin_dir, f32)
    rows.append(("float model (F32 GGUF / HF float32)", f32.stat().st_size, llama_f32, fp_ppl))
    rows.append((f"MoPEQ layer widths {[l_['experts'][0]['bits'] for l_ in bitmap['layers']]} (--format gguf)",
                 gfile.stat().st_size, llama_same, ours))

    # ---- 2. equal size vs uniform Q3_K_M ------------------------------------------------------------------------
    ref = work / "q3km.gguf"
    quantize_q3km(bin_dir, f32, ref, {})
    budget = expert_bytes(ref)
    ref_types = expert_types(ref)
    scores = {(l_["layer"], e["expert"]): (e["sensitivity"], e["frequency"]) for l_ in bitmap["layers"]
              for e in l_["experts"]}
    fpg = find_expert_groups(fp)
    per_proj_err: dict[tuple[int, int], dict[str, dict[int, float]]] = {}
    for g in fpg:
        for e in range(g.num_experts):
            per_proj_err[(g.layer, e)] = {p.name: {b: quantization_error(
                g.weight(e, p.name), quantize_rtn(g.weight(e, p.name).detach().float(), QuantSpec(b, GS, True)))
                for b in (4, 8)} for p in g.projections}

    def items(which: int) -> list[ExpertItem]:
        out = []
        for g in fpg:
            shapes = {p.name: (p.out_features, p.in_features) for p in g.projections}
            for e in range(g.num_experts):
                pe = per_proj_err[(g.layer, e)]
                pc = {n: {b: gguf_projection_cost(o, i, b) for b in (4, 8)} for n, (o, i) in shapes.items()}
                out.append(ExpertItem(
                    g.layer, e, g.expert_params, scores[(g.layer, e)][which],
                    {b: sum(pe[n][b] for n in pe) for b in (4, 8)}, {b: sum(pc[n][b] for n in pc) for b in (4, 8)},
                    proj_error=pe, proj_params={n: o * i for n, (o, i) in shapes.items()}, proj_cost=pc))
        return out

    rows.append(("uniform llama-quantize Q3_K_M (experts " + ", ".join(sorted(set(ref_types.values()))) + ")",
                 ref.stat().st_size, llama_ppl(bin_dir, ref), None))
    for label, which in (("MoPEQ (hutchinson)", 0), ("frequency", 1)):
        a = allocate(items(which), budget, granularity="layer-projection")
        m = load_model(MODEL)
        gs = find_expert_groups(m)
        ch = {(g.layer, e): {p.name: quantize_rtn(g.weight(e, p.name).detach().float(),
                                                  QuantSpec(a.proj_bits[(g.layer, p.name)], GS, True))
                             for p in g.projections} for g in gs for e in range(g.num_experts)}
        apply_fake_quant(gs, ch)
        src = work / f"fq-{which}.gguf"
        write_gguf(src, m, gs, None)
        over = {}
        for g in gs:
            for p in g.projections:
                t = ggml_type_for_width(a.proj_bits[(g.layer, p.name)], p.in_features)
                for n in (("ffn_gate_exps", "ffn_up_exps") if p.name == "gate_up_proj" else ("ffn_down_exps",)):
                    over[f"blk.{g.layer}.{n}"] = t
        dst = work / f"q3km-{which}.gguf"
        quantize_q3km(bin_dir, src, dst, over)
        widths = ",".join(f"{layer}:{p[:4]}={b}" for (layer, p), b in sorted(a.proj_bits.items()) if b != 4)
        rows.append((f"{label}, layer x projection at equal expert bytes ({widths} at 8 bits, rest 4)",
                     dst.stat().st_size, llama_ppl(bin_dir, dst), None))
        assert expert_bytes(dst) <= budget, (expert_bytes(dst), budget)

    print(f"work dir: {work}; expert bytes of the Q3_K_M reference: {budget:,} "
          f"(= {ggml_tensor_bytes(1, 32, 'Q4_0')} B per 32 Q4_0 weights)")
    print("| GGUF | file bytes | llama-perplexity (c=256) | our loader, same chunks |")
    print("|---|---|---|---|")
    for label, size, lp, op in rows:
        print(f"| {label} | {size:,} | {lp:.3f} | {'' if op is None else f'{op:.3f}'} |")
    print("\nllama-simple, greedy, 40 tokens after 'def main(args):\\n':\n" + gen)


if __name__ == "__main__":
    main()
