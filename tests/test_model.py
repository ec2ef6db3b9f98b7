"""DualCoOp++ on randomly initialised open_clip models (RN50, RN101, ViT-B-16) and small inputs."""

import copy
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils import needs_triton

open_clip = pytest.importorskip("open_clip")

import dualcoop_kernels as dk  # noqa: E402
from dualcoop_kernels.model.regions import region_features  # noqa: E402
from dualcoop_kernels.model.text import TextEncoder  # noqa: E402

CLASSES = ["cat", "dog", "traffic_light"]


@pytest.fixture(scope="module")
def rn50():
    return open_clip.create_model("RN50").eval()


@pytest.fixture(scope="module")
def vit():
    return open_clip.create_model("ViT-B-16").eval()


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("RN50")


@pytest.mark.parametrize("size, regions", [((64, 64), 4), ((96, 128), 12)])
def test_resnet_region_shapes(rn50, size, regions):
    model = dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4)
    features = model.encode_regions(torch.randn(2, 3, *size))
    assert features.shape == (2, regions, 1024) and not features.requires_grad
    assert model(torch.randn(2, 3, *size)).shape == (2, 2, 3)


@pytest.mark.slow
@pytest.mark.parametrize("size, regions", [((224, 224), 196), ((64, 80), 20)])
def test_vit_region_shapes(vit, size, regions):
    model = dk.DualCoOpPlusPlus(vit, CLASSES, n_ctx=4)
    assert model.encode_regions(torch.randn(1, 3, *size)).shape == (1, regions, 512)
    assert model(torch.randn(1, 3, *size)).shape == (1, 2, 3)


def test_resnet_regions_are_per_token_attention_pool_projections(rn50):
    """The layer4 output of CLIP's own forward (at its own input size), through v_proj and c_proj."""
    images = torch.randn(2, 3, 224, 224)
    captured = {}
    hook = rn50.visual.layer4.register_forward_hook(lambda module, args, out: captured.update(layer4=out))
    with torch.no_grad():
        rn50.visual(images)
    hook.remove()
    tokens = captured["layer4"].flatten(2).transpose(1, 2)
    pool = rn50.visual.attnpool
    expected = pool.c_proj(pool.v_proj(tokens))
    torch.testing.assert_close(region_features(rn50.visual, images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_vit_regions_are_self_attention_only_in_the_last_block(vit):
    """CLIP's own forward up to the last block, then that block with a mask that lets every token
    attend only to itself, ln_post and the projection: what the library computes without attention."""
    images = torch.randn(1, 3, 224, 224)
    captured = {}
    last = vit.visual.transformer.resblocks[-1]
    hook = last.register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    with torch.no_grad():
        vit.visual(images)
    hook.remove()
    x = captured["x"]
    tokens = x.shape[1]
    only_self = torch.full((tokens, tokens), float("-inf")).fill_diagonal_(0.0)
    with torch.no_grad():
        y = last.ln_1(x)
        x = x + last.ls_1(last.attn(y, y, y, need_weights=False, attn_mask=only_self)[0])
        x = x + last.ls_2(last.mlp(last.ln_2(x)))
        expected = vit.visual.ln_post(x[:, 1:]) @ vit.visual.proj
    torch.testing.assert_close(region_features(vit.visual, images), expected, rtol=1e-4, atol=1e-5)


def test_vit_regions_of_a_sequence_first_transformer():
    """open_clip before 2.26 built sequence-first blocks and said nothing of it (no batch_first)."""
    vision = dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16)
    text = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    visual = open_clip.model.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text).visual.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = region_features(visual, images)
        del visual.transformer.batch_first
        for block in visual.transformer.resblocks:
            block.attn.batch_first = False
        torch.testing.assert_close(region_features(visual, images), expected, rtol=1e-5, atol=1e-6)


