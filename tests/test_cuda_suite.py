"""Starts the CUDA suite (tests/cuda) in a process of its own where there is a GPU: this process runs
Triton in its interpreter, a choice that cannot be undone once triton is imported."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: tests/cuda runs where there is one")
def test_cuda_suite_in_its_own_process():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["DUALCOOP_CUDA_SUITE"] = "1"
    finished = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "cuda")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        cwd=ROOT,
    )
    assert finished.returncode == 0, finished.stdout[-6000:] + finished.stderr[-3000:]
