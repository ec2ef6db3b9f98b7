"""Benchmark the DualCoOp++ head: every backend against eager PyTorch and torch.compile of the reference.

    python benchmarks/bench_head.py                  # the coco preset on the default device
    python benchmarks/bench_head.py --all --out results.json
    python benchmarks/bench_head.py --preset zsl --device cuda --dtype bfloat16
    python benchmarks/bench_head.py --gpu-check      # on a GPU: check, time, write benchmarks/results/

For each preset it times the forward (inference, no autograd) and forward+backward (training: the
three prompt sets and the log temperature require grad, the frozen region features do not), reports
the median time, the peak memory beyond the inputs, both as ratios to eager, and each candidate's
largest deviation from the eager output. Nothing here asserts a timing.

``--gpu-check`` first checks every backend against a float64 reference at every preset and WTA mode
(outputs and gradients, the twice-the-eager-error rule of the tests), then times every preset, reports
the targets of the Triton head, and writes ``benchmarks/results/<gpu>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch
from harness import (
    HEAD_PRESETS,
    add_ratios,
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
from dualcoop_kernels.reference import WTA_MODES, dualcoop_head_reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
RESULTS_DIR = Path(__file__).parent / "results"
# Error allowed beyond twice the eager reference's, relative to the result's scale (as in the tests).
EXTRA_ERROR = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


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
            left_out[name] = "on the CPU it runs in Triton's interpreter, which says nothing of its speed " \
                             "(--interpreted-triton includes it)"
            continue
        found[name] = lambda *args, backend=name, **kw: dualcoop_head(*args, backend=backend, **kw)
    return found, left_out


def candidates(device: torch.device, use_compile: bool, interpreted_triton: bool) -> dict:
    """Label -> head function with the reference's signature: eager first, then torch.compile of the
    reference (a fresh one with static shapes: call this once per preset), then the library's backends."""
    found = {"eager": dualcoop_head_reference}
    if use_compile:
        torch._dynamo.reset()  # no earlier preset's graphs, no recompile limit reached
        found["torch.compile"] = torch.compile(dualcoop_head_reference, dynamic=False)
    return {**found, **library_backends(device, interpreted_triton)[0]}


def bench_preset(preset, shape, device, dtype, heads, wta, min_repeats, budget_s):
    """Time and peak memory of every head on one preset; rows for the report."""
    inputs = make_inputs(shape, device, dtype)
    features, texts, log_temp = inputs["features"], inputs["texts"], inputs["log_spatial_temp"]
    leaves = [*texts, log_temp]
    rows = []
    expected = None
    for label, head in heads.items():

        def forward():
            with torch.no_grad():
                return head(features, *texts, log_temp, wta=wta)

        def forward_backward():
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
                dict(preset=preset, **shape, wta=wta, backend=label, mode=mode, time_ms=time_ms,
                     peak_mib=memory, max_abs_error=max_error)
            )
    add_ratios(rows, same=("mode",))
    return rows


def output_and_gradients(head, inputs: dict, wta: str) -> list[torch.Tensor]:
    texts = [t.detach().requires_grad_() for t in inputs["texts"]]
    log_temp = inputs["log_spatial_temp"].detach().requires_grad_()
    out = head(inputs["features"], *texts, log_temp, wta=wta)
    grads = torch.autograd.grad(out, [*texts, log_temp], inputs["grad_output"].to(out.dtype))
    return [out, *grads]


