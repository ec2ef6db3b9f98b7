"""The C++/CUDA asymmetric loss against the reference: loss and gradient for every option, extreme
logits, unknown labels, empty and strided inputs; building, status, fallback and compilation."""

import importlib.metadata
import importlib.util
import logging
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import dualcoop_kernels as dk
from dualcoop_kernels.extension import build as extension_build
from dualcoop_kernels.loss import ASL_BACKENDS
from dualcoop_kernels.options import REDUCTIONS
from dualcoop_kernels.testing import assert_within_twice_reference_error

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the extension cannot be built here")


@pytest.fixture(scope="module", autouse=True)
def built():
    status = extension_build.build_extension()
    assert status.cpu_built, status.why_not  # where there is a compiler, the CPU part must build
    return status


def devices():
    found = ["cpu"]
    if torch.cuda.is_available() and extension_build.build_extension().cuda_built:
        found.append("cuda")
    return found


def random_case(B, C, two_way, dtype=torch.float64, device="cpu", unknown=0.3, extreme=True):
    """Logits around +-3 with some at +-50 (where the eps clamp and the clip decide), 0/1 targets and a
    mask with about ``unknown`` of the labels unknown."""
    shape = (B, 2, C) if two_way else (B, C)
    logits = 3 * torch.randn(shape, dtype=torch.float64)
    if extreme:
        logits = torch.where(torch.rand(shape) < 0.1, 50 * torch.sign(logits), logits)
    targets = (torch.rand(B, C) < 0.4).to(dtype)
    mask = torch.rand(B, C) >= unknown
    return logits.to(device, dtype).requires_grad_(), targets.to(device), mask.to(device)


