"""Compile the Triton head's kernels for CUDA GPUs without a GPU, exactly as the runtime compiles them for
a preset's shapes, and read what would run: registers, spills, shared memory, programs per
multiprocessor, the grid and its waves, and, from the SASS of each kernel's innermost loops, the
matrix instructions, barriers, async copies and local-memory traffic per trip.

    python benchmarks/kernel_resources.py                                    # coco, float32, sm_90
    python benchmarks/kernel_resources.py --arch 80 86 89 90 --dtype float32 bfloat16 --preset all --json rows.json
    python benchmarks/kernel_resources.py --wta all --dtype float64 --preset coco    # every WTA mode

How: the host functions (``dualcoop_head_forward`` and ``_backward``) run on CPU tensors of the
preset's shapes with the kernels' launches recorded instead of made; each recorded launch is then
compiled through Triton's own launcher in warm-up mode under a stand-in driver that names the target
GPU, so the kernel gets the runtime's specialisations (16-byte aligned pointers and integer arguments
divisible by 16 marked so, arguments equal to 1 made constants) and the launch settings
``choose_launch_config`` picks for that GPU's multiprocessor count. ptxas reports registers and
spills; nvdisasm (both shipped with Triton) gives the SASS. It also shows that every kernel compiles
for the GPU, which Triton's CPU interpreter never checks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from harness import HEAD_PRESETS, PRESET_WTA, format_table

from dualcoop_kernels.options import WTA_MODES
from dualcoop_kernels.triton import head as triton_head
from dualcoop_kernels.triton import head_kernels
from dualcoop_kernels.triton.head import LaunchConfig

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# A GPU of each architecture: multiprocessors, and per multiprocessor the shared memory blocks may use,
# the most resident threads and blocks (CUDA's occupancy tables); 65,536 registers on every one.
GPUS = {
    80: dict(gpu="A100", multiprocessors=108, shared=164 * 1024, threads=2048, blocks=32),
    86: dict(gpu="RTX 3090", multiprocessors=82, shared=100 * 1024, threads=1536, blocks=16),
    89: dict(gpu="RTX 4090", multiprocessors=128, shared=100 * 1024, threads=1536, blocks=24),
    90: dict(gpu="H100 SXM", multiprocessors=132, shared=228 * 1024, threads=2048, blocks=32),
}
REGISTERS_PER_SM = 65536
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# SASS opcodes counted per trip of an innermost loop
SASS_CLASSES = {
    "mma": re.compile(r"^(HGMMA|HMMA|DMMA|IMMA|QGMMA)\b"),
    "barriers": re.compile(r"^BAR\b"),  # CTA-wide (BAR.SYNC); wgmma's own waits are not counted
    "async_copies": re.compile(r"^(LDGSTS|UTMALDG|UBLKCP|LDGDEPBAR)\b"),
    "global_loads": re.compile(r"^LDG\b"),
    "local_memory": re.compile(r"^(LDL|STL)\b"),
}


def recorded_launches(
    dtype: torch.dtype, wta: str, shape: dict, launch: LaunchConfig, want_features: bool = True
) -> list[tuple]:
    """(pass, kernel, grid, args, kwargs) of every launch of one forward ("fwd") and backward ("bwd") at
    ``shape``; the backward computes the features' gradient only if ``want_features``."""
    launches = []
    saved = {kernel: kernel.run for kernel in head_kernels.KERNELS}
    current_pass = ["fwd"]

    def recorder(kernel):
        return lambda *args, grid, warmup, **kwargs: launches.append((current_pass[0], kernel, grid, args, kwargs))

    B, N, D, C = shape["B"], shape["N"], shape["D"], shape["C"]
    features = torch.randn(B, N, D, dtype=dtype)
    texts = [torch.randn(C, D, dtype=dtype) for _ in range(3)]
    theta = torch.tensor(3.0, dtype=triton_head._compute_dtype(dtype))
    options = (wta, 1.0, 20.0, launch.as_list())
    try:
        for kernel in head_kernels.KERNELS:
            kernel.run = recorder(kernel)
        outputs = triton_head.dualcoop_head_forward(features, *texts, theta, *options)
        current_pass[0] = "bwd"
        grad = torch.ones(B, 2, C, dtype=outputs[0].dtype)
        triton_head.dualcoop_head_backward(grad, features, *texts, theta, *outputs, *options, want_features, True, True)
    finally:
        for kernel, run in saved.items():
            kernel.run = run
    return launches


