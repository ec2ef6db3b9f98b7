"""Where each class finds its evidence, as pictures (the paper's visualisation): the evidence weights
of a class over the image's regions (the softmax over regions that weighs the region logits,
``DualCoOpPlusPlus.region_maps``) laid over the image as a red veil, on one fixed scale in multiples of
uniform evidence (the same in ``dualcoop explain`` and the report), so that a map that points nowhere
looks faint, not red.

``dualcoop explain RUN IMAGES --out DIR`` writes one PNG per image: the image, then one panel per class
(its top k, or the classes named), each with the class's name, probability and peak evidence (or that
it is near uniform), over the scale's colour bar.
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
CAPTION, BAR = 40, 44  # pixels under the panels: two caption lines, then the colour bar
VEIL = (230, 20, 20)
VEIL_OPACITY = 0.7
# The veil's scale, fixed so that pictures compare: evidence in multiples of uniform (a region's weight
# times the number of regions; 1 everywhere is evidence spread evenly), full red at SCALE_TOP and above.
SCALE_TOP = 8.0
SCALE_TICKS = (0, 1, 2, 4, 8)
NEAR_UNIFORM = 0.05  # a map whose every region is within 5 % of uniform points nowhere


def relative_evidence(weights: torch.Tensor) -> torch.Tensor:
    """Evidence weights (summing to 1 over the regions) in multiples of uniform."""
    weights = weights.float()
    return weights * weights.numel()


def evidence_summary(weights: torch.Tensor) -> str:
    """A map in words: its peak in multiples of uniform, or that it is near uniform (points nowhere)."""
    relative = relative_evidence(weights)
    spread = float((relative - 1).abs().max())
    if spread <= NEAR_UNIFORM:
        return f"near uniform (within {100 * spread:.0f} %): no place"
    return f"peak {float(relative.max()):.1f}x uniform"


def overlay(image, weights: torch.Tensor, side: int = PANEL):
    """The image as a ``side`` x ``side`` RGB picture with ``weights`` (an h x w evidence map) over it as
    a red veil on the fixed scale (:data:`SCALE_TOP`), so that a near-uniform map stays faint."""
    from PIL import Image

    base = image.convert("RGB").resize((side, side), Image.BICUBIC)
    opacity = (relative_evidence(weights) / SCALE_TOP).clamp(0, 1).cpu().numpy()
    veil = Image.fromarray(np.uint8(255 * VEIL_OPACITY * opacity)).resize((side, side), Image.BILINEAR)
    return Image.composite(Image.new("RGB", (side, side), VEIL), base, veil)


def colour_bar(width: int):
    """The veil's scale as a strip (the veil over mid grey), with its ticks in multiples of uniform."""
    from PIL import Image, ImageDraw

    left, right, top, bottom = 8, width - 16, 16, 28
    opacity = VEIL_OPACITY * np.linspace(0, 1, right - left)[:, None]
    colours = (1 - opacity) * 160 + opacity * np.array(VEIL)
    strip = Image.new("RGB", (width, BAR), "white")
    strip.paste(Image.fromarray(np.uint8(np.broadcast_to(colours, (bottom - top, *colours.shape)))), (left, top))
    draw = ImageDraw.Draw(strip)
    draw.text((left, 2), "evidence, in multiples of uniform (1: spread evenly over the regions)", fill="black")
    for tick in SCALE_TICKS:
        x = left + (right - left - 1) * tick / SCALE_TOP
        draw.line([(x, bottom), (x, bottom + 3)], fill="black")
        draw.text((x - 3, bottom + 4), f"{tick}+" if tick == SCALE_TOP else str(tick), fill="black")
    return strip


def jpeg_bytes(picture, quality: int = 80) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@torch.no_grad()
def explain_image(model, path: Path, image_size: int, protocol: str, classes: list[int] | None, top_k: int):
    """One picture: the image beside its evidence maps for ``classes`` (indices), or for its ``top_k``
    most probable classes, each captioned with the class, its probability and its map in words, over
    the veil's colour bar."""
    from PIL import Image, ImageDraw

    image = load_image(path, "explain")
    tensor = test_transform(image_size, protocol)(image)[None]
    maps = model.region_maps(tensor)
    probabilities = torch.sigmoid(ranking_scores(maps["logits"]))[0]
    chosen = classes if classes is not None else probabilities.topk(min(top_k, len(probabilities))).indices.tolist()
    panels = [image.convert("RGB").resize((PANEL, PANEL), Image.BICUBIC)]
    captions = [(Path(path).name, f"{image.width} x {image.height} pixels")]
    for c in chosen:
        evidence = maps["evidence"][0, c]
        panels.append(overlay(image, evidence))
        captions.append(
            (f"{model.prompts.classnames[c]}: probability {probabilities[c]:.2f}", evidence_summary(evidence))
        )
    width = PANEL * len(panels)
    sheet = Image.new("RGB", (width, PANEL + CAPTION + BAR), "white")
    draw = ImageDraw.Draw(sheet)
    for slot, (panel, lines) in enumerate(zip(panels, captions)):
        sheet.paste(panel, (slot * PANEL, 0))
        for row, line in enumerate(lines):
            draw.text((slot * PANEL + 4, PANEL + 5 + 16 * row), line[:36], fill="black")
    sheet.paste(colour_bar(min(width, 2 * PANEL)), (0, PANEL + CAPTION))
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
