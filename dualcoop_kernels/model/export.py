"""The trained model for inference, exported with ``torch.export``: normalised images in, B x C class
probabilities ``sigmoid(P+ - P-)`` out, with the prompts' text features folded in as constants (no text
encoder, no tokenizer, no open_clip at inference) and the head in eager PyTorch (the reference), so the
exported program runs wherever torch does. ``torch.export.load(path).module()(images)`` runs it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..reference.head import dualcoop_head_reference
from .regions import region_features


class FrozenScorer(nn.Module):
    """A model's image tower, text features and head, with nothing left to learn."""

    def __init__(self, model):
        super().__init__()
        self.visual = model.clip.visual
        self.with_positions = model.protocol == "dualcoop"
        with torch.no_grad():
            texts = [t.detach().float().clone() for t in model.text_features()]
        evidence, positive, negative = texts if len(texts) == 3 else (texts[0], *texts)
        for name, tensor in (("evidence", evidence), ("positive", positive), ("negative", negative)):
            self.register_buffer(name, tensor)
        self.register_buffer("log_spatial_temp", model.head.log_spatial_temp.detach().float().clone())
        self.wta, self.wta_gamma, self.logit_scale = model.head.wta, model.head.wta_gamma, model.head.logit_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        regions = region_features(self.visual, images, with_positions=self.with_positions).float()
        logits = dualcoop_head_reference(
            regions,
            self.evidence,
            self.positive,
            self.negative,
            self.log_spatial_temp,
            wta=self.wta,
            wta_gamma=self.wta_gamma,
            logit_scale=self.logit_scale,
        )
        return torch.sigmoid(logits[:, 1] - logits[:, 0])


def export_model(model, path, image_size: int, batch_example: int = 2) -> Path:
    """Export ``model`` (eval mode, on the CPU) for ``image_size`` x ``image_size`` images and any batch
    size; writes the ``.pt2`` file at ``path``, atomically."""
    from .._atomic import atomic_open

    scorer = FrozenScorer(model.cpu().eval()).eval()
    example = torch.randn(batch_example, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(scorer, (example,), dynamic_shapes={"images": {0: batch}})
    with atomic_open(path, "wb") as file:
        torch.export.save(program, file)
    return Path(path)
