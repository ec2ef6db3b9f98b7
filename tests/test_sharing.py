"""What comes after training: #P, the region maps, the report (in a real browser), shareable folders
loaded in one line, files that run no code, thresholded predictions and the exported model."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from utils import train_arguments_on

pytest.importorskip("open_clip")

import dualcoop_kernels as dk
from dualcoop_kernels.cli import main
from dualcoop_kernels.data.shapes import write_tiny_clip
from dualcoop_kernels.options import WTA_MODES
from dualcoop_kernels.training import PRESETS, TrainConfig, evaluation
from dualcoop_kernels.training.datasets import load_run_data

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def task(small_task):
    return small_task


@pytest.fixture(scope="module")
def run(task, tmp_path_factory):
    """A 3-epoch run on the synthetic task."""
    out = tmp_path_factory.mktemp("runs") / "shapes"
    assert main(train_arguments_on(task, out, "--lr", "0.002", epochs=3)) == 0
    return out


@pytest.fixture(scope="module")
def chance_run(task, tmp_path_factory):
    """A run whose test images are 32 copies of one image, the positives of each class listed last:
    whatever the prompts learned, they rank the test images no better than chance."""
    root = tmp_path_factory.mktemp("chance")
    (root / "images").mkdir()
    classes = (task["test"].read_text().splitlines()[0]).split(",")[1:]
    rows = ["image," + ",".join(classes)]
    for i in range(32):
        shutil.copy(task["root"] / "images" / "1_0.png", root / "images" / f"same_{i}.png")
        rows.append(f"images/same_{i}.png," + ",".join(str(int(i >= 32 - 6 - 4 * c)) for c in range(len(classes))))
    (root / "test.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path_factory.mktemp("runs") / "at-chance"
    arguments = train_arguments_on(task, out, epochs=2)
    arguments[arguments.index("--test-root") + 1] = str(root / "test.csv")
    assert main(arguments) == 0
    return out


def learnable(settings: dict, classes: int, width: int = 512) -> int:
    """#P: every prompt set's contexts (per class when class-specific) and the log temperature."""
    sets = 2 if settings.get("protocol") == "dualcoop" else 3
    return sets * settings["n_ctx"] * width * (1 if settings.get("shared_contexts") else classes) + 1


def test_the_docs_give_each_presets_learnable_parameters():
    classes = {"coco": 80, "voc": 20, "nuswide": 81, "bigearthnet": 19, "coco-zsl": 48, "nuswide-zsl": 925}
    table = (ROOT / "docs" / "training.md").read_text()
    for name, settings in PRESETS.items():
        assert f"| {name} | {learnable(settings, classes[name]):,} |" in table, name
    assert learnable(PRESETS["coco"], 80) == 2_580_481  # the model's own count: tests/test_model.py


@pytest.mark.slow
def test_learnable_parameters_are_reported(run):
    expected = learnable(dict(n_ctx=4), 4, width=64)
    assert json.loads((run / "eval.json").read_text())["learnable_parameters"] == expected
    assert json.loads((run / "model" / "config.json").read_text())["learnable_parameters"] == expected
    assert f"{expected:,} learnable parameters" in (run / "log.txt").read_text()


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    import open_clip

    tiny = write_tiny_clip(tmp_path_factory.mktemp("tiny"))
    open_clip.add_model_config(str(tiny))
    return {"vit": open_clip.create_model("tiny-clip").eval(), "resnet": open_clip.create_model("RN50").eval()}


