"""Dense region features of a frozen open_clip image tower: one D-vector per region, in the joint
image-text space, for the head to score against the prompts.

ResNets (RN50, RN101, RN50x4, ...): the trunk up to layer4, then the attention pool's value and output
projections applied to every spatial token on its own (docs/math.md): no pooling, no mean token, no positional
embedding, so any input size works (RN101 at 448 px gives 14 x 14 = 196 regions). The original
DualCoOp adds the mean token and the (resized) positional embedding to the tokens first.

ViTs (ViT-B/16, ViT-L/14, ...): every block but the last as CLIP runs it; in the last block each patch
attends only to itself, which leaves the attention its value and output projections (as in MaskCLIP,
Zhou et al. 2022); then the residual MLP, ln_post and the projection, per patch. The last block's
global attention is what mixes every patch into the class token: kept, it washes locality out of the
patch outputs, while the value path is the ViT's counterpart of the ResNet's per-token v_proj/c_proj.
The positional embedding is resized (bicubic) when the input is not the model's size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError, UsageTypeError


def is_resnet(visual: nn.Module) -> bool:
    return hasattr(visual, "attnpool") and hasattr(visual, "layer4")


def is_vit(visual: nn.Module) -> bool:
    return hasattr(visual, "class_embedding") and hasattr(visual, "transformer")


def _resize_grid(positions: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(S*S, C) positional embeddings of a square grid resized to (height*width, C), bicubic."""
    side = round(positions.shape[0] ** 0.5)
    if (side, side) == (height, width):
        return positions
    grid = positions.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(height * width, -1).to(positions.dtype)


def resnet_regions(visual: nn.Module, images: torch.Tensor, with_positions: bool = False) -> torch.Tensor:
    """B x 3 x H x W images -> B x (H/32 * W/32) x D region features of an open_clip ModifiedResNet.

    ``with_positions`` is the original DualCoOp's protocol: the mean token and the positional
    embedding are added to the tokens before the projections (the mean token is then dropped).
    """
    x = visual.stem(images.to(visual.conv1.weight.dtype))
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    height, width = x.shape[-2:]
    tokens = x.flatten(2).transpose(1, 2)  # B x HW x C
    pool = visual.attnpool
    if with_positions:
        positions = pool.positional_embedding.to(tokens.dtype)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + torch.cat([positions[:1], _resize_grid(positions[1:], height, width)])
        tokens = tokens[:, 1:]
    return F.linear(F.linear(tokens, pool.v_proj.weight, pool.v_proj.bias), pool.c_proj.weight, pool.c_proj.bias)


def _value_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ResidualAttentionBlock in which every token attends only to itself (batch-first tokens)."""
    attention = block.attn
    width = x.shape[-1]
    value = F.linear(block.ln_1(x), attention.in_proj_weight[2 * width :], attention.in_proj_bias[2 * width :])
    x = x + block.ls_1(attention.out_proj(value))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def vit_regions(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W images -> B x (H/p * W/p) x D patch features of an open_clip VisionTransformer."""
    if getattr(visual, "attn_pool", None) is not None:
        raise UsageError("ViTs with an attentional pooler (CoCa) are not supported: use a CLIP ViT or ResNet")
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    height, width = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)  # B x HW x width
    positions = visual.positional_embedding.to(x.dtype)
    positions = torch.cat([positions[:1], _resize_grid(positions[1:], height, width)])
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + positions)
    transformer = visual.transformer
    # open_clip's blocks are sequence-first unless the transformer says otherwise (before 2.26 it never does)
    batch_first = getattr(transformer, "batch_first", False)
    x = x if batch_first else x.transpose(0, 1)
    for block in transformer.resblocks[:-1]:
        x = block(x)
    x = x if batch_first else x.transpose(0, 1)
    x = visual.ln_post(_value_path(transformer.resblocks[-1], x)[:, 1:])
    return x @ visual.proj


def region_grid(regions: int, height: int, width: int) -> tuple[int, int]:
    """The rows and columns of the grid of ``regions`` regions of an image of ``height`` x ``width``
    pixels (row-major, as both towers flatten their feature maps)."""
    rows = max(1, round(math.sqrt(regions * height / width)))
    if regions % rows:
        raise UsageError(f"{regions} regions do not form a grid for a {height} x {width} image")
    return rows, regions // rows


def check_image_side(visual: nn.Module, side: int) -> None:
    """A ViT's patches tile only sides that are multiples of its patch size: refuse any other side,
    whose last rows and columns of pixels the patch convolution would silently leave out."""
    if not is_vit(visual):
        return
    patch = visual.conv1.stride[0]
    if side % patch:
        below = side - side % patch
        raise UsageError(
            f"image_size {side} is not a multiple of the ViT's patch size {patch}: its last {side % patch} rows "
            f"and columns of pixels would be left out; use {below or patch} or {below + patch}"
        )


def region_features(visual: nn.Module, images: torch.Tensor, with_positions: bool = False) -> torch.Tensor:
    """Region features of any supported open_clip image tower (ResNet or ViT); see the module doc."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise UsageError(f"images must have shape B x 3 x H x W, got {tuple(images.shape)}")
    if is_resnet(visual):
        return resnet_regions(visual, images, with_positions)
    if is_vit(visual):
        return vit_regions(visual, images)
    raise UsageTypeError(
        f"unsupported image tower {type(visual).__name__}: expected an open_clip ModifiedResNet or ViT"
    )
