"""Where each class finds its evidence, as pictures (the paper's visualisation): the evidence weights
of a class over the image's regions (the softmax over regions that weighs the region logits,
``DualCoOpPlusPlus.region_maps``) laid over the image as a red veil.

``dualcoop explain RUN IMAGES --out DIR`` writes one PNG per image: the image, then one panel per class
(its top k, or the classes named), each with the class's name and probability.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_open
from ..data import load_image
from ..data.transforms import test_transform
from ..metrics import ranking_scores

PANEL = 224  # pixels a side of each panel
VEIL = (230, 20, 20)


def overlay(image, weights: torch.Tensor, side: int = PANEL):
    """The image as a ``side`` x ``side`` RGB picture with ``weights`` (an h x w map) over it as a red
    veil, strongest where the weight is largest."""
    from PIL import Image

    base = image.convert("RGB").resize((side, side), Image.BICUBIC)
    values = weights.float().cpu().numpy()
    values = values / max(float(values.max()), 1e-12)
    veil = Image.fromarray(np.uint8(255 * 0.6 * values)).resize((side, side), Image.BILINEAR)
    return Image.composite(Image.new("RGB", (side, side), VEIL), base, veil)


def jpeg_bytes(picture, quality: int = 80) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@torch.no_grad()
def explain_image(model, path: Path, image_size: int, protocol: str, classes: list[int] | None, top_k: int):
    """One picture: the image beside its evidence maps for ``classes`` (indices), or for its ``top_k``
    most probable classes, each captioned with the class and its probability."""
    from PIL import Image, ImageDraw

    image = load_image(path, "explain")
    tensor = test_transform(image_size, protocol)(image)[None]
    maps = model.region_maps(tensor)
    probabilities = torch.sigmoid(ranking_scores(maps["logits"]))[0]
    chosen = classes if classes is not None else probabilities.topk(min(top_k, len(probabilities))).indices.tolist()
    panels = [image.convert("RGB").resize((PANEL, PANEL), Image.BICUBIC)]
    captions = [Path(path).name]
    for c in chosen:
        panels.append(overlay(image, maps["evidence"][0, c]))
        captions.append(f"{model.prompts.classnames[c]}: {probabilities[c]:.2f}")
    sheet = Image.new("RGB", (PANEL * len(panels), PANEL + 24), "white")
    draw = ImageDraw.Draw(sheet)
    for slot, (panel, caption) in enumerate(zip(panels, captions)):
        sheet.paste(panel, (slot * PANEL, 0))
        draw.text((slot * PANEL + 4, PANEL + 5), caption[:34], fill="black")
    return sheet


def write_explanations(model, paths: list[Path], out, config, classes=None, top_k: int = 3) -> list[Path]:
    """``out/<image name>.png`` for every image (names made unique by their position when they repeat)."""
    out = Path(out)
    stems = Counter(Path(path).stem for path in paths)
    written = []
    for number, path in enumerate(paths):
        stem = Path(path).stem
        target = out / f"{stem if stems[stem] == 1 else f'{number}_{stem}'}.png"
        with atomic_open(target, "wb") as file:
            explain_image(model, path, config.image_size, config.protocol, classes, top_k).save(file, format="PNG")
        written.append(target)
    return written
