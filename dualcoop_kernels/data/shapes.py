"""A small multi-label task that a randomly initialised CLIP's prompts can learn: coloured shapes on
noise, written as a labelled CSV with PNG images, and a tiny open_clip model config to learn it with.
A first try of the package on a CPU, in a minute (README, "A first try"), and the tests' task.

    dualcoop first-try FOLDER   # labels.csv, test.csv, images/, tiny-clip.json
"""

import csv
import json
from pathlib import Path

import numpy as np

from ..errors import UsageError

SHAPES = {
    "red square": (220, 30, 30),
    "green disc": (30, 200, 40),
    "blue bar": (40, 60, 230),
    "yellow cross": (230, 220, 30),
}
TINY_CLIP = {
    "embed_dim": 64,
    # a ViT: its patch embedding keeps colour and shape where a random ResNet's features barely vary
    "vision_cfg": {"image_size": 48, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def _draw(draw, name, colour, rng, side):
    x, y = rng.integers(4, side - 20, size=2)
    size = int(rng.integers(10, 16))
    if name.endswith("square"):
        draw.rectangle([x, y, x + size, y + size], fill=colour)
    elif name.endswith("disc"):
        draw.ellipse([x, y, x + size, y + size], fill=colour)
    elif name.endswith("bar"):
        draw.rectangle([x, y, x + size, y + size // 3], fill=colour)
    else:
        draw.rectangle([x + size // 3, y, x + 2 * size // 3, y + size], fill=colour)
        draw.rectangle([x, y + size // 3, x + size, y + 2 * size // 3], fill=colour)


def write_shapes(folder, count, seed=0, side=48, classes=SHAPES, name="labels.csv"):
    """``count`` images with each shape present with probability 0.4 (at least one), and their CSV."""
    from PIL import Image, ImageDraw  # here: TINY_CLIP is read where PIL may be missing (a GPU machine)

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    rows = []
    for index in range(count):
        present = rng.random(len(classes)) < 0.4
        present[rng.integers(len(classes))] = True
        image = Image.fromarray(rng.integers(0, 90, size=(side, side, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for (shape, colour), here in zip(classes.items(), present):
            if here:
                _draw(draw, shape, colour, rng, side)
        path = f"images/{seed}_{index}.png"
        image.save(folder / path)
        rows.append([path, *(int(value) for value in present)])
    with open(folder / name, "w", newline="") as file:
        csv.writer(file).writerows([["image", *classes], *rows])
    return folder / name


def write_tiny_clip(folder):
    path = folder / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def write_first_try(folder: Path, train: int = 160, test: int = 64) -> str:
    """The first try's task in ``folder``; what was written, in a line."""
    for name, count in (("train", train), ("test", test)):
        if count < 1:
            raise UsageError(f"--{name} must be at least 1 image, got {count}")
    train_csv = write_shapes(folder, train, seed=0)
    test_csv = write_shapes(folder, test, seed=1, name="test.csv")
    return f"{train_csv} ({train} images), {test_csv} ({test} images), {write_tiny_clip(folder)}"


if __name__ == "__main__":  # python -m dualcoop_kernels.data.shapes FOLDER: as dualcoop first-try
    import sys

    from ..cli import main

    raise SystemExit(main(["first-try", *sys.argv[1:]]))
