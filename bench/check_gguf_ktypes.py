"""llama.cpp reads MoPEQ's Q2_K / Q3_K / Q4_K encodings as gguf-py decodes them (the shipped model has no K-type rows).

    make engines
    OMP_NUM_THREADS=1 .venv/bin/python bench/check_gguf_ktypes.py [--bin .engines/llama.cpp/build/bin]

A random Mixtral with rows of 256 weights (hidden 256, intermediate 512, 2 layers, 4 experts, init std 0.1 so that
predictions are peaked) is exported with ``--format gguf`` at Q2_K / Q3_K / Q4_K / Q8_0 per layer x projection.
llama-perplexity scores the file on data/eval.txt; transformers scores the same model with its expert weights replaced
by ``gguf.quants.dequantize`` of the file's tensors, on the same chunks (BOS + 127 tokens, second half scored). Equal
figures mean llama.cpp decodes the K-type bytes as the reference decoder does; the float GGUF is the control.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import tiny_models  # noqa: E402
from bench_gguf import llama_style_ppl  # noqa: E402

from mopeq_core.apply import apply_fake_quant  # noqa: E402
from mopeq_core.config import QuantizeConfig  # noqa: E402
from mopeq_core.exporters import export  # noqa: E402
from mopeq_core.gguf_export import write_gguf  # noqa: E402
from mopeq_core.loading import load_model  # noqa: E402
from mopeq_core.moe import find_expert_groups  # noqa: E402
from mopeq_core.quantize import QuantSpec, quantize_rtn  # noqa: E402

N_CTX = 128
WIDTHS = {(0, "gate_up_proj"): 2, (0, "down_proj"): 3, (1, "gate_up_proj"): 4, (1, "down_proj"): 8}


def llama_ppl(bin_dir: Path, path: Path, text_file: Path) -> float:
    r = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(path), "-f", str(text_file), "-c", str(N_CTX),
                        "-b", str(N_CTX), "-t", "1"], capture_output=True, text=True, check=True)
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr).group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(REPO / ".engines" / "llama.cpp" / "build" / "bin"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    bin_dir = Path(args.bin)
    work = Path(tempfile.mkdtemp(prefix="gguf-ktypes-"))
    text_file = work / "eval.txt"
    text_file.write_text((REPO / "data" / "eval.txt").read_text()[:60000])
    tok = tiny_models.tokenizer()
    cfg = transformers.MixtralConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=N_CTX, tie_word_embeddings=False,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    torch.manual_seed(0)
    src = tiny_models._save(transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), tok,
                            work / "src")
    fp = load_model(src)
    f32 = work / "f32.gguf"
    write_gguf(f32, fp, find_expert_groups(fp), None)
    rows = [("F32 (control)", llama_ppl(bin_dir, f32, text_file), llama_style_ppl(fp, tok, text_file.read_text(),
                                                                                  N_CTX))]
    model = load_model(src)
    groups = find_expert_groups(model)
    chosen = {(g.layer, e): {p.name: quantize_rtn(g.weight(e, p.name).detach().float(),
                                                  QuantSpec(WIDTHS[(g.layer, p.name)], 32, True))
                             for p in g.projections} for g in groups for e in range(g.num_experts)}
    apply_fake_quant(groups, chosen)
    bits = {k: v["gate_up_proj"].spec.bits for k, v in chosen.items()}
    (kfile,) = export("gguf", work / "k", model, groups, chosen, bits,
                      QuantizeConfig(model=str(src), format="gguf", granularity="layer-projection"))
    tensors = {t.name: t for t in gguf.GGUFReader(str(kfile)).tensors}
    with torch.no_grad():
        for g in groups:
            for p in g.projections:
                names = ("ffn_gate_exps", "ffn_up_exps") if p.name == "gate_up_proj" else ("ffn_down_exps",)
                parts = []
                for n in names:
                    t = tensors[f"blk.{g.layer}.{n}.weight"]
                    parts.append(gguf.quants.dequantize(t.data, t.tensor_type).reshape(g.num_experts, -1,
                                                                                         p.in_features))
                getattr(g.module, p.name).copy_(torch.from_numpy(np.concatenate(parts, axis=1)))
    types = sorted({t.tensor_type.name for n, t in tensors.items() if "_exps" in n})
    rows.append((f"experts {', '.join(types)}", llama_ppl(bin_dir, kfile, text_file),
                 llama_style_ppl(model, tok, text_file.read_text(), N_CTX)))
    print("| GGUF | llama-perplexity | transformers with gguf-py's decoded weights, same chunks |")
    print("|---|---|---|")
    for label, a, b in rows:
        print(f"| {label} | {a:.4f} | {b:.4f} |")


if __name__ == "__main__":
    main()
