"""Dispatch: which implementations (backends) of an op exist, and which one ``backend=...`` selects.

Each op (the head, the loss) keeps its backends in a registry, in priority order, fastest first; the
registries are listed in ``REGISTRIES`` by op name. A backend offers its functions, ``unavailable_reason``
and ``prepare`` (``dualcoop_kernels.triton`` and ``dualcoop_kernels.extension`` are the models). ``"auto"`` takes the
first one available for the tensors' device; an explicit name that is unknown or unavailable raises a
``ValueError`` that lists what is available and why the others are not. A backend may also refuse
some dtypes (``unsupported_dtype``): ``"auto"`` then passes it over with a warning that says why. The
choice runs as plain Python even while ``torch.compile`` traces (preparing a backend may build C++ or
read files), and the traced graph keeps it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import UsageError


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
    # Returns why the backend cannot compute in a dtype, or None when it can.
    unsupported_dtype: Callable[[torch.dtype], str | None]

    def reason(self, device: torch.device, dtype: torch.dtype | None) -> str | None:
        """Why it cannot run on ``device`` (in ``dtype``, when given); None when it can."""
        return self.unavailable_reason(device) or (None if dtype is None else self.unsupported_dtype(dtype))


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
        unsupported_dtype: Callable[[torch.dtype], str | None] = lambda dtype: None,
    ) -> None:
        """Add a backend; register faster ones first, since ``auto`` takes the first available.
        ``unavailable_reason``, ``unsupported_dtype`` and ``use_in_auto`` must be cheap and free of side
        effects."""
        self._backends.append(Backend(name, function, unavailable_reason, use_in_auto, prepare, unsupported_dtype))

    def names(self) -> list[str]:
        return [backend.name for backend in self._backends]

    def available(self, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
        return [b.name for b in self._backends if b.reason(device, dtype) is None]

    def unavailable(self, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, str]:
        """Name -> why it cannot run on ``device`` (in ``dtype``, when given), for every backend that cannot."""
        reasons = {b.name: b.reason(device, dtype) for b in self._backends}
        return {name: reason for name, reason in reasons.items() if reason is not None}

    def check_known(self, name: str) -> None:
        """Fail early (e.g. in a module's constructor) on a name that no device could run."""
        if name != "auto" and name not in self.names():
            raise UsageError(f"unknown backend {name!r} for {self.op_name}; known: {['auto', *self.names()]}")

    def resolve(self, name: str, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
        """The backend that ``backend=name`` runs on ``device`` (for ``dtype`` inputs, when given),
        prepared (built, say) if need be."""
        chosen = _choose_backend(self.op_name, name, device, dtype)
        return next(backend for backend in self._backends if backend.name == chosen)

    def _choose(self, name: str, device: torch.device, dtype: torch.dtype | None) -> str:
        self.check_known(name)
        if name == "auto":
            candidates = [b for b in self._backends if b.use_in_auto(device)]
        else:
            candidates = [b for b in self._backends if b.name == name]
        reasons = {}
        for backend in candidates:
            backend.prepare(device)
            reason = backend.reason(device, dtype)
            if reason is None:
                self._warn_dtype_refusals(backend.name, device, dtype, reasons)
                return backend.name
            reasons[backend.name] = reason
        why = "; ".join(f"{backend}: {reason}" for backend, reason in reasons.items())
        raise UsageError(
            f"backend {name!r} of {self.op_name} is not available on {device}"
            f"{'' if dtype is None else f' for {dtype}'} ({why}); "
            f"available: {['auto', *self.available(device, dtype)]}"
        )

    def _warn_dtype_refusals(self, chosen: str, device: torch.device, dtype: torch.dtype | None, reasons: dict) -> None:
        """Say so when "auto" runs ``chosen`` because faster backends that run on the device refuse the dtype."""
        refused = [b.name for b in self._backends if b.name in reasons and b.unavailable_reason(device) is None]
        if refused:
            why = "; ".join(f"{name}: {reasons[name]}" for name in refused)
            warnings.warn(f"{self.op_name} runs on its {chosen} backend for {dtype} on {device} ({why})", stacklevel=6)


@torch.compiler.assume_constant_result
def _choose_backend(op_name: str, name: str, device: torch.device, dtype: torch.dtype | None) -> str:
    """The name of the backend chosen; torch.compile runs this eagerly and keeps its result."""
    return REGISTRIES[op_name]._choose(name, device, dtype)


def available_backends(
    op: str = "dualcoop_head", device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> list[str]:
    """Names of the backends of ``op`` (``"dualcoop_head"`` or ``"asymmetric_loss"``) that run on
    ``device`` (for inputs of ``dtype``, when given), fastest first; ``backend="auto"`` picks the
    first. A backend that the first call builds (the loss extension, where a compiler is found)
    counts as available."""
    if op not in REGISTRIES:
        raise UsageError(f"op must be one of {tuple(REGISTRIES)}, got {op!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise UsageError(f"device must be a torch.device or a name such as 'cpu' or 'cuda', got {device!r}") from error
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise UsageError(f"dtype must be a torch.dtype such as torch.float32, or None, got {dtype!r}")
    return REGISTRIES[op].available(device, dtype)
