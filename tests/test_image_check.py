"""Images checked before a run uses them: every unreadable one named with its CSV line in one error,
tiny ones warned, and the images found good not opened again while they stay as they are."""

import json
import os

import pytest
from PIL import Image

from dualcoop_kernels.data import image_check
from dualcoop_kernels.data.csv_labels import listed_lines
from dualcoop_kernels.data.image_check import check_image_files, record_file


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
        check_image_files(paths, where=lambda: listed_lines(csv), workers=2)
    message = str(raised.value)
    assert message.startswith("3 image(s) cannot be used: labels.csv line 3: ")
    assert f"{images / 'missing.png'} does not exist" in message
    assert f"labels.csv line 4: {images / 'text.png'} cannot be read as an image" in message
    assert f"labels.csv line 5: {images / 'cut.png'} cannot be read as an image" in message


def test_images_found_good_are_not_opened_again_until_they_change(images, monkeypatch):
    paths = sorted(images.glob("*.png"))
    assert check_image_files(paths) == []
    opened = []
    monkeypatch.setattr(image_check, "check_image", lambda path: opened.append(path) or (64, 64))
    assert check_image_files(paths) == [] and opened == []
    later = os.stat(paths[2]).st_mtime_ns + 10**9
    os.utime(paths[2], ns=(later, later))
    check_image_files(paths)
    assert opened == [str(paths[2])]


def test_tiny_images_are_warned_with_their_size(images):
    Image.new("RGB", (1, 1)).save(images / "dot.png")
    warnings = check_image_files([images / "0.png", images / "dot.png"])
    assert warnings == [
        f"1 image(s) have a side under 32 pixels ({images / 'dot.png'} (1 x 1)): upsampled to the model's side, "
        "they hold little a region can find"
    ]


def test_an_unwritable_record_leaves_the_check_standing(images, monkeypatch, caplog):
    monkeypatch.setattr(image_check, "record_file", lambda paths: images / "0.png" / "record.json")
    assert check_image_files([images / "1.png"]) == []
    assert "the record of checked images cannot be written" in caplog.text


def test_a_damaged_record_is_checked_again(images):
    paths = [str(images / "0.png"), str(images / "1.png")]
    check_image_files(paths)
    stored = record_file(paths)
    record = json.loads(stored.read_text())
    record[paths[0]] = 5  # damaged: not what the check writes
    record[paths[1]] = record[paths[1]][:2]
    stored.write_text(json.dumps(record))
    assert check_image_files(paths) == []
    assert all(len(entry) == 4 for entry in json.loads(stored.read_text()).values())
    stored.write_text("[1, 2")
    assert check_image_files(paths) == []


def test_each_list_of_images_has_a_record_of_its_own(images):
    """So that a record stays the size of its dataset, and a run reads only its own."""
    first, second = [str(images / "0.png")], [str(images / "0.png"), str(images / "1.png")]
    check_image_files(first)
    check_image_files(second)
    assert record_file(first) != record_file(second)
    assert list(json.loads(record_file(first).read_text())) == first


def test_a_run_checks_the_image_files_it_will_read(images, tmp_path):
    """Not images read by a loader of their own (BigEarthNet's patches), nor the training images of a
    run on cached features."""
    from dataclasses import replace

    import torch

    from dualcoop_kernels.data import MultiLabelDataset
    from dualcoop_kernels.training import TrainConfig
    from dualcoop_kernels.training.datasets import RunData, check_run_images
    from dualcoop_kernels.training.distributed import SINGLE_PROCESS

    gone = MultiLabelDataset([images / "gone.png"], torch.ones(1, 1), ["cat"])
    patches = replace(gone, loader=lambda path: Image.new("RGB", (64, 64)))
    data = RunData(train=gone, validation=None, tests={"test": patches}, mask=torch.ones(1, 1), train_indices=None)
    assert check_run_images(TrainConfig(root="x", features=str(tmp_path)), data, SINGLE_PROCESS) == []
    with pytest.raises(ValueError, match=r"^1 image\(s\) cannot be used: .*gone.png does not exist$"):
        check_run_images(TrainConfig(root="x"), data, SINGLE_PROCESS)
