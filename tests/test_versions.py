"""What the oldest supported stack (constraints/oldest.txt) needs: the operators' explicit schemas, a
launch configuration torch.compile can trace, both torchvision transform APIs, and the Triton
backend stepping aside, with its reason, where a Triton release cannot run it."""

import warnings

import pytest
import torch

import dualcoop_kernels as dk
from dualcoop_kernels import triton as triton_backend
from dualcoop_kernels.head import HEAD_BACKENDS
from dualcoop_kernels.triton.head import STATS, LaunchConfig


def test_the_triton_operators_have_schemas_on_every_supported_torch():
    """torch < 2.7 infers no schema from string annotations or list[int]: they are written out. The
    operators run here on meta tensors, so no kernel runs and any Triton will do."""
    B, N, D, C = 2, 5, 16, 3
    meta = dict(device="meta", dtype=torch.float32)
    features, *texts = torch.empty(B, N, D, **meta), *(torch.empty(C, D, **meta) for _ in range(3))
    launch = LaunchConfig(16, 16, 16, 16).as_list()
    outputs = torch.ops.dualcoop_kernels.dualcoop_head_forward(
        features, *texts, torch.empty((), **meta), "pos_norm", 1.0, 20.0, launch
    )
    assert [tuple(t.shape) for t in outputs] == [(B, 2, C), (B, C), (B, N), (3, C), (STATS, B, N), (3, B, N), (0,)]
    schema = str(torch.ops.dualcoop_kernels.dualcoop_head_backward.default._schema)
    assert "int[] launch_config" in schema and "bool want_temp" in schema


def test_the_launch_configuration_is_traced_without_a_deep_copy():
    """dataclasses.astuple deep-copies, which torch.compile <= 2.9 cannot trace in fullgraph mode."""
    launch = LaunchConfig(64, 32, 16, 64, splits=3)
    compiled = torch.compile(lambda x: x * sum(launch.as_list()), fullgraph=True, backend="eager")
    assert compiled(torch.ones(1)).item() == 64 + 32 + 16 + 64 + 3 + 8 + 2 + 1 + 16 + 64 + 32 + 64


@pytest.mark.parametrize(
    "triton, numpy, limited",
    [
        ("3.2.0", "1.26.4", True),
        ("3.3.1", "1.26.4", False),
        ("3.4.0", "2.4.6", True),
        ("3.4.0", "2.3.5", False),
        ("3.8.0", "2.4.6", False),
    ],
)
def test_interpreter_limits_of_old_triton_releases_are_named(monkeypatch, triton, numpy, limited):
    monkeypatch.setattr(triton_backend, "triton_version", lambda: triton)
    monkeypatch.setattr(triton_backend.importlib.metadata, "version", lambda package: numpy)
    reason = triton_backend.interpreter_limit()
    assert (reason is not None) == limited
    if limited:
        assert f"triton {triton}" in reason
        assert reason == HEAD_BACKENDS.unavailable(torch.device("cpu"))["triton"]
        assert dk.available_backends("dualcoop_head", "cpu") == ["reference"]


def test_float64_falls_back_to_the_reference_where_triton_has_no_float64_dots(monkeypatch):
    monkeypatch.setattr(triton_backend, "triton_version", lambda: "3.4.0")
    cuda = torch.device("cuda")
    assert dk.available_backends("dualcoop_head", cuda) == ["triton", "reference"]
    assert dk.available_backends("dualcoop_head", cuda, torch.float32) == ["triton", "reference"]
    assert dk.available_backends("dualcoop_head", cuda, torch.float64) == ["reference"]
    with pytest.warns(UserWarning, match=r"runs on its reference backend for torch\.float64.*triton 3\.4\.0 has no"):
        assert HEAD_BACKENDS.resolve("auto", cuda, torch.float64).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HEAD_BACKENDS.resolve("auto", cuda, torch.float32).name == "triton"
    with pytest.raises(ValueError, match=r"'triton'.*not available on cuda for torch\.float64.*no float64 dots"):
        HEAD_BACKENDS.resolve("triton", cuda, torch.float64)
    with pytest.raises(ValueError, match=r"dtype must be a torch\.dtype"):
        dk.available_backends("dualcoop_head", cuda, "float64")
