"""The C++/CUDA backend: the asymmetric loss as compiled torch operators (sources in ``csrc/``).

Like every backend it offers ``unavailable_reason(device)``, ``prepare(device)`` and its op functions
(here ``asymmetric_loss``). ``build.py`` finds the toolchain and builds, caches and loads the library;
``loss.py`` is the Python side of the operators.
"""

from .build import ExtensionStatus, build_extension, extension_status, prepare, unavailable_reason
from .loss import asymmetric_loss

__all__ = [
    "ExtensionStatus",
    "asymmetric_loss",
    "build_extension",
    "extension_status",
    "prepare",
    "unavailable_reason",
]
