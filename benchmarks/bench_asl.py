"""Benchmark the asymmetric loss: the C++/CUDA extension against eager PyTorch and torch.compile of the
reference, forward+backward, at B in {64, 192} and C in {80, 1006, 9605}.

    python benchmarks/bench_asl.py                   # the CPU, and the GPU when there is one
    python benchmarks/bench_asl.py --device cpu --out asl.json

The inputs are DualCoOp++'s: the two-way B x 2 x C head output, partial labels (30 % unknown), the
DualCoOp++ options (gamma_neg 2, gamma_pos 1, clip 0.05, sum). Times are medians, peak memory is what a
call adds beyond its inputs (see harness.py). Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import sys

import torch

from harness import (
    RATIO_LEGEND,
    add_ratios,
    environment,
    format_table,
    machine_line,
    median_time_ms,
    peak_memory_mib,
    progress,
    write_json,
)

from dualcoop_kernels import asymmetric_loss, build_extension
from dualcoop_kernels.reference import asymmetric_loss_reference

SHAPES = [(B, C) for B in (64, 192) for C in (80, 1006, 9605)]
OPTIONS = dict(gamma_neg=2.0, gamma_pos=1.0, clip=0.05)


def make_inputs(B: int, C: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, 2, C, generator=generator)).to(device).requires_grad_()
    targets = (torch.rand(B, C, generator=generator) < 0.1).float().to(device)
    mask = (torch.rand(B, C, generator=generator) >= 0.3).to(device)
    return logits, targets, mask


def candidates() -> dict:
    """Label -> loss function with the reference's signature; eager first."""
    compiled = torch.compile(asymmetric_loss_reference, dynamic=False)
    return {
        "eager": asymmetric_loss_reference,
        "torch.compile": compiled,
        "extension": lambda *args, **kw: asymmetric_loss(*args, backend="extension", **kw),
    }


def bench_device(device: torch.device, min_repeats: int, budget_s: float, shapes=SHAPES) -> list[dict]:
    rows = []
    for B, C in shapes:
        torch._dynamo.reset()  # a fresh static compile for every shape
        logits, targets, mask = make_inputs(B, C, device)
        expected = None
        for label, loss_fn in candidates().items():

            def forward_backward(loss_fn=loss_fn, logits=logits, targets=targets, mask=mask):
                logits.grad = None
                loss_fn(logits, targets, mask, **OPTIONS).backward()

            progress(f"  {device} B={B} C={C} {label} ...")
            forward_backward()  # warm-up (and compilation)
            loss = loss_fn(logits, targets, mask, **OPTIONS).item()
            expected = loss if expected is None else expected
            rows.append(
                dict(
                    device=device.type,
                    B=B,
                    C=C,
                    backend=label,
                    time_ms=median_time_ms(forward_backward, device, min_repeats=min_repeats, budget_s=budget_s),
                    peak_mib=peak_memory_mib(forward_backward, device),
                    relative_error=abs(loss - expected) / max(abs(expected), 1e-30),
                )
            )
    add_ratios(rows, same=("device", "B", "C"))
    return rows


COLUMNS = [
    ("device", "device"),
    ("B", "B"),
    ("C", "C"),
    ("backend", "backend"),
    ("time_ms", "fwd+bwd ms"),
    ("speedup", "x faster"),
    ("peak_mib", "peak MiB"),
    ("memory_saving", "x less mem"),
    ("relative_error", "rel err"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", action="append", help="cpu or cuda (repeatable); default: cpu, and cuda if present")
    parser.add_argument("--min-repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per case, about")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    status = build_extension()
    progress(f"extension: cpu {status.cpu_built}, cuda {status.cuda_built}, cache {status.cache_directory}")
    env = environment(torch.device(devices[-1]))  # before the run: the load average says what else runs
    rows = []
    for name in devices:
        device = torch.device(name)
        if not getattr(status, f"{device.type}_built"):
            sys.exit(f"the extension's {device.type} part is not built: {status.why_not.get(device.type)}")
        rows += bench_device(device, args.min_repeats, args.budget)
    print(f"asymmetric loss, two-way form, fp32, 30% unknown labels; {env['device']}, torch {env['torch']}")
    if "cpu" in devices:
        print(machine_line(env))
    print(format_table(rows, COLUMNS))
    print(RATIO_LEGEND)
    if args.out:
        write_json(args.out, dict(environment=env, extension=status.as_dict(), options=OPTIONS, results=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
