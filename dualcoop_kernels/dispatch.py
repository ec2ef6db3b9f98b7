"""Dispatch: which implementations (backends) of an op exist, and which one ``backend=...`` selects.

Each op (the head, the loss) keeps its backends in a registry, in priority order, fastest first; the
registries are listed in ``REGISTRIES`` by op name. A backend offers its functions, ``unavailable_reason``
and ``prepare`` (``dualcoop_kernels.triton`` and ``dualcoop_kernels.extension`` are the models). ``"auto"`` takes the
first one available for the tensors' device; an explicit name that is unknown or unavailable raises a
``ValueError`` that lists what is available and why the others are not. The choice runs as plain
Python even while ``torch.compile`` traces (preparing a backend may build C++ or read files), and the
traced graph keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    function: Callable
    # Returns why the backend cannot run on this device, or None when it can.
    unavailable_reason: Callable[[torch.device], str | None]
    # Whether "auto" may pick it for a device (it may still be unavailable there).
    use_in_auto: Callable[[torch.device], bool]
    # Run before the backend is considered for a call: may make it available (build it, say).
    prepare: Callable[[torch.device], None]


REGISTRIES: dict[str, BackendRegistry] = {}  # op name -> its registry


class BackendRegistry:
    def __init__(self, op_name: str):
        self.op_name = op_name
        self._backends: list[Backend] = []
        REGISTRIES[op_name] = self

    def register(
        self,
        name: str,
        function: Callable,
        *,
        unavailable_reason: Callable[[torch.device], str | None] = lambda device: None,
        prepare: Callable[[torch.device], None] = lambda device: None,
        use_in_auto: Callable[[torch.device], bool] = lambda device: True,
    ) -> None:
        """Add a backend; register faster ones first, since ``auto`` takes the first available.
        ``unavailable_reason`` and ``use_in_auto`` must be cheap and free of side effects."""
        self._backends.append(Backend(name, function, unavailable_reason, use_in_auto, prepare))

    def names(self) -> list[str]:
        return [backend.name for backend in self._backends]

    def available(self, device: torch.device) -> list[str]:
        return [b.name for b in self._backends if b.unavailable_reason(device) is None]

    def unavailable(self, device: torch.device) -> dict[str, str]:
        """Name -> why it cannot run on ``device``, for every backend that cannot."""
        reasons = {b.name: b.unavailable_reason(device) for b in self._backends}
        return {name: reason for name, reason in reasons.items() if reason is not None}

    def check_known(self, name: str) -> None:
        """Fail early (e.g. in a module's constructor) on a name that no device could run."""
        if name != "auto" and name not in self.names():
            raise ValueError(f"unknown backend {name!r} for {self.op_name}; known: {['auto', *self.names()]}")

    def resolve(self, name: str, device: torch.device) -> Backend:
        """The backend that ``backend=name`` runs on ``device``, prepared (built, say) if need be."""
        chosen = _choose_backend(self.op_name, name, device)
        return next(backend for backend in self._backends if backend.name == chosen)

    def _choose(self, name: str, device: torch.device) -> str:
        self.check_known(name)
        if name == "auto":
            candidates = [b for b in self._backends if b.use_in_auto(device)]
        else:
            candidates = [b for b in self._backends if b.name == name]
        reasons = {}
        for backend in candidates:
            backend.prepare(device)
            reason = backend.unavailable_reason(device)
            if reason is None:
                return backend.name
            reasons[backend.name] = reason
        why = "; ".join(f"{backend}: {reason}" for backend, reason in reasons.items())
        raise ValueError(
            f"backend {name!r} of {self.op_name} is not available on {device} ({why}); "
            f"available: {['auto', *self.available(device)]}"
        )


@torch.compiler.assume_constant_result
def _choose_backend(op_name: str, name: str, device: torch.device) -> str:
    """The name of the backend chosen; torch.compile runs this eagerly and keeps its result."""
    return REGISTRIES[op_name]._choose(name, device)


def available_backends(op: str = "dualcoop_head", device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends of ``op`` (``"dualcoop_head"`` or ``"asymmetric_loss"``) that run on
    ``device``, fastest first; ``backend="auto"`` picks the first. A backend that the first call
    builds (the loss extension, where a compiler is found) counts as available."""
    if op not in REGISTRIES:
        raise ValueError(f"op must be one of {tuple(REGISTRIES)}, got {op!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch.device or a name such as 'cpu' or 'cuda', got {device!r}") from error
    return REGISTRIES[op].available(device)