@pytest.mark.parametrize("wta", WTA_MODES)
@pytest.mark.parametrize("tower", ["vit", pytest.param("resnet", marks=pytest.mark.slow)])
def test_region_maps_weighted_sums_are_the_heads_logits(towers, tower, wta):
    model = dk.DualCoOpPlusPlus(towers[tower], ["cat", "dog", "red bus"], n_ctx=3, wta=wta, head_backend="reference")
    model.eval()
    images = torch.randn(2, 3, 48, 80) if tower == "vit" else torch.randn(2, 3, 64, 96)
    maps = model.region_maps(images)
    grid = (6, 10) if tower == "vit" else (2, 3)
    assert maps["evidence"].shape == (2, 3, *grid)
    torch.testing.assert_close(maps["evidence"].sum(dim=(2, 3)), torch.ones(2, 3))  # a softmax over regions
    with torch.no_grad():
        logits = model(images)
    summed = [(maps["evidence"] * maps[side]).sum(dim=(2, 3)) for side in ("negative", "positive")]
    torch.testing.assert_close(torch.stack(summed, dim=1), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps["logits"], logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_explain_writes_a_picture_per_image(run, task, tmp_path):
    from PIL import Image

    images = [str(task["root"] / "images" / f"1_{i}.png") for i in range(3)]
    assert main(["explain", str(run), *images, "--top-k", "2", "--out", str(tmp_path / "maps")]) == 0
    pictures = sorted((tmp_path / "maps").glob("*.png"))
    assert [p.name for p in pictures] == ["1_0.png", "1_1.png", "1_2.png"]
    assert Image.open(pictures[0]).size == (3 * 224, 224 + 40 + 44)  # the image, two classes; captions, scale
    assert main(["explain", str(run), images[0], "--classes", "blue bar", "--out", str(tmp_path / "one")]) == 0
    assert Image.open(tmp_path / "one" / "1_0.png").size == (2 * 224, 224 + 40 + 44)


def test_maps_share_one_scale_on_which_uniform_evidence_stays_faint():
    from PIL import Image

    from dualcoop_kernels.reports.maps import SCALE_TOP, evidence_summary, overlay

    grey = Image.new("RGB", (70, 70), (128, 128, 128))
    uniform = torch.full((7, 7), 1 / 49)
    uniform[0, 0] *= 1.03  # 3 % off uniform: still pointing nowhere
    peaked = torch.full((7, 7), 0.5 / 48)
    peaked[3, 3] = 0.5  # half the evidence in one region of 49: 24.5 times uniform
    assert evidence_summary(uniform).startswith("near uniform (within 3 %)")
    assert evidence_summary(peaked) == "peak 24.5x uniform"
    red = [np.asarray(overlay(grey, weights, 70))[..., 0].astype(int) - 128 for weights in (uniform, peaked)]
    assert red[0].max() < 20  # a faint, even veil: about 1 / SCALE_TOP of the full one
    assert red[1][35, 35] > 60 and red[1][5, 5] < red[0].max() + 1  # full red on the peak only
    assert SCALE_TOP > 1


@pytest.mark.slow
def test_a_run_at_chance_says_so_in_every_output(chance_run, capsys):
    results = json.loads((chance_run / "eval.json").read_text())
    test = results["test"]
    assert test["mAP"] < test["chance_mAP"] and "below chance" in test["findings"][0]
    log = (chance_run / "log.txt").read_text()
    assert f"test.csv: mAP {test['mAP']:.1f} is below chance ({test['chance_mAP']:.1f}" in log
    assert main(["eval", str(chance_run)]) == 0
    printed = capsys.readouterr().out
    assert f"test: mAP {test['mAP']:.1f} is below chance" in printed and " chance " in printed
    assert main(["eval", str(chance_run), "--json"]) == 0  # the run's findings, found again
    assert json.loads(capsys.readouterr().out)["findings"] == results["findings"]
    assert main(["report", str(chance_run)]) == 0
    page = (chance_run / "report.html").read_text()
    assert "<th>chance mAP</th>" in page and f"<td data-value='{test['chance_mAP']}'>" in page
    assert "<h2 id='findings'>Findings</h2>" in page and "is below chance" in page
    assert "labels known: overall" in page and "<th class='sortable'>chance AP (prevalence %)</th>" in page


@pytest.mark.slow
def test_the_final_evaluation_keeps_every_scored_image(run):
    scored = evaluation.load_scores(run / "scores" / "test.npz")
    assert scored["scores"].shape == (32, 4) and scored["classnames"] == list(json.loads(
        (run / "model" / "config.json").read_text())["classnames"])  # fmt: skip
    assert all(Path(path).name.startswith("1_") for path in scored["paths"])


@pytest.mark.slow
def test_from_pretrained_reproduces_the_test_map_exactly(run):
    model = dk.DualCoOpPlusPlus.from_pretrained(run)
    config = TrainConfig.load(run / "config.json")
    test = load_run_data(config, None).tests["test"]
    again = evaluation.evaluate_split(model, test, config, torch.device("cpu"))
    assert again["mAP"] == json.loads((run / "eval.json").read_text())["test"]["mAP"]
    shared = dk.DualCoOpPlusPlus.from_pretrained(run / "model")  # the folder alone, as shared
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(shared(images), model(images))


@pytest.mark.slow
def test_runs_of_older_versions_still_load(run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    model = dk.DualCoOpPlusPlus.from_pretrained(run)
    old_prompts = dict(prompts=model.prompt_state_dict(), classnames=model.prompts.classnames, epoch=1)
    torch.save(old_prompts, old / "prompts.pt")
    shutil.rmtree(old / "model")
    loaded = dk.DualCoOpPlusPlus.from_pretrained(old)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))


