"""The frozen text encoder: learned contexts and class tokens in, one D-vector per prompt set and class out.

A prompt is ``[SOS] ctx_1 ... ctx_n name . [EOS]``; CLIP's text transformer is causal, so the feature at
[EOS] depends on the tokens up to it alone. Three paths, all giving open_clip's ``encode_text`` of the
same prompts (to rounding):

- **full** (``full_length=True``, the authors'): all 77 tokens through open_clip's own transformer.
- **short**: the tokens up to the last [EOS] only, with PyTorch's fused causal attention
  (``scaled_dot_product_attention``) on open_clip's standard blocks.
- **shared prefix** (short, with contexts shared by all classes, on standard blocks): every prompt of a
  set begins with the same ``[SOS] + n_ctx`` tokens, whose hidden states are then the same for every
  class. The prefix runs once per set through every block, keeping each block's keys and values; the
  suffixes (the class name to [EOS], padded to the longest) run with positions continuing after the
  prefix, their queries attending to [the prefix's keys | their own causal keys]. Exact, gradients too
  (autograd sums the contexts' gradient over the classes), and about (1 + n_ctx + 3) / 3 times fewer
  tokens for one-word class names.

Without autograd (evaluation, open-vocabulary scoring) the classes run in chunks of about
``NO_GRAD_CHUNK_ELEMENTS`` tokens x width, so memory does not grow with the number of classes beyond the
features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError, UsageTypeError

TEXT_ENCODINGS = ("short", "full")  # up to the last [EOS] (exact, faster), or all 77 tokens (the authors')

# tokens x width per chunk of classes without autograd: about 50 MB of activations at any width
# (2,048 tokens at CLIP's 512), enough to keep the matrix products efficient
NO_GRAD_CHUNK_ELEMENTS = 2**20


class TextEncoder(nn.Module):
    """open_clip's text tower fed learned contexts and class tokens instead of token ids: positional
    embedding, causal transformer, final layer norm, the features at the [EOS] token, the text projection.
    Holds references to the CLIP model's own (frozen) modules.

    ``forward(contexts, tokenized)``: ``contexts`` holds one tensor per prompt set, n_ctx x width
    (shared) or C x n_ctx x width (class-specific, for the C classes of ``tokenized``); ``tokenized`` is
    C x 77 token ids of the prompts (the contexts' positions hold placeholders). Returns S x C x D.
    ``full_length=True`` runs the authors' 77-token path; ``fused`` and ``shared_prefix`` say which
    faster path applies (benchmarks and tests turn them off to compare).
    """

    def __init__(self, clip_model, full_length: bool = False):
        super().__init__()
        parts = ("transformer", "attn_mask", "token_embedding", "positional_embedding", "ln_final", "text_projection")
        for part in parts:
            if not hasattr(clip_model, part):
                raise UsageTypeError(
                    f"the CLIP model has no {part}: only open_clip CLIP models (not CustomTextCLIP) work"
                )
        pooling = getattr(clip_model, "text_pool_type", "argmax")
        if pooling != "argmax":
            raise UsageError(
                f"the CLIP model pools its text features by {pooling!r}; prompts are read at their [EOS] token "
                "(text pool type 'argmax', as in OpenAI's CLIP)"
            )
        self.clip = [clip_model]  # a list: not a submodule, so its weights are not registered twice
        # without a causal mask the feature at [EOS] sees the padding after it: only all 77 tokens are exact
        self.full_length = full_length or clip_model.attn_mask is None
        self.fused = not self.full_length and _standard_causal_blocks(clip_model)
        self.shared_prefix = self.fused

    def forward(self, contexts: list[torch.Tensor], tokenized: torch.Tensor) -> torch.Tensor:
        tracked = torch.is_grad_enabled() and any(c.requires_grad for c in contexts)
        sets, width = len(contexts), contexts[0].shape[-1]
        chunk_tokens = None if tracked else max(1, NO_GRAD_CHUNK_ELEMENTS // (sets * width))  # per set
        if self.shared_prefix and contexts[0].dim() == 2:
            return self._shared_prefix_features(contexts, tokenized, chunk_tokens)
        length = tokenized.shape[1] if self.full_length else int(tokenized.argmax(dim=-1).max()) + 1
        step = max(1, chunk_tokens // length) if chunk_tokens else tokenized.shape[0]
        features = []
        for start in range(0, tokenized.shape[0], step):
            rows = slice(start, start + step)
            chunk = [c if c.dim() == 2 else c[rows] for c in contexts]
            prompts = self._prompt_embeddings(chunk, tokenized[rows], length)
            features.append(self.encode_prompts(prompts, tokenized[rows].repeat(sets, 1)).unflatten(0, (sets, -1)))
        return torch.cat(features, 1)

    def encode_prompts(self, prompts: torch.Tensor, tokenized: torch.Tensor) -> torch.Tensor:
        """P x L x width prompt embeddings (L: 77, or at least up to the last [EOS]) and their P x 77
        token ids to P x D features, on the full or the short path."""
        clip = self.clip[0]
        dtype = clip.transformer.get_cast_dtype()
        ends = tokenized.argmax(dim=-1)  # [EOS]: the largest id
        length = prompts.shape[1] if self.full_length else int(ends.max()) + 1
        x = prompts[:, :length].to(dtype) + clip.positional_embedding[:length].to(dtype)
        if self.fused:
            for block in clip.transformer.resblocks:
                x = _causal_block(block, x)[0]
        else:
            mask = clip.attn_mask
            x = _open_clip_transformer(clip.transformer, x, None if mask is None else mask[:length, :length])
        return self._project(x[torch.arange(x.shape[0], device=x.device), ends])

    def _prompt_embeddings(self, contexts: list[torch.Tensor], tokenized: torch.Tensor, length: int) -> torch.Tensor:
        """(S*C) x length x width: the token embeddings with each set's contexts in place, set by set."""
        embedded = self.clip[0].token_embedding(tokenized[:, :length])
        classes, n_ctx = tokenized.shape[0], contexts[0].shape[-2]
        sos, rest = embedded[:, :1], embedded[:, 1 + n_ctx :]
        return torch.cat([torch.cat([sos, c.to(sos.dtype).expand(classes, -1, -1), rest], 1) for c in contexts])

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        clip = self.clip[0]
        x = clip.ln_final(x)
        projection = clip.text_projection
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection

    def _shared_prefix_features(self, contexts, tokenized: torch.Tensor, chunk_tokens: int | None) -> torch.Tensor:
        """The shared-prefix path: the prefix once per set, its keys and values kept per block, then
        the suffixes against them, in batches of one suffix length (of at most ``chunk_tokens`` per set)."""
        clip = self.clip[0]
        dtype = clip.transformer.get_cast_dtype()
        sets, n_ctx = len(contexts), contexts[0].shape[0]
        sos = clip.token_embedding(tokenized[:1, :1])  # every prompt begins with [SOS]
        prefix = torch.cat([sos.expand(sets, 1, -1), torch.stack(contexts).to(sos.dtype)], 1)
        x = prefix.to(dtype) + clip.positional_embedding[: 1 + n_ctx].to(dtype)
        keys_values = []
        for block in clip.transformer.resblocks:
            x, prefix_kv = _causal_block(block, x)
            keys_values.append(prefix_kv)
        lengths = tokenized.argmax(dim=-1) - n_ctx  # suffix tokens: from the class name to [EOS]
        batches = _suffix_batches(lengths, chunk_tokens)
        features = [self._suffix_features(tokenized[rows], int(lengths[rows[0]]), keys_values) for rows in batches]
        order = torch.cat(batches)
        return torch.cat(features, 1)[:, order.argsort()]

    def _suffix_features(self, tokenized: torch.Tensor, length: int, keys_values) -> torch.Tensor:
        """S x C x D features of the suffixes of ``tokenized`` (C classes, ``length`` suffix tokens
        each), attending to the prefix's per-block keys and values."""
        clip = self.clip[0]
        dtype = clip.transformer.get_cast_dtype()
        sets, _, start, _ = keys_values[0][0].shape  # S x heads x (1 + n_ctx) x dh
        span = slice(start, start + length)  # positions continue after the prefix
        x = clip.token_embedding(tokenized[:, span]).to(dtype) + clip.positional_embedding[span].to(dtype)
        x = x.flatten(0, 1).expand(sets, -1, -1)  # S x (C * length) x width: the same tokens in every set
        for block, (prefix_keys, prefix_values) in zip(clip.transformer.resblocks, keys_values):
            q, k, v = _heads(block, x)
            x = _block_rest(block, x, suffix_attention(q, k, v, prefix_keys, prefix_values, length))
        return self._project(x[:, length - 1 :: length])


def _suffix_batches(lengths: torch.Tensor, tokens: int | None) -> list[torch.Tensor]:
    """Indices of the classes in batches of one suffix length each (so that no padding is computed),
    of at most about ``tokens`` suffix tokens when given."""
    order = lengths.argsort(stable=True)
    batches = []
    for length, group in enumerate(order.split(torch.bincount(lengths).tolist())):
        if len(group):
            batches += group.split(max(1, tokens // length)) if tokens else [group]
    return batches


def suffix_attention(q, k, v, prefix_keys, prefix_values, length: int) -> torch.Tensor:
    """Causal attention of S x H x (C * length) x dh suffix queries (suffix by suffix) over [the
    prefix's S x H x P x dh keys | the suffix's own keys]: one softmax over both score blocks, without
    copying the prefix per class."""
    scale = q.shape[-1] ** -0.5
    on_prefix = (q @ prefix_keys.transpose(-1, -2)).unflatten(2, (-1, length))  # S x H x C x length x P
    q, k, v = (t.unflatten(2, (-1, length)) for t in (q, k, v))  # S x H x C x length x dh
    later = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    on_suffix = (q @ k.transpose(-1, -2)).masked_fill(later, float("-inf"))
    weights = torch.softmax(torch.cat([on_prefix, on_suffix], -1) * scale, dim=-1)
    to_prefix, to_suffix = weights.split([prefix_keys.shape[-2], length], -1)
    return to_prefix.flatten(2, 3) @ prefix_values + (to_suffix @ v).flatten(2, 3)


def _open_clip_transformer(transformer, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """open_clip's own text transformer on batch-first ``x``. A transformer with a ``batch_first``
    attribute (open_clip 2.26 and newer) takes batch-first input whatever its blocks use; older ones
    (without it) take sequence-first input."""
    if hasattr(transformer, "batch_first"):
        return transformer(x, attn_mask=attn_mask)
    return transformer(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)


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


def _heads(block, x: torch.Tensor):
    """Queries, keys and values of ``x`` (... x L x width), each ... x heads x L x head width."""
    attention = block.attn
    heads = attention.num_heads
    qkv = F.linear(block.ln_1(x), attention.in_proj_weight, attention.in_proj_bias)
    qkv = qkv.unflatten(-1, (3, heads, x.shape[-1] // heads)).movedim(-3, 0)  # 3 x ... x L x heads x dh
    return qkv.transpose(-2, -3).unbind(0)


def _block_rest(block, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The block after attention: x + out_proj(heads merged), then x + mlp(ln_2 x), each through its
    layer scale."""
    merged = attended.transpose(-2, -3).flatten(-2)
    x = x + block.ls_1(block.attn.out_proj(merged))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _causal_block(block, x: torch.Tensor):
    """One open_clip residual attention block with fused causal attention, and its keys and values."""
    q, k, v = _heads(block, x)
    return _block_rest(block, x, F.scaled_dot_product_attention(q, k, v, is_causal=True)), (k, v)
