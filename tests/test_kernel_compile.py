"""Every Triton kernel, in every WTA mode, compiles for a Hopper GPU, checked on any machine."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dualcoop_kernels.options import WTA_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_kernels_compile_for_hopper(dtype):
    """The interpreter runs kernels as Python and misses what only the GPU compiler rejects (a
    loop-carried variable changing type, say): compile every kernel for sm_90 with Triton's ptxas."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--dtype", dtype]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    # every mode: the forward and both gradient kernels, with WTA also both statistics kernels; one finish kernel
    expected = sum(3 if sides == ("one", "one") else 5 for sides in WTA_WEIGHTS.values()) + 1
    assert finished.stdout.count("_kernel") == expected