def check_preset(preset, shape, device, dtype, heads, wta) -> list[dict]:
    """Every head's output and gradients against a float64 reference: pass when its error is at most
    twice the eager reference's in ``dtype`` plus a small term (the rule of the tests)."""
    inputs = make_inputs(shape, device, dtype)
    exact_inputs = {key: [t.double() for t in value] if isinstance(value, list) else value.double()
                    for key, value in inputs.items()}  # the same (rounded) values, in float64
    exact = output_and_gradients(dualcoop_head_reference, exact_inputs, wta)
    eager = output_and_gradients(dualcoop_head_reference, inputs, wta)
    names = ["logits", "d text_evidence", "d text_pos", "d text_neg", "d log_spatial_temp"]
    rows = []
    for label, head in heads.items():
        got = output_and_gradients(head, inputs, wta)
        for name, ours, theirs, truth in zip(names, got, eager, exact):
            scale = max(1.0, truth.abs().max().item())
            error = (ours.double() - truth).abs().max().item()
            eager_error = (theirs.double() - truth).abs().max().item()
            bound = 2 * eager_error + EXTRA_ERROR[dtype] * scale
            rows.append(dict(preset=preset, wta=wta, dtype=str(dtype).removeprefix("torch."), backend=label,
                             quantity=name, error=error, eager_error=eager_error,
                             passed=bool(error <= bound)))
    return rows


BENCH_COLUMNS = [
    ("preset", "preset"), ("backend", "backend"), ("mode", "pass"), ("time_ms", "median ms"),
    ("speedup", "x eager"), ("peak_mib", "peak MiB"), ("memory_ratio", "mem / eager"),
    ("max_abs_error", "max |err|"),
]
CHECK_COLUMNS = [
    ("preset", "preset"), ("wta", "wta"), ("dtype", "dtype"), ("backend", "backend"), ("quantity", "quantity"),
    ("error", "max err vs fp64"), ("eager_error", "eager's err"), ("passed", "ok"),
]


def targets(rows: list[dict]) -> list[dict]:
    """The Triton head's targets (issue 3), measured; reported, never asserted."""

    def find(preset, backend, mode="fwd+bwd"):
        return next((r for r in rows if (r["preset"], r["backend"], r["mode"]) == (preset, backend, mode)), None)

    found = []
    coco, coco_compile, zsl = find("coco", "triton"), find("coco", "torch.compile"), find("zsl", "triton")
    if coco and coco["speedup"]:
        found.append(dict(target="coco fwd+bwd >= 5x eager", measured=f"{coco['speedup']:.2f}x",
                          met=coco["speedup"] >= 5))
    if coco and coco_compile and coco["time_ms"] and coco_compile["time_ms"]:
        ratio = coco_compile["time_ms"] / coco["time_ms"]
        found.append(dict(target="coco fwd+bwd >= 2x torch.compile", measured=f"{ratio:.2f}x", met=ratio >= 2))
    if zsl and zsl["memory_ratio"]:
        found.append(dict(target="zsl fwd+bwd peak <= 1/5 of eager", measured=f"{zsl['memory_ratio']:.3f}",
                          met=zsl["memory_ratio"] <= 0.2))
    openimages = find("openimages", "triton")
    if openimages and openimages["peak_mib"] is not None:
        found.append(dict(target="openimages fwd+bwd < 2 GiB beyond inputs",
                          measured=f"{openimages['peak_mib']:.0f} MiB", met=openimages["peak_mib"] < 2048))
    return found


