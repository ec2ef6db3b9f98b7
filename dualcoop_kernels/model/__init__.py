"""The model wing: DualCoOp++ on a frozen open_clip CLIP (needs the ``clip`` extra, imported on use).

``dualcoop.py`` the model; ``prompts.py`` the learned prompts and the text encoder; ``regions.py`` dense
region features of CLIP's image towers; ``images.py`` CLIP's preprocessing and the image check;
``loading.py`` open_clip models by name, with weights from a file or a tag.
"""

from .dualcoop import DualCoOpPlusPlus
from .images import check_images, clip_image_transform
from .loading import load_clip

__all__ = ["DualCoOpPlusPlus", "check_images", "clip_image_transform", "load_clip"]
