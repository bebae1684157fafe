"""Loads ``--format gptq`` exports with GPTQModel on CPU (torch kernel) and compares logits with the fake-quantized model.

Not in CI: gptqmodel is no dependency of the project. Install it aside and point PYTHONPATH at it:

    BUILD_CUDA_EXT=0 .venv/bin/pip install --target /tmp/gpkgs --no-deps gptqmodel==7.7.0 Defuser==0.0.28 \\
        Device-SMI==0.5.7 LogBar==0.4.15 PyPcre==0.6.4 TokeNicer==0.0.14 torchao==0.18.0
    PYTHONPATH=.:/tmp/gpkgs OMP_NUM_THREADS=1 .venv/bin/python bench/check_gptqmodel.py

For each (architecture, widths) it exports a tiny random model, loads it with ``GPTQModel.load(..., device="cpu",
backend=BACKEND.TORCH, dtype=torch.float16)`` as written and, for Mixtral, after renaming to GPTQModel's defused
expert names (``block_sparse_moe.experts.E.w1/w3/w2`` -> ``mlp.experts.E.gate_proj/up_proj/down_proj``), and prints
the relative logit error next to that of the fake-quantized model cast to float16 (the floor for a float16 loader).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import tiny_models  # noqa: E402
from test_exporters import IDS, cfg_for, logits, quantized, rel_err  # noqa: E402

from mopeq_core.exporters import export  # noqa: E402

WIDTHS = {"uniform 4": lambda i, e: 4, "layers 4/8": lambda i, e: 4 if i == 0 else 8,
          "experts 2/3/4/8": lambda i, e: (2, 3, 4, 8)[e % 4]}


def defused(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    def ren(k: str) -> str:
        for old, new in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            k = re.sub(rf"block_sparse_moe\.experts\.(\d+)\.{old}", rf"mlp.experts.\1.{new}", k)
        return k.replace("block_sparse_moe.gate", "mlp.gate")

    shutil.copytree(src, dst)
    idx = json.loads((dst / "model.safetensors.index.json").read_text())
    for shard in set(idx["weight_map"].values()):
        t = load_file(str(dst / shard))
        save_file({ren(k): v for k, v in t.items()}, str(dst / shard), metadata={"format": "pt"})
    idx["weight_map"] = {ren(k): v for k, v in idx["weight_map"].items()}
    (dst / "model.safetensors.index.json").write_text(json.dumps(idx))
    for f in ("config.json", "quantize_config.json"):
        text = (dst / f).read_text().replace("block_sparse_moe", "mlp").replace("w1|w2|w3", "down_proj|gate_proj|up_proj")
        (dst / f).write_text(text)
    return dst


def main() -> None:
    from gptqmodel import BACKEND, GPTQModel

    root = Path(tempfile.mkdtemp(prefix="gptqmodel-"))
    print("| model | widths | layout | rel. logit error, GPTQModel fp16 | fake-quantized model cast to fp16 |")
    print("|---|---|---|---|---|")
    for arch in ("mixtral", "qwen2_moe"):
        src = tiny_models.build_model(arch, root / "src")
        for label, width in WIDTHS.items():
            model, groups, chosen, bits = quantized(src, width)
            out = root / f"{arch}-{label.replace(' ', '').replace('/', '_')}"
            export("gptq", out, model, groups, chosen, bits, cfg_for("gptq"))
            tiny_models.tokenizer().save_pretrained(out)
            ref = logits(model, IDS)
            floor = rel_err(ref, logits(copy.deepcopy(model).half(), IDS))
            layouts = [("as written", out)] + ([("defused names", defused(out, Path(str(out) + "-defused")))]
                                               if arch == "mixtral" else [])
            for name, d in layouts:
                try:
                    m = GPTQModel.load(str(d), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
                    err = f"{rel_err(ref, logits(m.model, IDS)):.2e}"
                except Exception as exc:  # noqa: BLE001 - report the loader's refusal as the result
                    err = f"refused: {type(exc).__name__}: {str(exc)[:90]}"
                print(f"| {arch} | {label} | {name} | {err} | {floor:.2e} |")


if __name__ == "__main__":
    main()
