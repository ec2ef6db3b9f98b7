"""The model wing: DualCoOp++ on a frozen open_clip CLIP (needs the ``clip`` extra, imported on use).

``dualcoop.py`` the model; ``prompts.py`` the learned prompts; ``text.py`` the text encoder (full, short,
shared prefix); ``regions.py`` dense region features of CLIP's image towers; ``images.py`` CLIP's
preprocessing and the image check; ``loading.py`` open_clip models by name, with weights from a file or a tag;
``settings.py`` ``ModelSettings``, what rebuilds a model; ``pretrained.py`` the files of a folder of
trained prompts to share (read and written for ``save_pretrained`` and ``from_pretrained``);
``export.py`` the inference model as a ``torch.export`` program.
"""

from .dualcoop import DualCoOpPlusPlus
from .images import check_images, clip_image_transform
from .loading import load_clip

__all__ = ["DualCoOpPlusPlus", "check_images", "clip_image_transform", "load_clip"]
