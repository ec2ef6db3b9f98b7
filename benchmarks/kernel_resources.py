"""Compile every Triton head kernel for a CUDA architecture without a GPU and print what ptxas reports:
registers per thread and bytes spilled to local memory. A spill is a slow kernel on the GPU; this
shows it on any machine.

    python benchmarks/kernel_resources.py                      # fp32, the tiles choose_launch_config picks, sm_90
    python benchmarks/kernel_resources.py --dtype bfloat16 --tiles 64,32,16,64 --num-warps 8 --num-stages 1

It also shows that every kernel compiles for the GPU, which Triton's CPU interpreter never checks.
"""

from __future__ import annotations

import argparse
import inspect
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from harness import format_table

from dualcoop_kernels.options import WTA_WEIGHT_CODES, WTA_WEIGHTS
from dualcoop_kernels.triton import head as triton_head
from dualcoop_kernels.triton.head import LaunchConfig, choose_launch_config


def ptxas_path() -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    found = str(bundled) if bundled.exists() else shutil.which("ptxas")
    if found is None:
        sys.exit("no ptxas: neither triton's bundled one nor one on PATH")
    return found


DTYPES = {  # input dtype: (its pointer type, compute pointer type, accumulator, dot precision)
    "float32": ("*fp32", "*fp32", tl.float32, "tf32x3"),
    "bfloat16": ("*bf16", "*fp32", tl.float32, "tf32x3"),
    "float16": ("*fp16", "*fp32", tl.float32, "tf32x3"),
    "float64": ("*fp64", "*fp64", tl.float64, "ieee"),
}


def signature(kernel, constexprs: dict, dtype: str) -> dict:
    """Types of a kernel's arguments: pointers by ``triton_head.POINTER_KINDS``, the float64-typed
    scalars by their annotation, and 32-bit integers for the rest (sizes and strides)."""
    input_pointer, compute_pointer, _, _ = DTYPES[dtype]
    pointer_types = {"input": input_pointer, "compute": compute_pointer, "index": "*i32"}
    types = {}
    for name, parameter in inspect.signature(kernel.fn).parameters.items():
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = pointer_types[triton_head.POINTER_KINDS.get(name, "compute")]
        elif parameter.annotation in (tl.float64, "tl.float64"):
            types[name] = "fp64"
        else:
            types[name] = "i32"
    return types


def ast_source(kernel, types: dict, constexprs: dict) -> ASTSource:
    """What triton.compile takes for a kernel: triton 3.3 and newer key the constexprs by argument path,
    older releases by name (the package's oldest supported Triton, 3.2, among them)."""
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        return ASTSource(fn=kernel, signature=types, constants=constexprs)
    names = list(inspect.signature(kernel.fn).parameters)
    return ASTSource(
        fn=kernel, signature=types, constexprs={(names.index(name),): value for name, value in constexprs.items()}
    )


def resources(kernel, constexprs: dict, dtype: str, arch: int, num_warps: int, num_stages: int) -> dict:
    compiled = triton.compile(
        ast_source(kernel, signature(kernel, constexprs, dtype), constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    target = re.search(r"^\.target (\S+)", compiled.asm["ptx"], re.M)[1]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run(
            [ptxas_path(), f"-arch={target}", "-v", ptx.name, "-o", "/dev/null"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    spills = re.search(r"(\d+) bytes spill stores", report)
    return dict(
        registers=int(re.search(r"Used (\d+) registers", report)[1]),
        spill_bytes=int(spills[1]) if spills else 0,
        shared_bytes=compiled.metadata.shared,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100")
    parser.add_argument(
        "--tiles", help="block_n,block_c,block_d,block_d_grad (default: choose_launch_config for the coco preset)"
    )
    parser.add_argument("--num-warps", type=int)
    parser.add_argument("--num-stages", type=int)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the inputs' dtype")
    args = parser.parse_args(argv)
    launch = choose_launch_config(64, 196, 80, 512, torch.device("cpu"))
    if args.tiles:
        n, c, d, d_grad = map(int, args.tiles.split(","))
        launch = LaunchConfig(n, c, d, d_grad)
    num_warps = args.num_warps or launch.num_warps
    num_stages = args.num_stages or launch.num_stages
    _, _, accumulator, precision = DTYPES[args.dtype]
    tiles = dict(BLOCK_N=launch.block_n, BLOCK_C=launch.block_c, BLOCK_D=launch.block_d)
    tiles.update(ACC=accumulator, PRECISION=precision)
    rows = []
    reported = {triton_head._text_grad_finish_kernel}
    for wta, (positive, negative) in WTA_WEIGHTS.items():
        sides = dict(WTA_POS=WTA_WEIGHT_CODES[positive], WTA_NEG=WTA_WEIGHT_CODES[negative])
        kernels = [
            (triton_head._head_forward_kernel, {}),
            (triton_head._text_grad_kernel, dict(WANT_TEXT=True, BLOCK_DT=launch.block_d_grad)),
            (triton_head._feature_grad_kernel, dict(BLOCK_DT=launch.block_d_grad)),
        ]
        if wta != "none":
            kernels += [(triton_head._region_stats_kernel, {}), (triton_head._region_sums_kernel, {})]
        for kernel, extra in kernels:
            found = resources(kernel, dict(tiles, **sides, **extra), args.dtype, args.arch, num_warps, num_stages)
            rows.append(dict(kernel=kernel.fn.__name__, wta=wta, **found))
            reported.add(kernel)
    missing = [kernel.fn.__name__ for kernel in triton_head.KERNELS if kernel not in reported]
    if missing:
        sys.exit(f"kernels without a report here: {missing} (add them to main)")
    finish = dict(BLOCK_C=launch.block_c, BLOCK_DT=launch.block_d_grad, ACC=accumulator)
    found = resources(triton_head._text_grad_finish_kernel, finish, args.dtype, args.arch, num_warps, num_stages)
    rows.append(dict(kernel="_text_grad_finish_kernel", wta="-", **found))
    print(
        f"{args.dtype} inputs, sm_{args.arch}, launch {launch}, num_warps {num_warps}, num_stages {num_stages}, "
        f"triton {triton.__version__}"
    )
    print(
        format_table(
            rows,
            [
                ("kernel", "kernel"),
                ("wta", "wta"),
                ("registers", "registers"),
                ("spill_bytes", "spill bytes"),
                ("shared_bytes", "shared bytes"),
            ],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
