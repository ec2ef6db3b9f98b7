"""Benchmark the DualCoOp++ head: every backend against eager PyTorch and torch.compile of the reference.

    python benchmarks/bench_head.py                  # the coco preset on the default device
    python benchmarks/bench_head.py --all --out results.json
    python benchmarks/bench_head.py --preset zsl --device cuda --dtype bfloat16

For each preset it times the forward (inference, no autograd) and forward+backward (training: the
three prompt sets and the log temperature require grad, the frozen region features do not), reports
the median time, the peak memory beyond the inputs, both as ratios to eager, and each candidate's
largest deviation from the eager output. Every candidate runs through the public ``dualcoop_head``
(its input checks included); on a GPU the library's backends are also timed replayed from a CUDA
graph, which removes the launch overhead. Nothing here asserts a timing. ``gpu_check.py`` beside
this file is the one command for a GPU machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import torch

from harness import (
    HEAD_PRESETS,
    PRESET_WTA,
    RATIO_LEGEND,
    RESULTS_DIR,
    add_ratios,
    cuda_graph,
    environment,
    format_table,
    machine_line,
    median_time_ms,
    peak_memory_mib,
    progress,
    recorded_results,
    write_json,
)

from dualcoop_kernels import available_backends, dualcoop_head
from dualcoop_kernels.head import HEAD_BACKENDS
from dualcoop_kernels.options import DEFAULT_WTA_GAMMA, WTA_ALIASES, WTA_MODES
from dualcoop_kernels.testing import DRAWS, accuracy_failures, condition_ratio, head_draw, max_error

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
GRAPHED = " (CUDA graph)"


def quick_shape(shape: dict) -> dict:
    """Small odd sizes for smoke runs."""
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


def triton_is_interpreted(device: torch.device) -> bool:
    return device.type != "cuda"


def library_backends(device: torch.device, interpreted_triton: bool) -> tuple[dict, dict]:
    """Label -> head function for every backend of the library but the reference that runs here, and
    label -> why it was left out for the others."""
    found = {}
    left_out = HEAD_BACKENDS.unavailable(device)
    for name in available_backends("dualcoop_head", device):
        if name == "reference":
            continue
        if name == "triton" and triton_is_interpreted(device) and not interpreted_triton:
            left_out[name] = (
                "on the CPU it runs in Triton's interpreter, which says nothing of its speed "
                "(--interpreted-triton includes it)"
            )
            continue
        found[name] = functools.partial(dualcoop_head, backend=name)
    return found, left_out


def candidates(device: torch.device, use_compile: bool, interpreted_triton: bool) -> dict:
    """Label -> head function: eager first (the reference through the public call), then torch.compile
    of it (a fresh one with static shapes: call this once per preset), then the library's backends."""
    eager = functools.partial(dualcoop_head, backend="reference")
    found = {"eager": eager}
    if use_compile:
        torch._dynamo.reset()  # no earlier preset's graphs, no recompile limit reached
        found["torch.compile"] = torch.compile(eager, dynamic=False)
    return {**found, **library_backends(device, interpreted_triton)[0]}


def bench_preset(preset, shape, device, dtype, heads, wta, min_repeats, budget_s):
    """Time and peak memory of every head on one preset; rows for the report. On a GPU the library's
    backends (all but eager and torch.compile) are timed again replayed from a CUDA graph."""
    inputs = make_inputs(shape, device, dtype)
    features, texts, log_temp = inputs["features"], inputs["texts"], inputs["log_spatial_temp"]
    leaves = [*texts, log_temp]
    rows = []
    expected = None
    for label, head in heads.items():

        def forward(head=head):
            with torch.no_grad():
                return head(features, *texts, log_temp, wta=wta)

        def forward_backward(head=head):
            for leaf in leaves:
                leaf.grad = None
            head(features, *texts, log_temp, wta=wta).backward(inputs["grad_output"])

        try:
            output = forward().float()
        except torch.OutOfMemoryError:
            output = None
        if expected is None:
            expected = output
        max_error = None
        if output is not None and expected is not None and output.numel():
            max_error = (output - expected).abs().max().item()
        modes = [("fwd", forward), ("fwd+bwd", forward_backward)]
        graphs = device.type == "cuda" and label not in ("eager", "torch.compile")
        for mode, fn in modes + ([(mode + GRAPHED, fn) for mode, fn in modes] if graphs else []):
            progress(f"  {preset} {label} {mode} ...")
            row = dict(preset=preset, **shape, wta=wta, backend=label, mode=mode, max_abs_error=max_error)
            try:
                fn()  # warm-up (and compilation)
                timed = cuda_graph(fn, device) if mode.endswith(GRAPHED) else fn
                row.update(
                    time_ms=median_time_ms(timed, device, min_repeats=min_repeats, budget_s=budget_s),
                    peak_mib=peak_memory_mib(timed, device),
                )
            except torch.OutOfMemoryError:
                progress(f"  {preset} {label} {mode}: out of memory")
                row.update(time_ms=None, peak_mib=None)
            except RuntimeError as error:  # a capture that fails says why, and the run goes on
                progress(f"  {preset} {label} {mode}: {str(error)[:300]}")
                row.update(time_ms=None, peak_mib=None, error=str(error)[:300])
            rows.append(row)
    add_ratios(rows, same=("mode",), base=lambda row: (row["mode"].removesuffix(GRAPHED),))
    return rows