def loss_and_grad(backend, logits, targets, mask, grad_output=None, **options):
    loss = dk.asymmetric_loss(logits, targets, mask, backend=backend, **options)
    grad_output = torch.ones_like(loss) if grad_output is None else grad_output
    (grad,) = torch.autograd.grad(loss, logits, grad_output)
    return loss, grad


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("two_way", [False, True])
@pytest.mark.parametrize("focal_grad", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_float64_matches_reference(device, two_way, focal_grad, reduction, with_mask):
    logits, targets, mask = random_case(9, 37, two_way, device=device)
    mask = mask if with_mask else None
    options = dict(gamma_neg=2.0, gamma_pos=1.0, clip=0.05, focal_grad=focal_grad, reduction=reduction)
    grad_output = torch.randn(9, 37, dtype=torch.float64, device=device) if reduction == "none" else None
    expected = loss_and_grad("reference", logits, targets, mask, grad_output, **options)
    got = loss_and_grad("extension", logits, targets, mask, grad_output, **options)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("two_way", [False, True])
@pytest.mark.parametrize("focal_grad", [False, True])
def test_low_precision_within_twice_reference_error(device, dtype, two_way, focal_grad):
    logits, targets, mask = random_case(16, 101, two_way, dtype=dtype, device=device)
    exact_logits = logits.detach().double().requires_grad_()
    options = dict(gamma_neg=4.0, gamma_pos=1.0, clip=0.05, focal_grad=focal_grad, reduction="sum")
    exact = loss_and_grad("reference", exact_logits, targets.double(), mask, **options)
    eager = loss_and_grad("reference", logits, targets, mask, **options)
    got = loss_and_grad("extension", logits, targets, mask, **options)
    for what, ours, theirs, truth in zip(("loss", "grad"), got, eager, exact):
        assert ours.dtype == dtype
        assert_within_twice_reference_error(ours, theirs, truth, 1e-6 if dtype == torch.float32 else 4e-3, what)


@pytest.mark.parametrize("two_way", [False, True])
@pytest.mark.parametrize("focal_grad, gammas", [(True, (3.0, 1.5)), (False, (0.0, 0.0))])
def test_gradcheck(two_way, focal_grad, gammas):
    """gradcheck differentiates the focusing weight too: the detached one is checked at gamma 0 here,
    and at other gammas by the comparison with the reference above."""
    logits, targets, mask = random_case(4, 11, two_way, extreme=False)
    gamma_neg, gamma_pos = gammas

    def loss(z):
        return dk.asymmetric_loss(
            z,
            targets,
            mask,
            gamma_neg=gamma_neg,
            gamma_pos=gamma_pos,
            focal_grad=focal_grad,
            reduction="none",
            backend="extension",
        )

    assert torch.autograd.gradcheck(loss, (logits,))


def test_extreme_logits():
    logits = torch.tensor([[-50.0, 50.0, -50.0, 50.0, 0.0]], dtype=torch.float32, requires_grad=True)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]])
    for focal_grad in (False, True):
        got = loss_and_grad("extension", logits, targets, None, focal_grad=focal_grad, reduction="none")
        exact = loss_and_grad(
            "reference",
            logits.detach().double().requires_grad_(),
            targets.double(),
            None,
            focal_grad=focal_grad,
            reduction="none",
        )
        for ours, truth in zip(got, exact):
            assert torch.isfinite(ours).all()
            torch.testing.assert_close(ours.double(), truth, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("two_way", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_non_finite_logits_give_nan_as_the_reference_does(device, dtype, two_way, reduction):
    """The CPU kernel is built with -ffast-math, under which a NaN test may be compiled away: NaN and
    infinite logits, at known and unknown labels, must still give NaN loss and gradient elements,
    exactly where the reference has them."""
    logits, targets, mask = random_case(5, 37, two_way, dtype=dtype, device=device, extreme=False)
    with torch.no_grad():
        flat = logits.view(-1)
        flat[3], flat[40], flat[77] = math.nan, math.inf, -math.inf
    mask[0, 3] = False  # one non-finite logit under an unknown label
    expected = loss_and_grad("reference", logits, targets, mask, reduction=reduction)
    got = loss_and_grad("extension", logits, targets, mask, reduction=reduction)
    for ours, theirs in zip(got, expected):
        assert torch.isnan(ours).any()
        torch.testing.assert_close(torch.isnan(ours), torch.isnan(theirs))
        finite = ~torch.isnan(theirs)
        torch.testing.assert_close(
            ours[finite],
            theirs[finite],
            equal_nan=True,
            **({} if dtype == torch.float64 else dict(rtol=2e-2, atol=1e-3)),
        )


@pytest.mark.parametrize("device", devices())
def test_all_unknown_and_empty(device):
    logits, targets, _ = random_case(5, 7, two_way=True, device=device)
    nothing_known = torch.zeros(5, 7, dtype=torch.bool, device=device)
    for reduction in ("sum", "mean", "none"):
        loss, grad = loss_and_grad("extension", logits, targets, nothing_known, reduction=reduction)
        assert torch.all(loss == 0) and torch.all(grad == 0)
    empty = torch.zeros(0, 2, 7, dtype=torch.float64, device=device, requires_grad=True)
    for reduction in ("sum", "mean"):
        loss, grad = loss_and_grad("extension", empty, targets[:0], None, reduction=reduction)
        assert loss.item() == 0 and grad.shape == (0, 2, 7)
    assert dk.asymmetric_loss(empty, targets[:0], reduction="none", backend="extension").shape == (0, 7)


@pytest.mark.parametrize("device", devices())
def test_non_contiguous_inputs(device):
    B, C = 6, 19
    logits = (3 * torch.randn(C, 2, B, dtype=torch.float64, device=device)).permute(2, 1, 0).requires_grad_()
    targets = (torch.rand(C, B, device=device) < 0.5).double().T
    mask = (torch.rand(C, B, device=device) < 0.7).T
    assert not logits.is_contiguous() and not targets.is_contiguous() and not mask.is_contiguous()
    expected = loss_and_grad("reference", logits, targets, mask, reduction="mean")
    got = loss_and_grad("extension", logits, targets, mask, reduction="mean")
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_targets_of_other_dtypes():
    logits, targets, mask = random_case(4, 9, two_way=False)
    expected = dk.asymmetric_loss(logits, targets, mask, backend="reference")
    for other in (torch.bool, torch.int64, torch.float32):
        torch.testing.assert_close(dk.asymmetric_loss(logits, targets.to(other), mask, backend="extension"), expected)


def test_auto_takes_the_built_extension_and_status_says_so():
    assert ASL_BACKENDS.resolve("auto", torch.device("cpu")).name == "extension"
    assert dk.available_backends("asymmetric_loss", "cpu") == ["extension", "reference"]
    status = dk.extension_status()
    assert status["cpu_built"] and os.path.exists(status["cpu_library"])
    assert status["cache_directory"] and "cpu" not in status["why_not"]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("two_way", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_operators_pass_torch_library_opcheck(device, two_way, reduction):
    logits, targets, mask = random_case(4, 9, two_way, device=device)
    code = REDUCTIONS[reduction]
    torch.library.opcheck(
        torch.ops.dualcoop_kernels.asymmetric_loss_forward.default,
        (logits, targets, mask, 2.0, 1.0, 0.05, 1e-8, False, code, True),
    )
    _, grad = torch.ops.dualcoop_kernels.asymmetric_loss_forward(
        logits.detach(), targets, mask, 2.0, 1.0, 0.05, 1e-8, False, code, True
    )
    grad_loss = (
        torch.randn(4, 9, dtype=torch.float64, device=device)
        if reduction == "none"
        else torch.tensor(1.5, dtype=torch.float64, device=device)
    )
    torch.library.opcheck(
        torch.ops.dualcoop_kernels.asymmetric_loss_backward.default, (grad_loss, grad, two_way, torch.float64)
    )


def test_compiles_without_graph_breaks():
    logits, targets, mask = random_case(3, 8, two_way=True)
    loss_fn = dk.AsymmetricLoss(gamma_neg=2.0, backend="extension")
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = loss_and_grad("extension", logits, targets, mask)
    loss = compiled(logits, targets, mask)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, dk.asymmetric_loss(logits, targets, mask, gamma_neg=2.0, backend="extension"))
    assert grad.shape == got[1].shape


NO_COMPILER_SCRIPT = """
import warnings, torch, dualcoop_kernels as dk
logits = torch.randn(3, 2, 5, requires_grad=True)
targets = (torch.rand(3, 5) < 0.5).float()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loss = dk.asymmetric_loss(logits, targets)          # auto: tries to build, falls back
    loss = dk.asymmetric_loss(logits, targets)          # no second try, no second warning
loss.backward()
ours = [str(w.message) for w in caught if "dualcoop_kernels" in str(w.message)]
print("WARNINGS", len(ours))
print(ours[0])
torch.testing.assert_close(loss, dk.asymmetric_loss(logits, targets, backend="reference"))
try:
    dk.asymmetric_loss(logits, targets, backend="extension")
except ValueError as error:
    print("ERROR", error)
print("STATUS", dk.extension_status()["cpu_built"])
"""


@pytest.mark.slow
def test_without_a_compiler_the_pytorch_path_runs_with_one_warning(tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}
    finished = subprocess.run(
        [sys.executable, "-c", NO_COMPILER_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    out = finished.stdout
    assert "WARNINGS 1" in out
    assert "the PyTorch path runs instead" in out and "cannot be built here: no C++ compiler" in out
    assert "ERROR backend 'extension' of asymmetric_loss is not available on cpu" in out
    assert "available: ['auto', 'reference']" in out
    assert "STATUS False" in out


@pytest.fixture
def fresh_loader(tmp_path, monkeypatch):
    """A loader that has seen nothing, over an empty extension cache in tmp_path."""
    monkeypatch.setattr(extension_build, "_LOADER", extension_build._Loader())
    monkeypatch.setattr(extension_build, "_build_directory", lambda name: tmp_path / name)
    return extension_build._LOADER


def test_the_first_build_is_announced_once(fresh_loader, monkeypatch, caplog):
    from torch.utils import cpp_extension

    compiled = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, **kwargs: compiled.append(name))
    with caplog.at_level(logging.WARNING, logger="dualcoop_kernels"):
        for _ in range(3):
            extension_build.prepare(torch.device("cpu"))
    notices = [r.getMessage() for r in caplog.records if "building" in r.getMessage()]
    assert len(compiled) == 1 and len(notices) == 1, notices
    assert "building the CPU part of the asymmetric-loss extension, about a minute, once" in notices[0]
    assert not any("CUDA" in notice for notice in notices)  # a CPU loss builds the CPU part only


def test_the_library_name_is_keyed_by_what_it_is_built_from(tmp_path, monkeypatch):
    """Two installs share a built library only when they build the same thing, so they never rebuild
    each other's in the shared extension cache."""
    flags = dict(extra_cflags=["-O3"])
    name = extension_build._keyed("dualcoop_asl_cpu", **flags)
    copy = tmp_path / "another_checkout" / "csrc"
    shutil.copytree(extension_build._sources(), copy)
    monkeypatch.setattr(extension_build, "_sources", lambda: copy)
    assert extension_build._keyed("dualcoop_asl_cpu", **flags) == name  # the same sources elsewhere
    math_header = copy / "asl_math.h"
    math_header.write_text(math_header.read_text() + "\n// another version\n")
    changed = extension_build._keyed("dualcoop_asl_cpu", **flags)
    others = [changed, extension_build._keyed("dualcoop_asl_cpu", extra_cflags=["-O2"])]
    monkeypatch.setenv("CXX", "clang++")
    others.append(extension_build._keyed("dualcoop_asl_cpu", **flags))
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    others.append(extension_build._keyed("dualcoop_asl_cpu", **flags))
    assert len({name, *others}) == 5 and all(n.startswith("dualcoop_asl_cpu_") for n in others)


def test_available_backends_counts_a_backend_built_on_first_use(fresh_loader, monkeypatch):
    cpu = torch.device("cpu")
    assert extension_build.unavailable_reason(cpu) is None  # not built, but the first call builds it
    assert dk.available_backends("asymmetric_loss", "cpu") == ["extension", "reference"]
    assert "not built for these sources yet: the first loss call" in dk.extension_status()["why_not"]["cpu"]
    monkeypatch.setenv("DUALCOOP_KERNELS_NO_BUILD", "1")
    assert "DUALCOOP_KERNELS_NO_BUILD=1 stops builds" in extension_build.unavailable_reason(cpu)
    assert dk.available_backends("asymmetric_loss", "cpu") == ["reference"]
    monkeypatch.setattr(extension_build, "_LOADER", extension_build._Loader())  # a process started so
    assert "DUALCOOP_KERNELS_NO_BUILD=1 stops builds" in dk.extension_status()["why_not"]["cpu"]
    monkeypatch.delenv("DUALCOOP_KERNELS_NO_BUILD")
    monkeypatch.setenv("CXX", "/no/such/compiler")
    assert "no C++ compiler: '/no/such/compiler' (CXX) is not found" in extension_build.unavailable_reason(cpu)


COMPILE_FIRST_SCRIPT = """
import torch, dualcoop_kernels as dk
logits = torch.randn(3, 2, 5, requires_grad=True)
targets = (torch.rand(3, 5) < 0.5).float()
loss = torch.compile(dk.asymmetric_loss, fullgraph=True, backend="aot_eager")(logits, targets)
loss.backward()
torch.testing.assert_close(loss, dk.asymmetric_loss(logits, targets, backend="reference"))
print("BACKENDS", dk.available_backends("asymmetric_loss"))
"""


@pytest.mark.slow
def test_compiled_loss_as_the_first_call_of_a_process():
    """Choosing the backend (which may load or build the extension) runs outside the traced graph."""
    finished = subprocess.run([sys.executable, "-c", COMPILE_FIRST_SCRIPT], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "BACKENDS ['extension', 'reference']" in finished.stdout


def make_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "lib64").mkdir()
    (root / "lib64" / "libcudart.so").touch()
    return root


def test_cuda_toolkit_behind_a_linked_nvcc(tmp_path, monkeypatch):
    """torch guesses CUDA_HOME as the folder above the nvcc on PATH: wrong for /usr/local/bin/nvcc
    linking to /usr/local/cuda-X/bin/nvcc. The library follows the link; CUDA_HOME set wins."""
    from torch.utils import cpp_extension

    toolkit = make_toolkit(tmp_path / "cuda-12.4")
    (tmp_path / "local" / "bin").mkdir(parents=True)
    (tmp_path / "local" / "bin" / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'local' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "local"))  # torch's guess
    assert extension_build._cuda_home() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", "/opt/my-cuda")
    assert extension_build._cuda_home() == "/opt/my-cuda"


def test_cuda_toolkit_behind_a_wrapper_script(monkeypatch):
    """Where /usr/local/bin/nvcc is a script that runs the toolkit's nvcc (as on this project's CI
    machines), the toolkit is found in /usr/local/cuda or /usr/local/cuda-*."""
    from torch.utils import cpp_extension

    toolkits = [
        home
        for home in ("/usr/local/cuda", *Path("/usr/local").glob("cuda-*"))
        if extension_build._is_cuda_toolkit(str(home))
    ]
    if not toolkits:
        pytest.skip("no CUDA toolkit in /usr/local here")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local")
    assert extension_build._cuda_home() in [str(home) for home in toolkits]


def test_cuda_part_compiles_where_nvcc_is_found(built):
    """With a CUDA build of torch and nvcc, the CUDA source compiles and links, GPU or not."""
    reason = extension_build._cuda_unbuildable()
    if reason:
        pytest.skip(f"CUDA part not buildable here: {reason}")
    assert built.cuda_built, built.why_not.get("cuda")


def test_the_cuda_build_names_its_architecture_to_torch(monkeypatch):
    """Without TORCH_CUDA_ARCH_LIST torch guesses from the visible GPUs, and torch 2.4 to 2.8 fail on an
    empty guess (no GPU): the build sets it, for the build alone, unless the user did."""
    from torch.utils import cpp_extension

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    with extension_build._arch_list("90"):
        assert cpp_extension._get_cuda_arch_flags() == ["-gencode=arch=compute_90,code=sm_90"]
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    with extension_build._arch_list("90"):
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0"


def test_a_toolkit_of_another_cuda_major_version_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(extension_build, "_cuda_home", lambda: str(tmp_path))
    monkeypatch.setattr(extension_build, "_is_cuda_toolkit", lambda home: True)
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.48'\n")
    nvcc.chmod(0o755)
    extension_build._nvcc_release.cache_clear()
    reason = extension_build._cuda_unbuildable()
    assert reason == (
        f"nvcc 13.0 (CUDA_HOME={tmp_path}) and this torch's CUDA 12.4 differ in major version; "
        "set CUDA_HOME to a CUDA 12 toolkit"
    )


@pytest.mark.slow
def test_ahead_of_time_build_command():
    """``dualcoop build-extension``, and ``python -m dualcoop_kernels.extension``, its alias."""
    for command in (["dualcoop_kernels", "build-extension"], ["dualcoop_kernels.extension"]):
        finished = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=900)
        assert finished.returncode == 0, finished.stderr[-3000:]
        assert '"cpu_built": true' in finished.stdout
        assert "No CUDA runtime" not in finished.stderr  # torch's warning on a machine without a GPU, muted


def _setuptools_major() -> int:
    """The major version of the setuptools here (0 without one): a build without isolation needs a recent one."""
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return 0


@pytest.mark.slow
def test_an_installed_package_finds_its_sources(tmp_path):
    """A wheel carries csrc/ (schema, cpu/, cuda/, headers) inside the package, where the builder looks."""
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # setuptools writes build/ beside setup.py: not into the checkout
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__"))
    isolation = ["--no-build-isolation"] if _setuptools_major() >= 77 else []  # pyproject.toml's build-system
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, str(source), "-w", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    tracked = sorted(path.relative_to(root / "csrc") for path in (root / "csrc").rglob("*") if path.is_file())
    installed = target / "dualcoop_kernels" / "csrc"
    assert [path for path in tracked if not (installed / path).is_file()] == []
    script = "from dualcoop_kernels.extension.build import _sources; print(_sources())"
    found = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert found.stdout.strip() == str(installed), found.stderr[-2000:]
