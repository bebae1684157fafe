"""The model card (README.md) of a quantized artifact."""

from __future__ import annotations

from pathlib import Path


def write_model_card(out_dir: Path, bitmap: dict, report: dict) -> list[Path]:
    cfg = report["config"]
    widths = sorted({x["bits"] for layer in bitmap["layers"] for x in layer["experts"]})
    ppl = report.get("perplexity") or {}
    lines = [
        "---",
        f"base_model: {bitmap['model']}",
        "base_model_relation: quantized",
        "library_name: transformers",
        "tags: [mopeq, moe, mixed-precision, " + ", ".join(f"{b}-bit" for b in widths) + "]",
        "pipeline_tag: text-generation",
        "---",
        f"# {Path(str(bitmap['model'])).name} — MoPEQ {bitmap['avg_bits']:.2f}-bit",
        "",
        f"Mean expert width {bitmap['avg_bits']:.3f} bits; expert bytes {bitmap['expert_bytes']:,}; "
        f"total {bitmap['total_bytes']:,} bytes.",
        f"Perplexity: full precision {ppl.get('fp_perplexity')}, quantized {ppl.get('quantized_perplexity')}.",
        f"Sensitivity {bitmap['sensitivity']['method']}, allocator {cfg['allocator']}, quantizer {cfg['quantizer']}.",
        "",
        "Load with `mopeq_core.load_quantized(DIR)`.",
    ]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return [path]
