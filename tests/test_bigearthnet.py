"""BigEarthNet-S2 v1.0 and v2.0 on tiny patches written here (16-bit TIFF bands, metadata, split lists)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dualcoop_kernels.data import DatasetError, read_bigearthnet
from dualcoop_kernels.data.bigearthnet import CLASSES_19, CLASSES_43

PATCHES = {  # patch -> its CORINE labels (43-class names)
    "S2A_MSIL2A_20170613T101031_0_45": ["Coniferous forest", "Sea and ocean"],
    "S2A_MSIL2A_20170613T101031_0_46": ["Bare rock"],  # left out of the 19 classes
    "S2A_MSIL2A_20170613T101031_1_45": ["Continuous urban fabric", "Discontinuous urban fabric", "Vineyards"],
    "S2A_MSIL2A_20170613T101031_1_46": ["Pastures"],  # under snow: excluded
}
NAMES = list(PATCHES)
SPLIT = {"train": [NAMES[0], NAMES[1], NAMES[3]], "val": [NAMES[2]], "test": [NAMES[2]]}


def write_bands(folder, patch, value=1000):
    folder.mkdir(parents=True, exist_ok=True)
    for band, offset in (("B02", 0), ("B03", 500), ("B04", 1500), ("B08", 0)):
        data = np.full((12, 12), value + offset, dtype=np.uint16)
        data[0, 0] = 60000  # a saturated pixel
        Image.fromarray(data).save(folder / f"{patch}_{band}.tif")


def write_v1(root):
    for patch, labels in PATCHES.items():
        folder = root / "BigEarthNet-v1.0" / patch
        write_bands(folder, patch)
        (folder / f"{patch}_labels_metadata.json").write_text(json.dumps({"labels": labels, "tile_source": "x"}))
    for split, patches in SPLIT.items():
        (root / f"{split}.csv").write_text("".join(f"{patch}\n" for patch in patches))
    (root / "patches_with_seasonal_snow.csv").write_text(f"{NAMES[3]}\n")
    (root / "patches_with_cloud_and_shadow.csv").write_text("")


def test_v1_in_both_nomenclatures(tmp_path):
    write_v1(tmp_path)
    data = read_bigearthnet(tmp_path, "train", classes=43)
    assert data.classnames == CLASSES_43 and len(data) == 2  # the snowy patch is left out
    positives = [[CLASSES_43[i] for i in torch.where(row == 1)[0]] for row in data.labels]
    assert positives == [["Coniferous forest", "Sea and ocean"], ["Bare rock"]]
    data19 = read_bigearthnet(tmp_path, "train")
    assert data19.classnames == CLASSES_19 and len(CLASSES_19) == 19
    positives = [[CLASSES_19[i] for i in torch.where(row == 1)[0]] for row in data19.labels]
    assert positives == [["Coniferous forest", "Marine waters"], []]  # bare rock has no 19-class name
    test = read_bigearthnet(tmp_path, "test")
    assert [CLASSES_19[i] for i in torch.where(test.labels[0] == 1)[0]] == ["Urban fabric", "Permanent crops"]


def test_rgb_composite_scaling(tmp_path):
    write_v1(tmp_path)
    image = read_bigearthnet(tmp_path, "train")[0][0]
    assert image.mode == "RGB" and image.size == (12, 12)
    pixels = np.asarray(image)
    # B04 2500, B03 1500, B02 1000 clipped to [0, 2000] and scaled to 0..255: R saturates, G 191, B 128
    assert pixels[5, 5].tolist() == [255, 191, 128] and pixels[0, 0].tolist() == [255, 255, 255]
    brighter = np.asarray(read_bigearthnet(tmp_path, "train", rgb_max=4000)[0][0])
    assert brighter[5, 5].tolist() == [159, 96, 64]


def test_v1_errors_name_the_patch_and_file(tmp_path):
    write_v1(tmp_path)
    patch = NAMES[0]
    metadata = tmp_path / "BigEarthNet-v1.0" / patch / f"{patch}_labels_metadata.json"
    metadata.write_text(json.dumps({"labels": ["Lava fields"]}))
    with pytest.raises(DatasetError, match=f"patch {patch}: unknown label 'Lava fields'"):
        read_bigearthnet(tmp_path, "train")
    metadata.write_text("{broken")
    with pytest.raises(DatasetError, match=f"patch {patch}: .*labels_metadata.json holds no list of labels"):
        read_bigearthnet(tmp_path, "train")
    write_v1(tmp_path)
    (tmp_path / "BigEarthNet-v1.0" / patch / f"{patch}_B03.tif").unlink()
    with pytest.raises(FileNotFoundError, match=f"patch {patch}: band file .*_B03.tif is missing"):
        read_bigearthnet(tmp_path, "train")[0]
    with pytest.raises(ValueError, match=r"classes must be 19 or 43"):
        read_bigearthnet(tmp_path, classes=20)
    with pytest.raises(FileNotFoundError, match=r"neither BigEarthNet v2\.0"):
        read_bigearthnet(tmp_path / "nothing")


def test_v2_metadata_table(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    from pyarrow import parquet

    patches = ["S2A_MSIL2A_20170613T101031_33UUP_26_57", "S2B_MSIL2A_20180204T094109_34VER_31_60"]
    for patch in patches:
        write_bands(tmp_path / "BigEarthNet-S2" / "_".join(patch.split("_")[:-2]) / patch, patch, value=500)
    table = pyarrow.table(
        {
            "patch_id": patches,
            "labels": [["Arable land", "Inland waters"], ["Urban fabric"]],
            "split": ["train", "test"],
        }
    )
    parquet.write_table(table, tmp_path / "metadata.parquet")
    data = read_bigearthnet(tmp_path, "train")
    assert data.name == "bigearthnet-v2-train" and len(data) == 1
    assert [CLASSES_19[i] for i in torch.where(data.labels[0] == 1)[0]] == ["Arable land", "Inland waters"]
    assert np.asarray(data[0][0])[5, 5].tolist() == [255, 128, 64]
    with pytest.raises(ValueError, match="only the 19-class nomenclature"):
        read_bigearthnet(tmp_path, classes=43)
    with pytest.raises(DatasetError, match="no patch has split 'val'"):
        read_bigearthnet(tmp_path, "val")
    parquet.write_table(
        pyarrow.table({"patch_id": patches, "labels": [["Lava"], []], "split": ["train"] * 2}),
        tmp_path / "metadata.parquet",
    )
    with pytest.raises(DatasetError, match=r"metadata.parquet \(patch S2A.*\): unknown label 'Lava'"):
        read_bigearthnet(tmp_path, "train")


@pytest.mark.slow
def test_training_on_bigearthnet_through_the_command_line(tmp_path, capsys):
    pytest.importorskip("open_clip")
    from dualcoop_kernels.cli import main
    from dualcoop_kernels.data.shapes import write_tiny_clip

    write_v1(tmp_path / "ben")
    run = tmp_path / "run"
    arguments = [
        "train",
        "--preset",
        "bigearthnet",
        "--root",
        str(tmp_path / "ben"),
        "--clip",
        str(write_tiny_clip(tmp_path)),
    ]
    arguments += ["--pretrained", "none", "--image-size", "48", "--epochs", "1", "--batch-size", "2", "--workers", "0"]
    assert main([*arguments, "--bigearthnet-classes", "43", "--quiet", "--out", str(run)]) == 0
    evaluated = json.loads((run / "eval.json").read_text())
    assert list(evaluated["test"]["per_class_AP"]) == CLASSES_43
    assert "val_mAP" in (run / "metrics.jsonl").read_text()  # picked on BigEarthNet's own validation split