def write_gpu_report(env: dict, checks: list[dict], rows: list[dict], goals: list[dict], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-") or "gpu"
    write_json(out_dir / f"{slug}.json", dict(environment=env, checks=checks, results=rows, targets=goals))
    failed = [c for c in checks if not c["passed"]]
    lines = [
        f"# DualCoOp++ head on {env['device']}",
        "",
        f"{env['date']}, torch {env['torch']}, triton {env['triton']}, float32 inputs, "
        "produced by `python benchmarks/bench_head.py --gpu-check`.",
        "",
        f"## Correctness: {len(checks) - len(failed)} of {len(checks)} checks pass",
        "",
        "Each backend's output and gradients against a float64 reference; a check passes when the error is",
        "at most twice the eager float32 reference's, plus 1e-6 of the result's scale.",
        "",
        "```",
        format_table(failed, CHECK_COLUMNS) if failed else "all pass",
        "```",
        "",
        "## Time and memory (WTA pos_norm; median of triton.testing.do_bench; peak beyond the inputs)",
        "",
        "```",
        format_table(rows, BENCH_COLUMNS),
        "```",
        "",
        "## Targets",
        "",
        *[f"- {g['target']}: {g['measured']} ({'met' if g['met'] else 'not met'})" for g in goals],
        "",
    ]
    path = out_dir / f"{slug}.md"
    path.write_text("\n".join(lines))
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(HEAD_PRESETS), default="coco")
    parser.add_argument("--all", action="store_true", help="run every preset")
    parser.add_argument("--presets", help="comma-separated presets, for --all or --gpu-check (e.g. a rerun)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--wta", choices=WTA_MODES, default="pos_norm")
    parser.add_argument("--quick", action="store_true", help="small shapes, for smoke runs")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--interpreted-triton", action="store_true",
                        help="include the Triton head where it runs in the interpreter (CPU): slow, for checks")
    parser.add_argument("--min-repeats", type=int, default=5, help="timed calls per case, at least")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per case, about")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    parser.add_argument("--gpu-check", action="store_true",
                        help="check every backend at every preset, time them, write benchmarks/results/<gpu>.md/.json")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where --gpu-check writes")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.gpu_check and device.type != "cuda" and not args.quick:
        sys.exit("--gpu-check needs a CUDA device (add --quick for a CPU smoke run of the check)")
    presets = list(HEAD_PRESETS) if args.all or args.gpu_check else [args.preset]
    if args.presets:
        presets = args.presets.split(",")
        unknown = set(presets) - set(HEAD_PRESETS)
        if unknown:
            sys.exit(f"unknown presets {sorted(unknown)}; known: {list(HEAD_PRESETS)}")
    interpreted_triton = args.interpreted_triton or args.gpu_check
    if interpreted_triton and triton_is_interpreted(device) and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads the variable when it is imported, which importing the package has done
        if argv is not None:
            sys.exit("Triton on the CPU needs TRITON_INTERPRET=1 in the environment before Python starts")
        progress("setting TRITON_INTERPRET=1, which Triton on the CPU needs, and starting again")
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})

    def shape_of(preset):
        return quick_shape(HEAD_PRESETS[preset]) if args.quick else HEAD_PRESETS[preset]

    env = environment(device)  # before the run: the load average says what else is running
    checks = []
    if args.gpu_check:
        for preset in presets:
            for wta in WTA_MODES:
                progress(f"check {preset} {wta} {shape_of(preset)} {args.dtype} on {device}")
                checks += check_preset(preset, shape_of(preset), device, dtype,
                                       library_backends(device, interpreted_triton)[0], wta)
    rows = []
    for number, preset in enumerate(presets, 1):
        progress(f"[{number}/{len(presets)}] {preset} {shape_of(preset)} {args.dtype} {args.wta} on {device}")
        heads = candidates(device, not args.no_compile, interpreted_triton)
        rows += bench_preset(preset, shape_of(preset), device, dtype, heads, args.wta, args.min_repeats, args.budget)

    print(f"dualcoop head, {args.dtype}, wta {args.wta}, {env['device']}, torch {env['torch']}, triton {env['triton']}")
    if device.type == "cpu":
        print(machine_line(env))
    for name, reason in library_backends(device, interpreted_triton)[1].items():
        print(f"left out: {name}: {reason}")
    print(format_table(rows, BENCH_COLUMNS))
    goals = targets(rows)
    for goal in goals:
        print(f"target: {goal['target']}: {goal['measured']} ({'met' if goal['met'] else 'not met'})")
    if args.out:
        write_json(args.out, dict(environment=env, dtype=args.dtype, wta=args.wta, quick=args.quick,
                                  checks=checks, results=rows, targets=goals))
    recorded = recorded_results(RESULTS_DIR)
    if device.type == "cpu":
        print("GPU results recorded in benchmarks/results/:" if recorded else "No GPU results recorded yet.")
        for line in recorded:
            print(f"  {line}")
    if args.gpu_check:
        path = write_gpu_report(env, checks, rows, goals, Path(args.results_dir))
        failed = [c for c in checks if not c["passed"]]
        print(f"checks: {len(checks) - len(failed)} of {len(checks)} pass; report: {path}; "
              f"{time.perf_counter() - started:.0f} s in all")
        if failed:
            print(format_table(failed, CHECK_COLUMNS))
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
