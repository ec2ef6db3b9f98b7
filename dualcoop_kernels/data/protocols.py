"""The two protocols a run can follow, where the authors' two code bases differ (docs/data.md)."""

from __future__ import annotations

from .._checks import check_choice

PROTOCOLS = ("dualcoop++", "dualcoop")  # DualCoOp++ (the default), and the original DualCoOp


def check_protocol(protocol) -> str:
    check_choice("protocol", protocol, PROTOCOLS)
    return protocol