def test_text_features_equal_encode_text_for_a_real_phrase(rn50, tokenizer):
    model = dk.DualCoOpPlusPlus(rn50, CLASSES, ctx_init="a photo of a")
    assert model.prompts.n_ctx == 4
    with torch.no_grad():
        evidence, positive, negative = model.text_features()
        expected = rn50.encode_text(tokenizer([f"a photo of a {name.replace('_', ' ')}." for name in CLASSES]))
    for features in (evidence, positive, negative):
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip_name", ["rn50", "vit"])
def test_short_text_encoding_equals_the_full_length_one(clip_name, dtype, tokenizer, request):
    """The causal transformer's [EOS] feature depends on the tokens up to it alone: encoding only up to
    the longest prompt's [EOS], with fused causal attention, gives open_clip's 77-token features."""
    clip = copy.deepcopy(request.getfixturevalue(clip_name)).to(dtype)
    texts = ["a photo of a cat.", " ".join(["X"] * 21) + " traffic light.", "dog", "a b c d e f g h"]
    tokens = tokenizer(texts)
    embedded = clip.token_embedding(tokens)
    short, full = TextEncoder(clip), TextEncoder(clip, full_length=True)
    assert short.fused and not full.fused
    with torch.no_grad():
        expected = clip.encode_text(tokens)
        got_short, got_full = short.encode_prompts(embedded, tokens), full.encode_prompts(embedded, tokens)
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_full, expected, rtol=0, atol=0)
    torch.testing.assert_close(got_short, expected, **tolerance)


def test_short_text_encoding_without_fused_attention_slices_the_mask(rn50, tokenizer, monkeypatch):
    tokens = tokenizer(["a photo of a cat.", "dog"])
    encoder = TextEncoder(rn50)
    encoder.fused = False  # as for a text transformer that is not open_clip's standard one
    with torch.no_grad():
        got = encoder.encode_prompts(rn50.token_embedding(tokens), tokens)
    torch.testing.assert_close(got, rn50.encode_text(tokens))


def test_the_authors_full_length_text_encoding_gives_the_same_logits(rn50):
    short = dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4)
    full = dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4, text_encoding="full")
    full.load_prompt_state_dict(short.prompt_state_dict())
    regions = torch.randn(2, 5, 1024)
    torch.testing.assert_close(short(regions=regions), full(regions=regions), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="text_encoding must be one of"):
        dk.DualCoOpPlusPlus(rn50, CLASSES, text_encoding="long")


def test_only_prompts_and_temperature_learn(rn50):
    model = dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4).train()
    assert not rn50.training  # CLIP stays in eval mode, batch norm statistics included
    clip_before = {k: v.clone() for k, v in rn50.state_dict().items()}
    learned_before = model.prompt_state_dict()
    optimizer = torch.optim.Adam(model.learnable_parameters(), lr=0.01)  # moves every parameter with a gradient
    logits = model(torch.randn(2, 3, 64, 64))
    targets, mask = dk.split_signed_labels(torch.tensor([[1, -1, 0], [-1, 1, 1]]))
    dk.asymmetric_loss(logits, targets, mask, gamma_neg=2.0, backend="reference").backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"prompts.ctx_evidence", "prompts.ctx_pos", "prompts.ctx_neg", "head.log_spatial_temp"}
    optimizer.step()
    for name, value in model.prompt_state_dict().items():
        assert not torch.equal(value, learned_before[name]), name
    for name, value in rn50.state_dict().items():
        assert torch.equal(value, clip_before[name]), name


@needs_triton()
def test_head_backends_give_the_same_logits(rn50):
    model = dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4, head_backend="reference")
    regions = model.encode_regions(torch.randn(2, 3, 96, 96))
    expected = model(regions=regions)
    model.head.backend = "triton"  # Triton's interpreter on this CPU
    torch.testing.assert_close(model(regions=regions), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_parameter_count_of_coco_with_rn101():
    """3 * n_ctx * width * C + 1 = 3 * 21 * 512 * 80 + 1."""
    model = dk.DualCoOpPlusPlus("RN101", [f"class {i}" for i in range(80)])
    assert sum(p.numel() for p in model.learnable_parameters()) == 2_580_481
    shared = dk.DualCoOpPlusPlus(model.clip, ["cat", "dog"], shared_contexts=True)
    assert sum(p.numel() for p in shared.learnable_parameters()) == 3 * 21 * 512 + 1


def test_prompt_state_round_trip(rn50, tmp_path):
    model = dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4)
    with torch.no_grad():
        model.head.log_spatial_temp.fill_(2.5)
    path = tmp_path / "prompts.pt"
    torch.save(model.prompt_state_dict(), path)
    assert set(torch.load(path)) == {
        "prompts.ctx_evidence",
        "prompts.ctx_pos",
        "prompts.ctx_neg",
        "head.log_spatial_temp",
    }
    fresh = dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4)
    regions = model.encode_regions(torch.randn(2, 3, 64, 64))
    assert not torch.allclose(fresh(regions=regions), model(regions=regions))
    fresh.load_prompt_state_dict(torch.load(path))
    torch.testing.assert_close(fresh(regions=regions), model(regions=regions))
    with pytest.raises(ValueError, match="shape"):
        dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=5).load_prompt_state_dict(torch.load(path))


