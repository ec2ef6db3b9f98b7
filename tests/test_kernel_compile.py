"""Every Triton kernel, in every WTA mode, compiles for Ampere and Hopper GPUs, checked on any machine
with the Triton installed (the oldest supported one too: constraints/oldest.txt)."""

import json
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
    for sm_80 and sm_90 with Triton's ptxas, at coco (one class tile) and zsl (several)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = str(ROOT / "benchmarks" / "kernel_resources.py")
    command = [sys.executable, script, "--dtype", dtype, "--arch", str(arch), "--wta", "all", "--preset", "coco", "zsl"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    # every launch of a forward and backward in every mode: one class tile (5 kernels), then several,
    # with the features' own gradient kernel, where WTA adds the statistics and sums kernels
    expected = sum(5 + (6 if sides == ("one", "one") else 8) for sides in WTA_WEIGHTS.values())
    assert finished.stdout.count("_kernel") == expected


def compile_rows(tmp_path, *arguments) -> list[dict]:
    rows_file = tmp_path / "rows.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--json", str(rows_file), *arguments]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return json.loads(rows_file.read_text())["rows"]


@pytest.fixture(scope="module")
def compiled_rows(tmp_path_factory):
    """Every kernel of a prompt-learning step (features frozen) at the coco and nuswide presets (one
    class tile) and zsl (several), fp32 and bf16 inputs, compiled as launched for sm_80, sm_86, sm_89
    and sm_90."""
    return compile_rows(
        tmp_path_factory.mktemp("compiled"), "--frozen-features", "--arch", "80", "86", "89", "90",
        "--dtype", "float32", "bfloat16", "--preset", "coco", "nuswide", "zsl",
    )  # fmt: skip


SIMILARITY_KERNELS = ["_region_stats_kernel", "_forward_kernel", "_region_sums_kernel", "_similarity_grad_kernel"]
PIPELINED_KERNELS = [*SIMILARITY_KERNELS, "_text_grad_gemm_kernel"]


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [*PIPELINED_KERNELS, "_combine_regions_kernel", "_text_grad_finish_kernel"])
def test_no_kernel_spills_at_coco_nuswide_and_zsl_on_any_architecture(compiled_rows, kernel):
    rows = [row for row in compiled_rows if row["kernel"] == kernel]
    spilling = [
        f"{row['preset']} {row['dtype']} {row['arch']}: {row['spill_bytes']} bytes"
        for row in rows
        if row["spill_bytes"]
    ]
    assert rows and not spilling, spilling


@pytest.fixture(scope="module")
def rows_with_the_features_gradient(tmp_path_factory):
    """The same at coco and nuswide, with the features learning too (the similarity gradient's dF loop)."""
    return compile_rows(
        tmp_path_factory.mktemp("features"), "--arch", "80", "86", "89", "90",
        "--dtype", "float32", "bfloat16", "--preset", "coco", "nuswide",
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_89", "sm_90"])
def test_the_backward_with_the_features_gradient_does_not_spill(rows_with_the_features_gradient, arch):
    rows = [row for row in rows_with_the_features_gradient if row["arch"] == arch]
    assert rows and not [(row["kernel"], row["spill_bytes"]) for row in rows if row["spill_bytes"]]


@pytest.mark.slow
@pytest.mark.parametrize("kernel", PIPELINED_KERNELS)
def test_gemm_loops_load_with_async_copies(compiled_rows, kernel):
    """Two pipeline stages: the hot loop's loads are cp.async copies, no plain global loads wait in it.
    The similarity gradient's loop where it recomputes the similarities (zsl: coco and nuswide read the
    forward's), not in bf16 off sm_90: a 16-region bf16 chunk gives each thread 2 bytes, under
    cp.async's 4."""
    rows = [row for row in compiled_rows if row["kernel"] == kernel]
    if kernel == "_similarity_grad_kernel":
        rows = [
            row
            for row in rows
            if not row["launch"]["save_similarities"] and (row["dtype"] == "float32" or row["arch"] == "sm_90")
        ]
    assert rows and all(row["async_copies"] > 0 and row["global_loads"] == 0 for row in rows), rows


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--tiles", "64,32"], "--tiles takes four integers block_n,block_c,block_d,block_d_grad, got '64,32'"),
        (["--preset", "cocoa"], "unknown --preset ['cocoa']; known: ['voc', 'coco'"),
        (["--wta", "nope"], "unknown --wta 'nope'; known: preset, all, pos_norm"),
    ],
)
def test_the_resource_tool_names_a_bad_argument(arguments, message):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), *arguments]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert finished.returncode == 1 and message in finished.stderr, finished.stderr[-2000:]
