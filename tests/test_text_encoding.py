"""The text encoder's paths (full, short, shared prefix) against open_clip's encode_text, the contexts'
gradients against the short path, the fallback for non-standard blocks, chunks without autograd, and
other class lists (for_classes) scored in bounded memory."""

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

import dualcoop_kernels as dk  # noqa: E402
from dualcoop_kernels.model import dualcoop as dualcoop_module  # noqa: E402
from dualcoop_kernels.model import text as text_module  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# 1 to 6 tokens each ("_" reads as a space)
NAMES = ["cat", "traffic_light", "fire hydrant", "a b c d", "xylophone players unite", "a b c d e f"]
TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
TOWERS = {  # the text tower is the same module for both; the joint width and the projection differ
    "rn": {"embed_dim": 48, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}},
    "vit": {"embed_dim": 24, "vision_cfg": dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16)},
}
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def tiny_clip(tower: str, dtype=torch.float32, **text_options):
    torch.manual_seed(0)
    config = dict(TOWERS[tower], text_cfg={**TEXT_CFG, **text_options})
    return open_clip.model.CLIP(**config).eval().to(dtype)


def with_token_contexts(model, seed=0):
    """Sets every prompt set's contexts to the token embeddings of random words, so that its prompts
    are token sequences open_clip's encode_text can take; returns those S x C x 77 token ids."""
    prompts = model.prompts
    generator = torch.Generator().manual_seed(seed)
    embedding = model.clip.token_embedding
    ids = []
    for context in prompts.contexts().values():
        words = torch.randint(300, 40000, context.shape[:-1], generator=generator)
        with torch.no_grad():
            context.copy_(embedding(words))
        tokens = prompts.tokenized.clone()
        tokens[:, 1 : 1 + prompts.n_ctx] = words
        ids.append(tokens)
    return torch.stack(ids)


