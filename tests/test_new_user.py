"""What a new user meets first: results that must not be silently wrong (blank labels, duplicate images,
trivial metrics, classes without positives, schedules that train nothing, a noisy epoch pick), clear
messages for wrong inputs, and the first hour (a first try in a minute, resuming with the same command
line, tables that explain themselves)."""

import json
import logging
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")

from dualcoop_kernels.cli import main
from dualcoop_kernels.data import MultiLabelDataset, read_csv_labels
from dualcoop_kernels.data.shapes import TINY_CLIP
from dualcoop_kernels.metrics import evaluate, threshold_metrics, top_k_metrics
from dualcoop_kernels.training import TrainConfig, evaluation
from dualcoop_kernels.training.datasets import known_fractions, load_run_data, validation_indices

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def arguments(task, out, *extra, epochs=2):
    return [
        "train", "--dataset", "csv", "--root", str(task["train"]), "--test-root", str(task["test"]),
        "--clip", str(task["clip"]), "--pretrained", "none", "--image-size", "48", "--n-ctx", "4",
        "--epochs", str(epochs), "--batch-size", "16", "--val-fraction", "0.25", "--workers", "0", "--quiet",
        "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def task(small_task):
    return small_task


@pytest.fixture(scope="module")
def shared_run(task, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "shared"
    assert main(arguments(task, run, "--shared-contexts")) == 0
    return run


def error_of(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


# Silently wrong or misleading results


@pytest.mark.slow
def test_a_missing_class_file_is_not_a_class_name(shared_run, task, capsys):
    images = str(task["root"] / "images" / "1_0.png")
    for given in ("classes.txt", "lists/names"):
        error = error_of(capsys, ["predict", str(shared_run), images, "--classes", given])
        assert "reads as a file of class names" in error and "no such file" in error
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "a value with a / or a suffix such as .txt is read as a file" in " ".join(capsys.readouterr().out.split())


def test_repeated_images_are_refused_with_their_lines(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("image,cat\na.png,1\nb.png,0\na.png,1\n")
    with pytest.raises(ValueError, match=r"labels.csv, line 4: image a.png is listed again \(first on line 2\)"):
        read_csv_labels(csv)


def test_test_images_that_are_training_images_are_refused(task, tmp_path):
    config = TrainConfig(dataset="csv", root=str(task["train"]), test_root=str(task["train"]), val_fraction=0.25)
    with pytest.raises(ValueError, match=r"the test images \(labels.csv\) share \d+ image\(s\) with the training"):
        load_run_data(config, None)


def test_threshold_and_top_k_metrics_count_known_labels_only():
    scores = np.array([[2.0, 1.0, -1.0], [-1.0, 3.0, 0.5], [1.0, -2.0, 2.0]])
    labels = np.array([[1, 0, -1], [-1, 1, 0], [0, -1, 1]])  # 0: unknown
    known = labels != 0
    # the unknown cells are dropped: the same as the metrics of the known cells alone
    complete = np.where(known, labels, -1)
    masked = threshold_metrics(scores, labels, known=known)  # each class: its one known positive found
    assert masked["per_class_recall"].tolist() == [100.0, 100.0, 100.0]
    assert masked["per_class_precision"].tolist() == [100.0, 100.0, 100.0]  # no known negative is predicted
    assert threshold_metrics(scores, complete)["per_class_precision"][1] == 50.0  # unknown read as negative
    top = top_k_metrics(scores, labels, k=1, known=known)
    assert top == pytest.approx({"precision": 100.0, "recall": 100.0, "f1": 100.0})
    assert top_k_metrics(scores, labels, k=2, known=known)["precision"] == 100.0  # the second picks are unknown
    assert top_k_metrics(scores, labels, k=2)["precision"] == 50.0  # read as negatives, they would count wrong
    assert evaluate(scores, labels, k=1, known=known)["CP"] == 100.0


def fake_split(monkeypatch, scores, labels, classnames):
    monkeypatch.setattr(evaluation, "scores_of", lambda *args, **kwargs: np.asarray(scores, dtype=float))
    monkeypatch.setattr(evaluation, "model_for", lambda model, config, names: model)
    images = [Path(f"{i}.png") for i in range(len(labels))]
    return MultiLabelDataset(images, torch.tensor(labels), classnames, name="test.csv")


def test_blank_labels_are_left_out_of_every_metric_and_the_table_says_so(monkeypatch):
    dataset = fake_split(monkeypatch, [[2.0, -1.0], [1.0, 3.0]], [[1, 0], [0, 1]], ["cat", "dog"])
    results = evaluation.evaluate_split(None, dataset, TrainConfig(root="x", top_k=1), None)
    assert results["CP"] == results["OP"] == 100.0 and results["images"] == 2
    assert "50.0 % of the labels are unknown: every metric counts the known ones" in results["unknown_labels"]
    table = evaluation.results_table({"test": results})
    assert "test: 50.0 % of the labels are unknown" in table
    assert "\nmAP: each class's average precision (images ranked by P+ - P-)" in table
    assert "\nCP CR CF1: precision, recall and F1 of the predictions P+ > P-" in table
    assert "\nOP OR OF1: the same over every (image, class) pair pooled" in table
    assert "\nP@k R@k F1@k: each image's k highest-scoring classes" in table  # the run asked for top-k


def test_top_k_keeps_k_and_says_when_it_is_trivial(monkeypatch, caplog):
    dataset = fake_split(monkeypatch, [[2.0, -1.0], [1.0, 3.0]], [[1, -1], [-1, 1]], ["cat", "dog"])
    with caplog.at_level(logging.WARNING, logger="dualcoop_kernels"):
        results = evaluation.evaluate_split(None, dataset, TrainConfig(root="x"), None)
    assert results["top_k"]["k"] == 3 and results["top_k"]["recall"] == 100.0 and "trivial" in results["top_k"]
    assert "top-3 metrics are trivial with 2 classes" in caplog.text
    assert "P@3" in evaluation.results_table({"zsl": results})


def test_classes_without_a_positive_are_named_and_a_second_map_leaves_them_out(monkeypatch, caplog):
    dataset = fake_split(monkeypatch, [[2.0, -1.0], [1.0, 3.0]], [[1, -1], [-1, -1]], ["cat", "dog"])
    with caplog.at_level(logging.WARNING, logger="dualcoop_kernels"):
        results = evaluation.evaluate_split(None, dataset, TrainConfig(root="x", top_k=1), None)
    assert results["mAP"] == 50.0 and results["mAP_classes_with_positives"] == 100.0  # the papers' rule stays
    assert results["classes_without_positives"] == ["dog"]
    assert "1 class(es) without a positive count 0 in the mAP, the papers' rule (dog)" in caplog.text


def test_the_mask_never_marks_a_blank_label_known(task, tmp_path):
    rows = task["train"].read_text().splitlines()
    blanked = [rows[0]] + [re.sub(r",[01]$", ",", row) if i % 2 else row for i, row in enumerate(rows[1:])]
    csv = task["root"] / "blanks.csv"
    csv.write_text("\n".join(blanked) + "\n")
    config = TrainConfig(dataset="csv", root=str(csv), partial=0.5, val_fraction=0.25)
    data = load_run_data(config, tmp_path)
    labels = read_csv_labels(csv).labels
    mask = np.load(tmp_path / "mask.npy")
    assert not mask[labels.numpy() == 0].any()  # a blank is never known
    assert mask.mean() < (labels != 0).float().mean().item()  # and the draw keeps about half of the rest
    assert torch.equal(data.mask, torch.from_numpy(mask))
    fractions = known_fractions(data)  # what the run's first line prints
    assert fractions["overall"] == pytest.approx(mask.mean())
    for name, split in [("train", data.train), ("validation", data.validation)]:
        assert fractions[name] == pytest.approx((split.labels != 0).float().mean().item()) and fractions[name] < 0.5


@pytest.mark.slow
def test_a_run_states_what_it_trains_on_and_warns_of_what_makes_it_meaningless(task, tmp_path, capsys):
    run = tmp_path / "one"
    assert main(arguments(task, run, "--val-fraction", "0.1", epochs=1)) == 0
    log = (run / "log.txt").read_text()
    assert re.search(r"4 classes; images: train 86, validation 10, test 32; labels known: overall 100.0 %", log)
    assert re.search(r"learnable parameters", log) and "on cpu" in log
    assert "epochs 1 trains nothing at the base rate" in log  # and on the terminal, quiet or not:
    assert "epochs 1 trains nothing at the base rate" in capsys.readouterr().err
    assert "median of" in log and "the pick is mostly noise; hold out more with --val-fraction or --val-images" in log
    assert main(["train", "--resume", "--out", str(run), "--workers", "0"]) == 0
    assert "the run had finished its 1 epochs: its best epoch is evaluated again" in (run / "log.txt").read_text()


@pytest.mark.slow
def test_a_run_whose_best_epoch_is_the_warm_up_says_so(task, tmp_path, monkeypatch):
    from dualcoop_kernels.training import trainer

    scores = iter([50.0, 40.0])  # the trained epoch scores worse than the untrained prompts
    monkeypatch.setattr(trainer, "selection_score", lambda *args: next(scores))
    assert main(arguments(task, tmp_path / "run")) == 0
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "the best epoch is epoch 0, the warm-up at 1e-05: no trained epoch scored better than the untrained" in log


def test_val_images_sets_the_held_out_count_and_extends_smaller_draws():
    assert len(validation_indices(100, 0.05, images=40)) == 40
    assert set(validation_indices(100, 0.05, images=10)) <= set(validation_indices(100, 0.0, images=40))
    with pytest.raises(ValueError, match="val_images must be at least 1"):
        TrainConfig(root="x", val_images=0)


@pytest.mark.slow
def test_augmentation_choice_for_training_and_caches(task, tmp_path):
    run = tmp_path / "run"
    assert main(arguments(task, run, "--augment", "crop-flip")) == 0
    assert TrainConfig.load(run / "config.json").augment == "crop-flip"
    common = ["--dataset", "csv", "--root", str(task["train"]), "--clip", str(task["clip"]), "--pretrained", "none"]
    common += ["--image-size", "48", "--n-ctx", "4", "--batch-size", "16", "--workers", "0", "--quiet"]
    assert main(["cache", *common, "--augment", "crop-flip", "--views", "2", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["transform"] == "crop-flip"
    assert main(["cache", *common, "--out", str(tmp_path / "plain")]) == 0  # the test transform by default
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["transform"] == "test"


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


# Messages instead of tracebacks


@pytest.mark.slow
def test_a_damaged_cache_is_named_as_the_source_of_nan(task, tmp_path, capsys):
    common = ["--dataset", "csv", "--root", str(task["train"]), "--clip", str(task["clip"]), "--pretrained", "none"]
    common += ["--image-size", "48", "--n-ctx", "4", "--batch-size", "16", "--workers", "0", "--quiet"]
    assert main(["cache", *common, "--out", str(tmp_path / "cache")]) == 0
    features = np.load(tmp_path / "cache" / "features.npy", mmap_mode="r+")
    features[:] = np.nan
    features.flush()
    del features
    error = error_of(capsys, ["train", *common, "--features", str(tmp_path / "cache"), "--out", str(tmp_path / "r")])
    assert f"the feature cache {tmp_path / 'cache'} holds NaN or infinite features" in error


@pytest.mark.slow
def test_a_foreign_prompts_file_is_described(shared_run, task, tmp_path, capsys):
    import shutil

    images = str(task["root"] / "images" / "1_0.png")
    broken = tmp_path / "broken"
    shutil.copytree(shared_run, broken)
    (broken / "model" / "model.safetensors").write_text("not prompts")
    assert "model.safetensors cannot be read as safetensors" in error_of(capsys, ["predict", str(broken), images])
    other = tmp_path / "other"
    assert main(arguments(task, other, "--n-ctx", "6", epochs=1)) == 0  # class-specific, 6 tokens
    shutil.rmtree(broken / "model")
    shutil.copytree(other / "model", broken / "model")
    error = error_of(capsys, ["predict", str(broken), images])
    assert "holds another run's prompts: its settings differ from" in error and "['n_ctx', 'shared_contexts']" in error
    shutil.rmtree(broken / "model")  # an older run's layout: prompts.pt beside the run's settings
    old = torch.load(other / "checkpoints" / "last.pt", weights_only=True)
    torch.save(dict(prompts=old["best_prompts"], classnames=old["classnames"]), broken / "prompts.pt")
    error = error_of(capsys, ["predict", str(broken), images])
    assert "holds 3 prompt sets of class-specific contexts of 6 tokens, for 4 classes (red square" in error
    assert "its settings ask for 3 prompt sets of contexts shared by all classes of 4 tokens" in error
    (broken / "prompts.pt").write_text("hello")  # a text file in its place
    error = error_of(capsys, ["predict", str(broken), images])
    assert f"learned prompts {broken / 'prompts.pt'} cannot be read as a file of tensors" in error


def test_bad_model_files_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.csv").write_text("image,cat\n" + "".join(f"{i}.png,1\n" for i in range(20)))
    (tmp_path / "bad.json").write_text("{oops")
    (tmp_path / "text.pt").write_text("hello")
    base = ["train", "--dataset", "csv", "--root", "x.csv", "--out", "run"]
    error = error_of(capsys, [*base, "--clip", "bad.json"])
    assert f"open_clip model config {tmp_path / 'bad.json'} is not readable JSON" in error
    error = error_of(capsys, [*base, "--clip", "RN50", "--pretrained", "text.pt"])
    assert f"pretrained file {tmp_path / 'text.pt'} is not a checkpoint of RN50" in error
    assert "weights_only" not in error


def test_outputs_that_cannot_be_written_are_refused_up_front(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "x.csv").write_text("image,cat\n" + "".join(f"{i}.png,1\n" for i in range(20)))
    error = error_of(capsys, ["train", "--dataset", "csv", "--root", "x.csv", "--out", "afile/run"])
    assert "--out afile/run: " in error and "afile is a file, not a folder" in error
    error = error_of(capsys, ["predict", "somerun", "x.csv", "--out", str(tmp_path)])
    assert "is a folder; give the path of a file to write" in error


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


@pytest.mark.slow
def test_ctrl_c_names_what_was_left_and_a_closed_pipe_is_quiet(shared_run, task, capsys, monkeypatch):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "evaluate_run", stop)
    capsys.readouterr()
    assert main(["eval", str(shared_run)]) == 130
    assert "dualcoop eval: stopped; nothing was written" in capsys.readouterr().err
    from dualcoop_kernels.training import cache

    monkeypatch.setattr(cache, "cache_training_split", stop)
    cache_arguments = ["--dataset", "csv", "--root", str(task["train"]), "--out", str(shared_run.parent / "c")]
    assert main(["cache", *cache_arguments]) == 130
    error = capsys.readouterr().err
    assert "dualcoop cache: stopped; the chunks written are kept: the same command finishes the cache" in error
    monkeypatch.undo()
    piped = subprocess.run(
        f"{shlex.quote(sys.executable)} -m dualcoop_kernels eval {shlex.quote(str(shared_run))} --json | head -1",
        shell=True, capture_output=True, text=True,
    )  # fmt: skip
    assert piped.stdout.strip() == "{" and "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr


@pytest.mark.slow
def test_predict_scores_the_readable_images_and_lists_the_others(shared_run, task, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(task["root"] / "images" / "1_0.png").save(folder / "a.gif")
    (folder / "b.png").write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    error = error_of(capsys, ["predict", str(shared_run), str(folder), "--out", str(out)])
    assert "1 of 2 images could not be read (the others are scored)" in error and "b.png" in error
    rows = out.read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(str(folder / "a.gif"))


def test_an_image_side_that_the_vit_patches_do_not_tile_is_refused(task, tmp_path, capsys):
    error = error_of(capsys, arguments(task, tmp_path / "run", "--image-size", "50"))
    assert "image_size 50 is not a multiple of the ViT's patch size 8" in error and "use 48 or 56" in error


# The first hour


@pytest.mark.slow
def test_the_first_try_recipe_learns_in_about_a_minute(tmp_path):
    block = re.search(r"<!-- example:first-try -->\s*```bash\n(.*?)```", README, re.S)[1]
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    executables = {"python": [sys.executable], "dualcoop": [sys.executable, "-m", "dualcoop_kernels"]}
    for command in filter(None, commands):
        finished = subprocess.run(
            [*executables[command[0]], *command[1:]], cwd=tmp_path, capture_output=True, text=True
        )
        assert finished.returncode == 0, finished.stderr[-2000:]
    records = (tmp_path / "runs" / "first-try" / "metrics.jsonl").read_text().splitlines()
    scores = [json.loads(line)["val_mAP"] for line in records]
    assert max(scores) > scores[0] + 8  # learned something
    config = re.search(r"the tiny one:\s*```json\n(.*?)```", README, re.S)[1]
    assert json.loads(config) == TINY_CLIP == json.loads((tmp_path / "first-try" / "tiny-clip.json").read_text())


@pytest.mark.slow
def test_resume_accepts_the_same_command_line_and_names_what_differs(shared_run, task, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(shared_run, run)
    same = arguments(task, run, "--shared-contexts")
    assert main([*same, "--resume"]) == 0
    error = error_of(capsys, [*arguments(task, run, "--shared-contexts", "--lr", "0.1", epochs=3), "--resume"])
    assert "these settings differ: epochs 3 (the run's: 2), lr 0.1 (the run's: 0.005)" in error


def test_workers_default_to_what_the_machine_has():
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert TrainConfig(root="x").workers == min(4, cores)


@pytest.mark.slow
def test_pictures_mark_the_picked_epoch_and_tell_unseen_classes_apart(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from dualcoop_kernels.training.plots import plot_run

    marks, legends = [], []
    monkeypatch.setattr(Axes, "axvline", lambda self, x, **kw: marks.append(x))
    monkeypatch.setattr(Axes, "legend", lambda self, *a, **kw: legends.append(a[1] if len(a) > 1 else kw))
    history = [dict(epoch=e, train_loss=1.0 / (e + 1), val_mAP=10.0 * e) for e in range(3)]
    zsl = dict(mAP=50.0, per_class_AP={"kite": 50.0})
    gzsl = dict(mAP=60.0, per_class_AP={"cat": 70.0, "kite": 50.0})
    written = plot_run(tmp_path, history, dict(best_epoch=2, zsl=zsl, gzsl=gzsl))
    assert [path.name for path in written] == ["curves.png", "ap_zsl.png", "ap_gzsl.png"]
    assert marks == [2, 2] and ["seen", "unseen"] in legends


def test_benchmark_ratios_read_the_same_way():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_asl
    import bench_head
    import harness

    rows = [
        dict(backend="eager", case=1, time_ms=4.0, peak_mib=100.0),
        dict(backend="triton", case=1, time_ms=1.0, peak_mib=10.0),
    ]
    harness.add_ratios(rows, same=("case",))
    assert rows[1]["speedup"] == 4.0 and rows[1]["memory_saving"] == 10.0  # both: above 1 beats eager
    assert "above 1: better than eager, for both" in harness.RATIO_LEGEND
    for columns in (bench_head.BENCH_COLUMNS, bench_asl.COLUMNS):
        assert ("speedup", "x faster") in columns and ("memory_saving", "x less mem") in columns


@pytest.mark.slow
def test_what_review_found(shared_run, task, tmp_path, capsys):
    """Errors that name what the user gave, and the same --classes rules in predict and explain."""
    import shutil

    image = str(task["root"] / "images" / "1_0.png")
    assert "--top-k must be from 1 to the 4 classes, got 0" in error_of(
        capsys, ["explain", str(shared_run), image, "--top-k", "0", "--out", str(tmp_path / "maps")]
    )
    assert "--workers must be >= 0" in error_of(capsys, ["eval", str(shared_run), "--workers", "-1"])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(shared_run, unfinished)
    shutil.rmtree(unfinished / "model")
    assert "holds no trained prompts yet" in error_of(capsys, ["predict", str(unfinished), image])
    copy = tmp_path / "copy"
    shutil.copytree(shared_run, copy)
    error = error_of(capsys, [*arguments(task, copy, "--shared-contexts", "--wta", "pos_norm_det"), "--resume"])
    assert "freeze_temperature True (the run's: False)" in error  # what the alias implies is compared too
    specific = tmp_path / "specific"
    assert main(arguments(task, specific, epochs=1)) == 0  # class-specific contexts
    capsys.readouterr()
    assert main(["predict", str(specific), image, "--classes", "blue bar,red square"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "image,blue bar,red square,present"  # the run's columns


def test_messages_name_the_option_given(task, tmp_path):
    config = TrainConfig(dataset="csv", root=str(task["train"]), val_images=500)
    with pytest.raises(ValueError, match="--val-images 500 leaves no training images of 96"):
        load_run_data(config, None)
    csv = tmp_path / "labels.csv"
    csv.write_text("image,cat\nx.png,1\nsub/../x.png,0\n")
    with pytest.raises(ValueError, match=r"line 3: image sub/../x.png is listed again \(first on line 2\)"):
        read_csv_labels(csv)


def test_a_mismatched_cache_speaks_of_augment_choices():
    from dualcoop_kernels.training.cache import _mismatch

    assert _mismatch("transform", "crop-flip", "train") == "augment: cache 'crop-flip', run 'authors'"
