"""``python -m dualcoop_kernels.extension``: ``dualcoop build-extension`` with torch alone installed."""

import sys

from .build import build_and_print

if __name__ == "__main__":
    sys.exit(build_and_print())