def check_preset(preset, shape, device, dtype, heads, wta) -> list[dict]:
    """Every head's output and gradients (the features frozen, as in training) against float64, over
    the tests' number of random draws for ``dtype``, by their rules (``dualcoop_kernels.testing``): the
    median error at most twice eager's in ``dtype``, and every error within its condition bound."""
    names = ["logits", "d text_evidence", "d text_pos", "d text_neg", "d log_spatial_temp"]
    found = {label: [] for label in heads}
    for seed in range(DRAWS[dtype]):
        inputs = make_inputs(shape, device, dtype, seed)
        learned = [*inputs["texts"], inputs["log_spatial_temp"]]
        tensors = [inputs["features"], *(t.detach().requires_grad_() for t in learned)]
        for label, head in heads.items():
            found[label].append(head_draw(head, tensors, inputs["grad_output"], wta=wta, wta_gamma=DEFAULT_WTA_GAMMA))
    rows = []
    for label, label_draws in found.items():
        for name, column in zip(names, zip(*label_draws)):
            row = dict(preset=preset, wta=wta, dtype=str(dtype).removeprefix("torch."), backend=label, quantity=name)
            row.update(
                error=statistics.median(max_error(d.got, d.exact) for d in column),
                eager_error=statistics.median(max_error(d.eager, d.exact) for d in column),
                of_bound=max(condition_ratio(d) for d in column),
                passed=not accuracy_failures(list(column), dtype, name),
            )
            rows.append(row)
    return rows


BENCH_COLUMNS = [
    ("preset", "preset"),
    ("backend", "backend"),
    ("mode", "pass"),
    ("time_ms", "median ms"),
    ("speedup", "x faster"),
    ("peak_mib", "peak MiB"),
    ("memory_saving", "x less mem"),
    ("max_abs_error", "max |err|"),
]
CHECK_COLUMNS = [
    ("preset", "preset"),
    ("wta", "wta"),
    ("dtype", "dtype"),
    ("backend", "backend"),
    ("quantity", "quantity"),
    ("error", "median max err vs fp64"),
    ("eager_error", "eager's"),
    ("of_bound", "worst err / condition bound"),
    ("passed", "ok"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(HEAD_PRESETS), default="coco")
    parser.add_argument("--all", action="store_true", help="run every preset")
    parser.add_argument("--presets", help="comma-separated presets (e.g. a rerun)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--wta", choices=[*WTA_MODES, *WTA_ALIASES], help="WTA mode (default: each preset's own)")
    parser.add_argument("--quick", action="store_true", help="small shapes, for smoke runs")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument(
        "--interpreted-triton",
        action="store_true",
        help="include the Triton head where it runs in the interpreter (CPU): slow, for checks",
    )
    parser.add_argument("--min-repeats", type=int, default=5, help="timed calls per case, at least")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per case, about")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    return parser.parse_args(argv)


def selected_presets(args) -> list[str]:
    presets = list(HEAD_PRESETS) if args.all else [args.preset]
    if args.presets:
        presets = args.presets.split(",")
        unknown = set(presets) - set(HEAD_PRESETS)
        if unknown:
            sys.exit(f"unknown presets {sorted(unknown)}; known: {list(HEAD_PRESETS)}")
    return presets


def ensure_interpreter(device: torch.device, wanted: bool, argv) -> None:
    """Triton on the CPU needs TRITON_INTERPRET=1, which Triton reads when it is imported (importing
    the package has done that): set it and start again, rather than leave Triton out without a word."""
    if not wanted or not triton_is_interpreted(device) or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if argv is not None:
        sys.exit("Triton on the CPU needs TRITON_INTERPRET=1 in the environment before Python starts")
    progress("setting TRITON_INTERPRET=1, which Triton on the CPU needs, and starting again")
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ensure_interpreter(device, args.interpreted_triton, argv)
    env = environment(device)  # before the run: the load average says what else is running
    presets = selected_presets(args)
    rows = []
    for number, preset in enumerate(presets, 1):
        shape = quick_shape(HEAD_PRESETS[preset]) if args.quick else HEAD_PRESETS[preset]
        wta = WTA_ALIASES.get(args.wta, args.wta) or PRESET_WTA[preset]
        progress(f"[{number}/{len(presets)}] {preset} {shape} {args.dtype} {wta} on {device}")
        heads = candidates(device, not args.no_compile, args.interpreted_triton)
        rows += bench_preset(preset, shape, device, dtype, heads, wta, args.min_repeats, args.budget)

    print(f"dualcoop head, {args.dtype}, {env['device']}, torch {env['torch']}, triton {env['triton']}")
    if device.type == "cpu":
        print(machine_line(env))
    for name, reason in library_backends(device, args.interpreted_triton)[1].items():
        print(f"left out: {name}: {reason}")
    print(format_table(rows, BENCH_COLUMNS))
    print(RATIO_LEGEND)
    if device.type == "cpu":
        recorded = recorded_results(RESULTS_DIR)
        print("GPU results recorded in benchmarks/results/:" if recorded else "No GPU results recorded yet.")
        for line in recorded:
            print(f"  {line}")
    if args.out:
        write_json(args.out, dict(environment=env, dtype=args.dtype, quick=args.quick, results=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
