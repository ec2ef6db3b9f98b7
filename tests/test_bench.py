"""Smoke run of the benchmark script at small shapes: it runs, prints a table and writes its JSON.
It checks structure only; no timing is asserted."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_head_quick(tmp_path):
    out = tmp_path / "head.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_head.py"), "--quick", "--preset", "voc",
               "--min-repeats", "2", "--budget", "0", "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "median ms" in finished.stdout
    report = json.loads(out.read_text())
    assert report["environment"]["torch"]
    cases = {(row["backend"], row["mode"]) for row in report["results"]}
    assert cases == {(backend, mode) for backend in ("eager", "torch.compile") for mode in ("fwd", "fwd+bwd")}
    for row in report["results"]:
        assert row["preset"] == "voc" and math.isfinite(row["time_ms"]) and row["time_ms"] > 0
        assert row["max_abs_error"] < 1e-4
