"""DualCoOp++ on a frozen open_clip model: region features, learned prompts, the head.

Only the prompt contexts (and, in DualCoOp++, the log spatial temperature) learn; the CLIP weights are
frozen and stay in eval mode. The original DualCoOp (NeurIPS 2022) is ``protocol="dualcoop"``.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from .._checks import check_choice, check_classnames, check_float, check_tensor
from ..errors import UsageError
from ..head import DualCoOpHead
from ..options import DEFAULT_LOG_SPATIAL_TEMP, ORIGINAL_LOGIT_SCALE, ORIGINAL_TEMPERATURE, PROTOCOLS
from ..reference.head import dualcoop_head_regions
from .images import check_images, clip_image_transform
from .loading import load_clip, open_clip_module, registered_config, registered_name
from .pretrained import describe_prompts, describe_settings, read_folder, write_folder
from .prompts import PromptLearner
from .regions import region_features, region_grid
from .settings import ModelSettings
from .text import TEXT_ENCODINGS, TextEncoder

# Without autograd the head scores chunks of images whose B x N x C intermediates hold about this many
# numbers (the head must see all classes at once for WTA): 4 MiB each in float32, whatever the vocabulary
HEAD_CHUNK_ELEMENTS = 2**20


class DualCoOpPlusPlus(nn.Module):
    """Multi-label recognition with learned prompts on a frozen CLIP (DualCoOp++, or the original DualCoOp).

    Args:
        clip: an open_clip model name (e.g. ``"RN101"``, ``"ViT-B-16"``) or an open_clip CLIP model.
        classnames: the C class names, in the order of the logits.
        pretrained: with a model name: a checkpoint file or an open_clip tag (e.g. ``"openai"``); None
            leaves the CLIP weights random (for tests).
        n_ctx: context tokens per prompt (21); ctx_init: a phrase to start every context from (its token
            count is then n_ctx); shared_contexts: one set of contexts for all classes (it can score other
            class names: :meth:`for_classes`) instead of one per class.
        wta: the head's winner-take-all mode; head_backend: the head's backend (``"auto"``, ``"triton"``,
            ``"reference"``).
        protocol: ``"dualcoop++"`` (three prompts, learned temperature starting at ``spatial_temp_init``,
            logit scale e^3, WTA) or ``"dualcoop"`` (two prompts, the positive one as evidence, tau 20,
            logit scale 100, no WTA, mean token and positional embedding in the ResNet tokens).
        freeze_temperature: keeps DualCoOp++'s log temperature at ``spatial_temp_init`` (not learned,
            not in :meth:`prompt_state_dict`): with ``wta="pos_norm"``, the authors' ``pos_norm_det``.
        text_encoding: ``"short"`` runs the causal text transformer on the tokens up to the last [EOS]
            only, with fused attention, and with shared contexts computes their common prefix once per
            prompt set (the same features to rounding, several to many times faster: model/text.py);
            ``"full"`` on all 77 tokens through open_clip's own modules, as the authors did.

    ``forward(images)`` takes B x 3 x H x W images normalised as :meth:`image_transform` does and
    returns B x 2 x C logits (``[:, 0]`` negative, ``[:, 1]`` positive); ``forward(regions=...)``
    takes cached :meth:`encode_regions` output instead. :meth:`for_classes` scores other class names
    with the same CLIP and learned shared contexts.
    """

    def __init__(
        self,
        clip: str | nn.Module,
        classnames: list[str],
        *,
        pretrained: str | None = None,
        n_ctx: int | None = None,
        ctx_init: str | None = None,
        shared_contexts: bool = False,
        wta: str = "pos_norm",
        head_backend: str = "auto",
        protocol: str = "dualcoop++",
        spatial_temp_init: float = DEFAULT_LOG_SPATIAL_TEMP,
        text_encoding: str = "short",
        freeze_temperature: bool = False,
    ):
        super().__init__()
        check_choice("protocol", protocol, PROTOCOLS)
        check_choice("text_encoding", text_encoding, TEXT_ENCODINGS)
        classnames = check_classnames(classnames)  # before loading CLIP, which takes a while
        backbone = clip if isinstance(clip, str) else None  # a CLIP given as a module has no name
        if isinstance(clip, str):
            name = registered_name(clip)
            clip = load_clip(name, pretrained)  # first: it names an unknown model in a ValueError
            tokenizer = open_clip_module().get_tokenizer(name)
        else:
            tokenizer = open_clip_module().get_tokenizer("RN50")  # the CLIP BPE tokenizer that every CLIP model uses
        self.clip = clip.requires_grad_(False).eval()
        self.protocol = protocol
        original = protocol == "dualcoop"
        prompt_sets = ("pos", "neg") if original else ("evidence", "pos", "neg")
        self.prompts = PromptLearner(
            clip, tokenizer, classnames, prompt_sets, n_ctx, ctx_init, shared_contexts=shared_contexts
        )
        self.text_encoder = TextEncoder(clip, full_length=text_encoding == "full")
        if original:  # the same head: the positive prompts as evidence, a fixed temperature, no WTA
            self.head = DualCoOpHead(
                wta="none",
                logit_scale=ORIGINAL_LOGIT_SCALE,
                spatial_temp_init=math.log(ORIGINAL_TEMPERATURE),
                backend=head_backend,
                freeze_temperature=True,
            )
        else:
            self.head = DualCoOpHead(
                wta=wta,
                spatial_temp_init=spatial_temp_init,
                backend=head_backend,
                freeze_temperature=freeze_temperature,
            )
        self._text_cache: tuple | None = None
        # what rebuilds this model (from_settings, save_pretrained)
        self.settings = ModelSettings(
            backbone=backbone, pretrained=pretrained, n_ctx=self.prompts.n_ctx, shared_contexts=shared_contexts,
            wta=self.head.wta, protocol=protocol, freeze_temperature=freeze_temperature,
        )  # fmt: skip

    @classmethod
    def from_settings(cls, settings: ModelSettings, classnames: list[str], clip: nn.Module | None = None):
        """The model ``settings`` describe, for ``classnames``, its random parts (CLIP weights without a
        tag, the initial contexts) drawn from ``settings.seed``; ``clip`` reuses an already loaded CLIP."""
        backbone = settings.backbone
        if clip is None and not backbone:
            raise UsageError("settings name no backbone: give its open_clip name, or pass clip=<a loaded CLIP>")
        if clip is None and settings.clip_config:  # an open_clip config kept in full: registered first
            backbone = registered_config(backbone, settings.clip_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed or 0)
            model = cls(
                clip if clip is not None else backbone,
                classnames,
                pretrained=settings.pretrained if clip is None else None,
                n_ctx=settings.n_ctx,
                shared_contexts=settings.shared_contexts,
                wta=settings.wta,
                protocol=settings.protocol,
                freeze_temperature=settings.freeze_temperature,
            )
        # the names and seed given, whatever was loaded; the values the model resolved (aliases, n_ctx)
        given = dict(backbone=settings.backbone, pretrained=settings.pretrained, seed=settings.seed)
        model.settings = dataclasses.replace(model.settings, **given, clip_config=settings.clip_config)
        return model

    def train(self, mode: bool = True):
        """Training (or, with ``mode=False``, eval) mode for the prompts and the head, as ``nn.Module.train``;
        the frozen CLIP stays in eval mode, its batch norm statistics included. Returns the model."""
        super().train(mode)
        self.clip.eval()  # frozen, batch norm statistics included
        return self

    def learnable_parameters(self) -> list[nn.Parameter]:
        """The parameters that learn, for the optimizer: the contexts, and the log temperature unless it is
        frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    def learnable_parameter_count(self) -> int:
        """The papers' #P: how many numbers learn (contexts, and the log temperature)."""
        return sum(p.numel() for p in self.learnable_parameters())

    @property
    def embed_dim(self) -> int:
        """D, the width of the joint image-text space: of the region features and the text features."""
        projection = self.clip.text_projection
        return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]

    def image_transform(self, image_size: int | None = None):
        """The preprocessing the model expects, as a torchvision transform: PIL images (any mode: RGBA
        and grayscale become RGB), H x W x 3 NumPy arrays or uint8 tensors (3 x H x W, or B x 3 x H x W)
        to float32, resized to a square of ``image_size`` pixels (bicubic; the CLIP model's own size
        when None; DualCoOp++ trains at 448) and normalised with CLIP's mean and standard deviation."""
        return clip_image_transform(self.clip.visual, image_size)

    @torch.no_grad()
    def encode_regions(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W normalised images (see :meth:`image_transform`) -> B x N x D region features
        of the frozen CLIP (cacheable: they never change while the prompts learn)."""
        check_images(images)
        return region_features(self.clip.visual, images, with_positions=self.protocol == "dualcoop")

    def text_features(self, classes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One C x D tensor per prompt set (only the classes at the indices ``classes`` when given).
        Outside autograd (inference) the features of all classes are computed once and reused until a
        context changes (in-place updates bump its version)."""
        contexts = list(self.prompts.contexts().values())
        tracked = torch.is_grad_enabled() and any(c.requires_grad for c in contexts)
        key = tuple((c._version, c.data_ptr(), c.dtype, c.device) for c in contexts)
        cached = not tracked and classes is None
        if cached and self._text_cache is not None and self._text_cache[0] == key:
            return self._text_cache[1]
        features = list(self.text_encoder(*self.prompts(classes)).unbind(0))
        if cached:
            self._text_cache = (key, features)
        return features

    def forward(
        self,
        images: torch.Tensor | None = None,
        *,
        regions: torch.Tensor | None = None,
        classes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """B x 2 x C logits of ``images`` (or of cached ``regions``); with ``classes`` (indices), B x 2 x
        len(classes) logits of those classes only, in that order."""
        if (images is None) == (regions is None):
            raise UsageError("pass images (B x 3 x H x W) or regions (B x N x D from encode_regions), one of them")
        if regions is None:
            regions = self.encode_regions(images)
        else:
            doc = f"B x N x {self.embed_dim} (N regions of this model's width, as encode_regions gives them)"
            check_tensor("regions", regions, 3, doc)
            check_float("regions", regions)
            if regions.shape[-1] != self.embed_dim:
                raise UsageError(f"regions must have shape {doc}, got {tuple(regions.shape)}")
        texts = self.text_features(classes)
        # the head computes in float32 (float64 for float64 regions), also when the encoders ran in
        # fp16 or bf16 under autocast
        dtype = torch.float64 if regions.dtype == torch.float64 else torch.float32
        evidence, positive, negative = (t.to(dtype) for t in (texts if len(texts) == 3 else (texts[0], *texts)))
        with torch.autocast(regions.device.type, enabled=False):
            return self._head_logits(regions.to(dtype), evidence, positive, negative)

    def _head_logits(self, regions: torch.Tensor, *texts: torch.Tensor) -> torch.Tensor:
        """The head; without autograd in chunks of images, so that many classes fit in bounded memory."""
        step = max(1, HEAD_CHUNK_ELEMENTS // (regions.shape[1] * texts[0].shape[0]))
        if torch.is_grad_enabled() or regions.shape[0] <= step:
            return self.head(regions, *texts)
        # one tensor made before the chunks: small results kept between the chunks' large temporaries
        # would fragment the heap, and the peak would grow with the number of images after all
        logits = regions.new_empty(regions.shape[0], 2, texts[0].shape[0])
        for start in range(0, regions.shape[0], step):
            logits[start : start + step] = self.head(regions[start : start + step], *texts)
        return logits

    @torch.no_grad()
    def region_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Where each class finds its evidence in each image, as B x C x h x w maps over the image's grid
        of regions: ``evidence``, the weights of the regions (the softmax over regions of tau s^e at the
        learned temperature), and ``positive`` and ``negative``, the region logits after WTA; with
        ``logits`` (B x 2 x C), their weighted sums ``P+ = sum(evidence * positive)`` and ``P- =
        sum(evidence * negative)``: exactly what the head aggregates (computed by the reference head)."""
        regions = self.encode_regions(images).float()
        texts = [t.float() for t in self.text_features()]
        evidence, positive, negative = texts if len(texts) == 3 else (texts[0], *texts)
        head = self.head
        attention, region_pos, region_neg = dualcoop_head_regions(
            *(regions, evidence, positive, negative, head.log_spatial_temp.float()),
            *(head.wta, head.wta_gamma, head.logit_scale),
        )
        logits = torch.stack([(attention * region_neg).sum(dim=1), (attention * region_pos).sum(dim=1)], dim=1)
        height, width = region_grid(regions.shape[1], images.shape[-2], images.shape[-1])
        maps = {"evidence": attention, "positive": region_pos, "negative": region_neg}
        shape = (regions.shape[0], height, width, -1)
        return {name: m.reshape(shape).permute(0, 3, 1, 2) for name, m in maps.items()} | {"logits": logits}

    def for_classes(self, classnames: list[str]) -> DualCoOpPlusPlus:
        """This model scoring other classes: the same frozen CLIP, learned shared contexts, head and
        text encoder (shared, not copied: the new model follows this one's training), prompts around
        ``classnames``. Only their token ids are stored (C x 77), and without autograd the text
        features are computed in chunks of classes and the head in chunks of images, so 10,000 names
        cost little beyond their C x D features. Needs contexts shared by all classes (``shared_contexts``).
        WTA compares the classes scored together: logits depend on the list they are scored with."""
        other = copy.copy(self)  # every setting; the submodules' table is its own (prompts replaced)
        other.__dict__.update(_modules=dict(self._modules), _text_cache=None)
        other.prompts = self.prompts.for_classes(classnames)
        return other

    def save_pretrained(
        self, folder, *, backbone: str | None = None, pretrained: str | None = None, seed: int | None = None, **info
    ):
        """Write the learned prompts as a folder to share (``config.json`` and ``model.safetensors``,
        the layout of a Hugging Face ``PyTorchModelHubMixin`` model) with :attr:`settings` and ``info``
        (an epoch, scores) beside them. A CLIP given as a module must be named (``backbone``, and its
        weights' tag or file, ``pretrained``); random CLIP weights need the ``seed`` they were drawn from."""
        given = dict(backbone=backbone, pretrained=pretrained, seed=seed)
        settings = dataclasses.replace(
            self.settings, **{key: value for key, value in given.items() if value is not None}
        )
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.prompt_state_dict().items()}
        info = dict(info, learnable_parameters=self.learnable_parameter_count())
        return write_folder(folder, settings, list(self.prompts.classnames), state, info)

    @classmethod
    def from_pretrained(cls, source, *, clip=None, pretrained: str | None = None) -> DualCoOpPlusPlus:
        """The trained model in ``source``: a folder of :meth:`save_pretrained`, a run folder (its
        ``model/``), or a run folder written by 0.1.0 before model/ (``prompts.pt``), read without running any
        code; CLIP is built from the name and weights the folder records (``clip``: an already loaded
        CLIP instead; ``pretrained``: another copy of its weights)."""
        settings, classnames, state, folder = read_folder(source)
        if pretrained is not None:
            settings = dataclasses.replace(settings, pretrained=pretrained)
        model = cls.from_settings(settings, classnames, clip)
        try:
            model.load_prompt_state_dict(state)
        except ValueError as error:
            raise UsageError(
                f"{folder} holds {describe_prompts(state, classnames)}, but its settings ask for "
                f"{describe_settings(settings, len(classnames))}: the prompts are another run's ({error})"
            ) from error
        return model.eval()

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """The learned state alone (the contexts, and the log temperature), without the CLIP weights."""
        return {name: tensor.detach().clone() for name, tensor in self.named_parameters() if tensor.requires_grad}

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`prompt_state_dict` returned; the names and shapes must match this model's."""
        own = dict((name, p) for name, p in self.named_parameters() if p.requires_grad)
        if set(state) != set(own):
            raise UsageError(f"prompt state has {sorted(state)}, this model learns {sorted(own)}")
        for name, value in state.items():
            if value.shape != own[name].shape:
                raise UsageError(f"{name}: shape {tuple(value.shape)} in the state, {tuple(own[name].shape)} here")
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)