def as_written_by_0_1_0(path: Path) -> None:
    """A config.json as 0.1.0 wrote it: the CLIP as ``clip``, ``csc`` and ``learn_temperature`` (negated)."""
    config = json.loads(path.read_text())
    config["clip"] = config.pop("backbone")
    config["csc"] = not config.pop("shared_contexts")
    config["learn_temperature"] = not config.pop("freeze_temperature")
    path.write_text(json.dumps(config))


@pytest.mark.slow
def test_runs_and_folders_written_by_0_1_0_still_load(run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    as_written_by_0_1_0(old / "config.json")
    as_written_by_0_1_0(old / "model" / "config.json")
    model = dk.DualCoOpPlusPlus.from_pretrained(run)
    loaded = dk.DualCoOpPlusPlus.from_pretrained(old / "model")
    assert loaded.settings == model.settings
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
    assert TrainConfig.load(old / "config.json") == TrainConfig.load(run / "config.json")
    assert main(["eval", str(old), "--json"]) == 0  # the run's own config.json and its model/ agree


def test_a_half_written_folder_is_refused(tmp_path):
    model = dk.DualCoOpPlusPlus(str(write_tiny_clip(tmp_path)), ["cat", "dog"], n_ctx=2)
    with pytest.raises(ValueError, match="random weights, which the receiver can rebuild only from their seed"):
        model.save_pretrained(tmp_path / "shared")
    model.save_pretrained(tmp_path / "shared", seed=0)
    other = dk.DualCoOpPlusPlus(str(tmp_path / "tiny-clip.json"), ["cat", "dog"], n_ctx=2)
    with torch.no_grad():
        other.prompts.ctx_pos.add_(1.0)
    other.save_pretrained(tmp_path / "second", seed=0)
    shutil.copy(tmp_path / "second" / "model.safetensors", tmp_path / "shared" / "model.safetensors")
    with pytest.raises(ValueError, match=r"is not the file config\.json was written with"):
        dk.DualCoOpPlusPlus.from_pretrained(tmp_path / "shared")
    config = json.loads((tmp_path / "second" / "config.json").read_text())
    assert config["clip_config"]["embed_dim"] == 64 and config["format"] == "dualcoop_kernels prompts"


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_files_crafted_to_run_code_are_refused_everywhere(run, task, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile"
    shutil.copytree(run, hostile)
    shutil.rmtree(hostile / "model")  # an older run's layout: its prompts.pt is read
    for name in ("prompts.pt", "checkpoints/last.pt"):
        with open(hostile / name, "wb") as file:
            pickle.dump({"prompts": _RunsCode(marker), "config": _RunsCode(marker)}, file)
    image = str(task["root"] / "images" / "1_0.png")
    for arguments in (["train", "--resume", "--out", str(hostile)], ["eval", str(hostile)],
                      ["predict", str(hostile), image], ["report", str(hostile)]):  # fmt: skip
        capsys.readouterr()
        assert main(arguments) == 2, arguments
        assert "cannot be read as a file of tensors" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot be read as a file of tensors"):
        dk.DualCoOpPlusPlus.from_pretrained(hostile)
    assert not marker.exists()


@pytest.mark.slow
def test_the_exported_model_runs_in_a_fresh_process(run, tmp_path):
    out = tmp_path / "model.pt2"
    assert main(["export", str(run), "--out", str(out)]) == 0
    images = torch.randn(3, 3, 48, 48)
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import sys, torch; program = torch.export.load(sys.argv[1]).module(); "
        "torch.save(program(torch.load(sys.argv[2])), sys.argv[3])"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script, str(out), str(tmp_path / "images.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-2000:]
    model = dk.DualCoOpPlusPlus.from_pretrained(run)
    with torch.no_grad():
        logits = model(images)
    expected = torch.sigmoid(logits[:, 1] - logits[:, 0])
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_report_is_small_and_self_contained(run):
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert (run / "report.html").stat().st_size < 5e6
    assert "http://" not in page and "https://" not in page.replace("github.com/kjmillerCURIS", "")
    for expected in ("learnable parameters (#P)", "Learning curves", "AP against chance", "Precision-recall",
                     "most confident false positives", "data:image/jpeg;base64,", "chance mAP",
                     "evidence, in multiples of uniform", "probability", "(P+ - P- "):  # fmt: skip
        assert expected in page, expected
    assert "augment</td><td data-value='authors (--augment authors)'>" in page  # images augmented afresh
    assert ">red square</text>" in page  # the AP chart names its bars


@pytest.mark.slow
def test_a_run_that_predicts_every_class_everywhere_says_so(task, tmp_path):
    """Trained on labels that all say present (one epoch at a high rate), the prompts call every class
    present in every test image: the findings say so, and that the labels could not teach absence."""
    lines = task["train"].read_text().splitlines()
    rows = [lines[0], *(f"{task['root'] / line.split(',')[0]},1,1,1,1" for line in lines[1:])]
    (tmp_path / "all-present.csv").write_text("\n".join(rows) + "\n")
    arguments = train_arguments_on(task, tmp_path / "run", "--warmup-lr", "1.0", epochs=1)
    arguments[arguments.index("--root") + 1] = str(tmp_path / "all-present.csv")
    assert main(arguments) == 0
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert (
        "every class is predicted present in every image: CR is 100 and CP the prevalence"
        in results["test"]["findings"]
    )
    assert results["test"]["CR"] == 100.0
    assert results["findings"][0].startswith("4 class(es) have no known negative training label (red square, ")


@pytest.mark.slow
def test_the_report_of_a_run_evaluated_before_findings_says_it_was_not_checked(run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    results = json.loads((old / "eval.json").read_text())
    for key in ("findings", "labels_known", "augmentation"):
        del results[key]
    for key in ("findings", "chance_mAP"):
        del results["test"][key]
    (old / "eval.json").write_text(json.dumps(results))
    assert main(["report", str(old)]) == 0
    page = (old / "report.html").read_text()
    assert "Not checked: the run was evaluated by a version before 0.2.0" in page and "<h2>Results</h2>" in page


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_the_report_in_a_real_browser(run, tmp_path):
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    assert main(["report", str(run), "--out", str(tmp_path / "report.html")]) == 0
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get((tmp_path / "report.html").as_uri())
        undecoded = driver.execute_script(
            "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length"
        )
        assert driver.execute_script("return document.images.length") > 0 and undecoded == 0
        assert driver.find_element(By.ID, "findings").is_displayed()
        results = driver.find_element(By.XPATH, "//h2[text()='Results']/following-sibling::table[1]")
        headers = [cell.text for cell in results.find_elements(By.CSS_SELECTOR, "th")]
        assert headers[2:4] == ["mAP", "chance mAP"]
        table = driver.find_element(By.CSS_SELECTOR, "table.sortable")
        first = [row.text.split()[0] for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
        table.find_elements(By.CSS_SELECTOR, "th")[1].click()  # AP, descending
        cells = table.find_elements(By.CSS_SELECTOR, "tbody tr td:nth-child(2)")
        values = [float(cell.get_attribute("data-value")) for cell in cells]
        assert values == sorted(values, reverse=True)
        reordered = [row.text.split()[0] for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
        assert sorted(reordered) == sorted(first)
        driver.save_screenshot(str(tmp_path / "report.png"))
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_predictions_mark_the_present_classes(tmp_path):
    from dualcoop_kernels.cli import _prediction_header, _prediction_row

    probabilities = torch.tensor([0.9, 0.2, 0.51])
    assert _prediction_header(["a", "b", "c"], None)[-1] == "present"
    assert _prediction_row("x.png", probabilities, ["a", "b", "c"], None)[-1] == "a;c"
    top = _prediction_row("x.png", probabilities, ["a", "b", "c"], 2)
    assert top == ["x.png", "a", "0.900000", "1", "c", "0.510000", "1"]


@pytest.mark.slow
def test_a_loaded_model_can_be_shared_again(run, tmp_path):
    model = dk.DualCoOpPlusPlus.from_pretrained(run)
    model.save_pretrained(tmp_path / "again")  # its seed and its CLIP's config came with it
    again = dk.DualCoOpPlusPlus.from_pretrained(tmp_path / "again")
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(again(images), model(images))


def test_the_published_number_is_shown_only_for_the_published_experiment():
    from dualcoop_kernels.reports.report import reference_result

    coco = dict(PRESETS["coco"], root="COCO", partial=0.3)
    assert reference_result(TrainConfig(**coco)) == 84.0
    assert reference_result(TrainConfig(**dict(coco, partial=0.4))) is None  # not a published proportion
    for changed in (dict(pretrained="none"), dict(epochs=2), dict(lr=0.01), dict(augment="none")):
        assert reference_result(TrainConfig(**{**coco, **changed})) is None, changed


def test_a_folder_that_is_no_model_is_named_as_such(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"is not a model: it holds neither config\.json and model\.safetensors"
    ):
        dk.DualCoOpPlusPlus.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match=r"is not the config of dualcoop_kernels prompts"):
        dk.DualCoOpPlusPlus.from_pretrained(tmp_path)


def test_save_pretrained_names_a_clip_given_as_a_module(tmp_path):
    config = str(write_tiny_clip(tmp_path))
    model = dk.DualCoOpPlusPlus(config, ["cat", "dog"], n_ctx=2)
    given = dk.DualCoOpPlusPlus(model.clip, ["cat", "dog"], n_ctx=2)
    with pytest.raises(ValueError, match="a CLIP given as a module has no name"):
        given.save_pretrained(tmp_path / "unnamed", seed=0)
    with pytest.raises(ValueError, match=r"\['n_ctx'\] are written from the model's settings, not as info"):
        given.save_pretrained(tmp_path / "clash", backbone=config, seed=0, n_ctx=5)
    given.save_pretrained(tmp_path / "named", backbone=config, pretrained="my-weights.pt", seed=0, epoch=3)
    saved = json.loads((tmp_path / "named" / "config.json").read_text())
    assert (saved["backbone"], saved["pretrained"], saved["seed"], saved["epoch"]) == (
        "tiny-clip",
        "my-weights.pt",
        0,
        3,
    )