def test_a_frozen_temperature_is_neither_learned_nor_saved(rn50):
    """freeze_temperature=True (with wta="pos_norm": the authors' pos_norm_det) keeps theta at its start,
    out of the learnable parameters and the prompt state, which still round-trips."""
    model = dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4, freeze_temperature=True, spatial_temp_init=2.5)
    assert set(model.prompt_state_dict()) == {"prompts.ctx_evidence", "prompts.ctx_pos", "prompts.ctx_neg"}
    assert all(p is not model.head.log_spatial_temp for p in model.learnable_parameters())
    regions = model.encode_regions(torch.randn(2, 3, 64, 64))
    model(regions=regions).sum().backward()
    assert model.head.log_spatial_temp.grad is None and model.head.log_spatial_temp.item() == 2.5
    assert model.prompts.ctx_pos.grad is not None
    fresh = dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4, freeze_temperature=True, spatial_temp_init=2.5)
    fresh.load_prompt_state_dict(model.prompt_state_dict())
    torch.testing.assert_close(fresh(regions=regions), model(regions=regions))
    with pytest.raises(ValueError, match="this model learns"):
        dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4).load_prompt_state_dict(model.prompt_state_dict())


def test_text_features_are_cached_at_inference_until_the_prompts_change(rn50):
    model = dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4)
    with torch.no_grad():
        first = model.text_features()
        assert all(a is b for a, b in zip(first, model.text_features()))
        model.prompts.ctx_pos.add_(0.1)  # what an optimizer step does: an in-place update
        changed = model.text_features()
    assert changed[0] is not first[0] and not torch.allclose(changed[1], first[1])
    assert model.text_features()[0].requires_grad  # with autograd on, fresh features with a graph


@pytest.mark.slow
def test_a_checkpoint_loads_through_the_pretrained_path(rn50, tmp_path):
    path = tmp_path / "rn50.pt"
    torch.save(rn50.state_dict(), path)
    model = dk.DualCoOpPlusPlus("RN50", CLASSES, pretrained=str(path), n_ctx=4)
    for name, value in model.clip.state_dict().items():
        torch.testing.assert_close(value, rn50.state_dict()[name])


def test_bad_model_and_pretrained_arguments():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        dk.DualCoOpPlusPlus("RN51", CLASSES)
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag"):
        dk.DualCoOpPlusPlus("RN50", CLASSES, pretrained="/no/such/file.pt")
    with pytest.raises(ValueError, match="protocol must be one of"):
        dk.DualCoOpPlusPlus("RN50", CLASSES, protocol="dualcoop+++")


def test_an_unreachable_download_fails_at_once(monkeypatch):
    from dualcoop_kernels.model import loading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if loading._reachable("huggingface.co"):
        pytest.skip("huggingface.co is reachable here")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"huggingface\.co is unreachable.*pretrained=<a checkpoint file>"):
        dk.DualCoOpPlusPlus("RN50", CLASSES, pretrained="openai")
    assert time.monotonic() - started < 15


OPEN_CLIP_LOGGING = """
import logging, sys, open_clip
from dualcoop_kernels.model import loading

def create_model(name, pretrained=None):  # open_clip's way: on the root logger
    logging.warning("a warning of open_clip's")
    logging.warning("No pretrained weights loaded for model")
    logging.error("an error open_clip raises after")
    return "model"

create_model.__code__ = create_model.__code__.replace(co_filename=open_clip.__file__)
open_clip.create_model = create_model
if sys.argv[1] == "configured":
    logging.basicConfig(format="application: %(message)s")
else:
    logging.getLogger("dualcoop_kernels").addHandler(logging.StreamHandler())
assert loading.load_clip("RN50") == "model"
logging.warning("the application's own warning, after")
"""


