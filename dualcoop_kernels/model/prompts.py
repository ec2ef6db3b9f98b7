"""Learned prompts: the contexts that learn, and the token ids of every class's prompt (text.py encodes them).

A prompt is ``[SOS] ctx_1 ... ctx_n classname . [EOS]``: the class name at the end (CoOp's "end"
position), the ``n`` context vectors learned. DualCoOp++ learns three sets (evidential, positive,
negative), the original DualCoOp two (positive, negative); each class has its own contexts (the
default) or all classes share one (``shared_contexts``).
"""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_classnames
from ..errors import UsageError

DEFAULT_N_CTX = 21  # DualCoOp++'s context length
PLACEHOLDER = "X"  # stands for a learned context token in the tokenized prompt


class PromptLearner(nn.Module):
    """The learnable contexts of every prompt set, and the token ids of every class's prompt.

    Args:
        clip_model: an open_clip CLIP (its token embedding starts ``ctx_init`` contexts; nothing of it is kept).
        tokenizer: its open_clip tokenizer.
        classnames: the C class names ("_" reads as a space).
        prompt_sets: names of the sets, e.g. ``("evidence", "pos", "neg")``; parameter ``ctx_<name>`` each.
        n_ctx: context tokens per prompt (21 when None); with ``ctx_init`` it must match the phrase's
            token count, or be None.
        ctx_init: a phrase (e.g. "a photo of a") whose token embeddings start every context; None: N(0, 0.02).
        shared_contexts: one context set for all classes (n_ctx x width) rather than one per class
            (C x n_ctx x width).

    Only the C x 77 token ids are kept per class (the text encoder embeds them as it needs), so even
    10,000 classes cost little: see :meth:`for_classes`.
    """

    def __init__(
        self, clip_model, tokenizer, classnames, prompt_sets, n_ctx=None, ctx_init=None, *, shared_contexts=False
    ):
        super().__init__()
        classnames = check_classnames(classnames)
        embedding = clip_model.token_embedding
        width = embedding.weight.shape[1]
        if ctx_init:
            phrase_tokens = tokenizer([ctx_init])[0]
            length = int(phrase_tokens.argmax()) - 1  # between [SOS] and [EOS] (the largest id)
            if n_ctx not in (None, length):
                raise UsageError(f"ctx_init {ctx_init!r} has {length} tokens but n_ctx is {n_ctx}")
            n_ctx, phrase = length, ctx_init
            with torch.no_grad():
                start = embedding(phrase_tokens[None, 1 : 1 + n_ctx].to(embedding.weight.device))[0]
        else:
            n_ctx = DEFAULT_N_CTX if n_ctx is None else n_ctx
            phrase = " ".join([PLACEHOLDER] * n_ctx)
            start = None
        context_length = clip_model.positional_embedding.shape[0]
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 1 <= n_ctx <= context_length - 4:
            raise UsageError(
                f"n_ctx must be an integer from 1 to {context_length - 4} (the text context holds "
                f"{context_length} tokens, of which [SOS], the class name, '.' and [EOS] take at least 4), "
                f"got {n_ctx!r}"
            )
        self.n_ctx, self.shared_contexts, self.prompt_sets = n_ctx, shared_contexts, tuple(prompt_sets)
        self.tokenizer, self.phrase, self.context_length = tokenizer, phrase, context_length
        shape = (n_ctx, width) if shared_contexts else (len(classnames), n_ctx, width)
        for name in self.prompt_sets:
            context = torch.empty(shape, dtype=embedding.weight.dtype)
            if start is None:
                nn.init.normal_(context, std=0.02)
            else:
                context.copy_(start.expand(shape))
            self.register_parameter(f"ctx_{name}", nn.Parameter(context))
        self._set_classes(classnames)

    def _set_classes(self, classnames: list[str]) -> None:
        self.classnames = classnames
        texts = [f"{self.phrase} {name.replace('_', ' ')}." for name in classnames]
        tokenized = _tokenize_whole(self.tokenizer, texts, classnames, self.n_ctx, self.context_length)
        device = next(iter(self.contexts().values())).device
        # derived from the class names, so not part of the learned state (persistent=False)
        self.register_buffer("tokenized", tokenized.to(device), persistent=False)

    def contexts(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, f"ctx_{name}") for name in self.prompt_sets}

    def for_classes(self, classnames: list[str]) -> PromptLearner:
        """These shared contexts around other class names: the same parameters (not copies), so the
        new learner follows every update of this one. Class-specific contexts are refused."""
        if not self.shared_contexts:
            raise UsageError(
                "class-specific contexts exist only for the classes they were trained on; only contexts "
                "shared by all classes (shared_contexts=True) can score other class names"
            )
        classnames = check_classnames(classnames)
        other = PromptLearner.__new__(PromptLearner)
        nn.Module.__init__(other)
        for name in ("n_ctx", "shared_contexts", "prompt_sets", "tokenizer", "phrase", "context_length"):
            setattr(other, name, getattr(self, name))
        for name, context in self.contexts().items():
            other.register_parameter(f"ctx_{name}", context)
        other._set_classes(classnames)
        return other

    def forward(self, classes: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """What the text encoder takes: each set's contexts (a class-specific one at the classes'
        rows) and the C x 77 token ids; only the classes at the indices ``classes`` when given
        (zero-shot training samples a subset each batch)."""
        contexts = list(self.contexts().values())
        if classes is None:
            return contexts, self.tokenized
        return [c if self.shared_contexts else c[classes] for c in contexts], self.tokenized[classes]


def _tokenize_whole(tokenizer, texts, classnames, n_ctx, context_length) -> torch.Tensor:
    """Token ids of the prompts, refusing any that the text context would cut off: the tokenizer
    truncates silently. One token more than the context shows the overflow ([EOS] lands past it)."""
    longer = tokenizer(texts, context_length=context_length + 1)
    too_long = (longer.argmax(dim=-1) >= context_length).nonzero().flatten().tolist()  # [EOS]: the largest id
    if too_long:
        name = classnames[too_long[0]]
        needed = int(tokenizer([texts[too_long[0]]], context_length=4 * context_length)[0].argmax()) + 1
        raise UsageError(
            f"class name {name!r} does not fit the text context: its prompt needs {needed} tokens with "
            f"n_ctx={n_ctx}, and the context holds {context_length} ({len(too_long)} class(es) too long); "
            "shorten the name or lower n_ctx"
        )
    return longer[:, :context_length].contiguous()
