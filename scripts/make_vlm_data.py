#!/usr/bin/env python
"""Build the small image+text set shipped in ``data/vlm/`` (no network needed).

Two sources, both available on any machine with the project's dependencies:

1. photographs and micrographs bundled inside the scikit-image wheel (``skimage.data``), each with a caption written
   by hand from what the picture shows (only images whose docstring states a license or "no known copyright
   restrictions" are used; the statement is copied into ``data/vlm/LICENSE.md``);
2. charts, tables and short text documents rendered here with matplotlib from data chosen in this script, whose
   caption states exactly what was drawn (true by construction).

Outputs: ``data/vlm/images/*.png`` (longest side <= 160 px for photos, small renders), ``data/vlm/calib.jsonl`` and
``data/vlm/eval.jsonl`` (``{"image": "images/NAME.png", "text": CAPTION}``; images relative to the .jsonl file) and
``data/vlm/LICENSE.md``. Deterministic: running it again rewrites identical files (matplotlib's PNG metadata is
stripped).

    .venv/bin/python scripts/make_vlm_data.py
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "data" / "vlm"
PHOTO_SIDE = 160

# skimage.data function -> caption (written from the image itself).
PHOTOS: dict[str, str] = {
    "astronaut": "A portrait of astronaut Eileen Collins smiling in an orange flight suit, with the United States "
                 "flag and a model of a space shuttle behind her.",
    "brick": "A grayscale photograph of a brick wall seen at an angle, with long rows of bricks.",
    "camera": "A black and white photograph of a man in a dark coat looking through a camera on a tripod on a "
              "lawn.",
    "chelsea": "A close-up color photograph of the face of a tabby cat with green eyes.",
    "clock": "A grayscale photograph of a motion-blurred round wall clock in front of a plain wall.",
    "coffee": "A color photograph from above of a cup of espresso on a red saucer with a spoon.",
    "coins": "A grayscale photograph of rows of old coins lying on a gray background.",
    "grass": "A grayscale close-up texture of grass with many thin blades.",
    "gravel": "A grayscale close-up texture of gravel made of many small stones.",
    "horse": "A black silhouette of a standing horse on a white background.",
    "hubble_deep_field": "A deep space photograph from the Hubble telescope showing many small distant galaxies on "
                         "a black background.",
    "immunohistochemistry": "A color microscope image of stained tissue: brown glands on a pale blue background.",
    "microaneurysms": "A small grayscale image of a retina with dark blood vessels and small dark spots.",
    "retina": "A color photograph of the retina of a human eye: an orange disc with red blood vessels on black.",
    "rocket": "A color photograph of a rocket standing on its launch pad at night between lit towers.",
    "text": "A grayscale photograph of handwritten characters on a light surface.",
    "cell": "A grayscale microscope image of a single round bright cell on a dark gray background.",
}


def _license_note(fn) -> str:
    """The sentences of a skimage.data docstring that say where the image comes from and under which terms."""
    doc = inspect.getdoc(fn) or ""
    doc = re.sub(r"Returns\n-------\n.*?(\n\n|$)", "", doc, flags=re.S).split("References\n----------")[0]
    lines = [ln.strip() for ln in doc.splitlines() if not re.fullmatch(r"-+|Notes|\.\. versionchanged::.*", ln.strip())]
    keep = []
    for para in "\n".join(lines).split("\n\n"):
        if para.startswith(".. ") or para.startswith("This image was replaced"):
            continue
        if re.search(r"licen[cs]e|public domain|CC0|copyright|downloaded from|photographer|owner", para, re.I):
            keep.append(" ".join(x for x in para.splitlines() if x))
    return " ".join(keep)


def _save_png(img, path: Path) -> None:
    img.save(path, format="PNG", optimize=True)


def _photo(name: str):
    import skimage.data as sd
    from PIL import Image

    arr = getattr(sd, name)()
    if arr.dtype != np.uint8:
        arr = (255 * (arr.astype(np.float64) / max(float(arr.max()), 1e-9))).astype(np.uint8)
    img = Image.fromarray(arr).convert("RGB")
    img.thumbnail((PHOTO_SIDE, PHOTO_SIDE), Image.Resampling.LANCZOS)
    return img


def _render(draw, size=(2.4, 1.8), dpi=80):
    """Render a matplotlib figure into a PIL image (no metadata, so the PNG is byte-stable)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig = plt.figure(figsize=size, dpi=dpi)
    draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _renders() -> list[tuple[str, object, str]]:
    """(name, PIL image, caption) for every matplotlib render."""
    out = []

    def bar(name, title, labels, values, color):
        def draw(fig):
            ax = fig.add_subplot(111)
            ax.bar(labels, values, color=color)
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
        parts = ", ".join(f"{k} {v}" for k, v in zip(labels, values))
        out.append((name, _render(draw), f"A {color} bar chart titled '{title}' with the values {parts}."))

    bar("bar_fruit", "Fruit sales", ["apples", "pears", "plums"], [12, 7, 4], "green")
    bar("bar_rain", "Rain days", ["May", "June", "July", "August"], [9, 6, 3, 5], "blue")
    bar("bar_votes", "Votes", ["red", "blue"], [30, 45], "orange")
    bar("bar_pets", "Pets owned", ["cats", "dogs", "fish"], [5, 8, 2], "purple")

    def line(name, title, ys, color):
        def draw(fig):
            ax = fig.add_subplot(111)
            ax.plot(range(1, len(ys) + 1), ys, color=color, marker="o")
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
        trend = "rises" if ys[-1] > ys[0] else "falls"
        out.append((name, _render(draw), f"A {color} line chart titled '{title}' that {trend} from {ys[0]} to "
                                         f"{ys[-1]} over {len(ys)} points."))

    line("line_temp", "Temperature", [10, 12, 15, 19, 22], "red")
    line("line_price", "Price", [50, 44, 40, 31], "black")
    line("line_users", "Users", [2, 4, 8, 16, 32, 64], "blue")

    def pie(name, title, labels, values):
        def draw(fig):
            ax = fig.add_subplot(111)
            ax.pie(values, labels=labels, textprops={"fontsize": 7})
            ax.set_title(title, fontsize=9)
        big = labels[int(np.argmax(values))]
        out.append((name, _render(draw), f"A pie chart titled '{title}' with {len(labels)} slices; the largest "
                                         f"slice is {big}."))

    pie("pie_budget", "Budget", ["rent", "food", "travel"], [50, 30, 20])
    pie("pie_energy", "Energy", ["solar", "wind", "gas", "coal"], [15, 35, 40, 10])

    def doc(name, lines):
        def draw(fig):
            fig.patch.set_facecolor("white")
            for i, t in enumerate(lines):
                fig.text(0.05, 0.85 - i * 0.2, t, fontsize=10, family="monospace")
        out.append((name, _render(draw, size=(3.0, 1.4)), "A document with the text: " + " ".join(lines)))

    doc("doc_invoice", ["INVOICE 1042", "Total: 250 EUR", "Due: 1 March"])
    doc("doc_memo", ["MEMO", "Meeting moved", "to room 12"])
    doc("doc_receipt", ["RECEIPT", "2 coffee 6.00", "1 cake 3.50"])
    doc("doc_sign", ["EXIT", "Keep door closed"])

    def table(name, header, rows):
        def draw(fig):
            ax = fig.add_subplot(111)
            ax.axis("off")
            t = ax.table(cellText=rows, colLabels=header, loc="center")
            t.set_fontsize(8)
        body = "; ".join(", ".join(r) for r in rows)
        out.append((name, _render(draw), f"A table with the columns {', '.join(header)} and the rows: {body}."))

    table("table_scores", ["name", "score"], [["Ana", "91"], ["Ben", "78"], ["Cy", "85"]])
    table("table_stock", ["item", "count"], [["bolts", "120"], ["nuts", "95"]])

    def shapes(name, kind, color):
        from matplotlib import patches

        def draw(fig):
            ax = fig.add_subplot(111)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_aspect("equal")
            ax.axis("off")
            if kind == "circle":
                ax.add_patch(patches.Circle((0.5, 0.5), 0.3, color=color))
            elif kind == "square":
                ax.add_patch(patches.Rectangle((0.2, 0.2), 0.6, 0.6, color=color))
            else:
                ax.add_patch(patches.Polygon([[0.2, 0.2], [0.8, 0.2], [0.5, 0.8]], color=color))
        out.append((name, _render(draw, size=(1.6, 1.6)), f"A single {color} {kind} on a white background."))

    shapes("shape_red_circle", "circle", "red")
    shapes("shape_blue_square", "square", "blue")
    shapes("shape_green_triangle", "triangle", "green")
    return out