def context_gradients(model, classes=None, seed=1):
    """The contexts' gradients of a fixed random weighting of the text features."""
    model.zero_grad()
    features = torch.stack(model.text_features(classes))
    weights = torch.randn(features.shape, generator=torch.Generator().manual_seed(seed), dtype=features.dtype)
    (features * weights).sum().backward()
    return [context.grad.clone() for context in model.prompts.contexts().values()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_ctx", [1, 64])
@pytest.mark.parametrize("protocol", ["dualcoop++", "dualcoop"])  # three prompt sets, two
@pytest.mark.parametrize("tower", ["rn", "vit"])
def test_shared_prefix_features_and_gradients(tower, protocol, n_ctx, dtype):
    clip = tiny_clip(tower, dtype)
    model = dk.DualCoOpPlusPlus(clip, NAMES, n_ctx=n_ctx, shared_contexts=True, protocol=protocol).to(dtype)
    assert model.text_encoder.shared_prefix
    tokens = with_token_contexts(model)
    with torch.no_grad():
        features = model.text_features()
        for got, ids in zip(features, tokens):
            torch.testing.assert_close(got, clip.encode_text(ids), **TOLERANCES[dtype])
    for classes in (None, torch.tensor([4, 0, 2]), torch.tensor([5])):  # every class, a subset, one class
        with torch.no_grad():
            subset = model.text_features(classes)
        for got, every in zip(subset, features):
            torch.testing.assert_close(got, every if classes is None else every[classes], **TOLERANCES[dtype])
        if dtype == torch.float64:
            shared = context_gradients(model, classes)
            model.text_encoder.shared_prefix = False  # the short path of every prompt, whole
            short = context_gradients(model, classes)
            model.text_encoder.shared_prefix = True
            for a, b in zip(shared, short):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RN50", "ViT-B-16"])
def test_shared_prefix_on_clip_text_towers(name):
    """The real towers' sizes (width 512, 12 blocks) with the zero-shot presets' 64 contexts."""
    torch.manual_seed(0)
    clip = open_clip.create_model(name).eval()
    model = dk.DualCoOpPlusPlus(clip, NAMES, n_ctx=64, shared_contexts=True)
    tokens = with_token_contexts(model)
    with torch.no_grad():
        for got, ids in zip(model.text_features(), tokens):
            torch.testing.assert_close(got, clip.encode_text(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared_contexts", [True, False])
@pytest.mark.parametrize("text_encoding", ["short", "full"])
def test_every_path_equals_encode_text(text_encoding, shared_contexts):
    clip = tiny_clip("rn", torch.float64)
    model = dk.DualCoOpPlusPlus(clip, NAMES, n_ctx=5, shared_contexts=shared_contexts, text_encoding=text_encoding).to(
        torch.float64
    )
    assert model.text_encoder.shared_prefix == (text_encoding == "short")  # used only where contexts are shared
    tokens = with_token_contexts(model)
    with torch.no_grad():
        for got, ids in zip(model.text_features(), tokens):
            torch.testing.assert_close(got, clip.encode_text(ids), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(
    "qk_norm" not in open_clip.model.CLIPTextCfg.__dataclass_fields__,
    reason=f"open_clip {version('open_clip_torch')} builds no qk_norm blocks "
    "(the sequence-first test covers the fallback)",
)
def test_non_standard_blocks_fall_back_to_open_clips_transformer():
    """qk_norm makes open_clip build its custom blocks, which the fused paths do not compute."""
    clip = tiny_clip("vit", torch.float64, qk_norm=True)
    model = dk.DualCoOpPlusPlus(clip, NAMES, n_ctx=3, shared_contexts=True).to(torch.float64)
    assert not model.text_encoder.fused and not model.text_encoder.shared_prefix
    tokens = with_token_contexts(model)
    with torch.no_grad():
        for got, ids in zip(model.text_features(), tokens):
            torch.testing.assert_close(got, clip.encode_text(ids), rtol=1e-12, atol=1e-12)
    assert all(gradient.abs().sum() > 0 for gradient in context_gradients(model))


class SequenceFirst(torch.nn.Module):
    """open_clip's text transformer as releases before 2.26 made it: no batch_first attribute,
    sequence-first input and output."""

    def __init__(self, transformer):
        super().__init__()
        self.batch_first_transformer = transformer
        self.resblocks = transformer.resblocks

    def get_cast_dtype(self):
        return self.batch_first_transformer.get_cast_dtype()

    def forward(self, x, attn_mask=None):
        return self.batch_first_transformer(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)


@pytest.mark.parametrize("tower", ["rn", "vit"])
def test_a_sequence_first_transformer_falls_back_to_it_with_sequence_first_input(tower):
    clip = tiny_clip(tower, torch.float64)
    tokens = with_token_contexts(dk.DualCoOpPlusPlus(clip, NAMES, n_ctx=3, shared_contexts=True).to(torch.float64))
    with torch.no_grad():
        expected = [clip.encode_text(ids) for ids in tokens]
    clip.transformer = SequenceFirst(clip.transformer)
    model = dk.DualCoOpPlusPlus(clip, NAMES, n_ctx=3, shared_contexts=True).to(torch.float64)
    assert not model.text_encoder.fused and not model.text_encoder.shared_prefix
    assert torch.equal(with_token_contexts(model), tokens)
    with torch.no_grad():
        for got, truth in zip(model.text_features(), expected):
            torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("text_encoding", ["short", "full"])
def test_a_text_tower_without_causal_mask_runs_all_77_tokens(text_encoding):
    """Without the mask the feature at [EOS] depends on the padding after it: no shorter path is exact."""
    clip = tiny_clip("rn", torch.float64, no_causal_mask=True)
    model = dk.DualCoOpPlusPlus(clip, NAMES, n_ctx=3, shared_contexts=True, text_encoding=text_encoding).to(
        torch.float64
    )
    assert model.text_encoder.full_length and not model.text_encoder.fused
    tokens = with_token_contexts(model)
    with torch.no_grad():
        for got, ids in zip(model.text_features(), tokens):
            torch.testing.assert_close(got, clip.encode_text(ids), rtol=1e-12, atol=1e-12)


def test_a_text_tower_pooled_other_than_at_eos_is_refused():
    with pytest.raises(ValueError, match=r"pools its text features by 'first'.*\[EOS\]"):
        dk.DualCoOpPlusPlus(tiny_clip("rn", pool_type="first"), NAMES, n_ctx=3)


def test_the_fallback_equals_the_shared_prefix_on_standard_blocks():
    model = dk.DualCoOpPlusPlus(tiny_clip("rn", torch.float64), NAMES, n_ctx=7, shared_contexts=True).to(torch.float64)
    fast = [f.detach() for f in model.text_features()], context_gradients(model)
    model.text_encoder.fused = model.text_encoder.shared_prefix = False  # open_clip's transformer, mask sliced
    slow = [f.detach() for f in model.text_features()], context_gradients(model)
    for a, b in zip(fast[0] + fast[1], slow[0] + slow[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("text_encoding, shared_contexts", [("short", True), ("short", False), ("full", True)])
def test_chunks_of_classes_without_autograd_equal_one_batch(text_encoding, shared_contexts, monkeypatch):
    clip = tiny_clip("vit", torch.float64)
    names = NAMES + [f"{word} {index}" for index, word in enumerate(NAMES * 3)]  # 1 to 7 tokens
    model = dk.DualCoOpPlusPlus(clip, names, n_ctx=4, shared_contexts=shared_contexts, text_encoding=text_encoding).to(
        torch.float64
    )
    tracked = [f.detach() for f in model.text_features()]  # autograd on: one batch per suffix length
    monkeypatch.setattr(text_module, "NO_GRAD_CHUNK_ELEMENTS", 3 * 32 * 12)  # 12 tokens a set: a few classes
    with torch.no_grad():
        chunked = model.text_features()
    for a, b in zip(chunked, tracked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_head_without_autograd_in_chunks_of_images(monkeypatch):
    clip = tiny_clip("vit")
    model = dk.DualCoOpPlusPlus(clip, NAMES, n_ctx=4, shared_contexts=True, head_backend="reference")
    regions = torch.randn(7, 5, 24)
    with torch.no_grad():
        whole = model(regions=regions)
        monkeypatch.setattr(dualcoop_module, "HEAD_CHUNK_ELEMENTS", 2 * 5 * len(NAMES))  # two images a chunk
        calls = []
        model.head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
        chunked = model(regions=regions)
    assert calls == [2, 2, 2, 1]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    assert model(regions=regions).requires_grad and calls[-1] == 7  # with autograd: one call


def test_for_classes_shares_clip_contexts_and_head():
    clip = tiny_clip("vit")
    model = dk.DualCoOpPlusPlus(clip, NAMES, n_ctx=4, shared_contexts=True, head_backend="reference")
    regions = torch.randn(3, 5, 24)
    reordered = model.for_classes(NAMES[::-1])
    assert reordered.clip is model.clip and reordered.head is model.head
    assert reordered.prompts.ctx_pos is model.prompts.ctx_pos and model.prompts.classnames == NAMES
    assert {name for name, _ in reordered.named_parameters() if _.requires_grad} == set(model.prompt_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reordered(regions=regions), model(regions=regions).flip(-1))
        other = model.for_classes(["kayak", "cat"])
        before = other(regions=regions)
        model.prompts.ctx_pos.add_(0.5)  # a training step of the original: the view follows it
        assert not torch.allclose(other(regions=regions), before)
    with pytest.raises(ValueError, match="class-specific contexts exist only for the classes they were trained on"):
        dk.DualCoOpPlusPlus(clip, NAMES, n_ctx=4).for_classes(["kayak"])
    with pytest.raises(ValueError, match="class names must be distinct"):
        model.for_classes(["kayak", "kayak"])


OPEN_VOCABULARY_SCRIPT = """
import json, sys, time
import open_clip, torch
import dualcoop_kernels as dk

def high_water_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024

config, count, images = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
clip = open_clip.model.CLIP(**config).eval()
model = dk.DualCoOpPlusPlus(clip, ["cat", "dog"], n_ctx=16, shared_contexts=True, head_backend="reference").eval()
pictures = torch.randn(images, 3, config["vision_cfg"]["image_size"], config["vision_cfg"]["image_size"])
with torch.no_grad():
    model(pictures)  # a model in use: one-time allocations of the libraries are made
    regions = model.encode_regions(pictures).shape[1]
names = [f"name {index}" for index in range(count)]
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")  # the high-water mark starts again from what is resident now
before = high_water_mib()
started = time.perf_counter()
with torch.no_grad():
    logits = model.for_classes(names)(pictures)
seconds = time.perf_counter() - started
print(json.dumps(dict(added_mib=high_water_mib() - before, shape=list(logits.shape), regions=regions,
                      finite=bool(logits.isfinite().all()), seconds=seconds)))
"""


@pytest.mark.slow
def test_ten_thousand_names_score_in_bounded_memory():
    """10,000 names: the peak memory that scoring adds (for_classes, text features, regions, head) stays
    below one B x N x C float32 tensor, of which a head over the whole batch would keep several, and
    below the S x C x 77 x width prompt embeddings that building the prompts whole would take. 64
    images, so that one image's chunk of the head (about ten N x C tensors) is far below the bound."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak memory of one part of a process")
    width = 64
    config = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 96, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {**TEXT_CFG, "width": width},
    }
    count, images = 10_000, 64
    # glibc serves large blocks from memory maps, returned when freed, so that the resident size follows
    # what is allocated instead of how fragmented the heap has become
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    finished = subprocess.run(
        [sys.executable, "-c", OPEN_VOCABULARY_SCRIPT, json.dumps(config), str(count), str(images)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    assert result["shape"] == [images, 2, count] and result["finite"]
    per_vocabulary_mib = images * result["regions"] * count * 4 / 2**20  # one B x N x C float32 tensor
    prompt_embeddings_mib = 3 * count * 77 * width * 4 / 2**20
    assert result["added_mib"] < min(per_vocabulary_mib, prompt_embeddings_mib), result
