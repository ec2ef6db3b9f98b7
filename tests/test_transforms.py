"""The training and test image transforms of both protocols, on small PIL images and uint8 tensors."""

import json
import random
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from dualcoop_kernels.data import transforms as T

MEAN = torch.tensor(T.CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(T.CLIP_STD).view(3, 1, 1)
TABLE = json.loads((resources.files("dualcoop_kernels.data") / T.POLICY_FILE).read_text())  # as packaged
TABLE_OPS = sorted({step.op for sub_policy in T.load_policy() for step in sub_policy})


def noise_image(height=40, width=40, low=0, high=256) -> Image.Image:
    """Random RGB pixels from torch's generator (seeded for every test)."""
    return Image.fromarray(torch.randint(low, high, (height, width, 3), dtype=torch.uint8).numpy())


def checkerboard(side: int, cell: int) -> Image.Image:
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    board = (((rows // cell + cols // cell) % 2) * 255).to(torch.uint8)
    return Image.fromarray(board.unsqueeze(-1).expand(side, side, 3).contiguous().numpy())


def pixels(image) -> torch.Tensor:
    """A PIL image as a 3 x H x W uint8 tensor (tensors pass through)."""
    if isinstance(image, torch.Tensor):
        return image
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def normalised(image: Image.Image) -> torch.Tensor:
    return (pixels(image).float() / 255 - MEAN) / STD


def unnormalised(output: torch.Tensor) -> torch.Tensor:
    """A transform's output back to 0..255 pixels (exact for pixels that no op touched)."""
    return (output * STD + MEAN).mul(255).round().clamp(0, 255).to(torch.uint8)


def write_policy(tmp_path, sub_policies, ranges=None):
    table = {**TABLE, "sub_policies": sub_policies}
    if ranges is not None:
        table["magnitude_ranges"] = ranges
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(table))
    return path


def sub_policy(op1, p1, op2="invert", p2=0.0, index1=9, index2=9):
    return {"p1": p1, "op1": op1, "magnitude_index1": index1, "p2": p2, "op2": op2, "magnitude_index2": index2}


# --- shapes, normalisation, interpolation, input modes ---


@pytest.mark.parametrize("protocol", T.TEST_INTERPOLATIONS)
@pytest.mark.parametrize("grey", [0, 77, 255])
def test_constant_grey_becomes_its_normalised_value(protocol, grey):
    out = T.test_transform(32, protocol)(Image.new("RGB", (40, 30), (grey,) * 3))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, ((grey / 255 - MEAN) / STD).expand(3, 32, 32), atol=1e-6, rtol=0)


def test_test_transforms_resize_bicubic_for_dualcoop_plus_plus_and_bilinear_for_dualcoop():
    board = checkerboard(37, 3)
    plus_plus, original = T.test_transform(16, "dualcoop++")(board), T.test_transform(16, "dualcoop")(board)
    torch.testing.assert_close(plus_plus, normalised(board.resize((16, 16), Image.Resampling.BICUBIC)))
    torch.testing.assert_close(original, normalised(board.resize((16, 16), Image.Resampling.BILINEAR)))
    assert (plus_plus - original).abs().amax() > 0.1


@pytest.mark.parametrize("protocol", T.TEST_INTERPOLATIONS)
def test_train_transform_gives_normalised_float_squares(protocol):
    for seed in range(4):
        torch.manual_seed(seed)
        out = T.train_transform(32, protocol)(noise_image(50, 36))
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        pixels01 = out * STD + MEAN
        assert pixels01.amin() >= -1e-5 and pixels01.amax() <= 1 + 1e-5


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "I;16"])
def test_any_image_mode_becomes_rgb(mode):
    image = noise_image(36, 36).convert(mode)
    expected = normalised(image.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
    torch.testing.assert_close(T.test_transform(32)(image), expected)
    for protocol in T.TEST_INTERPOLATIONS:
        assert T.train_transform(32, protocol)(image).shape == (3, 32, 32)


def test_alpha_is_dropped_and_grey_is_copied_to_every_channel():
    rgba = Image.new("RGBA", (32, 32), (10, 200, 30, 0))
    torch.testing.assert_close(T.test_transform(32)(rgba), normalised(Image.new("RGB", (32, 32), (10, 200, 30))))
    grey = unnormalised(T.test_transform(32)(Image.new("L", (32, 32), 91)))
    assert (grey == 91).all()


# --- randomness: torch's global generator only ---


@pytest.mark.parametrize("protocol", T.TEST_INTERPOLATIONS)
def test_torch_seed_replays_the_augmentation_and_other_seeds_differ(protocol):
    image, transform = noise_image(48, 40), T.train_transform(32, protocol)

    def augmented(seed, other_seed):
        random.seed(other_seed)  # Python's and NumPy's generators must not matter
        np.random.seed(other_seed)
        torch.manual_seed(seed)
        return transform(image)

    first = [augmented(seed, other_seed=seed) for seed in range(4)]
    again = [augmented(seed, other_seed=100 + seed) for seed in range(4)]
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    for i in range(4):
        for j in range(i):
            assert not torch.equal(first[i], first[j])


# --- the cutout ---


def assert_one_cutout(before: torch.Tensor, after: torch.Tensor, side: int) -> tuple[bool, tuple[int, ...]]:
    """``after`` equals ``before`` but for one square of one colour, ``side`` wide unless a border clips it;
    returns whether a border clipped it, and its colour."""
    changed = (before != after).any(0)
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    square = after[:, top:bottom, left:right]
    assert (square == square[:, :1, :1]).all(), "the cutout is one colour"
    outside = torch.ones_like(changed)
    outside[top:bottom, left:right] = False
    assert torch.equal(before[:, outside], after[:, outside])
    height, width = before.shape[1:]
    for low, high, size in ((top, bottom, height), (left, right, width)):
        assert high - low == side or ((low == 0 or high == size) and high - low < side), (low, high)
    return (bottom - top, right - left) != (side, side), tuple(square[:, 0, 0].tolist())


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("fraction, side", [(0.4, 16), (0.5, 20)])
def test_random_cutout_fills_one_square_clipped_at_the_borders(fraction, side, as_tensor):
    image = noise_image(40, 40)
    image = pixels(image) if as_tensor else image
    clipped, colours = [], set()
    for seed in range(12):
        torch.manual_seed(seed)
        was_clipped, colour = assert_one_cutout(pixels(image), pixels(T.RandomCutout(fraction)(image)), side)
        clipped.append(was_clipped)
        colours.add(colour)
    assert any(clipped) and not all(clipped) and len(colours) == 12


def test_dualcoop_plus_plus_resize_branch_cuts_out_0_4_of_the_side(monkeypatch):
    monkeypatch.setattr(T, "CROP_PROBABILITY", 0.0)
    # torch.rand at 1 applies no policy op (p <= 1) and no flip, which leaves the cutout alone to see
    monkeypatch.setattr(torch, "rand", lambda *size, **kwargs: torch.ones(*size))
    image, transform = noise_image(40, 40), T.train_transform(40)
    for seed in range(4):
        torch.manual_seed(seed)
        assert_one_cutout(pixels(image), unnormalised(transform(image)), side=16)


def test_dualcoop_cuts_out_half_the_side_then_applies_two_randaugment_ops(monkeypatch):
    randaugment_ops = []
    monkeypatch.setattr(T.v2, "RandAugment", lambda num_ops: randaugment_ops.append(num_ops) or v2.Identity())
    image, transform = noise_image(40, 40), T.train_transform(40, "dualcoop")
    assert randaugment_ops == [2]
    for seed in range(4):
        torch.manual_seed(seed)
        assert_one_cutout(pixels(image), unnormalised(transform(image)), side=20)


# --- the multi-label AutoAugment table ---


def test_table_magnitudes_are_linspace_of_the_ranges():
    table, loaded = TABLE, T.load_policy()
    assert len(loaded) == len(table["sub_policies"]) == 117
    for raw, steps in zip(table["sub_policies"], loaded):
        for position, step in enumerate(steps, start=1):
            op = raw[f"op{position}"]
            assert (step.op, step.probability) == (op, raw[f"p{position}"])
            if op in T.MAGNITUDE_FREE_OPS:
                assert step.magnitude is None
                continue
            expected = np.linspace(*table["magnitude_ranges"][op], 10)[raw[f"magnitude_index{position}"]]
            if op == "posterize":
                assert step.magnitude == int(np.round(expected)) and isinstance(step.magnitude, int)
            else:
                assert step.magnitude == pytest.approx(expected, rel=1e-12, abs=1e-12)
    first = loaded[0]  # posterize at index 8 of linspace(8, 4, 10), rotate at index 9 of linspace(0, 30, 10)
    assert [(s.op, s.magnitude) for s in first] == [("posterize", 4), ("rotate", 30.0)]


def strongest_step(op):
    """The table's step of ``op`` that changes images most (solarize: the lowest threshold)."""
    steps = [step for sub_policy in T.load_policy() for step in sub_policy if step.op == op]
    return max(steps, key=lambda step: -step.magnitude if op == "solarize" else step.magnitude or 0)


@pytest.mark.parametrize("op", TABLE_OPS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_every_op_of_the_table_changes_an_image(op, as_tensor):
    image = noise_image(32, 32, low=60, high=190)  # low contrast, so autocontrast and equalize stretch it
    image = pixels(image) if as_tensor else image
    for sign in (1, -1) if op in T.SIGNED_OPS else (1,):
        out = strongest_step(op).apply(image, sign)
        assert type(out) is type(image) and pixels(out).shape == (3, 32, 32) and pixels(out).dtype == torch.uint8
        assert not torch.equal(pixels(out), pixels(image)), (op, sign)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_point_ops_follow_their_definitions(as_tensor):
    image = noise_image(16, 16)
    before = pixels(image).int()
    image = pixels(image) if as_tensor else image
    assert torch.equal(pixels(T.PolicyStep("invert", 1.0, None).apply(image)).int(), 255 - before)
    for bits in (4, 6):
        posterized = pixels(T.PolicyStep("posterize", 1.0, bits).apply(image)).int()
        assert torch.equal(posterized, before & (256 - 2 ** (8 - bits)))
    for threshold in (113.8, 256.0):  # 256, the table's index 0, inverts nothing
        solarized = pixels(T.PolicyStep("solarize", 1.0, threshold).apply(image)).int()
        assert torch.equal(solarized, torch.where(before >= threshold, 255 - before, before))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_geometric_ops_fill_what_they_uncover_with_grey(as_tensor):
    image = Image.new("RGB", (32, 32), (250, 10, 10))
    image = pixels(image) if as_tensor else image
    rotated = pixels(T.PolicyStep("rotate", 1.0, 30.0).apply(image))
    assert all(rotated[:, row, col].tolist() == [128, 128, 128] for row in (0, 31) for col in (0, 31))
    # Both shears keep the top-left corner in place, as the authors' PIL matrix (1, m, 0, 0, 1, 0) does: the
    # first row (shearx) or column (sheary) stays, but for an edge pixel that the tensors' bilinear blends
    for sign in (1, -1):
        sheared_x = pixels(T.PolicyStep("shearx", 1.0, 0.3).apply(image, sign))
        assert (sheared_x[:, 0] != pixels(image)[:, 0]).any(0).sum() <= 1
        assert (sheared_x[:, 31] == 128).all(0).sum() >= 9  # 0.3 x 31 rows
        sheared_y = pixels(T.PolicyStep("sheary", 1.0, 0.3).apply(image, sign))
        assert (sheared_y[:, :, 0] != pixels(image)[:, :, 0]).any(0).sum() <= 1
        assert (sheared_y[:, :, 31] == 128).all(0).sum() >= 9
    shifted = pixels(T.PolicyStep("translatex", 1.0, 150 / 331).apply(image, sign=1))
    grey_columns = (shifted == 128).all(0).all(0)
    assert grey_columns.sum() in (14, 15) and grey_columns[0], "a band of about 0.45 x 32 px on one side"


def test_signed_enhance_ops_use_one_plus_or_minus_the_magnitude():
    image = noise_image(16, 16, low=60, high=190)
    step = T.PolicyStep("brightness", 1.0, 0.5)
    torch.testing.assert_close(pixels(step.apply(image, 1)), pixels(v2.functional.adjust_brightness(image, 1.5)))
    torch.testing.assert_close(pixels(step.apply(image, -1)), pixels(v2.functional.adjust_brightness(image, 0.5)))


def test_one_uniform_sub_policy_per_call_with_each_op_at_its_probability(tmp_path):
    # Sub-policy 0 inverts (p 1) and never posterizes (p 0); sub-policy 1 solarizes at threshold 256: nothing
    policy = write_policy(
        tmp_path, [sub_policy("invert", 1.0, "posterize", 0.0), sub_policy("solarize", 1.0, index1=0)]
    )
    augment = T.MultiLabelAutoAugment(policy)
    image = pixels(noise_image(8, 8))
    outcomes = [augment(image) for _ in range(200)]
    inverted = sum(torch.equal(out, 255 - image) for out in outcomes)
    assert sum(torch.equal(out, image) for out in outcomes) == 200 - inverted
    assert 70 < inverted < 130


def test_signed_ops_draw_their_sign_per_call(tmp_path):
    augment = T.MultiLabelAutoAugment(write_policy(tmp_path, [sub_policy("brightness", 1.0)]))
    image = pixels(noise_image(8, 8, low=60, high=190))
    brighter = [int(augment(image).sum()) > int(image.sum()) for _ in range(40)]
    assert 5 < sum(brighter) < 35


def test_table_naming_an_unknown_op_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"sub-policy 1: unknown op 'warp' in op2.*known ops: autocontrast"):
        T.load_policy(write_policy(tmp_path, [sub_policy("invert", 0.5), sub_policy("invert", 0.5, "warp", 0.5)]))


@pytest.mark.parametrize(
    "bad, message",
    [
        (sub_policy("rotate", 1.5), "p1 must lie in"),
        (sub_policy("rotate", 0.5, index1=10), "magnitude_index1 must be an int in 0..9"),
        (sub_policy("rotate", 0.5, index1=2.0), "magnitude_index1 must be an int"),
    ],
)
def test_table_with_a_bad_probability_or_magnitude_index_is_refused(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        T.load_policy(write_policy(tmp_path, [bad]))


def test_table_without_a_range_for_an_op_that_needs_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'rotate' takes a magnitude"):
        T.load_policy(write_policy(tmp_path, [sub_policy("rotate", 0.5)], ranges={}))


# --- argument checks ---


@pytest.mark.parametrize("image_size", [0, -32, 32.0, True, "32", None])
@pytest.mark.parametrize("build", [T.test_transform, T.train_transform])
def test_image_size_must_be_a_positive_int(build, image_size):
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        build(image_size)


@pytest.mark.parametrize("build", [T.test_transform, T.train_transform])
def test_protocol_must_be_one_of_the_two(build):
    with pytest.raises(ValueError, match=r"protocol must be one of \('dualcoop\+\+', 'dualcoop'\), got 'dualcoop\+'"):
        build(32, "dualcoop+")


@pytest.mark.parametrize(
    "crop_scale", [(0.0, 1.0), (0.8, 0.5), (0.5, 1.1), (0.5,), (0.5, 0.7, 1.0), "ab", (True, 1.0), None]
)
def test_crop_scale_must_be_two_fractions_in_order(crop_scale):
    with pytest.raises(ValueError, match="crop_scale must be two numbers 0 < lo <= hi <= 1"):
        T.train_transform(32, crop_scale=crop_scale)


def test_nus_wide_crop_scale_is_accepted():
    assert T.train_transform(32, crop_scale=(0.6, 1.0))(noise_image(36, 36)).shape == (3, 32, 32)


@pytest.mark.parametrize("fraction", [0.0, -0.4, 1.5])
def test_cutout_fraction_must_lie_in_0_1(fraction):
    with pytest.raises(ValueError, match="fraction must lie in"):
        T.RandomCutout(fraction)


@pytest.mark.parametrize("make", [lambda: T.RandomCutout(0.5), lambda: T.MultiLabelAutoAugment()])
def test_the_package_transforms_answer_both_torchvision_apis(make):
    """torchvision 0.21 and newer call make_params and transform; older releases _get_params and
    _transform: both give the same image from the same seed."""
    transform, image = make(), pixels(noise_image(16, 16))
    torch.manual_seed(3)
    new = transform.transform(image, transform.make_params([image]))
    torch.manual_seed(3)
    old = transform._transform(image, transform._get_params([image]))
    assert torch.equal(new, old)


def test_crop_flip_keeps_colours_that_the_authors_augmentation_changes():
    from PIL import Image

    from dualcoop_kernels.data.transforms import train_transform

    image = Image.new("RGB", (40, 40), (200, 40, 40))
    torch.manual_seed(0)
    kept = [train_transform(32, augmentation="crop-flip")(image) for _ in range(8)]
    assert all(torch.allclose(view, kept[0]) for view in kept)  # a flat colour stays that colour
    authors = [train_transform(32)(image) for _ in range(16)]
    assert any(not torch.allclose(view, kept[0], atol=1e-3) for view in authors)
    assert torch.equal(train_transform(32, augmentation="none")(image), kept[0])
