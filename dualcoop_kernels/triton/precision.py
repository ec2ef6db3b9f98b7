"""Which products the Triton head's dots use: the one place this is decided, per dtype and GPU.

- float64 (the tests' exact path): IEEE float64.
- bf16 and fp16 inputs: the similarity GEMM multiplies them natively on a GPU (their products are exact in
  float32, which accumulates); the gradient GEMMs multiply float32 dL/ds and so are float32's.
- float32: float32-accurate products, since WTA amplifies a similarity's error (docs/math.md,
  "Numerics"): 3xTF32 on the tensor cores where TF32 runs several times faster than float32 FMAs (the
  data-centre parts: sm_80, sm_90 and newer), IEEE float32 FMAs where it does not (sm_86, sm_89,
  sm_120: GeForce and workstation parts, whose TF32 tensor rate is about their FMA rate, so 3xTF32
  would cost three times IEEE).

Triton's CPU interpreter computes every dot exactly (a numpy matmul) whatever the precision says.
``DUALCOOP_EMULATE_DOTS`` makes it round the dots' float32 operands as a GPU would, so that the
accuracy tests see a precision's error here: ``tf32`` (operands rounded to TF32, to nearest),
``tf32x3`` (each operand split into a TF32 high and low part, the low-by-low product dropped, as
Triton's 3xTF32 does), ``bf16`` (operands rounded to bfloat16, to nearest even).
"""

from __future__ import annotations

import os

import torch
import triton.language as tl

from ..errors import UsageError

EMULATIONS = ("tf32", "tf32x3", "bf16")
# GPUs whose TF32 tensor rate is about their float32 FMA rate (compute capabilities)
TF32_NO_FASTER = {(8, 6), (8, 9), (12, 0)}


def dot_precision(compute: torch.dtype, capability: tuple[int, int] | None) -> str:
    """The kernels' PRECISION for a compute dtype on a GPU of ``capability`` (None: the interpreter,
    where it may name an emulation, ``"emulate-tf32x3"`` say)."""
    if compute == torch.float64:
        return "ieee"
    if capability is None:
        return interpreter_precision()
    return "ieee" if capability in TF32_NO_FASTER else "tf32x3"


def interpreter_precision() -> str:
    emulation = os.environ.get("DUALCOOP_EMULATE_DOTS", "")
    if emulation and emulation not in EMULATIONS:
        raise UsageError(f"DUALCOOP_EMULATE_DOTS must be one of {EMULATIONS} or unset, got {emulation!r}")
    return f"emulate-{emulation}" if emulation else "ieee"


def similarity_dtype(dtype: torch.dtype, capability: tuple[int, int] | None):
    """The dtype the similarity GEMM multiplies in, for inputs of ``dtype``: bf16 and fp16 as they are on a
    GPU (exact products, float32 accumulation), float32 in the interpreter (whose bf16 dots are wrong, and
    whose float32 products of those values are the same), the compute dtype otherwise."""
    native = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    if capability is not None and dtype in native:
        return native[dtype]
    return tl.float64 if dtype == torch.float64 else tl.float32