def main() -> None:
    import skimage
    import skimage.data as sd

    images = OUT / "images"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("*.png"):
        old.unlink()
    records, licenses = [], []
    for name, caption in PHOTOS.items():
        _save_png(_photo(name), images / f"{name}.png")
        records.append({"image": f"images/{name}.png", "text": caption})
        licenses.append(f"- `images/{name}.png`: `skimage.data.{name}()` (scikit-image {skimage.__version__}), "
                        f"reduced to at most {PHOTO_SIDE} px. {_license_note(getattr(sd, name))}")
    for name, img, caption in _renders():
        _save_png(img, images / f"{name}.png")
        records.append({"image": f"images/{name}.png", "text": caption})
    # Interleave photos and renders, then hold out every fourth record for evaluation.
    order = sorted(range(len(records)), key=lambda i: (i * 7919) % len(records))
    records = [records[i] for i in order]
    calib = [r for i, r in enumerate(records) if i % 4 != 3]
    evals = [r for i, r in enumerate(records) if i % 4 == 3]
    for fname, rows in (("calib.jsonl", calib), ("eval.jsonl", evals)):
        (OUT / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    renders = ", ".join(f"`images/{n}.png`" for n, _, _ in _renders())
    (OUT / "LICENSE.md").write_text(
        "# Licenses of the images in data/vlm\n\n"
        "Made by `scripts/make_vlm_data.py`; nothing here was downloaded.\n\n"
        "## Photographs from scikit-image's bundled sample data\n\n"
        "scikit-image itself is BSD-3-Clause licensed; the statements below are those in the docstring of each "
        "`skimage.data` function (see also the scikit-image documentation of `skimage.data`).\n\n"
        + "\n".join(licenses) + "\n\n"
        "## Renders made by this project\n\n"
        f"{renders}: charts, tables, shapes and text documents drawn with matplotlib from values chosen in "
        "`scripts/make_vlm_data.py`. They are this project's own work, licensed like the project (Apache-2.0), and "
        "their captions state exactly what was drawn.\n\n"
        "## Captions\n\nThe captions of the photographs were written for this project from what each picture "
        "shows (Apache-2.0).\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{len(calib)} calibration + {len(evals)} evaluation pairs, {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
