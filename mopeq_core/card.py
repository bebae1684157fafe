"""The model card (README.md) of a quantized artifact, and its bit-map heatmap (bitmap.png).

``write_model_card(out_dir, bitmap, report) -> list[Path]`` is called by the pipeline's export stage once
``bitmap.json`` and ``report.json`` exist. The card is a ``huggingface_hub.ModelCard`` whose metadata is a
``ModelCardData`` (``base_model``, ``base_model_relation: quantized``, ``library_name``, ``tags``, ``pipeline_tag``).
``base_model`` is a Hub repo id, never a path: the repo the model was fetched from, or for a local model the
``_name_or_path`` of its config when that names a Hub repo; otherwise it is left out (and so is the relation).
The card shows no filesystem path of the machine that made it. Then: size before and after,
mean bits, a histogram of widths, per-layer mean widths, the heatmap, perplexity before and after, the sensitivity
method (with the auto candidates' hold-out losses), allocator, quantizer, calibration data, package versions, the exact
``mopeq quantize`` command that reproduces the artifact and how to load it.
"""

from __future__ import annotations

import json
import math
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

HEATMAP_NAME = "bitmap.png"
WIDTH_COLORS = {2: "#d7301f", 3: "#fc8d59", 4: "#74c476", 5: "#41ab5d", 6: "#238b45", 8: "#2b8cbe"}
LOADERS = {
    "mopeq": "mopeq",
    "fake": "transformers",
    "compressed-tensors": "transformers",
    "gptq": "transformers",
    "gguf-overrides": "transformers",
}
DEFAULT_CALIB_DESC = "the built-in default calibration text (mopeq_core/data/calib_default.txt)"


# ---------------------------------------------------------------------------------------------------------------------
# small formatting helpers
# ---------------------------------------------------------------------------------------------------------------------