class _TargetOnly:
    """Triton's active driver for a GPU that is not here: the target to compile for, nothing to launch on.
    Each architecture is its own 'device', so that Triton keeps their kernels apart."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)


def ptxas_report(ptx: str) -> dict:
    target = re.search(r"^\.target (\S+)", ptx, re.M)[1]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as file:
        file.write(ptx)
        file.flush()
        report = subprocess.run(
            [str(TOOLS / "ptxas"), f"-arch={target}", "-v", file.name, "-o", "/dev/null"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    spills = re.search(r"(\d+) bytes spill stores", report)
    return dict(
        registers=int(re.search(r"Used (\d+) registers", report)[1]), spill_bytes=int(spills[1]) if spills else 0
    )


def sass_lines(cubin: bytes) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run(
            [str(TOOLS / "nvdisasm"), "-c", file.name], capture_output=True, text=True, check=True
        ).stdout
    return listing.splitlines()


def _instructions_and_loops(lines: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """The SASS instructions in order, and every loop as the span from a label to a later branch back
    to it, sorted by where it starts (an outer loop before the loops it holds)."""
    labels, instructions, loops = {}, [], []
    for line in lines:
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            labels[label[1]] = len(instructions)
            continue
        found = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(.+?)\s*;", line)
        if not found:
            continue
        instructions.append(found[1])
        back = re.search(r"BRA\s+`?\((\.L_x_\d+)\)", found[1])
        if back and back[1] in labels and labels[back[1]] < len(instructions):
            loops.append((labels[back[1]], len(instructions)))
    return instructions, sorted(set(loops), key=lambda span: (span[0], -span[1]))


def innermost_loops(lines: list[str]) -> list[list[str]]:
    """The instructions of each innermost loop (one that holds no other)."""
    instructions, loops = _instructions_and_loops(lines)
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [instructions[a:b] for a, b in innermost]


def _mma_fmas(opcode: str) -> tuple[str, int]:
    """A matrix instruction's input type and its multiply-adds per issuing warp: a Hopper HGMMA is one
    warpgroup's (four warps issue it), an HMMA or DMMA one warp's."""
    shape = re.match(r"^[A-Z]+\.(\d+)x(\d+)x(\d+)", opcode)
    if shape:  # HGMMA.64x16x8: M x N x K for the warpgroup
        fmas = math.prod(map(int, shape.groups())) // 4
    else:  # HMMA.1688, HMMA.16816, DMMA.884: M, N, K run together
        digits = re.match(r"^[A-Z]+\.(\d+)", opcode)[1]
        m, n, k = (int(digits[:2]), int(digits[2]), int(digits[3:])) if len(digits) > 3 else map(int, digits)
        fmas = m * n * k
    kind = "f64" if opcode.startswith("DMMA") else opcode.rsplit(".", 1)[-1].lower()
    return ("f16" if kind == "f32" else kind), fmas  # fp16 inputs carry no type suffix: HMMA.16816.F32


def _load_bytes(opcode: str) -> int:
    """Bytes one warp reads from global memory with a load or async copy (4 per lane unless sized)."""
    width = re.search(r"\.(64|128)\b", opcode)
    return 32 * (int(width[1]) // 8 if width else 4)


def loop_details(lines: list[str]) -> tuple[list[dict], int]:
    """Every loop of a kernel longer than one instruction (the one-instruction loop after EXIT is a
    trap) with what one warp issues per trip in its own body, loops it holds excluded: instructions,
    multiply-adds per matrix input type, global bytes read and whether they are async copies; and the
    instructions outside every loop."""
    instructions, spans = _instructions_and_loops(lines)
    spans = [span for span in spans if span[1] - span[0] > 1]
    inside = set()
    loops = []
    for start, end in spans:
        nested = [(s, e) for s, e in spans if (s, e) != (start, end) and start <= s and e <= end]
        own = [i for i in range(start, end) if not any(s <= i < e for s, e in nested)]
        inside.update(own)
        body = [instructions[i] for i in own]
        fmas = {}
        for op in body:
            if SASS_CLASSES["mma"].match(op):
                kind, count = _mma_fmas(op.split()[0])
                fmas[kind] = fmas.get(kind, 0) + count
        loads = [op.split()[0] for op in body if SASS_CLASSES["global_loads"].match(op) or op.startswith("LDGSTS")]
        loops.append(
            dict(
                instructions=len(body),
                fmas=fmas,
                load_bytes=sum(map(_load_bytes, loads)),
                async_copies=any(op.startswith("LDGSTS") for op in loads),
            )
        )
    return loops, len(instructions) - len(inside)


def loop_summary(lines: list[str]) -> dict:
    """The innermost loop with the most matrix instructions (or the longest): its counts per trip."""
    loops = innermost_loops(lines)
    if not loops:
        return dict(loop_instructions=0, mma_shape="-", **dict.fromkeys(SASS_CLASSES, 0))
    hot = max(loops, key=lambda body: (sum(bool(SASS_CLASSES["mma"].match(op)) for op in body), len(body)))
    counts = {name: sum(bool(pattern.match(op)) for op in hot) for name, pattern in SASS_CLASSES.items()}
    shapes = sorted({op.split()[0] for op in hot if SASS_CLASSES["mma"].match(op)})
    return dict(loop_instructions=len(hot), mma_shape=" ".join(shapes) or "-", **counts)


def programs_per_multiprocessor(registers: int, shared: int, num_warps: int, arch: int) -> int:
    gpu = GPUS[arch]
    per_warp = -(-registers * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
    by_registers = REGISTERS_PER_SM // (per_warp * num_warps)
    by_threads = gpu["threads"] // (32 * num_warps)
    by_shared = gpu["shared"] // (shared + 1024) if shared else gpu["blocks"]  # 1 KiB reserved per block
    return min(by_registers, by_threads, by_shared, gpu["blocks"])


def compiled_row(kernel, grid, args, kwargs, arch: int) -> dict:
    """What one launch runs on ``arch``: resources, occupancy, the hot loop's counts, and in ``loops``
    every loop's (``loop_details``; what benchmarks/kernel_model.py reads)."""
    driver.set_active(_TargetOnly(arch))  # for good: with no GPU there is no default driver to go back to
    compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs)
    found = ptxas_report(compiled.asm["ptx"])
    shared, num_warps = compiled.metadata.shared, kwargs.get("num_warps", 4)
    programs = programs_per_multiprocessor(found["registers"], shared, num_warps, arch)
    size = math.prod(grid)
    waves = size / (programs * GPUS[arch]["multiprocessors"]) if programs else float("inf")
    lines = sass_lines(compiled.asm["cubin"])
    loops, straight = loop_details(lines)
    return dict(
        kernel=kernel.fn.__name__,
        **found,
        shared_bytes=shared,
        num_warps=num_warps,
        programs_per_sm=programs,
        grid=size,
        waves=round(waves, 2),
        **loop_summary(lines),
        loops=loops,
        straight_instructions=straight,
    )


