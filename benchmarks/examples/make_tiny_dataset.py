"""Write a tiny synthetic image dataset in both of the runner's own-data layouts (no download).

    python benchmarks/examples/make_tiny_dataset.py OUT [--classes 12] [--per-class 8] [--size 40] [--seed 0]

writes ``OUT/images/<class>/<n>.png`` (for ``--dataset folder --data-root OUT/images``) and ``OUT/data.csv`` (for
``--dataset csv --data-root OUT/data.csv``): the first half of the classes train, the second half test, and in the
CSV every other test image of a class is a query, the rest its gallery. Each class is a texture (stripes or a
checkerboard of its own period) in random colours, with noise; every fourth image is saved in grayscale, to show
that both kinds are read.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import os

import numpy as np


def class_image(c: int, n_classes: int, size: int, rng: np.random.RandomState) -> np.ndarray:
    """One H x W x 3 uint8 image of class ``c``: a texture (horizontal stripes, vertical stripes or a checkerboard)
    of a period that the class fixes, at a random phase, in a random colour, with noise. The colour says nothing
    about the class: a network has to learn to look at the texture."""
    kind, period = c % 3, (3, 5, 8, 13, 21)[(c // 3) % 5]
    yy, xx = np.mgrid[0:size, 0:size]
    dy, dx = rng.randint(period, size=2)
    h = ((yy + dy) // max(1, period // 2)) % 2
    v = ((xx + dx) // max(1, period // 2)) % 2
    pattern = (h, v, h ^ v)[kind]
    fg = np.array(colorsys.hsv_to_rgb(rng.rand(), 0.8, 0.9))
    bg = np.array(colorsys.hsv_to_rgb(rng.rand(), 0.5, 0.3))
    img = np.where(pattern[..., None] == 1, fg, bg) + rng.normal(0, 0.08, (size, size, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_tiny_dataset(out: str, classes: int = 12, per_class: int = 8, size: int = 40, seed: int = 0) -> dict:
    """Write the image folder and the CSV file; returns their paths (``folder``, ``csv``)."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    folder = os.path.join(out, "images")
    rows = []
    for c in range(classes):
        name = f"class_{c:03d}"
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for i in range(per_class):
            img = Image.fromarray(class_image(c, classes, size, rng))
            if (c * per_class + i) % 4 == 3:
                img = img.convert("L")
            rel = os.path.join("images", name, f"{i:03d}.png")
            img.save(os.path.join(out, rel))
            test = c >= (classes + 1) // 2
            rows.append(
                {
                    "path": rel,
                    "label": name,
                    "split": "test" if test else "train",
                    "is_query": int(test and i % 2 == 0) if test else "",
                    "is_gallery": int(test and i % 2 == 1) if test else "",
                }
            )
    csv_path = os.path.join(out, "data.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "split", "is_query", "is_gallery"])
        w.writeheader()
        w.writerows(rows)
    return {"folder": folder, "csv": csv_path}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--size", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    paths = make_tiny_dataset(a.out, a.classes, a.per_class, a.size, a.seed)
    print(f"--dataset folder --data-root {paths['folder']}\n--dataset csv --data-root {paths['csv']}")
