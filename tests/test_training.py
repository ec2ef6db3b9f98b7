"""Training, evaluation and prediction through the ``dualcoop`` command on a small synthetic task
(coloured shapes on noise, a tiny randomly initialised CLIP), resuming after a kill, zero-shot runs,
and the schedule and settings."""

import dataclasses
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")

from dualcoop_kernels.cli import main
from dualcoop_kernels.data import MultiLabelDataset, read_csv_labels
from dualcoop_kernels.data.shapes import SHAPES, write_shapes, write_tiny_clip
from dualcoop_kernels.training import PRESETS, TrainConfig, evaluation, learning_rate, preset_config
from dualcoop_kernels.training.datasets import (
    degenerate_class_warnings,
    known_fractions,
    load_run_data,
    validation_indices,
)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return dict(
        train=write_shapes(root, 160, seed=0),
        test=write_shapes(root, 64, seed=1, name="test.csv"),
        clip=write_tiny_clip(root),
    )


def train_arguments(task, out, epochs=6, extra=()):
    return [
        "train", "--dataset", "csv", "--root", str(task["train"]), "--test-root", str(task["test"]),
        "--clip", str(task["clip"]), "--pretrained", "none", "--image-size", "48", "--n-ctx", "8",
        "--epochs", str(epochs), "--batch-size", "16", "--lr", "0.001", "--val-fraction", "0.25",
        "--workers", "0", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip


def history(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_times(records):
    return [{key: value for key, value in record.items() if key != "seconds"} for record in records]


@pytest.fixture(scope="module")
def trained(task, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "shapes"
    started = time.perf_counter()
    assert main(train_arguments(task, run)) == 0
    return run, time.perf_counter() - started


@pytest.mark.slow
def test_a_run_learns_the_synthetic_task(trained, capsys):
    run, seconds = trained
    records = history(run)
    assert [record["epoch"] for record in records] == list(range(6))
    assert records[0]["lr"] == 1e-5 and records[1]["lr"] == pytest.approx(1e-3)
    scores = [record["val_mAP"] for record in records]
    print(f"validation mAP by epoch {[round(s, 1) for s in scores]}, {seconds / 6:.1f} s per epoch")
    assert max(scores[1:]) > scores[0] + 8  # well above the untrained start
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["selected_on"] == "val" and evaluated["best_epoch"] == max(range(6), key=scores.__getitem__)
    assert set(evaluated["test"]["per_class_AP"]) == set(SHAPES)
    for name in ("config.json", "mask.npy", "model/model.safetensors", "model/config.json", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert TrainConfig.load(run / "config.json").epochs == 6
    assert not list(run.rglob("*.tmp"))  # every file renamed into place
    pictures = {"curves.png", "ap_test.png"}
    if importlib.util.find_spec("matplotlib"):
        assert pictures <= {path.name for path in run.iterdir()}
    else:
        assert "no plots (pip install matplotlib" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_and_predict_commands(trained, task, tmp_path, capsys):
    run, _ = trained
    assert main(["eval", str(run), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "eval.json").read_text())
    assert printed["test"]["mAP"] == pytest.approx(saved["test"]["mAP"], abs=1e-9)
    assert main(["eval", str(run)]) == 0
    assert "mAP" in capsys.readouterr().out
    images = task["test"].parent / "images"
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(run), str(images), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "image," + ",".join(SHAPES) + ",present" and len(lines) == 1 + 224
    cells = lines[1].split(",")
    probabilities = [float(value) for value in cells[1:-1]]
    assert all(0 <= p <= 1 for p in probabilities)
    present = {name for name, p in zip(SHAPES, probabilities) if p > 0.5}  # P+ > P-, the metrics' threshold
    assert set(filter(None, cells[-1].split(";"))) == present
    assert main(["predict", str(run), str(images / "1_0.png"), "--top-k", "2"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header == "image,class_1,probability_1,present_1,class_2,probability_2,present_2"
    row = row.split(",")
    assert row[1] in SHAPES and row[3] == str(int(float(row[2]) > 0.5))


def run_command(arguments, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "dualcoop_kernels", *arguments], **kwargs)


@pytest.mark.slow
def test_resume_after_a_kill_matches_the_uninterrupted_run(trained, task, tmp_path):
    run, _ = trained
    killed = tmp_path / "killed"
    process = run_command(train_arguments(task, killed), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 3))  # somewhere in a later epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = run_command(["train", "--resume", "--out", str(killed), "--quiet"], stderr=subprocess.PIPE)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-3000:]
    assert without_times(history(killed)) == without_times(history(run))
    assert json.loads((killed / "eval.json").read_text()) == json.loads((run / "eval.json").read_text())


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_resumes(trained, task, tmp_path):
    run, _ = trained
    stopped = tmp_path / "stopped"
    process = run_command(train_arguments(task, stopped), stderr=subprocess.PIPE)
    while not (stopped / "checkpoints" / "last.pt").exists() and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 130
    assert "saved: --resume continues" in process.stderr.read().decode()
    state = torch.load(stopped / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] > 0 or state["epoch"] > 1  # stopped inside an epoch (or just past one)
    assert main(["train", "--resume", "--out", str(stopped), "--quiet"]) == 0
    assert without_times(history(stopped)) == without_times(history(run))
    assert re.search(r"resuming at epoch \d+, step \d+ of \d+", (stopped / "log.txt").read_text())


@pytest.mark.slow
def test_zero_shot_run_reports_unseen_and_generalised_scores(task, tmp_path):
    seen = write_shapes(tmp_path / "seen", 48, seed=2, classes=dict(list(SHAPES.items())[:3]))
    everything = write_shapes(tmp_path / "all", 32, seed=3, name="test.csv")
    run = tmp_path / "zsl"
    arguments = train_arguments(task, run, epochs=2, extra=["--zero-shot", "--shared-contexts"])
    arguments[arguments.index("--root") + 1] = str(seen)
    arguments[arguments.index("--test-root") + 1] = str(everything)
    assert main(arguments) == 0
    evaluated = json.loads((run / "eval.json").read_text())
    assert list(evaluated["zsl"]["per_class_AP"]) == ["yellow cross"]
    assert list(evaluated["gzsl"]["per_class_AP"]) == list(SHAPES)
    # zero-shot runs pick by F1 at the top 3, except with 3 seen classes or fewer, where it cannot change
    assert evaluated["selection_metric"] == "mAP" and "val_mAP" in history(run)[0]


def predictions(capsys, arguments):
    capsys.readouterr()  # what came before
    assert main(["predict", *arguments]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    names = header.split(",")[1:-1]  # the last column: the classes present
    return {name: [float(row.split(",")[1 + i]) for row in rows] for i, name in enumerate(names)}


@pytest.mark.slow
def test_open_vocabulary_prediction_with_shared_contexts(trained, task, tmp_path, capsys):
    run = tmp_path / "shared"
    assert main(train_arguments(task, run, epochs=1, extra=["--shared-contexts"])) == 0
    images = str(task["test"].parent / "images")
    trained_scores = predictions(capsys, [str(run), images])
    reordered = list(SHAPES)[::-1]
    given = predictions(capsys, [str(run), images, "--classes", ",".join(reordered)])
    for name in SHAPES:  # the same classes, by name and in another order: the same scores
        assert given[name] == pytest.approx(trained_scores[name], abs=2e-6)
    names_file = tmp_path / "names.txt"
    names_file.write_text("purple star\ntraffic light\n")
    unseen = predictions(capsys, [str(run), images, "--classes", str(names_file)])
    assert list(unseen) == ["purple star", "traffic light"]
    assert all(0 <= p <= 1 for values in unseen.values() for p in values)
    class_specific, _ = trained
    assert main(["predict", str(class_specific), images, "--classes", "cat"]) == 2
    assert "class-specific contexts" in capsys.readouterr().err
    assert main(["predict", str(run), images, "--classes", " , "]) == 2
    assert "names no class" in capsys.readouterr().err


@pytest.mark.slow
def test_zero_shot_batches_train_on_a_random_subset_of_the_seen_classes(task, tmp_path, monkeypatch):
    from dualcoop_kernels.model import DualCoOpPlusPlus
    from dualcoop_kernels.training import train

    asked = []
    forward = DualCoOpPlusPlus.forward

    def spy(self, images=None, *, regions=None, classes=None):
        if self.training:
            asked.append(None if classes is None else classes.tolist())
        return forward(self, images, regions=regions, classes=classes)

    monkeypatch.setattr(DualCoOpPlusPlus, "forward", spy)
    seen = write_shapes(tmp_path / "seen", 64, seed=2, classes=dict(list(SHAPES.items())[:3]))
    config = TrainConfig(
        dataset="csv", root=str(seen), test_root=str(task["test"]), backbone=str(task["clip"]), pretrained=None,
        image_size=48, n_ctx=4, zero_shot=True, shared_contexts=True, max_train_classes=2, epochs=2, batch_size=16,
        workers=0, val_fraction=0.25,
    )  # fmt: skip
    train(config, tmp_path / "run", show_progress=False)
    assert asked and all(len(subset) == 2 and subset == sorted(set(subset)) for subset in asked)
    assert len({tuple(subset) for subset in asked}) > 1  # a fresh subset per batch


@pytest.mark.slow
def test_without_a_test_set_the_held_out_images_are_reported(task, tmp_path):
    """With partial labels the held-out images keep theirs: the reported mAP ranks the known labels
    only, as the epoch was picked; results are readable by others as the umask allows."""
    arguments = train_arguments(task, tmp_path / "run", epochs=2, extra=["--partial", "0.5"])
    del arguments[arguments.index("--test-root") : arguments.index("--test-root") + 2]
    assert main(arguments) == 0
    evaluated = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert list(evaluated["val"]["per_class_AP"]) == list(SHAPES) and "unknown_labels" in evaluated["val"]
    picked = history(tmp_path / "run")[evaluated["best_epoch"]]["val_mAP"]
    assert evaluated["val"]["mAP"] == pytest.approx(picked, abs=1e-9)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "run" / "eval.json").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.slow
def test_a_diverging_run_says_so_and_resume_may_change_workers(trained, task, tmp_path, capsys):
    assert main(train_arguments(task, tmp_path / "run", epochs=1, extra=["--loss-weight", "1e39"])) == 2
    assert "training diverged at epoch 0, step 0: the loss is inf" in capsys.readouterr().err
    run, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["train", "--resume", "--workers", "1", "--out", str(copy), "--quiet"]) == 0  # already finished
    assert json.loads((copy / "eval.json").read_text()) == json.loads((run / "eval.json").read_text())


@pytest.mark.slow
def test_two_processes_give_the_single_process_run(trained, task, tmp_path):
    """torchrun with two CPU processes (gloo): each takes half of every global batch, the gradients
    are summed, rank 0 writes; the run equals the single-process one to rounding."""
    single = tmp_path / "single"
    assert main(train_arguments(task, single, epochs=2)) == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*launcher, "-m", "dualcoop_kernels", *train_arguments(task, tmp_path / "two", epochs=2)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert len(history(single)) == len(history(tmp_path / "two"))
    for one, two in zip(history(single), history(tmp_path / "two")):
        assert one["train_loss"] == pytest.approx(two["train_loss"], rel=1e-5)
        assert one["val_mAP"] == pytest.approx(two["val_mAP"], abs=1e-6)


@pytest.mark.slow
def test_bf16_encoders_and_a_compiled_text_encoder(task, tmp_path):
    from dualcoop_kernels.model import DualCoOpPlusPlus

    model = DualCoOpPlusPlus(str(task["clip"]), list(SHAPES), n_ctx=4)
    with torch.no_grad():
        eager = model.text_features()[0]
        model.text_encoder = torch.compile(model.text_encoder)
        model._text_cache = None
        torch.testing.assert_close(model.text_features()[0], eager, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(torch.randn(2, 3, 48, 48))
    assert logits.dtype == torch.float32  # the head computes in float32 under autocast
    run = tmp_path / "run"
    assert main(train_arguments(task, run, epochs=1, extra=["--precision", "bf16", "--compile-text"])) == 0
    assert TrainConfig.load(run / "config.json").precision == "bf16"
    assert json.loads((run / "eval.json").read_text())["test"]["mAP"] > 0


def test_schedule_is_the_authors():
    config = TrainConfig(root="x", epochs=50, lr=0.005)
    assert learning_rate(config, 0) == 1e-5
    assert learning_rate(config, 1) == pytest.approx(0.005)
    assert learning_rate(config, 49) / 0.005 == pytest.approx((1 + math.cos(math.pi * 48 / 50)) / 2)
    assert learning_rate(config, 49) / 0.005 == pytest.approx(0.0039, abs=1e-4)


def test_settings_of_the_wrong_type_are_refused():
    for settings, message in [
        (dict(shared_contexts="False"), "shared_contexts must be bool"),
        (dict(epochs=1.5), "epochs must be int"),
        (dict(crop_scale="0.5,1"), "crop_scale must be two numbers"),
        (dict(lr=float("inf")), "must be finite"),
        (dict(loss_weight=-1.0), "loss_weight must be > 0"),
        (dict(image_size=100000), "image_size must be at most 2048"),
    ]:
        with pytest.raises((TypeError, ValueError), match=message):
            TrainConfig(root="x", **settings)
    assert TrainConfig(root=Path("x")).root == "x"


def test_presets_hold_the_papers_settings():
    coco = TrainConfig(**preset_config("coco"), root="x")
    assert (coco.backbone, coco.image_size, coco.batch_size, coco.lr, coco.epochs, coco.wta) == (
        "RN101",
        448,
        64,
        0.005,
        50,
        "pos_norm",
    )
    assert (coco.n_ctx, coco.shared_contexts, coco.loss_weight, coco.momentum, coco.weight_decay) == (
        21,
        False,
        0.02,
        0.9,
        5e-4,
    )
    voc = TrainConfig(**preset_config("voc"), root="x")
    assert (voc.image_size, voc.wta) == (512, "pos_softmax")
    nus = TrainConfig(**preset_config("nuswide"), root="x")
    assert (nus.batch_size, nus.crop_scale) == (192, (0.6, 1.0))
    zsl = TrainConfig(**preset_config("coco-zsl"), root="x")
    zsl_values = (zsl.zero_shot, zsl.backbone, zsl.image_size, zsl.n_ctx, zsl.shared_contexts, zsl.batch_size, zsl.lr)
    assert (*zsl_values, zsl.loss_weight) == (
        True, "RN50", 224, 64, True, 32, 0.002, 0.01
    )  # fmt: skip
    assert set(PRESETS) == {"coco", "voc", "nuswide", "bigearthnet", "coco-zsl", "nuswide-zsl"}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["train", "--out", "RUN"], "--root is needed"),
        (["train", "--preset", "coco", "--root", "NOWHERE", "--out", "RUN"], "instances_train2014.json do not exist"),
        (
            ["train", "--root", "x.csv", "--dataset", "csv", "--partial", "1.5", "--out", "RUN"],
            r"partial must be in \(0, 1\]",
        ),
        (["train", "--resume", "--lr", "0.1", "--out", "RUN"], "--resume continues"),
        (["eval", "NOWHERE"], "cannot read the run's configuration"),
        (["predict", "NOWHERE", "x.png"], "cannot read the run's configuration"),
        (["predict", "NOWHERE", "x.png", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["train", "--dataset", "csv", "--root", "x.csv", "--zero-shot", "--out", "RUN"], "contexts shared by all"),
        (
            ["train", "--dataset", "csv", "--root", "x.csv", "--mask", "m.npy", "--partial", "0.5", "--out", "RUN"],
            "--mask",
        ),
        (
            ["train", "--dataset", "csv", "--root", ".", "--out", "RUN"],
            "is a folder; a csv dataset's --root is its CSV",
        ),
        (["train", "--dataset", "csv", "--root", "x.csv", "--device", "gpu0", "--out", "RUN"], "device must be auto"),
        (
            ["train", "--dataset", "csv", "--root", "x.csv", "--clip", "none.json", "--out", "RUN"],
            "config none.json does",
        ),
        (["train", "--resume", "--out", "RUN"], "cannot read the run's configuration"),
    ],
)
def test_command_line_errors_are_one_line(arguments, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.csv").write_text("image,cat\n" + "".join(f"{i}.png,1\n" for i in range(20)))
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "error:" in error
    assert re.search(message, error), error


def test_a_run_folder_is_not_overwritten(task, tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"")
    assert main(train_arguments(task, tmp_path / "run")) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_a_new_run_is_not_written_among_other_files(task, tmp_path, capsys):
    """A dataset's folder, or another model's config.json, is not a place for a run's files."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "labels.csv").write_text("image,cat\n")
    (data / "config.json").write_text('{"architectures": ["BertModel"]}')
    assert main(train_arguments(task, data)) == 2
    error = capsys.readouterr().err
    assert f"--out {data} holds other files (config.json, labels.csv)" in error and "new or empty folder" in error
    assert (data / "config.json").read_text() == '{"architectures": ["BertModel"]}'
    assert sorted(p.name for p in data.iterdir()) == ["config.json", "labels.csv"]
    from dualcoop_kernels.training.runs import _refuse_other_files

    stopped = tmp_path / "stopped"  # an attempt that ended before its first checkpoint: reused
    TrainConfig(dataset="csv", root=str(task["train"])).save(stopped / "config.json")
    (stopped / "log.txt").write_text("")
    _refuse_other_files(stopped)


def test_a_truncated_checkpoint_is_refused(task, tmp_path, capsys):
    run = tmp_path / "run"
    TrainConfig(dataset="csv", root=str(task["train"])).save(run / "config.json")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    assert main(["train", "--resume", "--out", str(run)]) == 2
    error = capsys.readouterr().err
    assert "checkpoint" in error and "cannot be read" in error


def test_the_module_runs_as_the_command():
    finished = subprocess.run([sys.executable, "-m", "dualcoop_kernels", "--help"], capture_output=True, text=True)
    assert finished.returncode == 0 and "train" in finished.stdout and "predict" in finished.stdout


def test_zero_shot_runs_pick_by_f1_at_k_when_it_can_change():
    from dualcoop_kernels.training.evaluation import selection_metric

    zero_shot = TrainConfig(root="x", zero_shot=True, shared_contexts=True)
    assert selection_metric(zero_shot, 48) == "F1@3" and selection_metric(zero_shot, 3) == "mAP"
    assert selection_metric(TrainConfig(root="x"), 80) == "mAP"


def parsed_settings(*arguments):
    """The settings that ``dualcoop train ARGUMENTS`` gives, as TrainConfig values."""
    from dualcoop_kernels.cli import _given_settings, _parser

    return _given_settings(_parser().parse_args(["train", *arguments, "--out", "RUN"]))


def other_value(item: dataclasses.Field):
    """A value of a setting other than its default, valid on its own."""
    default, choices = item.default, item.metadata["choices"]
    if choices:
        return next(choice for choice in choices if choice != default)
    by_type = {
        "bool": lambda: not default,
        "int": lambda: default + 1,
        "int | None": lambda: 7,
        "float": lambda: default / 2,
        "str": lambda: {"backbone": "RN50", "device": "cpu"}.get(item.name, "data.csv"),
        "str | None": lambda: "none" if item.name == "pretrained" else "given.file",
        "tuple[float, float]": lambda: (0.25, 0.5),
        "dict": lambda: {"note": "a=b"},
    }
    return by_type[item.type]()


def as_arguments(flag: str, value) -> list[str]:
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + flag[2:]]
    if isinstance(value, tuple):
        return [flag, *map(str, value)]
    if isinstance(value, dict):
        return [flag, *(f"{key}={item}" for key, item in value.items())]
    return [flag, str(value)]


def test_every_setting_has_a_documented_flag_that_round_trips(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for item in dataclasses.fields(TrainConfig):
        flag = item.metadata["flag"] or "--" + item.name.replace("_", "-")
        assert re.search(rf"^  {re.escape(flag)}\b.*\n.*\(default: ", help_text, re.M | re.S), flag
        wanted = other_value(item)
        given = parsed_settings(*as_arguments(flag, wanted))
        if item.metadata["path"] == "always":
            wanted = str(tmp_path / wanted)
        assert given == {item.name: wanted}, (flag, given)
        needs = {"zero_shot": {"shared_contexts": True}, "mask_file": {}}.get(item.name, {})
        config = TrainConfig(**{"root": "x", **needs, **given})
        assert getattr(config, item.name) == wanted


def test_help_states_defaults_in_the_users_terms(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: off: class-specific contexts)" in help_text and "(default: True)" not in help_text


def test_a_presets_boolean_can_be_switched_off():
    from dualcoop_kernels.cli import _config_from, _parser

    arguments = ["--preset", "coco-zsl", "--root", "x", "--no-zero-shot", "--no-shared-contexts", "--out", "RUN"]
    config = _config_from(_parser().parse_args(["train", *arguments]))
    assert (config.zero_shot, config.shared_contexts, config.n_ctx) == (False, False, 64)


def test_the_run_state_round_trips_through_a_safe_checkpoint(tmp_path):
    from dualcoop_kernels._atomic import atomic_torch_save, load_torch_file
    from dualcoop_kernels.training.state import RunState

    state = RunState()
    state.add_step(0.5, 16)
    state.add_step(0.25, 16)
    assert state.end_epoch({"epoch": 0, "val_mAP": 12.5}, 12.5, {"ctx": torch.ones(2)})
    assert not state.end_epoch({"epoch": 1, "val_mAP": 12.5}, 12.5, {"ctx": torch.zeros(2)})  # the first stays
    state.add_step(1.0, 16)
    atomic_torch_save(tmp_path / "state.pt", state.state_dict())
    draws = torch.rand(3), random.random()
    restored = RunState()
    restored.load_state_dict(load_torch_file(tmp_path / "state.pt", "state"))  # weights_only: no code runs
    again = torch.rand(3), random.random()
    assert torch.equal(again[0], draws[0]) and again[1] == draws[1]  # the generators are back where they were
    assert torch.equal(restored.best_prompts["ctx"], torch.ones(2))
    restored.best_prompts = state.best_prompts
    assert restored == state and (restored.epoch, restored.step, restored.best_epoch) == (2, 1, 0)
    assert restored.mean_loss == 1.0


@pytest.mark.slow
def test_log_txt_has_a_line_per_epoch_and_the_results_in_a_quiet_run(trained):
    run, _ = trained
    log = (run / "log.txt").read_text()
    assert len(re.findall(r"epoch \d+: lr .* training loss .* val mAP", log)) == 6
    assert re.search(r"best epoch \d+, picked by mAP on val\n\s*split\s+images\s+mAP.*\n\s*test\s+64\s", log), log


@pytest.mark.slow
def test_a_resumed_run_reads_its_config_once(trained, tmp_path, monkeypatch):
    run, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    reads = []
    load = TrainConfig.load.__func__
    monkeypatch.setattr(TrainConfig, "load", classmethod(lambda cls, path: reads.append(path) or load(cls, path)))
    assert main(["train", "--resume", "--out", str(copy), "--quiet"]) == 0
    assert reads == [copy / "config.json"]


@pytest.mark.slow
def test_under_torchrun_a_failure_is_said_once_and_logged_by_every_rank(task, tmp_path):
    run = tmp_path / "two"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    arguments = train_arguments(task, run, epochs=1, extra=["--loss-weight", "1e39"])
    finished = subprocess.run([*launcher, "-m", "dualcoop_kernels", *arguments], capture_output=True, text=True)
    assert finished.returncode != 0
    assert finished.stderr.count("dualcoop train: error: training diverged") == 1, finished.stderr[-3000:]
    log = (run / "log.txt").read_text()
    assert "rank 0 stopped: UsageError: training diverged" in log and "rank 1 stopped: UsageError" in log
    assert log.count("Traceback (most recent call last)") == 2  # each rank's, kept for a bug report


@pytest.mark.slow
def test_ten_thousand_names_through_predict_in_bounded_memory(task, tmp_path):
    """predict --classes with 10,000 names: the text features in chunks of classes, the head in chunks
    of images, so the peak grows by a chunk's constant cost (some 0.1 to 0.4 GiB here), less than half
    of one B x N x C float32 tensor of the vocabulary (1.4 GiB; the eager head would hold several)."""
    run = tmp_path / "shared"
    extra = ["--shared-contexts", "--n-ctx", "4", "--image-size", "96"]  # 12 x 12 regions an image
    assert main(train_arguments(task, run, epochs=1, extra=extra)) == 0
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, image in enumerate(sorted((task["test"].parent / "images").glob("1_*.png"))[:32] * 8):
        shutil.copy(image, photos / f"{index}.png")
    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing number {i}\n" for i in range(10_000)))
    measure = (
        "import resource, subprocess, sys; "
        "subprocess.run([sys.executable, '-m', 'dualcoop_kernels', *sys.argv[1:]], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )

    def peak_kib(*classes) -> int:
        arguments = ["predict", str(run), str(photos), "--batch-size", "256", "--out", str(tmp_path / "p.csv")]
        finished = subprocess.run([sys.executable, "-c", measure, *arguments, *classes], capture_output=True, text=True)
        assert finished.returncode == 0, finished.stderr[-2000:]
        return int(finished.stdout.split()[-1])

    own = peak_kib()
    vocabulary = peak_kib("--classes", str(names))
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert len(header) == 1 + 10_000 + 1 and header[1] == "thing number 0"
    regions = (96 // 8) ** 2  # the tiny ViT's patches
    one_tensor_kib = 256 * regions * 10_000 * 4 / 1024  # B x N x C float32 over the vocabulary
    print(f"peak {own / 1024:.0f} MiB with the run's classes, {vocabulary / 1024:.0f} MiB with 10,000 names")
    assert vocabulary - own < one_tensor_kib / 2


# What a run reads and reports (moved from the new user's tests: the conftest's small task)


def test_test_images_that_are_training_images_are_refused(small_task, tmp_path):
    config = TrainConfig(
        dataset="csv", root=str(small_task["train"]), test_root=str(small_task["train"]), val_fraction=0.25
    )
    with pytest.raises(ValueError, match=r"the test images \(labels.csv\) share \d+ image\(s\) with the training"):
        load_run_data(config, None)


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


def test_the_mask_never_marks_a_blank_label_known(small_task, tmp_path):
    rows = small_task["train"].read_text().splitlines()
    blanked = [rows[0]] + [re.sub(r",[01]$", ",", row) if i % 2 else row for i, row in enumerate(rows[1:])]
    csv = small_task["root"] / "blanks.csv"
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


def test_val_images_sets_the_held_out_count_and_extends_smaller_draws():
    assert len(validation_indices(100, 0.05, images=40)) == 40
    assert set(validation_indices(100, 0.05, images=10)) <= set(validation_indices(100, 0.0, images=40))
    with pytest.raises(ValueError, match="val_images must be at least 1"):
        TrainConfig(root="x", val_images=0)


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


def test_messages_name_the_option_given(small_task, tmp_path):
    config = TrainConfig(dataset="csv", root=str(small_task["train"]), val_images=500)
    with pytest.raises(ValueError, match="--val-images 500 leaves no training images of 96"):
        load_run_data(config, None)
    csv = tmp_path / "labels.csv"
    csv.write_text("image,cat\nx.png,1\nsub/../x.png,0\n")
    with pytest.raises(ValueError, match=r"line 3: image sub/../x.png is listed again \(first on line 2\)"):
        read_csv_labels(csv)


def test_classes_training_cannot_teach_are_named():
    labels = torch.tensor([[1, -1, 1], [-1, -1, 1], [1, -1, 0]])  # dog: never present; bird: never absent
    dataset = MultiLabelDataset([Path(f"{i}.png") for i in range(3)], labels, ["cat", "dog", "bird"])
    warnings = degenerate_class_warnings(dataset)
    assert warnings[0].startswith("1 class(es) have no known positive training label (dog)")
    assert warnings[1].startswith("1 class(es) have no known negative training label (bird)")
    both = MultiLabelDataset([Path("0.png"), Path("1.png")], torch.tensor([[1, -1], [-1, 1]]), ["cat", "dog"])
    assert degenerate_class_warnings(both) == []


def test_hand_edited_settings_are_named_and_old_blanks_take_the_default(tmp_path):
    with pytest.raises(TypeError, match=r"crop_scale must be two numbers \(low, high\), got None"):
        TrainConfig(root="x", crop_scale=None)
    old = TrainConfig.from_dict(dict(root="x", clip="RN50", csc=True, learn_temperature=None), "config.json")
    assert (old.backbone, old.shared_contexts, old.freeze_temperature) == ("RN50", False, False)


def test_a_label_file_that_is_not_utf8_is_named(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_bytes("image,caf\xe9\na.png,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"labels.csv is not UTF-8 text .*save it as UTF-8"):
        read_csv_labels(labels)


def test_a_ranking_at_chance_and_predictions_that_ignore_the_image_are_said(monkeypatch, caplog):
    labels = [[1, -1], [-1, 1], [1, -1], [-1, 1]]
    dataset = fake_split(monkeypatch, [[0.5, 0.9], [0.9, 0.5], [0.4, 0.8], [0.8, 0.4]], labels, ["cat", "dog"])
    with caplog.at_level(logging.WARNING, logger="dualcoop_kernels"):
        results = evaluation.evaluate_split(None, dataset, TrainConfig(root="x", top_k=1), None)
    assert results["chance_mAP"] == 50.0 and results["mAP"] < 50.0
    assert results["findings"] == [
        f"mAP {results['mAP']:.1f} is below chance (50.0, what a random ranking scores): the prompts rank images "
        "little better than at random",
        "every class is predicted present in every image: CR is 100 and CP the prevalence",
    ]
    assert "test.csv: every class is predicted present in every image" in caplog.text
    table = evaluation.results_table({"test": results})
    assert " chance " in table.splitlines()[0] and "test: every class is predicted present" in table
    good = fake_split(monkeypatch, [[2.0, -1.0], [-1.0, 2.0], [2.0, -1.0], [-1.0, 2.0]], labels, ["cat", "dog"])
    assert evaluation.evaluate_split(None, good, TrainConfig(root="x", top_k=1), None)["findings"] == []


def test_a_pick_that_does_not_carry_over_to_the_test_set_is_said(small_task):
    config = TrainConfig(dataset="csv", root=str(small_task["train"]), test_root=str(small_task["test"]), epochs=2)
    config.val_fraction = 0.1  # about 10 images: a median of 4 positives per class
    data = load_run_data(config, None)
    far = evaluation.run_findings(config, data, {"best_epoch": 1, "test": {"mAP": 40.0}}, picked=75.0)
    assert "validation mAP 75.0 at the picked epoch against test mAP 40.0: the two are far apart" in far[-1]
    near = evaluation.run_findings(config, data, {"best_epoch": 1, "test": {"mAP": 70.0}}, picked=75.0)
    assert not any("far apart" in finding for finding in near)
    warm_up = evaluation.run_findings(config, data, {"best_epoch": 0, "test": {"mAP": 70.0}}, picked=75.0)
    assert "the best epoch is epoch 0, the warm-up at 1e-05" in warm_up[-1]
    noisy = [finding for finding in far if "the pick is mostly noise" in finding]
    assert noisy and "validation images that pick the best epoch hold a median of" in noisy[0]
