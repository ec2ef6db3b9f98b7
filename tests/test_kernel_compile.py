"""Every Triton kernel, in every WTA mode, compiles for Ampere and Hopper GPUs, checked on any machine
with the Triton installed (the oldest supported one too: constraints/oldest.txt)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualcoop_kernels import triton as triton_backend
from dualcoop_kernels.options import WTA_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
NO_FLOAT64_DOTS = triton_backend.unsupported_dtype(torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize(
    "dtype",
    [
        "float32",
        "bfloat16",
        pytest.param("float64", marks=pytest.mark.skipif(bool(NO_FLOAT64_DOTS), reason=f"{NO_FLOAT64_DOTS}")),
    ],
)
def test_kernels_compile_for_the_gpu(dtype, arch):
    """The interpreter runs kernels as Python and misses what only the GPU compiler rejects (a
    loop-carried variable changing type, or syntax an older Triton lacks, say): compile every kernel
    for sm_80 and sm_90 with Triton's ptxas."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = str(ROOT / "benchmarks" / "kernel_resources.py")
    command = [sys.executable, script, "--dtype", dtype, "--arch", str(arch), "--wta", "all", "--preset", "coco"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    # every launch of a forward and backward in every mode: with WTA the statistics and sums kernels too
    expected = sum(4 if sides == ("one", "one") else 6 for sides in WTA_WEIGHTS.values())
    assert finished.stdout.count("_kernel") == expected
