"""Dataset readers on tiny datasets written here in the real formats, partial labels and mask files."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dualcoop_kernels.data import (
    COCO_CLASSES,
    COCO_SEEN,
    COCO_UNSEEN,
    NUSWIDE_CONCEPTS,
    VOC_CLASSES,
    DatasetError,
    MultiLabelDataset,
    known_mask,
    load_mask,
    partial_labels,
    read_coco,
    read_csv_labels,
    read_nuswide,
    read_nuswide_tags,
    read_voc,
    save_mask,
)

COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def write_image(path, colour=(200, 30, 30), size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_coco(root, split="train", annotations=None, images=4):
    categories = [dict(id=i, name=name) for i, name in zip(COCO_IDS, COCO_CLASSES)]
    listed = [dict(id=100 + k, file_name=f"{split}_{k}.jpg") for k in range(images)]
    if annotations is None:
        annotations = [
            dict(id=1, image_id=102, category_id=1, iscrowd=0, bbox=[0, 0, 5, 5]),  # person
            dict(id=2, image_id=101, category_id=4, iscrowd=0, bbox=[0, 0, 5, 5]),  # motorcycle
            dict(id=3, image_id=101, category_id=18, iscrowd=1, bbox=[0, 0, 5, 5]),  # dog, crowd
            dict(id=4, image_id=102, category_id=5, iscrowd=0, bbox=[0, 0, 0.5, 9]),  # airplane, under a pixel
        ]
    path = root / "annotations" / f"instances_{split}2014.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(images=listed, annotations=annotations, categories=categories[::-1])))
    for entry in listed:
        write_image(root / f"{split}2014" / entry["file_name"])
    return path


def test_coco_dualcoop_plus_plus_rules(tmp_path):
    write_coco(tmp_path)
    data = read_coco(tmp_path, "train")
    assert len(data) == 4 and data.labels.shape == (4, 80) and data.labels.dtype == torch.int8
    assert data.classnames[3] == "motor bike" and data.classnames[4] == "aeroplane"
    assert data.classnames[9] == "traffic light" and data.classnames[:3] == ["person", "bicycle", "car"]
    positives = {row: [data.classnames[c] for c in torch.where(data.labels[row] == 1)[0]] for row in range(4)}
    # every image, in the file's order; the crowd dog and the sub-pixel airplane do not count in train
    assert positives == {0: [], 1: ["motor bike"], 2: ["person"], 3: []}
    assert data.image_paths[2] == tmp_path / "train2014" / "train_2.jpg"
    image, labels, index = data[1]
    assert image.mode == "RGB" and image.size == (8, 6) and index == 1 and labels[3] == 1


def test_coco_tiny_boxes_count_in_val(tmp_path):
    write_coco(tmp_path, "val")
    data = read_coco(tmp_path, "val")
    assert data.labels[2, COCO_CLASSES.index("airplane")] == 1


def test_coco_original_dualcoop_rules(tmp_path):
    write_coco(tmp_path)
    data = read_coco(tmp_path, "train", protocol="dualcoop")
    # only annotated images, in the order of their first annotation; crowd counts; COCO's names
    assert [path.name for path in data.image_paths] == ["train_2.jpg", "train_1.jpg"]
    assert data.classnames[3] == "motorcycle" and data.classnames[4] == "airplane"
    assert data.labels[1, COCO_CLASSES.index("dog")] == 1 and data.labels[0, COCO_CLASSES.index("airplane")] == 1


def test_coco_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"instances_train2014.json"):
        read_coco(tmp_path)
    path = write_coco(tmp_path, annotations=[dict(id=7, image_id=100, category_id=12, bbox=[0, 0, 2, 2])])
    with pytest.raises(DatasetError, match=r"instances_train2014.json: annotation 7 has unknown category id 12"):
        read_coco(tmp_path)
    write_coco(tmp_path, annotations=[dict(id=8, image_id=999, category_id=1, bbox=[0, 0, 2, 2])])
    with pytest.raises(DatasetError, match="unknown image id 999"):
        read_coco(tmp_path)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="is not valid JSON"):
        read_coco(tmp_path)
    write_coco(tmp_path, images=0, annotations=[])
    with pytest.raises(DatasetError, match="the split has no images"):
        read_coco(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        read_coco(tmp_path, "test")
    with pytest.raises(ValueError, match="protocol must be one of"):
        read_coco(tmp_path, protocol="dualcoop+")


def test_malformed_coco_entries_name_the_file(tmp_path):
    path = write_coco(tmp_path)
    content = json.loads(path.read_text())
    broken = dict(content, images=[{"id": 1}])
    path.write_text(json.dumps(broken))
    with pytest.raises(DatasetError, match=r"instances_train2014.json: an entry of images .* lacks"):
        read_coco(tmp_path)
    path.write_text(json.dumps(dict(content, images=content["images"] + content["images"][:1])))
    with pytest.raises(DatasetError, match="image ids repeat"):
        read_coco(tmp_path)
    content["annotations"][0]["bbox"] = "wide"
    path.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match="annotation 1 has a malformed bbox"):
        read_coco(tmp_path)


def test_datasets_refuse_ambiguous_labels_and_paths(tmp_path):
    with pytest.raises(TypeError, match="bool labels would read False as unknown"):
        MultiLabelDataset(["a.png"], torch.tensor([[True, False]]), ["cat", "dog"])
    with pytest.raises(ValueError, match=r"labels must hold only \+1"):
        MultiLabelDataset(["a.png"], torch.tensor([[0.6, 0.0]]), ["cat", "dog"])
    with pytest.raises(TypeError, match="image_paths must be a list of paths"):
        MultiLabelDataset("ab", torch.ones(2, 1), ["cat"])


def test_a_missing_or_unreadable_image_is_named(tmp_path):
    write_coco(tmp_path)
    data = read_coco(tmp_path)
    (tmp_path / "train2014" / "train_0.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"coco-train: image .*train_0.jpg does not exist"):
        data[0]
    (tmp_path / "train2014" / "train_1.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"train_1.jpg cannot be read as an image"):
        data[1]


def write_voc(root, objects, split="trainval"):
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    (main / f"{split}.txt").write_text("".join(f"{image}\n" for image in objects))
    for image, items in objects.items():
        body = "".join(
            f"<object><name>{name}</name><difficult>{int(difficult)}</difficult></object>" for name, difficult in items
        )
        (root / "Annotations").mkdir(exist_ok=True)
        (root / "Annotations" / f"{image}.xml").write_text(f"<annotation>{body}</annotation>")
        write_image(root / "JPEGImages" / f"{image}.jpg")


def test_voc_difficult_objects_do_not_count(tmp_path):
    write_voc(tmp_path, {"000005": [("chair", False), ("diningtable", True)], "000007": [("pottedplant", True)]})
    data = read_voc(tmp_path)
    assert data.classnames == VOC_CLASSES and "diningtable" in data.classnames and "tvmonitor" in data.classnames
    assert data.labels[0, VOC_CLASSES.index("chair")] == 1
    assert data.labels[0, VOC_CLASSES.index("diningtable")] == -1  # present only as difficult: negative
    assert (data.labels[1] == -1).all()
    assert data.image_paths[1] == tmp_path / "JPEGImages" / "000007.jpg"


def test_voc_errors_name_the_file(tmp_path):
    write_voc(tmp_path, {"000001": [("sofa", False)]})
    (tmp_path / "Annotations" / "000001.xml").write_text("<annotation><object><name>couch</name></object></annotation>")
    with pytest.raises(DatasetError, match=r"000001.xml: unknown class 'couch'"):
        read_voc(tmp_path)
    (tmp_path / "Annotations" / "000001.xml").write_text("<annotation>")
    with pytest.raises(DatasetError, match=r"000001.xml is not valid XML"):
        read_voc(tmp_path)
    (tmp_path / "ImageSets" / "Main" / "trainval.txt").write_text("000001 1\n")
    with pytest.raises(DatasetError, match=r"trainval.txt, line 1: expected one image id"):
        read_voc(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"test.txt"):
        read_voc(tmp_path, "test")


def write_nuswide(root, concepts, labels, tags=None, tag_rows=None, split="Train"):
    (root / "ConceptsList").mkdir(parents=True, exist_ok=True)
    (root / "ConceptsList" / "Concepts81.txt").write_text("\n".join(concepts) + "\n")
    images = [f"animal\\{k:04d}_1.jpg" for k in range(len(labels))]
    (root / "ImageList").mkdir(exist_ok=True)
    (root / "ImageList" / f"{split}Imagelist.txt").write_text("\r\n".join(images) + "\r\n")
    folder = root / "Groundtruth" / "TrainTestLabels"
    folder.mkdir(parents=True, exist_ok=True)
    for column, concept in enumerate(concepts):
        (folder / f"Labels_{concept}_{split}.txt").write_text("".join(f"{row[column]} \n" for row in labels))
    if tags is not None:
        (root / "NUS_WID_Tags").mkdir(exist_ok=True)
        (root / "NUS_WID_Tags" / "TagList1k.txt").write_text("\n".join(tags) + "\n")
        (root / "NUS_WID_Tags" / f"{split}_Tags1k.dat").write_text(
            "".join("\t".join(map(str, row)) + "\n" for row in tag_rows)
        )


def test_nuswide_concepts_and_tags(tmp_path):
    tags, tag_rows = ["sky", "blue", "cat", "nikon"], [[1, 1, 0, 0], [0, 0, 1, 1]]
    write_nuswide(tmp_path, ["sky", "cat", "tree"], [[1, 0, 0], [0, 1, 1]], tags, tag_rows)
    data = read_nuswide(tmp_path, "train")
    assert data.classnames == ["sky", "cat", "tree"]
    assert data.labels.tolist() == [[1, -1, -1], [-1, 1, 1]]
    assert data.image_paths[1] == tmp_path / "Flickr" / "animal" / "0001_1.jpg"
    seen = read_nuswide_tags(tmp_path, "train", images=tmp_path / "pictures")
    assert seen.classnames == ["blue", "nikon"]  # the tags that are not concepts
    assert seen.labels.tolist() == [[1, -1], [-1, 1]]
    assert seen.image_paths[0] == tmp_path / "pictures" / "animal" / "0000_1.jpg"


def test_nuswide_errors_name_the_file(tmp_path):
    write_nuswide(tmp_path, ["sky", "cat"], [[1, 0], [0, 2]])
    with pytest.raises(DatasetError, match=r"Labels_cat_Train.txt, line 2: expected 0 or 1, got '2'"):
        read_nuswide(tmp_path)
    write_nuswide(tmp_path, ["sky", "cat"], [[1, 0]])
    (tmp_path / "ImageList" / "TrainImagelist.txt").write_text("a\\1.jpg\na\\2.jpg\n")
    with pytest.raises(DatasetError, match=r"Labels_sky_Train.txt: 1 labels for 2 images"):
        read_nuswide(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"TestImagelist.txt"):
        read_nuswide(tmp_path, "test")


def test_csv_labels(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    path = tmp_path / "labels.csv"
    path.write_text("image,cat,traffic light\nimages/a.png,1,\nimages/b.png,0,1\n")
    data = read_csv_labels(path)
    assert data.classnames == ["cat", "traffic light"]
    assert data.labels.tolist() == [[1, 0], [-1, 1]]
    assert data.image_paths[0] == tmp_path / "images" / "a.png"
    assert data[0][0].mode == "RGB"
    with pytest.raises(FileNotFoundError, match=r"b.png does not exist"):
        data[1]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"line 1: the header must be image,<class 1>"),
        ("path,cat\nx.png,1\n", r"line 1: the header must be"),
        ("image,cat,cat\nx.png,1,0\n", r"line 1: class names must be distinct"),
        ("image,cat,dog\nx.png,1\n", r"line 2: 2 fields, the header has 3"),
        ("image,cat\nx.png,yes\n", r"line 2: values must be 1, 0 or empty, got 'yes'"),
        ("image,cat\n,1\n", r"line 2: the image path is empty"),
        ("image,cat\n", r"no images listed"),
    ],
)
def test_csv_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "labels.csv"
    path.write_text(content)
    with pytest.raises(DatasetError, match=f"labels.csv.*{message}"):
        read_csv_labels(path)


def test_csv_path_must_be_a_path(tmp_path):
    with pytest.raises(TypeError, match="path must be a path"):
        read_csv_labels(["labels.csv"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_csv_labels(tmp_path / "none.csv")


def test_partial_labels_are_the_authors_draw():
    labels = torch.where(torch.rand(37, 11) < 0.3, 1, -1).to(torch.int8)
    for proportion in (0.1, 0.5, 0.9):
        np.random.seed(5)  # what the authors' code does before drawing
        expected = labels.numpy() * (np.random.random((37, 11)) < proportion)
        got = partial_labels(labels, proportion, seed=5)
        assert np.array_equal(got.numpy(), expected) and got.dtype == labels.dtype
        assert abs((got != 0).float().mean().item() - proportion) < 0.12
    assert torch.equal(partial_labels(labels, 1.0, seed=3), labels)  # 1 keeps every label
    assert torch.equal(partial_labels(labels, 0.4, seed=3, protocol="dualcoop"), partial_labels(labels, 0.4, seed=3))


def test_partial_masks_nest_across_proportions():
    masks = [known_mask((50, 20), p, seed=1) for p in (0.1, 0.3, 0.6, 0.9)]
    for smaller, larger in zip(masks, masks[1:]):
        assert not (smaller & ~larger).any() and larger.sum() > smaller.sum()
    assert not torch.equal(known_mask((50, 20), 0.5, seed=1), known_mask((50, 20), 0.5, seed=2))


@pytest.mark.parametrize("proportion", [0, -0.1, 1.5, float("nan"), "0.5"])
def test_partial_labels_refuse_bad_proportions(proportion):
    with pytest.raises(ValueError, match="proportion"):
        partial_labels(torch.ones(2, 3), proportion, seed=0)


def test_partial_labels_refuse_incomplete_labels_and_bad_seeds():
    with pytest.raises(ValueError, match="labels must be complete"):
        partial_labels(torch.tensor([[1, 0]]), 0.5, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        partial_labels(torch.ones(2, 3), 0.5, seed=-1)
    with pytest.raises(ValueError, match="seed must be"):
        partial_labels(torch.ones(2, 3), 0.5, seed=1.5)


def test_mask_files_round_trip_and_are_checked(tmp_path):
    mask = known_mask((6, 4), 0.5, seed=0)
    save_mask(tmp_path / "run" / "mask.npy", mask)
    assert torch.equal(load_mask(tmp_path / "run" / "mask.npy", (6, 4)), mask)
    assert [path.name for path in (tmp_path / "run").iterdir()] == ["mask.npy"]  # no temporary left
    with pytest.raises(ValueError, match=r"is \(6, 4\), the dataset's labels are \(5, 4\)"):
        load_mask(tmp_path / "run" / "mask.npy", (5, 4))
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=r"not a readable .npy"):
        load_mask(tmp_path / "bad.npy", (6, 4))


def test_nuswide_concepts_read_as_shipped(tmp_path):
    write_nuswide(tmp_path, NUSWIDE_CONCEPTS, [[1] * 81])
    assert len(NUSWIDE_CONCEPTS) == 81 and read_nuswide(tmp_path).classnames == NUSWIDE_CONCEPTS


def test_zero_shot_split_of_coco():
    assert len(COCO_SEEN) == 48 and len(COCO_UNSEEN) == 17 and not set(COCO_SEEN) & set(COCO_UNSEEN)
    assert [COCO_CLASSES[i] for i in COCO_UNSEEN][:4] == ["airplane", "bus", "cat", "dog"]


def test_the_package_and_its_data_readers_import_without_the_clip_extra():
    script = (
        "import sys; sys.modules['torchvision'] = sys.modules['open_clip'] = None\n"
        "import dualcoop_kernels, dualcoop_kernels.data, dualcoop_kernels.metrics, dualcoop_kernels.cli\n"
        "print('ok')"
    )
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert finished.stdout.strip() == "ok", finished.stderr[-2000:]


def test_repeated_images_are_refused_with_their_lines(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("image,cat\na.png,1\nb.png,0\na.png,1\n")
    with pytest.raises(ValueError, match=r"labels.csv, line 4: image a.png is listed again \(first on line 2\)"):
        read_csv_labels(csv)
