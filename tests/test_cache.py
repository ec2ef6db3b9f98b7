"""Feature caches: the same logits as the images, resumable chunked extraction, ranks, and refusals."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")

from dualcoop_kernels.cli import main
from dualcoop_kernels.data.shapes import write_shapes, write_tiny_clip
from dualcoop_kernels.data.transforms import test_transform
from dualcoop_kernels.training import TrainConfig, build_model
from dualcoop_kernels.training import cache as cache_module
from dualcoop_kernels.training.cache import FeatureCache, extract
from dualcoop_kernels.training.datasets import training_split
from dualcoop_kernels.training.distributed import Ranks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    config = TrainConfig(
        dataset="csv", root=str(write_shapes(root, 40, seed=0)), backbone=str(write_tiny_clip(root)), pretrained=None,
        image_size=48, n_ctx=4, batch_size=8, workers=0,
    )  # fmt: skip
    dataset = training_split(config)
    return config, dataset, build_model(config, dataset.classnames)


def test_logits_from_the_cache_equal_those_from_the_images(setup, tmp_path):
    config, dataset, model = setup
    cache = extract(config, model, dataset, tmp_path / "cache", dtype="float32")
    features = cache.read_for(config, model, dataset)
    assert features.shape == (1, 40, 36, 64)
    transform = test_transform(config.image_size, config.protocol)
    images = torch.stack([transform(dataset[i][0]) for i in range(8)])
    with torch.no_grad():
        expected = model(images)
        got = model(regions=torch.from_numpy(np.array(features[0, :8])))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    half = extract(config, model, dataset, tmp_path / "half")  # float16, the default
    assert half.read_for(config, model, dataset).dtype == np.float16


def test_extraction_resumes_after_a_crash_and_ranks_share_a_cache(setup, tmp_path, monkeypatch):
    config, dataset, model = setup
    monkeypatch.setattr(cache_module, "CHUNK_IMAGES", 8)
    whole = extract(config, model, dataset, tmp_path / "whole", views=2, augment=True)
    expected = np.asarray(whole.read_for(config, model, dataset))
    assert not np.array_equal(expected[0], expected[1])  # two augmented views

    marked = []
    real_mark = cache_module.atomic_write_text

    def crash_after_two_chunks(path, text):
        if path.parent.name == "done":
            if len(marked) == 2:
                raise KeyboardInterrupt("killed")
            marked.append(path)
        real_mark(path, text)

    monkeypatch.setattr(cache_module, "atomic_write_text", crash_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        extract(config, model, dataset, tmp_path / "crashed", views=2, augment=True)
    monkeypatch.setattr(cache_module, "atomic_write_text", real_mark)
    crashed = FeatureCache(tmp_path / "crashed")
    assert crashed.done() == {0, 1}
    with pytest.raises(ValueError, match="incomplete: 3 chunks missing"):
        crashed.read_for(config, model, dataset)
    extract(config, model, dataset, tmp_path / "crashed", views=2, augment=True)  # finishes the rest
    np.testing.assert_array_equal(np.asarray(crashed.read_for(config, model, dataset)), expected)

    for rank in (0, 1):  # one after the other: the barriers need a process group only for world > 1
        monkeypatch.setattr(Ranks, "barrier", lambda self: None)
        extract(config, model, dataset, tmp_path / "ranks", views=2, augment=True, ranks=Ranks(rank, 2))
    assert FeatureCache(tmp_path / "ranks").done() == set(range(5))
    np.testing.assert_array_equal(
        np.asarray(FeatureCache(tmp_path / "ranks").read_for(config, model, dataset)), expected
    )


def test_a_mismatched_corrupted_or_truncated_cache_is_refused(setup, tmp_path):
    config, dataset, model = setup
    cache = extract(config, model, dataset, tmp_path / "cache")
    other = TrainConfig(**{**config.as_dict(), "image_size": 64})
    with pytest.raises(ValueError, match=r"made otherwise than this run needs \(image_size: cache 48, run 64"):
        cache.read_for(other, model, dataset)
    with pytest.raises(ValueError, match=r"holds a cache made otherwise \(differs in \['dtype'\]\)"):
        extract(config, model, dataset, tmp_path / "cache", dtype="float32")
    features = tmp_path / "cache" / "features.npy"
    features.write_bytes(features.read_bytes()[: features.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"features.npy cannot be read"):
        cache.read_for(config, model, dataset)
    (tmp_path / "cache" / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match=r"manifest.json is not valid JSON"):
        cache.read_for(config, model, dataset)
    with pytest.raises(FileNotFoundError, match=r"no manifest.json"):
        FeatureCache(tmp_path / "nothing").read_for(config, model, dataset)
    with pytest.raises(ValueError, match="views must be a positive int, and 1 without augmentation"):
        extract(config, model, dataset, tmp_path / "views", views=2)


@pytest.mark.slow
def test_training_from_a_cache_through_the_command_line(setup, tmp_path, capsys):
    config, _, _ = setup
    common = ["--dataset", "csv", "--root", config.root, "--clip", config.backbone, "--pretrained", "none"]
    common += ["--image-size", "48", "--n-ctx", "4", "--batch-size", "8", "--workers", "0", "--quiet"]
    assert main(["cache", *common, "--augment", "--views", "2", "--out", str(tmp_path / "cache")]) == 0
    assert "is complete; train with --features" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", *common, "--features", str(tmp_path / "cache"), "--epochs", "2", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["features"] == str(tmp_path / "cache")
    results = json.loads((run / "eval.json").read_text())
    assert (
        "val" in results and results["augmentation"] == f"authors (2 cached views of each image, {tmp_path / 'cache'})"
    )
    assert (
        main(
            [
                "train",
                *common,
                "--features",
                str(tmp_path / "cache"),
                "--image-size",
                "64",
                "--out",
                str(tmp_path / "r2"),
            ]
        )
        == 2
    )
    assert "made otherwise than this run needs" in capsys.readouterr().err


def test_the_augmentation_a_run_had_is_the_caches(tmp_path):
    """A cache made with the test transform means no augmentation, whatever --augment says."""
    from dualcoop_kernels.training.cache import applied_augmentation

    (tmp_path / "manifest.json").write_text(json.dumps({"transform": "test", "views": 1}))
    config = TrainConfig(root="x", augment="authors", features=str(tmp_path))
    assert applied_augmentation(config) == f"none (cached features of the test transform, {tmp_path})"
    assert applied_augmentation(TrainConfig(root="x", augment="crop-flip")) == "crop-flip"


def test_a_mismatched_cache_speaks_of_augment_choices():
    from dualcoop_kernels.training.cache import _mismatch

    assert _mismatch("transform", "crop-flip", "train") == "augment: cache 'crop-flip', run 'authors'"
