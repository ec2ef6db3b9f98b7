"""Smoke run of the benchmark script at small shapes: it runs, prints a table and writes its JSON.
It checks structure only; no timing is asserted."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


BENCH_HEAD = [sys.executable, str(ROOT / "benchmarks" / "bench_head.py")]


def run(command):
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return finished


def test_bench_head_quick(tmp_path):
    out = tmp_path / "head.json"
    finished = run([*BENCH_HEAD, "--quick", "--preset", "voc", "--min-repeats", "2", "--budget", "0",
                    "--out", str(out)])
    assert "median ms" in finished.stdout
    report = json.loads(out.read_text())
    assert report["environment"]["torch"]
    cases = {(row["backend"], row["mode"]) for row in report["results"]}
    assert cases == {(backend, mode) for backend in ("eager", "torch.compile") for mode in ("fwd", "fwd+bwd")}
    for row in report["results"]:
        assert row["preset"] == "voc" and math.isfinite(row["time_ms"]) and row["time_ms"] > 0
        assert row["max_abs_error"] < 1e-4


def test_gpu_check_quick_on_cpu(tmp_path):
    """The GPU check's code path at small shapes, with Triton in its interpreter: every preset and WTA
    mode checked against float64 (it exits non-zero on a failed check), then the report files."""
    finished = run([*BENCH_HEAD, "--gpu-check", "--quick", "--device", "cpu", "--no-compile",
                    "--min-repeats", "1", "--budget", "0", "--results-dir", str(tmp_path)])
    assert "checks: 75 of 75 pass" in finished.stdout
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {row["backend"] for row in report["results"]} == {"eager", "triton"}
    assert len(report["checks"]) == 75 and all(check["passed"] for check in report["checks"])
    assert "Correctness: 75 of 75 checks pass" in next(tmp_path.glob("*.md")).read_text()

