"""Benchmark the DualCoOp++ head: every backend against eager PyTorch and torch.compile of the reference.

    python benchmarks/bench_head.py                  # the coco preset on the default device
    python benchmarks/bench_head.py --all --out results.json
    python benchmarks/bench_head.py --preset zsl --device cuda --dtype bfloat16

For each preset it times the forward (inference, no autograd) and forward+backward (training: the
three prompt sets and the log temperature require grad, the frozen region features do not), reports
the median time, the peak memory beyond the inputs, and both as ratios to eager. It also reports each
candidate's largest deviation from the eager output. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import sys

import torch
from harness import (
    HEAD_PRESETS,
    environment,
    format_table,
    median_time_ms,
    peak_memory_mib,
    progress,
    write_json,
)

from dualcoop_kernels import available_backends, dualcoop_head
from dualcoop_kernels.reference import dualcoop_head_reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def quick_shape(shape: dict) -> dict:
    """Small odd sizes for smoke runs; keeps the preset's proportions roughly."""
    return dict(B=3, N=min(shape["N"], 37), D=min(shape["D"], 64), C=min(shape["C"], 101))


def make_inputs(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def randn(*size, requires_grad=False):
        return torch.randn(*size, generator=generator).to(device, dtype).requires_grad_(requires_grad)

    B, N, D, C = shape["B"], shape["N"], shape["D"], shape["C"]
    return dict(
        features=randn(B, N, D),
        texts=[randn(C, D, requires_grad=True) for _ in range(3)],
        log_spatial_temp=torch.tensor(3.0, device=device, requires_grad=True),
        grad_output=randn(B, 2, C),
    )


def candidates(device: torch.device, use_compile: bool) -> dict:
    """Label -> head function with the reference's signature. The eager reference comes first."""
    found = {"eager": dualcoop_head_reference}
    if use_compile:
        found["torch.compile"] = torch.compile(dualcoop_head_reference)
    for name in available_backends("dualcoop_head", device):
        if name != "reference":
            found[name] = lambda *args, backend=name, **kw: dualcoop_head(*args, backend=backend, **kw)
    return found


def bench_preset(preset: str, shape: dict, device, dtype, use_compile: bool, min_repeats: int, budget_s: float):
    inputs = make_inputs(shape, device, dtype)
    features, texts, log_temp = inputs["features"], inputs["texts"], inputs["log_spatial_temp"]
    leaves = [*texts, log_temp]
    rows = []
    expected = None
    for label, head in candidates(device, use_compile).items():

        def forward():
            with torch.no_grad():
                return head(features, *texts, log_temp)

        def forward_backward():
            for leaf in leaves:
                leaf.grad = None
            head(features, *texts, log_temp).backward(inputs["grad_output"])

        try:
            output = forward().float()
        except torch.OutOfMemoryError:
            output = None
        if expected is None:
            expected = output
        max_error = None
        if output is not None and expected is not None and output.numel():
            max_error = (output - expected).abs().max().item()
        for mode, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            progress(f"  {preset} {label} {mode} ...")
            try:
                fn()  # warm-up (and compilation)
                time_ms = median_time_ms(fn, device, min_repeats=min_repeats, budget_s=budget_s)
                memory = peak_memory_mib(fn, device)
            except torch.OutOfMemoryError:
                progress(f"  {preset} {label} {mode}: out of memory")
                time_ms = memory = None
            rows.append(
                dict(preset=preset, **shape, backend=label, mode=mode, time_ms=time_ms,
                     peak_mib=memory, max_abs_error=max_error)
            )
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Speed-up (eager time / time) and memory ratio (peak / eager peak) against the eager row."""
    eager = {row["mode"]: row for row in rows if row["backend"] == "eager"}
    for row in rows:
        base = eager[row["mode"]]
        ok = row["time_ms"] and base["time_ms"]
        row["speedup"] = base["time_ms"] / row["time_ms"] if ok else None
        ok = row["peak_mib"] and base["peak_mib"]
        row["memory_ratio"] = row["peak_mib"] / base["peak_mib"] if ok else None


COLUMNS = [
    ("preset", "preset"),
    ("backend", "backend"),
    ("mode", "pass"),
    ("time_ms", "median ms"),
    ("speedup", "x eager"),
    ("peak_mib", "peak MiB"),
    ("memory_ratio", "mem / eager"),
    ("max_abs_error", "max |err|"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(HEAD_PRESETS), default="coco")
    parser.add_argument("--all", action="store_true", help="run every preset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--quick", action="store_true", help="small shapes, for smoke runs")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--min-repeats", type=int, default=5, help="timed calls per case, at least")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per case, about")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    presets = list(HEAD_PRESETS) if args.all else [args.preset]
    rows = []
    for number, preset in enumerate(presets, 1):
        shape = quick_shape(HEAD_PRESETS[preset]) if args.quick else HEAD_PRESETS[preset]
        progress(f"[{number}/{len(presets)}] {preset} {shape} {args.dtype} on {device}")
        rows += bench_preset(
            preset, shape, device, dtype, not args.no_compile, args.min_repeats, args.budget
        )
    env = environment(device)
    print(f"dualcoop head, {args.dtype}, {env['device']}, torch {env['torch']}, triton {env['triton']}")
    print(format_table(rows, COLUMNS))
    if args.out:
        write_json(args.out, dict(environment=env, dtype=args.dtype, quick=args.quick, results=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
