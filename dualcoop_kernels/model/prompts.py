"""Learned prompts and the frozen text encoder that turns them into one D-vector per class and prompt.

A prompt is ``[SOS] ctx_1 ... ctx_n classname . [EOS]``: the class name at the end (CoOp's "end"
position), the ``n`` context vectors learned. DualCoOp++ learns three sets (evidential, positive,
negative), the original DualCoOp two (positive, negative); each class has its own contexts (``csc``,
the default) or all classes share one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_classnames

DEFAULT_N_CTX = 21  # DualCoOp++'s context length
PLACEHOLDER = "X"  # stands for a learned context token in the tokenized prompt


class PromptLearner(nn.Module):
    """The learnable contexts of every prompt set, and the fixed token embeddings around them.

    Args:
        clip_model: an open_clip CLIP (its token embedding gives the fixed tokens; nothing of it is kept).
        tokenizer: its open_clip tokenizer.
        classnames: the C class names ("_" reads as a space).
        prompt_sets: names of the sets, e.g. ``("evidence", "pos", "neg")``; parameter ``ctx_<name>`` each.
        n_ctx: context tokens per prompt (21 when None); with ``ctx_init`` it must match the phrase's
            token count, or be None.
        ctx_init: a phrase (e.g. "a photo of a") whose token embeddings start every context; None: N(0, 0.02).
        csc: class-specific contexts (C x n_ctx x width) rather than one shared (n_ctx x width).
    """

    def __init__(self, clip_model, tokenizer, classnames, prompt_sets, n_ctx=None, ctx_init=None, csc=True):
        super().__init__()
        classnames = check_classnames(classnames)
        embedding = clip_model.token_embedding
        width = embedding.weight.shape[1]
        if ctx_init:
            phrase_tokens = tokenizer([ctx_init])[0]
            length = int(phrase_tokens.argmax()) - 1  # between [SOS] and [EOS] (the largest id)
            if n_ctx not in (None, length):
                raise ValueError(f"ctx_init {ctx_init!r} has {length} tokens but n_ctx is {n_ctx}")
            n_ctx, prefix = length, ctx_init
            with torch.no_grad():
                start = embedding(phrase_tokens[None, 1 : 1 + n_ctx].to(embedding.weight.device))[0]
        else:
            n_ctx = DEFAULT_N_CTX if n_ctx is None else n_ctx
            prefix = " ".join([PLACEHOLDER] * n_ctx)
            start = None
        context_length = clip_model.positional_embedding.shape[0]
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 1 <= n_ctx <= context_length - 4:
            raise ValueError(
                f"n_ctx must be an integer from 1 to {context_length - 4} (the text context holds "
                f"{context_length} tokens, of which [SOS], the class name, '.' and [EOS] take at least 4), "
                f"got {n_ctx!r}"
            )
        self.n_ctx, self.csc, self.prompt_sets, self.classnames = n_ctx, csc, tuple(prompt_sets), classnames
        shape = (len(classnames), n_ctx, width) if csc else (n_ctx, width)
        for name in self.prompt_sets:
            context = torch.empty(shape, dtype=embedding.weight.dtype)
            if start is None:
                nn.init.normal_(context, std=0.02)
            else:
                context.copy_(start.expand(shape))
            self.register_parameter(f"ctx_{name}", nn.Parameter(context))

        texts = [f"{prefix} {name.replace('_', ' ')}." for name in classnames]
        tokenized = _tokenize_whole(tokenizer, texts, classnames, n_ctx, context_length)
        with torch.no_grad():
            fixed = embedding(tokenized.to(embedding.weight.device))
        # derived from the class names, so not part of the learned state (persistent=False)
        self.register_buffer("tokenized", tokenized, persistent=False)
        self.register_buffer("token_prefix", fixed[:, :1], persistent=False)  # [SOS]
        self.register_buffer("token_suffix", fixed[:, 1 + n_ctx :], persistent=False)  # name . [EOS] pad

    def contexts(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, f"ctx_{name}") for name in self.prompt_sets}

    def forward(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embeddings of every set, stacked: (S*C) x L x width, set by set; only the classes at
        the indices ``classes`` when given (zero-shot training samples a subset each batch)."""
        prefix, suffix = self.token_prefix, self.token_suffix
        if classes is not None:
            prefix, suffix = prefix[classes], suffix[classes]
        prompts = []
        for context in self.contexts().values():
            if self.csc:
                context = context if classes is None else context[classes]
            else:
                context = context.expand(prefix.shape[0], -1, -1)
            prompts.append(torch.cat([prefix, context.to(prefix.dtype), suffix], 1))
        return torch.cat(prompts)


