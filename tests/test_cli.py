"""The dualcoop command: a user error is one line (its traceback under DUALCOOP_DEBUG=1), a bug in the
package shows its traceback and says it is one, running out of memory says what to change; and what a
new user meets first: clear messages for wrong inputs, runs that say what makes them meaningless, the
first try in a minute, resuming with the same command line."""

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from utils import train_arguments_on

from dualcoop_kernels import cli
from dualcoop_kernels.cli import main
from dualcoop_kernels.data.shapes import TINY_CLIP
from dualcoop_kernels.errors import UsageError, UsageTypeError
from dualcoop_kernels.training import TrainConfig, evaluation
from dualcoop_kernels.version import __version__


def test_a_user_error_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DUALCOOP_DEBUG", raising=False)
    assert cli.main(["eval", str(tmp_path / "no-run")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("dualcoop eval: error: cannot read the run's configuration") and "no-run" in error
    assert len(error.strip().splitlines()) == 1 and "Traceback" not in error


def test_dualcoop_debug_adds_the_traceback_of_a_user_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DUALCOOP_DEBUG", "1")
    assert cli.main(["eval", str(tmp_path / "no-run")]) == 2
    error = capsys.readouterr().err
    assert "Traceback" in error and "UsageError" in error
    assert error.strip().splitlines()[-1].startswith("dualcoop eval: error: cannot read the run's configuration")


def test_a_bug_in_the_package_shows_its_traceback_and_says_so(tmp_path, capsys, monkeypatch):
    def broken(args):
        return {}["a key the package forgot"]

    monkeypatch.setattr(cli, "_eval", broken)
    assert cli.main(["eval", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "Traceback" in error and "KeyError: 'a key the package forgot'" in error
    assert f"dualcoop eval: this is a bug in dualcoop_kernels {__version__}, not in what you asked" in error


def test_a_value_error_the_package_did_not_mean_is_a_bug(tmp_path, capsys, monkeypatch):
    """Only UsageError (and files, and unavailable weights) are the user's: a ValueError from deep inside
    is shown as the bug it is, not as a one-line complaint about the input."""

    def broken(args):
        raise ValueError("math domain error")

    monkeypatch.setattr(cli, "_eval", broken)
    assert cli.main(["eval", str(tmp_path)]) == 1
    assert "this is a bug in dualcoop_kernels" in capsys.readouterr().err


def test_running_out_of_memory_says_what_to_change(tmp_path, capsys, monkeypatch):
    """Advice the command can take: eval has no --batch-size, predict has."""

    def too_big(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(cli, "_eval", too_big)
    assert cli.main(["eval", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.strip() == (
        "dualcoop eval: error: OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB: try --device cpu"
    )
    monkeypatch.setattr(cli, "_predict", too_big)
    assert cli.main(["predict", str(tmp_path), "x.png"]) == 2
    assert "try a smaller --batch-size, or --device cpu" in capsys.readouterr().err


def test_a_missing_extra_is_the_users_to_install(monkeypatch):
    from dualcoop_kernels.errors import MissingExtra
    from dualcoop_kernels.model.loading import open_clip_module

    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"pip install 'dualcoop_kernels\[clip\]'") as raised:
        open_clip_module()
    assert isinstance(raised.value, UsageError) and isinstance(raised.value, ImportError)


def test_usage_errors_are_the_errors_python_users_catch():
    """Code that catches ValueError (or TypeError, for a wrong type) keeps working."""
    assert issubclass(UsageError, ValueError) and issubclass(UsageTypeError, TypeError)
    with pytest.raises(UsageError, match=r"features must be a torch\.Tensor"):
        from dualcoop_kernels import dualcoop_head

        dualcoop_head([[1.0]], *[torch.zeros(2, 1)] * 3, torch.zeros(()))


# Runs of the command on the small task (they need open_clip)

needs_open_clip = pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None, reason="the model needs open_clip_torch (the clip extra)"
)
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.fixture(scope="module")
def task(small_task):
    return small_task


@pytest.fixture(scope="module")
def shared_run(task, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "shared"
    assert main(train_arguments_on(task, run, "--shared-contexts")) == 0
    return run


def error_of(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


@needs_open_clip
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


@needs_open_clip
@pytest.mark.slow
def test_a_run_states_what_it_trains_on_and_warns_of_what_makes_it_meaningless(task, tmp_path, capsys):
    run = tmp_path / "one"
    assert main(train_arguments_on(task, run, "--val-fraction", "0.1", epochs=1)) == 0
    log = (run / "log.txt").read_text()
    assert re.search(r"4 classes; images: train 86, validation 10, test 32; labels known: overall 100.0 %", log)
    assert re.search(r"learnable parameters", log) and "on cpu" in log
    assert "epochs 1 trains nothing at the base rate" in log  # and on the terminal, quiet or not:
    assert "epochs 1 trains nothing at the base rate" in capsys.readouterr().err
    assert "median of" in log and "the pick is mostly noise; hold out more with --val-fraction or --val-images" in log
    assert main(["train", "--resume", "--out", str(run), "--workers", "0"]) == 0
    assert "the run had finished its 1 epochs: its best epoch is evaluated again" in (run / "log.txt").read_text()


@needs_open_clip
@pytest.mark.slow
def test_a_run_whose_best_epoch_is_the_warm_up_says_so(task, tmp_path, monkeypatch):
    from dualcoop_kernels.training import trainer

    scores = iter([50.0, 40.0])  # the trained epoch scores worse than the untrained prompts
    monkeypatch.setattr(trainer, "selection_score", lambda *args: next(scores))
    assert main(train_arguments_on(task, tmp_path / "run")) == 0
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "the best epoch is epoch 0, the warm-up at 1e-05: no trained epoch scored better than the untrained" in log


@needs_open_clip
@pytest.mark.slow
def test_augmentation_choice_for_training_and_caches(task, tmp_path):
    run = tmp_path / "run"
    assert main(train_arguments_on(task, run, "--augment", "crop-flip")) == 0
    assert TrainConfig.load(run / "config.json").augment == "crop-flip"
    common = ["--dataset", "csv", "--root", str(task["train"]), "--clip", str(task["clip"]), "--pretrained", "none"]
    common += ["--image-size", "48", "--n-ctx", "4", "--batch-size", "16", "--workers", "0", "--quiet"]
    assert main(["cache", *common, "--augment", "crop-flip", "--views", "2", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["transform"] == "crop-flip"
    assert main(["cache", *common, "--out", str(tmp_path / "plain")]) == 0  # the test transform by default
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["transform"] == "test"


@needs_open_clip
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


@needs_open_clip
@pytest.mark.slow
def test_a_foreign_prompts_file_is_described(shared_run, task, tmp_path, capsys):
    import shutil

    images = str(task["root"] / "images" / "1_0.png")
    broken = tmp_path / "broken"
    shutil.copytree(shared_run, broken)
    (broken / "model" / "model.safetensors").write_text("not prompts")
    assert "model.safetensors cannot be read as safetensors" in error_of(capsys, ["predict", str(broken), images])
    other = tmp_path / "other"
    assert main(train_arguments_on(task, other, "--n-ctx", "6", epochs=1)) == 0  # class-specific, 6 tokens
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


@needs_open_clip
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


@needs_open_clip
def test_outputs_that_cannot_be_written_are_refused_up_front(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    (tmp_path / "x.csv").write_text("image,cat\n" + "".join(f"{i}.png,1\n" for i in range(20)))
    error = error_of(capsys, ["train", "--dataset", "csv", "--root", "x.csv", "--out", "afile/run"])
    assert "--out afile/run: " in error and "afile is a file, not a folder" in error
    error = error_of(capsys, ["predict", "somerun", "x.csv", "--out", str(tmp_path)])
    assert "is a folder; give the path of a file to write" in error


@needs_open_clip
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


@needs_open_clip
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


@needs_open_clip
@pytest.mark.slow
def test_tiny_and_unreadable_images_are_said_by_predict_and_explain(shared_run, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (1, 1), "red").save(tmp_path / "dot.png")
    (tmp_path / "text.png").write_text("not an image")
    capsys.readouterr()
    assert main(["predict", str(shared_run), str(tmp_path / "dot.png")]) == 0
    assert "1 image(s) have a side under 32 pixels" in capsys.readouterr().err
    error = error_of(capsys, ["explain", str(shared_run), str(tmp_path / "text.png"), "--out", str(tmp_path / "m")])
    assert f"1 image(s) cannot be used: {tmp_path / 'text.png'} cannot be read as an image" in error
    assert main(["explain", str(shared_run), str(tmp_path / "dot.png"), "--out", str(tmp_path / "m")]) == 0
    assert "1 image(s) have a side under 32 pixels" in capsys.readouterr().err


@needs_open_clip
def test_unreadable_training_images_stop_the_run_before_it_trains(task, tmp_path, capsys):
    """Each named with its CSV line, in one message, instead of a DataLoader traceback mid-epoch."""
    data = tmp_path / "data"
    shutil.copytree(task["root"] / "images", data / "images")
    (data / "images" / "0_3.png").write_text("not an image")
    (data / "images" / "0_7.png").unlink()
    (data / "labels.csv").write_text(task["train"].read_text())
    arguments = train_arguments_on(task, tmp_path / "run")
    arguments[arguments.index("--root") + 1] = str(data / "labels.csv")
    error = error_of(capsys, arguments)
    assert error.startswith("dualcoop train: error: 2 image(s) cannot be used: labels.csv line 5: ")
    assert "labels.csv line 9: " in error and "does not exist" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@needs_open_clip
def test_an_image_side_that_the_vit_patches_do_not_tile_is_refused(task, tmp_path, capsys):
    error = error_of(capsys, train_arguments_on(task, tmp_path / "run", "--image-size", "50"))
    assert "image_size 50 is not a multiple of the ViT's patch size 8" in error and "use 48 or 56" in error


@needs_open_clip
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


@needs_open_clip
@pytest.mark.slow
def test_resume_accepts_the_same_command_line_and_names_what_differs(shared_run, task, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(shared_run, run)
    same = train_arguments_on(task, run, "--shared-contexts")
    assert main([*same, "--resume"]) == 0
    error = error_of(capsys, [*train_arguments_on(task, run, "--shared-contexts", "--lr", "0.1", epochs=3), "--resume"])
    assert "these settings differ: epochs 3 (the run's: 2), lr 0.1 (the run's: 0.005)" in error


@needs_open_clip
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
    error = error_of(
        capsys, [*train_arguments_on(task, copy, "--shared-contexts", "--wta", "pos_norm_det"), "--resume"]
    )
    assert "freeze_temperature True (the run's: False)" in error  # what the alias implies is compared too
    specific = tmp_path / "specific"
    assert main(train_arguments_on(task, specific, epochs=1)) == 0  # class-specific contexts
    capsys.readouterr()
    assert main(["predict", str(specific), image, "--classes", "blue bar,red square"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "image,blue bar,red square,present"  # the run's columns


def test_classes_named_twice_are_refused():
    """Each class is one column of predict's output, as ``for_classes`` refuses repeated names."""
    with pytest.raises(UsageError, match=r"--classes names \['a'\] more than once"):
        cli._class_list("a, b,a")


@needs_open_clip
@pytest.mark.slow
def test_eval_says_which_epoch_it_scored_and_that_a_run_is_unfinished(shared_run, tmp_path, capsys):
    assert main(["eval", str(shared_run)]) == 0
    printed = capsys.readouterr().out
    epoch = json.loads((shared_run / "model" / "config.json").read_text())["epoch"]
    assert printed.startswith(f"scored: epoch {epoch} (epochs count from 0), the best of the run's 2\n")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(shared_run, unfinished)
    config = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps(dict(config, epochs=50)))  # as if stopped at 2 of 50
    assert main(["eval", str(unfinished), "--json"]) == 0
    printed_json = capsys.readouterr().out
    scored = json.loads(printed_json)["scored"]
    assert scored.endswith("the best of the 2 trained of the run's 50")
    findings = json.loads(printed_json)["findings"]
    assert (
        f"the run is unfinished (2 of 50 epochs): dualcoop train --resume --out {unfinished} continues it" in findings
    )
