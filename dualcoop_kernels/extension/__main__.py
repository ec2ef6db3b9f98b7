"""Build the asymmetric-loss extension ahead of time and print what was built:

    python -m dualcoop_kernels.extension

It builds into torch's extension cache (TORCH_EXTENSIONS_DIR), where every later process finds it.
The CUDA part needs a CUDA toolkit (CUDA_HOME, or nvcc on PATH); without a GPU it is compiled for
sm_90 (DUALCOOP_CUDA_ARCH=80 picks another). Exits non-zero when the CPU part could not be built.
"""

import json
import sys

from .build import build_extension


def main() -> int:
    status = build_extension()
    print(json.dumps(status.as_dict(), indent=2))
    return 0 if status.cpu_built else 1


if __name__ == "__main__":
    sys.exit(main())