@pytest.mark.parametrize("root", ["unconfigured", "configured"])
def test_open_clips_log_lines_are_said_in_the_packages_log(root):
    """Not as stray 'WARNING:root:' lines, nor its note on random weights, and without configuring the
    application's root logger (open_clip logs on it)."""
    run = [sys.executable, "-W", "ignore", "-c", OPEN_CLIP_LOGGING, root]  # log lines only: older open_clip
    # imports timm, whose FutureWarning (a Python warning, not a log line) would come first
    lines = subprocess.run(run, capture_output=True, text=True, check=True).stderr.splitlines()
    if root == "unconfigured":
        assert lines == ["open_clip: a warning of open_clip's", "WARNING:root:the application's own warning, after"]
    else:  # the package's line reaches the application's handler, once
        assert lines == [
            "application: open_clip: a warning of open_clip's",
            "application: the application's own warning, after",
        ]


def test_context_options(rn50):
    assert dk.DualCoOpPlusPlus(rn50, CLASSES).prompts.n_ctx == 21
    with pytest.raises(ValueError, match="has 4 tokens but n_ctx is 6"):
        dk.DualCoOpPlusPlus(rn50, CLASSES, ctx_init="a photo of a", n_ctx=6)
    with pytest.raises(ValueError, match=r"images .* or regions"):
        dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=2)()


def test_original_dualcoop_variant(rn50):
    model = dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4, protocol="dualcoop")
    assert sum(p.numel() for p in model.learnable_parameters()) == 2 * 4 * 512 * 3  # no temperature
    images = torch.randn(2, 3, 64, 64)
    regions = model.encode_regions(images)
    assert not torch.allclose(regions, region_features(rn50.visual, images))  # mean token + positions
    positive, negative = model.text_features()
    f = F.normalize(regions, dim=-1)
    s_pos, s_neg = f @ F.normalize(positive, dim=-1).T, f @ F.normalize(negative, dim=-1).T
    attention = torch.softmax(20 * s_pos, dim=1)
    expected = torch.stack([100 * (attention * s_neg).sum(1), 100 * (attention * s_pos).sum(1)], dim=1)
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "classnames, error, message",
    [
        ("cat", TypeError, r"classnames must be a list of class names .*got str 'cat'"),
        (["cat", 3], TypeError, r"every class name must be a non-empty string, got \[3\]"),
        (["cat", " "], TypeError, r"non-empty string"),
        (["cat", "dog", "cat"], ValueError, r"class names must be distinct, these repeat: \['cat'\]"),
        ([], ValueError, r"at least one class"),
    ],
)
def test_bad_class_names(rn50, classnames, error, message):
    with pytest.raises(error, match=message):
        dk.DualCoOpPlusPlus(rn50, classnames, n_ctx=4)
    with pytest.raises(error, match=message):  # refused before a CLIP is loaded
        dk.DualCoOpPlusPlus("RN50", classnames, pretrained="/no/such/file.pt")


def test_class_names_and_contexts_must_fit_the_text_context(rn50):
    """The tokenizer would cut a long prompt off silently, [EOS] and all."""
    long_name = " ".join(["hippopotamus"] * 40)
    with pytest.raises(
        ValueError,
        match=r"class name 'hippopotamus .*' does not fit the text context: its prompt "
        r"needs \d+ tokens with n_ctx=21, and the context holds 77",
    ):
        dk.DualCoOpPlusPlus(rn50, ["cat", long_name])
    with pytest.raises(ValueError, match=r"n_ctx must be an integer from 1 to 73 .* got 80"):
        dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=80)
    with pytest.raises(ValueError, match=r"n_ctx must be an integer from 1 to 73 .* got 0"):
        dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=0)
    fits = " ".join(["a"] * (77 - 3 - 21))  # [SOS], 21 contexts, the name, '.', [EOS]: exactly 77 tokens
    model = dk.DualCoOpPlusPlus(rn50, ["cat", fits])
    assert int(model.prompts.tokenized[1].argmax()) == 76  # [EOS] last
    with pytest.raises(ValueError, match="needs 78 tokens"):
        dk.DualCoOpPlusPlus(rn50, ["cat", fits + " a"])


