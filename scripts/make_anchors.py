"""Write the anchor set shipped with pyguard (pyguard/data/anchors): small generated images
(shapes on coloured backgrounds, deterministic) and one question each, as anchors.jsonl.

    .venv/bin/python scripts/make_anchors.py
"""
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "pyguard" / "data" / "anchors"
SHAPES = ["circle", "square", "triangle", "stripes"]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
QUESTIONS = ["What is shown in this image?", "Describe this picture in one sentence.",
             "Which shape and colour do you see?", "What could this image be used for?"]


def draw(shape: str, colour, background, size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(im)
    m = size // 6
    if shape == "circle":
        d.ellipse([m, m, size - m, size - m], fill=colour)
    elif shape == "square":
        d.rectangle([m, m, size - m, size - m], fill=colour)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=colour)
    else:
        for x in range(0, size, 8):
            d.rectangle([x, 0, x + 3, size], fill=colour)
    return im


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, shape in enumerate(SHAPES):
        for j, (name, colour) in enumerate(COLOURS.items()):
            background = tuple(int(x) for x in rng.integers(180, 256, 3))
            file = f"{shape}-{name}.png"
            draw(shape, colour, background).save(OUT / file, optimize=True)
            rows.append({"image": file, "text": QUESTIONS[(i + j) % len(QUESTIONS)]})
    (OUT / "anchors.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} anchors in {OUT}")


if __name__ == "__main__":
    main()
