"""The two protocols a run can follow, where the authors' two code bases differ (docs/data.md)."""

from __future__ import annotations

from .._checks import check_choice
from ..options import PROTOCOLS


def check_protocol(protocol) -> str:
    check_choice("protocol", protocol, PROTOCOLS)
    return protocol