def test_images_must_be_normalised_floats(rn50):
    model = dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with pytest.raises(
        TypeError, match=r"images must be normalised floating tensors, got torch.uint8.*image_transform"
    ):
        model(pixels)
    with pytest.raises(ValueError, match=r"normalised with CLIP's mean and std.*as 0..255 pixels would be"):
        model(pixels.float())
    with pytest.raises(ValueError, match=r"images must have shape B x 3 x H x W \(RGB\)"):
        model(torch.randn(2, 1, 64, 64))
    normalised = model.image_transform(64)(pixels)
    assert normalised.dtype == torch.float32 and normalised.shape == (2, 3, 64, 64)
    assert model(normalised).shape == (2, 2, 3)


def test_image_transform_is_clips_preprocessing(rn50):
    from PIL import Image

    model = dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4)
    gray = Image.new("L", (50, 30), color=128)
    out = model.image_transform()(gray)  # the model's own side, RGB
    assert out.shape == (3, 224, 224)
    mean, std = torch.tensor(rn50.visual.image_mean), torch.tensor(rn50.visual.image_std)
    torch.testing.assert_close(out[:, 0, 0], (128 / 255 - mean) / std)
    assert model.image_transform(448)(torch.zeros(3, 100, 80, dtype=torch.uint8)).shape == (3, 448, 448)
    rgba = Image.new("RGBA", (40, 40), color=(255, 0, 0, 128))  # a PNG with transparency
    assert model.image_transform(32)(rgba).shape == (3, 32, 32)
    for bad in (0, -5, "224", 100.5):
        with pytest.raises(ValueError, match="image_size must be a positive number of pixels"):
            model.image_transform(bad)


def test_regions_of_the_wrong_width_are_named(rn50):
    model = dk.DualCoOpPlusPlus(rn50, CLASSES, n_ctx=4)
    assert model.embed_dim == 1024
    with pytest.raises(ValueError, match=r"regions must have shape B x N x 1024 \(N regions of this model's width"):
        model(regions=torch.randn(2, 5, 512))
    with pytest.raises(TypeError, match=r"regions must be a floating tensor"):
        model(regions=torch.ones(2, 5, 1024, dtype=torch.int64))


OFFLINE_AFTER_IMPORT_SCRIPT = """
import os, time
import huggingface_hub, dualcoop_kernels as dk   # huggingface_hub reads HF_HUB_OFFLINE here
os.environ["HF_HUB_OFFLINE"] = "1"                  # set afterwards, from Python
started = time.monotonic()
try:
    dk.DualCoOpPlusPlus("RN50", ["cat"], pretrained="openai")
except RuntimeError as error:
    print("ERROR", error)
print("SECONDS", time.monotonic() - started)
"""


@pytest.mark.slow
def test_offline_set_after_import_takes_effect(tmp_path):
    """With HF_HUB_OFFLINE=1 set from Python after import, a tag that is not in the cache fails at
    once with a clear message (open_clip, left alone, retries the download for most of a minute)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "empty-hub-cache")
    finished = subprocess.run(
        [sys.executable, "-c", OFFLINE_AFTER_IMPORT_SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "not in the download cache and HF_HUB_OFFLINE is set" in finished.stdout, finished.stdout
    assert float(finished.stdout.split("SECONDS")[1]) < 15


def test_image_transform_takes_rgba_arrays_and_refuses_paths():
    import open_clip

    from dualcoop_kernels.model.images import clip_image_transform

    transform = clip_image_transform(open_clip.create_model("RN50").visual, 32)
    rgba = np.zeros((40, 30, 4), dtype=np.uint8)
    rgba[..., :3] = 120
    assert torch.equal(transform(rgba), transform(rgba[..., :3]))
    with pytest.raises(TypeError, match="got str: open the file first"):
        transform("photo.png")
    with pytest.raises(ValueError, match=r"a NumPy image must be H x W, H x W x 1, 3 or 4"):
        transform(np.zeros((4, 4, 5), dtype=np.uint8))


def test_a_backbone_file_that_is_no_model_config_is_named(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("image,cat\n")
    with pytest.raises(ValueError, match=r"labels.csv is a file but not an open_clip model config: give a model name"):
        dk.DualCoOpPlusPlus(str(labels), CLASSES)