def _tokenize_whole(tokenizer, texts, classnames, n_ctx, context_length) -> torch.Tensor:
    """Token ids of the prompts, refusing any that the text context would cut off: the tokenizer
    truncates silently. One token more than the context shows the overflow ([EOS] lands past it)."""
    longer = tokenizer(texts, context_length=context_length + 1)
    too_long = (longer.argmax(dim=-1) >= context_length).nonzero().flatten().tolist()  # [EOS]: the largest id
    if too_long:
        name = classnames[too_long[0]]
        needed = int(tokenizer([texts[too_long[0]]], context_length=4 * context_length)[0].argmax()) + 1
        raise ValueError(
            f"class name {name!r} does not fit the text context: its prompt needs {needed} tokens with "
            f"n_ctx={n_ctx}, and the context holds {context_length} ({len(too_long)} class(es) too long); "
            "shorten the name or lower n_ctx"
        )
    return longer[:, :context_length].contiguous()


class TextEncoder(nn.Module):
    """open_clip's text tower fed prompt embeddings instead of token ids: positional embedding,
    causal transformer, final layer norm, the features at the [EOS] token, the text projection.
    Holds references to the CLIP model's own (frozen) modules.

    The transformer is causal, so the feature at [EOS] depends on the tokens up to it alone: it runs on
    the shortest length that holds every prompt's [EOS] (about 27 of 77 tokens for COCO's prompts with
    21 contexts), which gives the 77-token features to rounding. Its attention is PyTorch's fused
    ``scaled_dot_product_attention`` with a causal mask where the blocks are open_clip's standard ones;
    ``full_length=True`` runs open_clip's own transformer on all 77 tokens, as the authors did.
    """

    def __init__(self, clip_model, full_length: bool = False):
        super().__init__()
        for part in ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection"):
            if not hasattr(clip_model, part):
                raise TypeError(f"the CLIP model has no {part}: only open_clip CLIP models (not CustomTextCLIP) work")
        self.clip = [clip_model]  # a list: not a submodule, so its weights are not registered twice
        self.full_length = full_length
        self.fused = not full_length and _standard_causal_blocks(clip_model)

    def forward(self, prompts: torch.Tensor, tokenized: torch.Tensor) -> torch.Tensor:
        clip = self.clip[0]
        dtype = clip.transformer.get_cast_dtype()
        ends = tokenized.argmax(dim=-1)  # [EOS]: the largest id
        length = prompts.shape[1] if self.full_length else int(ends.max()) + 1
        x = prompts[:, :length].to(dtype) + clip.positional_embedding[:length].to(dtype)
        if self.fused:
            for block in clip.transformer.resblocks:
                x = _causal_block(block, x)
        else:
            x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), ends]
        projection = clip.text_projection
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def _standard_causal_blocks(clip_model) -> bool:
    """Whether the text transformer is open_clip's plain one: batch-first blocks of pre-norm attention
    (one packed in-projection) and MLP under a causal mask, which :func:`_causal_block` computes."""
    transformer = clip_model.transformer
    mask = getattr(clip_model, "attn_mask", None)
    if mask is None or not getattr(transformer, "batch_first", False):
        return False
    causal = torch.full_like(mask, float("-inf")).triu(1)
    if not torch.equal(mask, causal):
        return False
    return all(
        isinstance(getattr(block, "attn", None), nn.MultiheadAttention)
        and block.attn._qkv_same_embed_dim
        and block.attn.batch_first
        and not hasattr(block, "ln_1_kv")
        and all(hasattr(block, part) for part in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2"))
        for block in transformer.resblocks
    )


def _causal_block(block, x: torch.Tensor) -> torch.Tensor:
    """One open_clip residual attention block with fused causal attention: x + attn(ln_1 x), then
    x + mlp(ln_2 x), each through its layer scale."""
    attention = block.attn
    batch, length, width = x.shape
    heads = attention.num_heads
    q, k, v = F.linear(block.ln_1(x), attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.view(batch, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, width)
    x = x + block.ls_1(attention.out_proj(attended))
    return x + block.ls_2(block.mlp(block.ln_2(x)))
