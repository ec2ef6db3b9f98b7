"""``python -m dualcoop_kernels.extension``: the same as ``dualcoop build-extension`` (cli.py)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["build-extension"]))
