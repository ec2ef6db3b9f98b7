"""``dualcoop train --report-to``: summary.csv, TensorBoard's event files and an offline W&B run, on the
small synthetic task; a resumed run logs each epoch once; unknown names and missing packages are the
user's errors, said before the run trains."""

import csv
import json
import sys

import pytest

pytest.importorskip("open_clip")

from utils import train_arguments_on

from dualcoop_kernels.cli import main
from dualcoop_kernels.errors import MissingExtra, UsageError
from dualcoop_kernels.training import TrainConfig, tracking, train, trainer
from dualcoop_kernels.training.distributed import Ranks

EVERY = "tensorboard,wandb,csv"


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """W&B offline and quiet, its own files in a temporary folder, never the user's home."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            patch.setenv(name, str(home / name.lower()))
        yield


@pytest.fixture(scope="module")
def runs(small_task, offline, tmp_path_factory):
    """Two runs of 2 epochs reporting everywhere: one straight through; one stopped after its first epoch
    (the second epoch's start interrupted, as Ctrl-C would) and resumed."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    folder = tmp_path_factory.mktemp("tracked")
    assert main(train_arguments_on(small_task, folder / "straight", "--report-to", EVERY)) == 0
    stopped = folder / "stopped"
    original = trainer.train_one_epoch

    def stop_at_epoch_1(session, epoch, interrupt):
        if epoch == 1:
            raise KeyboardInterrupt("stopped")
        original(session, epoch, interrupt)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "train_one_epoch", stop_at_epoch_1)
        assert main(train_arguments_on(small_task, stopped, "--report-to", EVERY)) == 130
    assert [row["epoch"] for row in summary(stopped)] == ["0"]
    assert main(["train", "--resume", "--out", str(stopped), "--quiet"]) == 0
    return folder / "straight", stopped


def summary(run):
    with open(run / "summary.csv", newline="") as file:
        return list(csv.DictReader(file))


def events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_summary_csv_has_a_row_per_epoch_with_the_records_scalars(runs):
    run, _ = runs
    rows = summary(run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "val_mAP", "seconds"]
    assert [row["epoch"] for row in rows] == ["0", "1"]
    for row, record in zip(rows, records):
        assert {key: float(value) for key, value in row.items()} == pytest.approx(record)
    assert not list(run.glob(".summary.csv.*"))  # written atomically: no temporary file left


def test_tensorboard_holds_the_scalars_pr_curves_and_settings(runs):
    run, _ = runs
    accumulator = events(run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for tag, key in [("train/loss", "train_loss"), ("train/lr", "lr"), ("val/mAP", "val_mAP")]:
        scalars = accumulator.Scalars(tag)
        assert [event.step for event in scalars] == [0, 1], tag
        assert [event.value for event in scalars] == pytest.approx([record[key] for record in records], rel=1e-6)
    results = json.loads((run / "eval.json").read_text())
    (final,) = accumulator.Scalars("final/test/mAP")
    assert final.step == results["best_epoch"] and final.value == pytest.approx(results["test"]["mAP"], rel=1e-6)
    classes = [name.replace(" ", "_") for name in results["test"]["per_class_AP"]]  # "red square": a tag's
    assert set(accumulator.PluginTagToContent("pr_curves")) == {f"pr/test/{name}" for name in classes}
    assert "_hparams_/session_start_info" in accumulator.PluginTagToContent("hparams")
    (text,) = accumulator.Tensors("config/text_summary")
    assert text.step == 0 and b'"report_to": "tensorboard,wandb,csv"' in text.tensor_proto.string_val[0]


def test_wandb_writes_an_offline_run_in_the_run_folder(runs):
    run, _ = runs
    (offline_run,) = (run / "wandb").glob("offline-run-*")
    wandb_id = (run / "wandb-id.txt").read_text().strip()
    assert offline_run.name.endswith(wandb_id) and (offline_run / f"run-{wandb_id}.wandb").is_file()


def test_a_resumed_run_logs_each_epoch_once(runs):
    _, resumed = runs
    assert [row["epoch"] for row in summary(resumed)] == ["0", "1"]
    accumulator = events(resumed)
    for tag in ("train/loss", "train/lr", "val/mAP"):
        assert [event.step for event in accumulator.Scalars(tag)] == [0, 1], tag
    assert [text.step for text in accumulator.Tensors("config/text_summary")] == [0, 1]  # each session's
    wandb_id = (resumed / "wandb-id.txt").read_text().strip()
    sessions = sorted((resumed / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<run id>, with "-1" added when both sessions start within the same second
    assert len(sessions) == 2 and [session.name.split("-")[3] for session in sessions] == [wandb_id] * 2


def test_an_unknown_name_is_refused_with_the_valid_ones(small_task, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:  # argparse's check of the choices, as for --wta
        main(train_arguments_on(small_task, tmp_path / "run", "--report-to", "csv,tensorbord"))
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--report-to: invalid choice: 'csv,tensorbord'" in error and "'tensorboard', 'wandb', 'csv'" in error
    with pytest.raises(UsageError, match=r"report_to names \['tb'\]: its names, separated by commas, must be among"):
        TrainConfig(root="x", report_to="csv,tb")
    run = tmp_path / "edited"  # a hand-edited config.json: one line from the command, exit code 2
    TrainConfig(dataset="csv", root=str(small_task["train"])).save(run / "config.json")
    settings = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**settings, "report_to": "tensorbord"}))
    assert main(["train", "--resume", "--out", str(run)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "report_to names ['tensorbord']" in error


def test_names_are_a_comma_separated_list_and_old_configs_report_nowhere():
    assert TrainConfig(root="x", report_to=" csv, tensorboard,csv").report_to == "csv,tensorboard"
    assert TrainConfig(root="x", report_to="").report_to == ""
    old = TrainConfig(root="x").as_dict()
    del old["report_to"]  # a config.json written before --report-to
    assert TrainConfig.from_dict(old, "config.json").report_to == ""


@pytest.mark.parametrize("name, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_stops_the_run_before_it_trains(name, module, small_task, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # what an import finds where the package is missing
    config = TrainConfig(dataset="csv", root=str(small_task["train"]), epochs=1, report_to=f"csv,{name}")
    with pytest.raises(MissingExtra, match=rf"pip install 'dualcoop_kernels\[{name}\]'"):
        train(config, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "summary.csv").exists()
    assert main(train_arguments_on(small_task, tmp_path / "cli", "--report-to", name)) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and f"--report-to {name} needs the {name} package" in error


def test_only_the_first_rank_reports(tmp_path):
    config = TrainConfig(root="x", report_to="csv")
    with tracking.trackers(config, tmp_path, Ranks(rank=1, world=2), tracking.packages(config)) as made:
        assert made == ()
    with tracking.trackers(config, tmp_path, Ranks(rank=0, world=2), tracking.packages(config)) as made:
        assert [type(tracker) for tracker in made] == [tracking.CsvTracker]