def rows_for(preset: str, dtype: str, wta: str, arch: int, overrides: dict, want_features: bool = True) -> list[dict]:
    """A row per launch of one forward and backward at ``preset`` (``compiled_row``), with its pass."""
    shape = HEAD_PRESETS[preset]
    B, N, D, C = shape["B"], shape["N"], shape["D"], shape["C"]
    context = dict(preset=preset, dtype=dtype, wta=wta, arch=f"sm_{arch}", gpu=GPUS[arch]["gpu"])
    with _as_gpu(arch):
        launch = triton_head.choose_launch_config(B, N, C, D, torch.device("cuda"))
        launch = LaunchConfig(**{**vars(launch), **overrides})
        launches = recorded_launches(DTYPES[dtype], wta, shape, launch, want_features)
    return [
        dict(
            context,
            **compiled_row(kernel, grid, args, kwargs, arch),
            **{"pass": step},
            precision=kwargs.get("PRECISION", "-"),
            launch=vars(launch),
        )
        for step, kernel, grid, args, kwargs in launches
    ]


@contextlib.contextmanager
def _as_gpu(arch: int):
    """The host functions choose launch settings and dot precision for a GPU of ``arch``."""
    saved = triton_head._multiprocessors, triton_head._capability
    triton_head._multiprocessors = lambda device: GPUS[arch]["multiprocessors"]
    triton_head._capability = lambda device: divmod(arch, 10)
    try:
        yield
    finally:
        triton_head._multiprocessors, triton_head._capability = saved


