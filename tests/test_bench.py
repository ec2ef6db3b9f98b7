"""Smoke run of the benchmark script at small shapes: it runs, prints a table and writes its JSON.
It checks structure only; no timing is asserted."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dualcoop_kernels.options import WTA_MODES

ROOT = Path(__file__).resolve().parents[1]


BENCH_HEAD = [sys.executable, str(ROOT / "benchmarks" / "bench_head.py")]


def run(command, env=None):
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return finished


@pytest.mark.slow
def test_bench_head_quick(tmp_path):
    out = tmp_path / "head.json"
    finished = run(
        [*BENCH_HEAD, "--quick", "--preset", "voc", "--min-repeats", "2", "--budget", "0", "--out", str(out)]
    )
    assert "median ms" in finished.stdout
    assert "torch uses" in finished.stdout and "threads of" in finished.stdout and "load average" in finished.stdout
    assert "left out: triton: on the CPU it runs in Triton's interpreter" in finished.stdout
    assert "GPU results recorded" in finished.stdout or "No GPU results recorded yet." in finished.stdout
    report = json.loads(out.read_text())
    assert report["environment"]["torch"]
    cases = {(row["backend"], row["mode"]) for row in report["results"]}
    assert cases == {(backend, mode) for backend in ("eager", "torch.compile") for mode in ("fwd", "fwd+bwd")}
    for row in report["results"]:
        assert row["preset"] == "voc" and math.isfinite(row["time_ms"]) and row["time_ms"] > 0
        assert row["max_abs_error"] < 1e-4


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The GPU check's every step at small shapes on the CPU, Triton in its interpreter: the CUDA suite
    is collected (and skipped), every preset and WTA mode is checked against float64, then timing,
    the launch-settings sweep, the loss, training steps and text features; the report files are written."""
    finished = run(  # a generous budget: each step's share must not stop it on a busy machine
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--budget",
            "2400",
            "--dry-run",
            "--out",
            str(tmp_path),
            "--min-repeats",
            "1",
            "--repeat-s",
            "0",
        ]
    )
    assert "gpu_check:" in finished.stdout and "stopped" not in finished.stdout
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert all(state.startswith("done") for state in report["steps"].values()), report["steps"]
    results = report["results"]
    assert "skipped" in results["tests"]["summary"] and results["tests"]["returncode"] == 0
    checks = results["checks"]["rows"]
    expected = 5 * len(WTA_MODES) * 5  # presets, modes, the logits and the gradients of the prompts and theta
    assert len(checks) == expected and all(check["passed"] for check in checks)
    assert {row["backend"] for row in results["timing"]["rows"]} == {"eager", "triton"}
    assert len(results["sweep"]["rows"]) == 7 and all("time_ms" in row for row in results["sweep"]["rows"])
    assert {row["backend"] for row in results["loss"]["rows"]} == {"eager", "torch.compile", "extension"}
    model = results["model"]["rows"]  # kernel_model.py's rows, compiled for an H100 in a dry run
    assert {(row["preset"], row["pass"]) for row in model} == {("voc", step) for step in ("fwd", "bwd", "fwd+bwd")}
    assert all(row["gpu"] == "H100" and row["estimate_us"] > 0 and row["roofline_us"] > 0 for row in model)
    if importlib.util.find_spec("open_clip"):
        ways = [(row["config"], row["way"]) for row in results["train"]["rows"]]
        assert ways == [("quick", "authors"), ("quick", "package")] + [
            ("nuswide-zsl", way) for way in ("authors", "package-short", "package")
        ]
        assert {row["section"] for row in results["text"]["rows"]} == {"training", "features", "open", "grouping"}
    else:
        assert "open_clip_torch is not installed" in results["train"]["error"]
        assert "open_clip_torch is not installed" in results["text"]["error"]
    markdown = next(tmp_path.glob("*.md")).read_text()
    assert f"{expected} of {expected} checks pass" in markdown
    assert "Launch settings" in markdown and "A training step" in markdown
    assert "Text features" in markdown and "model us" in markdown


@pytest.mark.slow
def test_interpreted_triton_sets_the_interpreter(tmp_path):
    """Without TRITON_INTERPRET=1 in the environment, --interpreted-triton sets it and starts again,
    instead of leaving Triton out without a word."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = tmp_path / "head.json"
    finished = run(
        [
            *BENCH_HEAD,
            "--quick",
            "--preset",
            "coco",
            "--no-compile",
            "--interpreted-triton",
            "--min-repeats",
            "1",
            "--budget",
            "0",
            "--out",
            str(out),
        ],
        env=env,
    )
    assert "setting TRITON_INTERPRET=1" in finished.stderr
    assert "left out" not in finished.stdout
    assert {row["backend"] for row in json.loads(out.read_text())["results"]} == {"eager", "triton"}


def test_recorded_gpu_results_are_summarised(tmp_path):
    from harness import recorded_results

    assert recorded_results(tmp_path) == []
    report = dict(
        environment=dict(device="NVIDIA H100 80GB HBM3", date="2026-12-01T10:00:00+00:00"),
        targets=[dict(target="coco fwd+bwd >= 5x eager", measured="6.10x", met=True)],
    )
    (tmp_path / "NVIDIA-H100-80GB-HBM3.json").write_text(json.dumps(report))
    assert recorded_results(tmp_path) == [
        "NVIDIA H100 80GB HBM3 (2026-12-01, NVIDIA-H100-80GB-HBM3.md): coco fwd+bwd >= 5x eager: 6.10x"
    ]


@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    """A training step both ways at the quick configuration (RN50, 224 px, batch 16, 80 classes): every
    part timed once, the package's way compared with the authors'. About two minutes on two cores."""
    pytest.importorskip("open_clip")
    out = tmp_path / "train.json"
    finished = run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--quick", "--out", str(out)])
    assert "x authors" in finished.stdout and "text enc" in finished.stdout
    rows = json.loads(out.read_text())["results"]
    assert [(row["way"], row["precision"]) for row in rows] == [("authors", "fp32"), ("package", "fp32")]
    for row in rows:
        assert row["config"] == "quick"
        for part in ("step", "image", "text", "head", "loss", "optimizer"):
            assert math.isfinite(row[f"{part}_ms"]) and row[f"{part}_ms"] > 0


@pytest.mark.slow
def test_bench_text_quick(tmp_path):
    """Every section of the text-feature benchmark on a tiny CLIP: each way's row, its tokens and time."""
    pytest.importorskip("open_clip")
    out = tmp_path / "text.json"
    finished = run([sys.executable, str(ROOT / "benchmarks" / "bench_text.py"), "--quick", "--out", str(out)])
    assert "x short" in finished.stdout and "tokens" in finished.stdout
    rows = json.loads(out.read_text())["results"]
    cases = {(row["section"], row["way"]) for row in rows}
    training = {("training", way) for way in ("full", "short", "shared", "shared-sdpa")}
    features = {("features", way) for way in ("full", "short", "shared")}
    assert cases == training | features | {("open", "shared"), ("grouping", "short"), ("grouping", "grouped")}
    for row in rows:
        assert math.isfinite(row["time_ms"]) and row["time_ms"] > 0 and row["tokens"] > 0
    shared = next(row for row in rows if (row["section"], row["way"]) == ("training", "shared"))
    short = next(row for row in rows if (row["section"], row["way"]) == ("training", "short"))
    assert shared["tokens"] < short["tokens"] / 5  # 64 shared contexts: the prefix once, not per class


def test_benchmark_ratios_read_the_same_way():
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
