"""Estimate the Triton head's time on an H100 SXM and an A100 from its compiled code, beside the roofline.

    python benchmarks/kernel_model.py                                   # coco, float32, both GPUs
    python benchmarks/kernel_model.py --preset all --dtype float32 bfloat16 --json estimates.json

Each launch is compiled as the runtime compiles it (kernel_resources.py); from its SASS come, per loop
and per trip, the instructions one warp issues, its multiply-adds by matrix input type and the bytes
it reads from global memory, and the instructions outside every loop. This file knows how many trips
each loop makes at a shape (``LOOP_TRIPS``). The passes are those of a prompt-learning step, as
bench_head.py times them: the forward, and a backward to the prompts and theta (features frozen).

Assumptions (the first GPU check shows how far off they are; gpu_check.py prints both):
- A multiprocessor issues 4 warp instructions per cycle (4 schedulers, at most one each) whatever the
  instruction; its tensor cores run ``TENSOR_FMAS`` multiply-adds per cycle per input type (dense
  datasheet rates); it reads L2 at ``l2_bytes_per_s`` / multiprocessors (``GPUS``: the inputs fit in
  L2).
- A trip of a loop costs a program the largest of its issue, tensor and L2 cycles; the programs
  resident on a multiprocessor share those, so a wave of them takes their sum, but never less than
  one program's trip plus ``LOAD_LATENCY`` cycles when the loop's loads are not async copies (one
  stage: nothing hides them).
- Waves: ceil(grid / (programs per multiprocessor x multiprocessors)), each as long as a full one; a
  grid smaller than a wave spreads evenly over the multiprocessors.
- Each launch adds ``LAUNCH_US`` (the gap between kernels on one stream); host-side PyTorch ops of the
  operators (norms, sums of partials) are left out.
- Roofline of a pass: its useful multiply-adds (no padding, no recomputation: the forward's three
  similarity GEMMs, the backward's dT = dS^T f) at the rate of the products the package needs, against
  reading the features and prompts once from HBM. Float32 inputs need float32-accurate products
  (3xTF32: three TF32 ones on these GPUs); bf16 inputs multiply natively in the forward, while the
  backward's dS is float32 (3xTF32 again).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import kernel_resources

from harness import HEAD_PRESETS, PRESET_WTA, format_table

from dualcoop_kernels.options import WTA_WEIGHTS
from dualcoop_kernels.triton.head import FINISH_TILE, LaunchConfig, text_gemm_splits

GPUS = {
    "H100": dict(arch=90, clock_hz=1.755e9, hbm_bytes_per_s=3.35e12, l2_bytes_per_s=5.5e12),
    "A100": dict(arch=80, clock_hz=1.41e9, hbm_bytes_per_s=2.04e12, l2_bytes_per_s=4.0e12),
}
# Dense multiply-adds per cycle per multiprocessor, by matrix input type ("ffma": float32 CUDA cores).
TENSOR_FMAS = {
    90: dict(bf16=2048, f16=2048, tf32=1024, f64=128, ffma=128),
    80: dict(bf16=1024, f16=1024, tf32=512, f64=64, ffma=64),
}
ISSUE_PER_CYCLE = 4
LOAD_LATENCY = 600  # cycles from a global load to its use when nothing is in flight ahead of it
LAUNCH_US = 2.0
ELEMENT_BYTES = dict(float32=4, bfloat16=2, float16=2, float64=8)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _two_sweeps(wta: str) -> bool:
    """Whether the region statistics sweep the classes twice (a softmax needs M and m first)."""
    positive, negative = WTA_WEIGHTS[wta]
    return positive not in ("one", "norm") or negative != "one"


def _maybe_unrolled(trips: int, row: dict) -> list[int]:
    """A simple counted loop as the SASS holds it: gone when Triton made a count of 1 a constant,
    unrolled by 4 with a remainder loop after it, or as written."""
    return {0: [], 2: [trips // 4, trips % 4]}.get(len(row["loops"]), [trips])


def _gemm_splits(s, launch) -> tuple[int, int]:
    """The text-gradient GEMM: feature rows per split, and the splits (head.py)."""
    return text_gemm_splits(s["B"] * s["N"], LaunchConfig(**launch))


def _sweep_tiles(s, launch) -> int:
    """Class tiles of a kernel that sweeps every class for its region tile (head.py's _sweep_constants)."""
    return _cdiv(s["C"], min(launch["block_c"], launch["sweep_block_c"]))


def _stats_trips(s, launch, row):
    sweep = [_sweep_tiles(s, launch), _sweep_tiles(s, launch) * _cdiv(s["D"], launch["block_d"])]
    return sweep * (2 if _two_sweeps(row["wta"]) else 1)


def _sums_trips(s, launch, row):
    class_tiles = _sweep_tiles(s, launch)
    return [class_tiles, class_tiles * _cdiv(s["D"], launch["block_d"])]


def _finish_trips(s, launch, row):
    splits = _gemm_splits(s, launch)[1]
    return _maybe_unrolled(_cdiv(splits, min(splits, FINISH_TILE[0])), row)


def _feature_grad_trips(s, launch, row):
    class_tiles = _sweep_tiles(s, launch)
    chunks = _cdiv(s["D"], launch["block_d_grad"])
    return [class_tiles, class_tiles * _cdiv(s["D"], launch["block_d"]), class_tiles * chunks, chunks]


def _forward_trips(s, launch, row):
    return [_cdiv(s["D"], launch["block_d"])]


def _combine_trips(s, launch, row):
    return _maybe_unrolled(_cdiv(s["N"], launch["block_n"]), row)


def _similarity_grad_trips(s, launch, row):
    # the similarity loop (none when the forward saved the similarities), then dF's (features learning),
    # both in steps of BLOCK_D
    return [_cdiv(s["D"], launch["block_d"])] * len(row["loops"])


def _text_grad_gemm_trips(s, launch, row):
    return [_cdiv(_gemm_splits(s, launch)[0], launch["gemm_block_k"])]


# Trips per program of each loop, in the order the SASS holds them (an outer loop before its inner ones).
LOOP_TRIPS = {
    "_region_stats_kernel": _stats_trips,
    "_forward_kernel": _forward_trips,
    "_combine_regions_kernel": _combine_trips,
    "_region_sums_kernel": _sums_trips,
    "_similarity_grad_kernel": _similarity_grad_trips,
    "_text_grad_gemm_kernel": _text_grad_gemm_trips,
    "_text_grad_finish_kernel": _finish_trips,
    "_feature_grad_kernel": _feature_grad_trips,
}


def _trip_cycles(loop: dict, warps: int, arch: int, l2_bytes_per_cycle: float) -> float:
    """One program's cycles for one trip of ``loop`` with the multiprocessor to itself, latency aside."""
    issue = loop["instructions"] * warps / ISSUE_PER_CYCLE
    tensor = sum(fmas * warps / TENSOR_FMAS[arch][kind] for kind, fmas in loop["fmas"].items())
    memory = loop["load_bytes"] * warps / l2_bytes_per_cycle
    return max(issue, tensor, memory)


def launch_estimate(row: dict, shape: dict, gpu: str) -> float:
    """Microseconds for one launch compiled as in ``row`` (kernel_resources.compiled_row)."""
    spec, arch = GPUS[gpu], GPUS[gpu]["arch"]
    trips = LOOP_TRIPS[row["kernel"]](shape, row["launch"], row)
    if len(trips) != len(row["loops"]):
        raise ValueError(
            f"{row['kernel']}: the SASS has {len(row['loops'])} loops, LOOP_TRIPS knows {len(trips)}; "
            "update LOOP_TRIPS for the kernel as it is now"
        )
    multiprocessors = kernel_resources.GPUS[arch]["multiprocessors"]
    resident = min(row["programs_per_sm"], math.ceil(row["grid"] / multiprocessors))  # a small grid spreads out
    l2_per_cycle = spec["l2_bytes_per_s"] / spec["clock_hz"] / multiprocessors
    wave = row["straight_instructions"] * row["num_warps"] * resident / ISSUE_PER_CYCLE
    for loop, count in zip(row["loops"], trips):
        one = _trip_cycles(loop, row["num_warps"], arch, l2_per_cycle)
        latency = LOAD_LATENCY if loop["load_bytes"] and not loop["async_copies"] else 0
        wave += count * max(resident * one, one + latency)
    waves = math.ceil(row["grid"] / (resident * multiprocessors))
    return waves * wave / spec["clock_hz"] * 1e6 + LAUNCH_US


def roofline_us(shape: dict, dtype: str, gpu: str, step: str) -> float:
    """The pass's floor (module doc): useful tensor work against one read of its inputs from HBM."""
    spec, rates = GPUS[gpu], TENSOR_FMAS[GPUS[gpu]["arch"]]
    B, N, D, C = shape["B"], shape["N"], shape["D"], shape["C"]
    gemm = 3 * B * N * D * C  # multiply-adds of the three similarity sets, or of dT

    def fma_cycles(kind):
        if dtype == "float64":
            return gemm / rates["f64"]
        return gemm / rates[kind] if kind != "tf32" else 3 * gemm / rates["tf32"]

    cycles = fma_cycles("bf16" if dtype in ("bfloat16", "float16") else "tf32") if step == "fwd" else fma_cycles("tf32")
    compute_s = cycles / kernel_resources.GPUS[spec["arch"]]["multiprocessors"] / spec["clock_hz"]
    memory_s = (B * N * D + 3 * C * D) * ELEMENT_BYTES[dtype] / spec["hbm_bytes_per_s"]
    return max(compute_s, memory_s) * 1e6


def estimates(preset: str, dtype: str, gpu: str) -> tuple[list[dict], list[dict]]:
    """(per-launch rows, per-pass rows with the keys preset, dtype, gpu, pass, estimate_us, roofline_us)."""
    shape = HEAD_PRESETS[preset]
    compiled = kernel_resources.rows_for(preset, dtype, PRESET_WTA[preset], GPUS[gpu]["arch"], {}, want_features=False)
    launches = [dict(row, gpu=gpu, estimate_us=round(launch_estimate(row, shape, gpu), 1)) for row in compiled]
    passes = []
    for step in ("fwd", "bwd"):
        passes.append(
            dict(
                preset=preset,
                dtype=dtype,
                gpu=gpu,
                **{"pass": step},
                estimate_us=round(sum(row["estimate_us"] for row in launches if row["pass"] == step), 1),
                roofline_us=round(roofline_us(shape, dtype, gpu, step), 1),
            )
        )
    total = {key: round(passes[0][key] + passes[1][key], 1) for key in ("estimate_us", "roofline_us")}
    passes.append(dict(passes[0], **{"pass": "fwd+bwd"}, **total))
    for row in passes:
        row["x_roofline"] = round(row["estimate_us"] / row["roofline_us"], 1)
    return launches, passes


LAUNCH_COLUMNS = [
    ("preset", "preset"),
    ("dtype", "dtype"),
    ("gpu", "gpu"),
    ("pass", "pass"),
    ("kernel", "kernel"),
    ("grid", "grid"),
    ("programs_per_sm", "progs/SM"),
    ("estimate_us", "estimate us"),
]
PASS_COLUMNS = [
    ("preset", "preset"),
    ("dtype", "dtype"),
    ("gpu", "gpu"),
    ("pass", "pass"),
    ("estimate_us", "estimate us"),
    ("roofline_us", "roofline us"),
    ("x_roofline", "x roofline"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["coco"], help=f"of {list(HEAD_PRESETS)}, or all")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--gpu", nargs="+", default=list(GPUS), choices=list(GPUS))
    parser.add_argument("--json", type=Path, help="write the per-pass rows (and the launches) to this file")
    args = parser.parse_args(argv)
    presets = kernel_resources.compiling_presets(args.preset)
    launches, passes = [], []
    for preset in presets:
        for dtype in args.dtype:
            for gpu in args.gpu:
                found = estimates(preset, dtype, gpu)
                launches += found[0]
                passes += found[1]
    print(format_table(launches, LAUNCH_COLUMNS))
    print()
    print(format_table(passes, PASS_COLUMNS))
    if args.json:
        args.json.write_text(json.dumps(dict(rows=passes, launches=launches), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