COLUMNS = [
    ("preset", "preset"),
    ("dtype", "dtype"),
    ("arch", "arch"),
    ("wta", "wta"),
    ("kernel", "kernel"),
    ("precision", "precision"),
    ("registers", "regs"),
    ("spill_bytes", "spill B"),
    ("shared_bytes", "shared B"),
    ("programs_per_sm", "progs/SM"),
    ("grid", "grid"),
    ("waves", "waves"),
    ("loop_instructions", "loop instr"),
    ("mma", "MMA"),
    ("mma_shape", "MMA shape"),
    ("barriers", "barriers"),
    ("async_copies", "async"),
    ("global_loads", "LDG"),
    ("local_memory", "LDL/STL"),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(GPUS), help="compute capabilities")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=list(DTYPES), help="the inputs' dtypes")
    parser.add_argument("--preset", nargs="+", default=["coco"], help=f"of {list(HEAD_PRESETS)}, or all")
    parser.add_argument("--wta", default="preset", help="a WTA mode, 'preset' (each preset's own) or 'all'")
    parser.add_argument("--tiles", help="block_n,block_c,block_d,block_d_grad instead of choose_launch_config's")
    parser.add_argument("--frozen-features", action="store_true", help="no features' gradient, as in prompt learning")
    parser.add_argument("--num-warps", type=int)
    parser.add_argument("--num-stages", type=int)
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    return parser


def _overrides(args) -> dict:
    overrides = {}
    if args.tiles:
        tiles = args.tiles.split(",")
        if len(tiles) != 4 or not all(tile.isdigit() for tile in tiles):
            sys.exit(f"--tiles takes four integers block_n,block_c,block_d,block_d_grad, got {args.tiles!r}")
        overrides.update(zip(("block_n", "block_c", "block_d", "block_d_grad"), map(int, tiles)))
    if args.num_warps:
        overrides["num_warps"] = args.num_warps
    if args.num_stages:
        overrides["num_stages"] = args.num_stages
    return overrides


def compiling_presets(preset_argument: list[str]) -> list[str]:
    """The presets ``--preset`` names (``all``: every one), after checking that kernels can be compiled
    here; exits naming what is wrong."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the kernels are compiled here, not interpreted")
    presets = list(HEAD_PRESETS) if preset_argument == ["all"] else preset_argument
    unknown = [preset for preset in presets if preset not in HEAD_PRESETS]
    if unknown:
        sys.exit(f"unknown --preset {unknown}; known: {list(HEAD_PRESETS)} or all")
    return presets


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    presets = compiling_presets(args.preset)
    if args.wta not in ("preset", "all", *WTA_MODES):
        sys.exit(f"unknown --wta {args.wta!r}; known: preset, all, {', '.join(WTA_MODES)}")
    rows = []
    for preset in presets:
        modes = WTA_MODES if args.wta == "all" else [PRESET_WTA[preset] if args.wta == "preset" else args.wta]
        for dtype in args.dtype:
            for arch in args.arch:
                for wta in modes:
                    rows += rows_for(preset, dtype, wta, arch, _overrides(args), not args.frozen_features)
    print(f"triton {triton.__version__}, compiled as launched; launch settings per preset in --json")
    print(format_table(rows, COLUMNS))
    if args.json:
        args.json.write_text(json.dumps(dict(triton=triton.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
