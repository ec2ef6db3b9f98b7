"""``python -m dualcoop_kernels`` is the ``dualcoop`` command."""

import sys

from .cli import main

sys.exit(main())