def short_number(x: float | None) -> str:
    """Compact form for heatmap cells: ``0.0123`` -> ``0.012``, ``12345`` -> ``1.2e+04``, ``1e-6`` -> ``1.0e-06``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 0.01:
        return f"{x:.1e}"
    return f"{x:.2g}"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    n = float(n)
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def is_local_model(model: str) -> bool:
    """The same rule as ``loading.resolve_model``: an existing path, or one that starts like a path."""
    return Path(model).expanduser().exists() or model.startswith((".", "/", "~"))


def hub_repo_id(name: Any, namespaced: bool = True) -> str | None:
    """``name`` when it reads as a Hub repo id (``namespace/name``; a bare legacy name such as ``gpt2`` too unless
    ``namespaced``) and is not a path on this machine, else None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(name, str) or name.count("/") > 1 or (namespaced and "/" not in name) or is_local_model(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def base_model_id(model: str, out_dir: Path | None = None) -> str | None:
    """The card's ``base_model``: the Hub repo the model came from; for a local model the ``_name_or_path`` of its
    config (then of the artifact's config) when that is a Hub repo id; None otherwise."""
    if not is_local_model(model):  # fetched from the Hub under this id
        return hub_repo_id(model, namespaced=False)
    for cfg_path in (Path(model).expanduser() / "config.json", *([Path(out_dir) / "config.json"] if out_dir else [])):
        try:
            name = json.loads(cfg_path.read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if hub_repo_id(name):
            return name
    return None


def _shown(path: Any) -> Any:
    """A data file as the card shows it: absolute (machine) paths by their file name only."""
    if isinstance(path, str) and (path.startswith(("/", "~")) or Path(path).is_absolute()):
        return Path(path).name
    return path


def _widths(bitmap: dict) -> list[int]:
    return sorted({x["bits"] for layer in bitmap["layers"] for x in layer["experts"]})


def bit_range_tag(widths: list[int]) -> str:
    if not widths:
        return "unquantized"
    lo, hi = min(widths), max(widths)
    return f"{lo}bit" if lo == hi else f"{lo}-{hi}bit"


def _or_list(items: list) -> str:
    items = [str(x) for x in items]
    return " or ".join(items) if len(items) <= 2 else ", ".join(items[:-1]) + " or " + items[-1]


def _layer_mean(layer: dict) -> float:
    params = sum(x["params"] for x in layer["experts"])
    return sum(x["bits"] * x["params"] for x in layer["experts"]) / max(params, 1)


# ---------------------------------------------------------------------------------------------------------------------
# reproduce command
# ---------------------------------------------------------------------------------------------------------------------


def reproduce_args(config: dict, out_dir: str | Path, revision: str | None = None) -> list[str]:
    """``mopeq quantize`` arguments (after ``quantize``) that rebuild this run from ``report["config"]``.

    ``revision`` (the resolved commit) pins the model when the run did not name one."""
    c = config
    args = [str(c["model"]), "--out", str(out_dir)]
    budget = c.get("budget") or {}
    if budget.get("gb") is not None:
        args += ["--budget-gb", repr(float(budget["gb"]))]
    else:
        args += ["--avg-bits", repr(float(budget.get("avg_bits") or 3.0))]
    args += ["--bits", ",".join(str(b) for b in c["bits"])]
    for key, flag in (("sensitivity", "--sensitivity"), ("allocator", "--allocator"), ("scope", "--scope"),
                      ("granularity", "--granularity"), ("quantizer", "--quantizer")):
        args += [flag, str(c[key])]
    args += ["--cost", str(c.get("cost", "output"))]
    if not c.get("sequential", True):
        args.append("--no-sequential")
    args += ["--group-size", str(c["group_size"])]
    if not c.get("symmetric", True):
        args.append("--asymmetric")
    if c.get("act_order"):
        args.append("--act-order")
    args += ["--probes", str(c["probes"]), "--probe-tol", repr(float(c["probe_tol"]))]
    if c.get("calib_file"):
        args += ["--calib-file", str(c["calib_file"])]
    args += ["--calib-samples", str(c["calib_samples"]), "--seq-len", str(c["seq_len"])]
    if c.get("calib_all_experts"):
        args.append("--calib-all-experts")
    if c.get("eval_file"):
        args += ["--eval-file", str(c["eval_file"])]
    args += ["--eval-samples", str(c["eval_samples"]), "--device", str(c["device"])]
    rev = c.get("revision") or revision
    if rev:
        args += ["--revision", str(rev)]
    if c.get("low_memory"):
        args.append("--low-memory")
    args += ["--format", str(c.get("format", "mopeq"))]
    if c.get("trust_remote_code"):
        args.append("--trust-remote-code")
    args += ["--seed", str(c.get("seed", 0))]
    return args


def reproduce_command(config: dict, out_dir: str | Path, revision: str | None = None) -> str:
    return "mopeq quantize " + " ".join(shlex.quote(a) for a in reproduce_args(config, out_dir, revision))


# ---------------------------------------------------------------------------------------------------------------------
# heatmap
# ---------------------------------------------------------------------------------------------------------------------


def heatmap_grid(bitmap: dict) -> tuple[list[int], list[list[int | None]], list[list[float | None]]]:
    """(layer indices, bits[row][expert], sensitivity[row][expert]); rows padded with None to the widest layer."""
    layers = bitmap["layers"]
    width = max((len(l_["experts"]) for l_ in layers), default=0)
    bits = [[None] * width for _ in layers]
    sens = [[None] * width for _ in layers]
    for r, layer in enumerate(layers):
        for x in layer["experts"]:
            bits[r][x["expert"]] = x["bits"]
            sens[r][x["expert"]] = x.get("sensitivity")
    return [l_["layer"] for l_ in layers], bits, sens


def render_heatmap(bitmap: dict, path: Path) -> dict:
    """Layers x experts, colour = bits, each cell annotated with the expert's sensitivity (short form).

    Returns what was drawn (``rows``, ``cols``, ``layers``, ``bits``) so callers can check it; the PNG also carries
    the grid size in its ``mopeq:grid`` text chunk."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    layer_ids, bits, sens = heatmap_grid(bitmap)
    rows, cols = len(bits), (len(bits[0]) if bits else 0)
    widths = _widths(bitmap)
    data = np.array([[np.nan if b is None else float(b) for b in row] for row in bits], dtype=float) \
        if rows and cols else np.full((1, 1), np.nan)
    colors = [WIDTH_COLORS.get(b, "#999999") for b in widths] or ["#999999"]
    bounds = ([w - 0.5 for w in widths] + [widths[-1] + 0.5]) if widths else [0, 1]
    cmap = ListedColormap(colors).with_extremes(bad="#ffffff")
    norm = BoundaryNorm(bounds, cmap.N)

    fig_w = min(40.0, max(5.0, 0.55 * cols + 2.5))
    fig_h = min(40.0, max(2.5, 0.42 * rows + 1.6))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=100)
    ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    cells = max(rows * cols, 1)
    font = 8 if cells <= 256 else 6 if cells <= 1024 else 4 if cells <= 4096 else 2.5
    for r in range(rows):
        for c in range(cols):
            if bits[r][c] is not None:
                ax.text(c, r, short_number(sens[r][c]), ha="center", va="center", fontsize=font, color="black")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    step_x = max(1, cols // 32)
    step_y = max(1, rows // 48)
    ax.set_xticks(list(range(0, cols, step_x)))
    ax.set_yticks(list(range(0, rows, step_y)))
    ax.set_yticklabels([str(layer_ids[i]) for i in range(0, rows, step_y)])
    method = (bitmap.get("sensitivity") or {}).get("method", "?")
    ax.set_title(f"bits per expert (mean {bitmap.get('avg_bits', float('nan')):.2f})\n"
                 f"cell text: {method} sensitivity", fontsize=9)
    ax.legend(handles=[Patch(color=WIDTH_COLORS.get(b, "#999999"), label=f"{b}-bit") for b in widths],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", metadata={"Software": "mopeq", "mopeq:grid": f"{rows}x{cols}",
                                              "mopeq:layers": ",".join(str(i) for i in layer_ids)})
    plt.close(fig)
    return {"rows": rows, "cols": cols, "layers": layer_ids, "bits": bits}


# ---------------------------------------------------------------------------------------------------------------------
# the card
# ---------------------------------------------------------------------------------------------------------------------


def _pipeline_tag(out_dir: Path) -> str:
    try:
        cfg = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "text-generation"
    archs = cfg.get("architectures") or []
    if "vision_config" in cfg or any(a.endswith("ForConditionalGeneration") for a in archs):
        return "image-text-to-text"
    return "text-generation"


def package_versions(report: dict) -> dict[str, str]:
    import platform

    out = {"mopeq": str(report.get("mopeq_version") or _version("mopeq"))}
    for name in ("torch", "transformers", "safetensors", "compressed-tensors"):
        v = _version(name)
        if v:
            out[name] = v
    out["python"] = platform.python_version()
    return out


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _load_section(fmt: str, out_dir: Path) -> list[str]:
    d = "DIR"  # this directory, or the Hub repo it was pushed to
    if fmt == "mopeq":
        return [
            ("Per-expert packed MoPEQ format (experts stay packed in memory and are dequantized per forward pass). "
            "Load it with the MoPEQ loader:"),
            "```python",
            "from mopeq_core import load_quantized",
            "from transformers import AutoTokenizer",
            f'model = load_quantized("{d}", device="cpu")  # or "cuda"',
            f'tokenizer = AutoTokenizer.from_pretrained("{d}")',
            "```",
        ]
    if fmt == "compressed-tensors":
        return [
            ("compressed-tensors `pack-quantized` checkpoint (one int scheme per MoE layer, non-expert weights kept). "
            "Stock transformers loads it (it dequantizes the experts while fusing them); `mopeq_core.load_quantized` "
            "is not needed:"),
            "```python",
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{d}")',
            "```",
            "See docs/EXPORTS.md of MoPEQ for serving engines.",
        ]
    if fmt == "gptq":
        return [
            "GPTQ (v1) checkpoint with a GPTQModel `dynamic` map for experts whose width differs from the default:",
            "```python",
            "from gptqmodel import GPTQModel",
            f'model = GPTQModel.load("{d}")',
            "```",
        ]
    if fmt == "gguf-overrides":
        from .exporters import gguf_commands

        return [
            "The fake-quantized weights in safetensors plus `tensor-types.txt` for llama.cpp. Build a GGUF with:",
            "```bash",
            *gguf_commands(d),
            "```",
        ]
    return [
        "Fake-quantized weights (dequantized, full-size) for evaluation:",
        "```python",
        "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{d}")',
        "```",
    ]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return lines


def _fmt_float(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    try:
        return f"{float(x):.{digits}f}"
    except (TypeError, ValueError):
        return str(x)


def build_card(out_dir: Path, bitmap: dict, report: dict, heatmap: str | None = HEATMAP_NAME) -> str:
    cfg = report.get("config") or {}
    fmt = cfg.get("format", "mopeq")
    widths = _widths(bitmap)
    sizes = report.get("sizes") or {}
    ppl = report.get("perplexity") or {}
    sens_desc = bitmap.get("sensitivity") or {}
    alloc = bitmap.get("allocation") or {}
    source = str(bitmap.get("model") or cfg.get("model"))
    base = base_model_id(source, out_dir)
    local = is_local_model(source)
    # a local model without a Hub id is named by its directory (./NAME in the reproduce command), never its path
    model_id = base or (Path(source).expanduser().name if local else source)
    name = model_id.rstrip("/").rsplit("/", 1)[-1]
    avg = bitmap.get("avg_bits")
    lines = [f"# {name} — MoPEQ, {avg:.2f} bits per expert weight" if avg is not None else f"# {name} — MoPEQ",
              "",
              f"Routed experts of `{model_id}`" + (f" (revision `{bitmap['revision']}`)" if bitmap.get("revision")
                                                   else "")
              + f" quantized per expert to {_or_list(widths)} bits by MoPEQ "
              "(sensitivity-guided bit allocation); non-expert weights are kept as they were. "
              f"Artifact format: `{fmt}`.", ""]

    # size ------------------------------------------------------------------------------------------------------
    fp_e, q_e = sizes.get("fp_expert_bytes"), sizes.get("expert_bytes", bitmap.get("expert_bytes"))
    ne = sizes.get("non_expert_bytes")
    total = sizes.get("total_bytes", bitmap.get("total_bytes"))
    before = (fp_e + ne) if fp_e is not None and ne is not None else None
    lines += ["## Size", ""]
    lines += _table(["", "before", "after"], [
        ["routed experts", f"{human_bytes(fp_e)} ({fp_e:,} B)" if fp_e is not None else "n/a",
         f"{human_bytes(q_e)} ({q_e:,} B)" if q_e is not None else "n/a"],
        ["non-expert weights", f"{human_bytes(ne)}" if ne is not None else "n/a",
         f"{human_bytes(ne)}" if ne is not None else "n/a"],
        ["total", f"{human_bytes(before)} ({before:,} B)" if before is not None else "n/a",
         f"{human_bytes(total)} ({total:,} B)" if total is not None else "n/a"],
    ])
    if fp_e and q_e:
        lines += ["", f"Experts are {fp_e / q_e:.2f}x smaller"
                  + (f"; the whole model {before / total:.2f}x." if before and total else ".")
                  + " Expert bytes count the packed codes plus float16 group scales (and zero points when "
                  "asymmetric)."]
    if fmt != "mopeq":
        lines += ["", f"These are MoPEQ's packed sizes (bitmap.json); the `{fmt}` files on disk use that format's "
                  "own layout" + (" and hold full-precision (dequantized) weights." if fmt in ("fake", "gguf-overrides")
                                  else ".")]
    lines += [""]

    # widths ----------------------------------------------------------------------------------------------------
    target = alloc.get("target_avg_bits")
    budget = alloc.get("budget_bytes")
    lines += ["## Bit widths", "",
              f"Mean bits per expert weight: **{avg:.3f}**" if avg is not None else "Mean bits: n/a"]
    if target is not None:
        lines[-1] += f" (target {target})"
    elif budget is not None:
        lines[-1] += f" (budget {human_bytes(budget)} for the whole model)"
    lines += ["", "Histogram of widths:", ""]
    experts = [x for layer in bitmap["layers"] for x in layer["experts"]]
    n_exp = max(len(experts), 1)
    n_par = max(sum(x["params"] for x in experts), 1)
    count = Counter(x["bits"] for x in experts)
    pcount = Counter()
    for x in experts:
        pcount[x["bits"]] += x["params"]
    lines += _table(["width", "experts", "share of experts", "share of expert weights", ""], [
        [f"{b}-bit", count[b], f"{100 * count[b] / n_exp:.1f} %", f"{100 * pcount[b] / n_par:.1f} %",
         "█" * max(1, round(20 * count[b] / n_exp))] for b in widths])
    lines += ["", "Per-layer mean width:", ""]
    lines += _table(["layer", "module", "mean bits", *[f"{b}-bit experts" for b in widths]], [
        [layer["layer"], f"`{layer['module']}`", f"{_layer_mean(layer):.2f}",
         *[sum(1 for x in layer["experts"] if x["bits"] == b) for b in widths]] for layer in bitmap["layers"]])
    if heatmap:
        lines += ["", (f"![bits per expert: layers x experts, colour = width, text = "
                      f"{sens_desc.get('method', 'sensitivity')} sensitivity]({heatmap})"), ""]

    # quality ---------------------------------------------------------------------------------------------------
    lines += ["## Perplexity", ""]
    if ppl.get("fp_perplexity") is not None and ppl.get("quantized_perplexity") is not None:
        inc = ppl.get("increase_pct")
        lines += _table(["model", "perplexity"], [
            ["full precision", _fmt_float(ppl["fp_perplexity"])],
            ["quantized (this artifact)", _fmt_float(ppl["quantized_perplexity"])],
            ["change", f"{inc:+.2f} %" if inc is not None else "n/a"]])
        lines += ["", (f"Measured on `{_shown(ppl.get('eval_file'))}` ({ppl.get('eval_tokens', 'n/a')} predicted tokens, "
                  f"{cfg.get('seq_len')}-token windows).")]
    else:
        lines += ["Not measured (the run had no `--eval-file`)."]
    lines += [""]
    if report.get("eval_suites"):
        from .eval_suites import markdown_table

        lines += ["## Evaluation suites", "", "Same settings on the full-precision and the quantized model.", ""]
        lines += markdown_table(report["eval_suites"]) + [""]

    # method ----------------------------------------------------------------------------------------------------
    lines += ["## How it was made", ""]
    method = sens_desc.get("method", report.get("selected_sensitivity"))
    s_line = f"- **Sensitivity**: `{method}`"
    extras = []
    if sens_desc.get("probes"):
        extras.append(f"{sens_desc['probes']} Hutchinson probes")
    if sens_desc.get("rel_std_err_median") is not None:
        extras.append(f"median relative std. error {sens_desc['rel_std_err_median']:.3g}")
    if sens_desc.get("calib_tokens"):
        extras.append(f"{sens_desc['calib_tokens']:,} calibration tokens")
    if extras:
        s_line += " (" + ", ".join(extras) + ")"
    if sens_desc.get("selected_by") == "auto":
        s_line += ("; chosen automatically by the lowest cross-fitted loss among the candidates below (scores "
                   "from one half of the calibration data, loss on the other, every token once)")
    lines.append(s_line)
    cand = report.get("candidate_holdout_loss") or sens_desc.get("candidate_holdout_loss") or {}
    if cand:
        paired = (report.get("candidate_validation") or {}).get("paired_vs_best") or {}

        def _diff(m):
            p = paired.get(m) or {}
            if p.get("std_err") is None:
                return "n/a"
            return f"{p['mean_diff']:+.5f} ± {p['std_err']:.5f}"
        lines += [""]
        lines += _table(["candidate", "validation loss", "vs the selected (paired, ± s.e.)", ""], [
            [f"`{m}`", _fmt_float(v, 5), _diff(m), "selected" if m == method else ""]
            for m, v in sorted(cand.items(), key=lambda kv: kv[1])])
        lines += [""]
    lines.append(f"- **Allocator**: `{alloc.get('allocator', cfg.get('allocator'))}`, scope "
                 f"`{alloc.get('scope', cfg.get('scope'))}`, granularity `{alloc.get('granularity', cfg.get('granularity'))}`"
                 f", widths {bitmap.get('bits_choices', cfg.get('bits'))}")
    allocation = report.get("allocation") or {}
    if allocation.get("exact") is not None:
        lines[-1] += " (exact optimum)" if allocation["exact"] else " (approximate solution)"
    lines.append(f"- **Quantizer**: `{bitmap.get('quantizer', cfg.get('quantizer'))}`, group size "
                 f"{bitmap.get('group_size', cfg.get('group_size'))}, "
                 f"{'symmetric' if bitmap.get('symmetric', cfg.get('symmetric', True)) else 'asymmetric'}"
                 + (", act-order" if cfg.get("act_order") else ""))
    calib = f"`{_shown(cfg['calib_file'])}`" if cfg.get("calib_file") else DEFAULT_CALIB_DESC
    cov = report.get("calibration") or {}
    c_line = (f"- **Calibration data**: {calib}, {cfg.get('calib_samples')} samples x {cfg.get('seq_len')} tokens")
    if cov.get("experts"):
        c_line += (f"; {cov.get('experts_with_tokens')}/{cov.get('experts')} experts received routed tokens "
                   f"(fewest: {cov.get('min_tokens')})")
    lines.append(c_line)
    stages = report.get("stages") or {}
    if stages:
        lines.append("- **Stage times**: " + ", ".join(
            f"{k} {v.get('seconds', 0):.1f} s" for k, v in stages.items() if isinstance(v, dict)))
    lines += [""]

    # versions, reproduce, load ---------------------------------------------------------------------------------
    lines += ["## Package versions", ""]
    lines += _table(["package", "version"], [[k, v] for k, v in package_versions(report).items()])
    shown_cfg = {**cfg, "model": f"./{Path(source).expanduser().name}" if local else model_id,
                 "calib_file": _shown(cfg.get("calib_file")), "eval_file": _shown(cfg.get("eval_file"))}
    lines += ["", "## Reproduce", "", "```bash",
              reproduce_command(shown_cfg, Path(out_dir).name, report.get("revision")) if cfg
              else "# configuration not recorded", "```", ""]
    if local and cfg:
        lines += [f"(`{shown_cfg['model']}`: the local model directory the run read; data files by their names.)",
                  ""]
    if cfg.get("allow_pickle"):
        lines += ["(The run also allowed pickle checkpoints, which the CLI does not offer.)", ""]
    lines += ["## How to load", ""] + _load_section(fmt, out_dir) + [""]
    lines += [("`bitmap.json` holds the per-expert widths, sensitivities and routing frequencies; `report.json` the "
              "full run report."), ""]
    return str(model_card(out_dir, fmt, widths, base, lines))


def card_data(out_dir: Path, fmt: str, widths: list[int], base: str | None):
    """The card's metadata, validated by ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import ModelCardData

    tags = ["mopeq", "moe", "mixed-precision", bit_range_tag(widths)]
    if fmt in ("compressed-tensors", "gptq"):
        tags.append(fmt)
    return ModelCardData(base_model=base, base_model_relation="quantized" if base else None,
                         library_name=LOADERS.get(fmt, "transformers"), tags=tags,
                         pipeline_tag=_pipeline_tag(out_dir))


def model_card(out_dir: Path, fmt: str, widths: list[int], base: str | None, body: list[str]):
    """A ``huggingface_hub.ModelCard``: the metadata as YAML front matter, then the body."""
    from huggingface_hub import ModelCard

    data = card_data(out_dir, fmt, widths, base)
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body))


def write_model_card(out_dir: Path, bitmap: dict, report: dict) -> list[Path]:
    """Write README.md and bitmap.png into ``out_dir``; return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    heatmap = out_dir / HEATMAP_NAME
    render_heatmap(bitmap, heatmap)
    files.append(heatmap)
    path = out_dir / "README.md"
    path.write_text(build_card(out_dir, bitmap, report, HEATMAP_NAME), encoding="utf-8")
    files.insert(0, path)
    return files
