"""Images checked before a run uses them: every unreadable one named with its CSV line in one error,
tiny ones warned, and the images found good not opened again while they stay as they are."""

import os

import pytest
from PIL import Image

from dualcoop_kernels.data import image_check
from dualcoop_kernels.data.csv_labels import listed_lines
from dualcoop_kernels.data.image_check import check_images


@pytest.fixture
def images(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALCOOP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (40 + i, 48), (10 * i, 0, 0)).save(folder / f"{i}.png")
    return folder


def test_every_unreadable_image_is_named_with_its_line_in_one_error(images):
    (images / "text.png").write_text("not an image")
    whole = (images / "0.png").read_bytes()
    (images / "cut.png").write_bytes(whole[: len(whole) // 2])
    csv = images.parent / "labels.csv"
    listed = ["1.png", "missing.png", "text.png", "cut.png", "2.png"]
    csv.write_text("image,cat\n" + "".join(f"images/{name},1\n" for name in listed))
    paths = [images / name for name in listed]
    with pytest.raises(ValueError) as raised:
        check_images(paths, where=listed_lines(csv), workers=2)
    message = str(raised.value)
    assert message.startswith("3 image(s) cannot be used: labels.csv line 3: ")
    assert f"{images / 'missing.png'} does not exist" in message
    assert f"labels.csv line 4: {images / 'text.png'} cannot be read as an image" in message
    assert f"labels.csv line 5: {images / 'cut.png'} cannot be read as an image" in message


def test_images_found_good_are_not_opened_again_until_they_change(images, monkeypatch):
    paths = sorted(images.glob("*.png"))
    assert check_images(paths) == []
    opened = []
    monkeypatch.setattr(image_check, "check_image", lambda path: opened.append(path) or (64, 64))
    assert check_images(paths) == [] and opened == []
    later = os.stat(paths[2]).st_mtime_ns + 10**9
    os.utime(paths[2], ns=(later, later))
    check_images(paths)
    assert opened == [str(paths[2])]


def test_tiny_images_are_warned_with_their_size(images):
    Image.new("RGB", (1, 1)).save(images / "dot.png")
    warnings = check_images([images / "0.png", images / "dot.png"])
    assert warnings == [
        f"1 image(s) have a side under 32 pixels ({images / 'dot.png'} (1 x 1)): upsampled to the model's side, "
        "they hold little a region can find"
    ]


def test_an_unwritable_record_leaves_the_check_standing(images, monkeypatch, caplog):
    monkeypatch.setattr(image_check, "checked_images_file", lambda: images / "0.png" / "record.json")
    assert check_images([images / "1.png"]) == []
    assert "the record of checked images cannot be written" in caplog.text
