"""Building and loading the C++/CUDA extension of the asymmetric loss, and its status.

The sources are in ``csrc/``: ``asl.cpp`` declares the operators, ``cpu/`` and ``cuda/`` hold their
kernels, ``asl_math.h`` the element math both share. They are compiled with ninja by
``torch.utils.cpp_extension.load`` into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), which later processes reuse. The first loss call that considers the
extension (``backend="auto"`` or ``"extension"``) builds it, once a process, unless
``DUALCOOP_KERNELS_NO_BUILD=1``; ahead of time: ``python -m dualcoop_kernels.extension``. A build
that fails leaves the PyTorch path running, with one warning that says why.

The CPU part (the schemas and the CPU kernels) comes first; the CUDA part is built where torch has CUDA
and nvcc is found, for the visible GPU's architecture (sm_90 when there is none, which still checks that
it compiles).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import glob
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .loss import register_python_side

DEFAULT_CUDA_ARCH = "90"  # compiled for when no GPU is visible
SOURCE_SUFFIXES = (".h", ".cpp", ".cu")
SCHEMA = "asl.cpp"  # beside asl_math.h and asl_host.h; the kernels in cpu/ and cuda/
PARTS = ("cpu", "cuda")  # each needs the ones before it
NOT_BUILT_YET = (
    "not built for these sources yet: the first loss call that considers it builds it, about a minute, "
    "once (or ahead of time: python -m dualcoop_kernels.extension)"
)
LOG = logging.getLogger("dualcoop_kernels")


@functools.cache
def _cpp_extension():
    """torch.utils.cpp_extension, imported without the warning it logs on a machine without a GPU
    ("No CUDA runtime is found"), which says nothing wrong: the CUDA part compiles without one."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _sources() -> Path:
    """``csrc`` inside the installed package, or beside it in a source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / SCHEMA).exists():
            return candidate
    raise FileNotFoundError(
        f"the extension's sources ({SCHEMA}) are not in {package / 'csrc'} or {package.parent / 'csrc'}"
    )


@functools.cache
def _cpu_flags() -> tuple[str, list[str], list[str]]:
    """The CPU library's name and compile and link flags: OpenMP (ATen's parallel_for is OpenMP in
    its headers, serial without the flag), -ffast-math and glibc's vector exp and log (libmvec, which
    glibc declares only under -ffast-math) for the instruction set this machine has, which the name
    records. Without the finite-math part of -ffast-math the element loop runs at half speed: GCC
    moves the floors of the exponents past exp, whose underflowing arguments take a slow path.
    csrc/asl_math.h tests for NaN by its bits, which that assumption cannot remove."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    cflags = ["-O3", "-ffast-math", "-fopenmp"]
    ldflags = ["-fopenmp"]
    if platform.machine() == "x86_64" and capability.startswith("avx"):
        cflags += ["-mavx2", "-mfma", "-mf16c"]
        capability = "avx2"
    if ctypes.util.find_library("mvec"):
        ldflags.append("-lmvec")
    return f"dualcoop_asl_cpu_{capability}", cflags, ldflags


def _cuda_arch() -> str:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}{minor}"
    return os.environ.get("DUALCOOP_CUDA_ARCH", DEFAULT_CUDA_ARCH)


@contextlib.contextmanager
def _arch_list(arch: str | None):
    """TORCH_CUDA_ARCH_LIST as the architecture built for (e.g. "9.0" for "90") while torch builds, unless
    the user set it: unset, torch 2.4 to 2.8 fail on a machine without a GPU (an empty list)."""
    if arch is None or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        yield
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{arch[:-1]}.{arch[-1]}"
    try:
        yield
    finally:
        del os.environ["TORCH_CUDA_ARCH_LIST"]


def _is_cuda_toolkit(home: str | None) -> bool:
    return (
        bool(home)
        and (Path(home) / "bin" / "nvcc").exists()
        and any((Path(home) / folder / "libcudart.so").exists() for folder in ("lib64", "lib"))
    )


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(number) for number in re.findall(r"\d+", Path(path).name))


def _cuda_home() -> str | None:
    """The CUDA toolkit to build with. ``CUDA_HOME`` (or ``CUDA_PATH``) when set, as torch reads it.
    Otherwise torch's guess, which is the folder above the first nvcc on PATH, when that is a whole
    toolkit; else the toolkit behind that nvcc (a link), ``/usr/local/cuda`` or the newest
    ``/usr/local/cuda-*``. torch's guess alone misses a toolkit whose nvcc is linked or wrapped
    from ``/usr/local/bin``."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit
    cpp_extension = _cpp_extension()
    nvcc = shutil.which("nvcc")
    candidates = [
        cpp_extension.CUDA_HOME,
        str(Path(nvcc).resolve().parent.parent) if nvcc else None,
        "/usr/local/cuda",
        *sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True),
    ]
    return next((home for home in candidates if _is_cuda_toolkit(home)), cpp_extension.CUDA_HOME)


def _cuda_unbuildable() -> str | None:
    if torch.version.cuda is None:
        return "this torch has no CUDA"
    home = _cuda_home()
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        return f"nvcc not found (CUDA_HOME={home}); set CUDA_HOME to a CUDA toolkit"
    if not _is_cuda_toolkit(home):
        return f"CUDA_HOME={home} has no lib64/libcudart.so to link; set CUDA_HOME to a CUDA toolkit"
    release = _nvcc_release(home)
    if release is not None and release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return (
            f"nvcc {release} (CUDA_HOME={home}) and this torch's CUDA {torch.version.cuda} differ in major "
            f"version; set CUDA_HOME to a CUDA {torch.version.cuda.split('.')[0]} toolkit"
        )
    return None


@functools.cache
def _nvcc_release(home: str) -> str | None:
    """The CUDA release of a toolkit's nvcc ("13.0"), None when it does not say."""
    try:
        banner = subprocess.run([str(Path(home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True)
    except OSError:
        return None
    found = re.search(r"release (\d+\.\d+)", banner.stdout)
    return found[1] if found else None


@functools.cache
def _ninja_missing() -> bool:
    return not _cpp_extension().is_ninja_available()


def _unbuildable() -> str | None:
    """Why nothing can be built here now (None when the CPU part can be): builds switched off, or no
    compiler, or no ninja."""
    if os.environ.get("DUALCOOP_KERNELS_NO_BUILD") == "1":
        return "DUALCOOP_KERNELS_NO_BUILD=1 stops builds"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} (CXX) is not found"
    if _ninja_missing():
        return "ninja is not installed (pip install ninja)"
    return None


def _keyed(name: str, **load_arguments) -> str:
    """A library's name with a digest of what it is built from: the sources' contents, the flags, the
    compiler and torch's version. Two installs of the package (two checkouts, a checkout and a wheel)
    thus never rebuild each other's library in the shared extension cache, and a library is rebuilt
    exactly when something it is made of changed."""
    digest = hashlib.sha256(
        f"{torch.__version__} {os.environ.get('CXX', 'c++')} {sorted(load_arguments.items())}".encode()
    )
    sources = _sources()
    for source in sorted(path for path in sources.rglob("*") if path.suffix in SOURCE_SUFFIXES):
        digest.update(str(source.relative_to(sources)).encode() + b"\0" + source.read_bytes())
    return f"{name}_{digest.hexdigest()[:12]}"


def _cuda_include_paths() -> list[str]:
    """pip's CUDA headers (nvidia/cu13/include and the like), which torch's own headers may need."""
    try:
        import nvidia
    except ImportError:
        return []
    return [str(path) for root in nvidia.__path__ for path in Path(root).glob("cu*/include")]


def _build_directory(name: str) -> Path:
    return Path(_cpp_extension()._get_build_directory(name, verbose=False))


@dataclass
class ExtensionStatus:
    """What :func:`extension_status` reports."""

    cpu_built: bool = False
    cuda_built: bool = False
    cpu_library: str | None = None
    cuda_library: str | None = None
    cache_directory: str | None = None
    why_not: dict = field(default_factory=dict)  # part -> reason it is missing

    def as_dict(self) -> dict:
        """The status as a plain dict: what :func:`extension_status` returns and ``dualcoop build-extension``
        prints as JSON."""
        return asdict(self)


class _Loader:
    """Loads and builds the two parts, at most once a process each: the loss asks on every call."""

    def __init__(self):
        self.status = ExtensionStatus()
        self.looked = False  # the cache has been looked at
        self.build_tried: set[str] = set()
        self.failed: set[str] = set()  # parts whose build failed: it would fail the same way again

    def built(self, part: str) -> bool:
        return getattr(self.status, f"{part}_built")

    def load(self, build: tuple[str, ...] = ()) -> ExtensionStatus:
        """Load the parts that are built; build those named in ``build`` first if they are missing or
        stale. The CUDA part needs the CPU part, which defines the operators."""
        wanted = set(build) - self.build_tried
        if self.looked and not wanted:
            return self.status
        self.looked = True
        self.build_tried |= wanted
        name, cflags, ldflags = _cpu_flags()
        sources = _sources()
        cpu = dict(
            sources=[str(sources / SCHEMA), str(sources / "cpu" / "asl_cpu.cpp")],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
        )
        self.status.cache_directory = str(_build_directory(name).parent)
        if not self._load_part("cpu", _keyed(name, **cpu), "cpu" in build, **cpu):
            return self.status
        register_python_side()
        reason = _cuda_unbuildable()
        if reason:
            self.status.why_not["cuda"] = reason
            return self.status
        arch = _cuda_arch()
        cuda = dict(
            sources=[str(sources / "cuda" / "asl_cuda.cu")],
            extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
            extra_include_paths=_cuda_include_paths(),
        )
        self._load_part("cuda", _keyed(f"dualcoop_asl_cuda_sm{arch}", **cuda), "cuda" in build, **cuda)
        return self.status

    def _load_part(self, part: str, name: str, build: bool, **load_arguments) -> bool:
        """Load one part from the cache, building it first if asked to and it is missing or stale."""
        cpp_extension = _cpp_extension()
        if self.built(part):
            return True
        if part in self.failed:
            return False
        library = _build_directory(name) / f"{name}.so"
        if not library.exists():
            if not build:  # loading would compile
                reason = _unbuildable()
                self.status.why_not[part] = (
                    f"not built, and it cannot be built here: {reason}" if reason else NOT_BUILT_YET
                )
                return False
            reason = _unbuildable()
            if reason:
                self.status.why_not[part] = f"cannot be built here: {reason}"
                self.failed.add(part)
                return False
            LOG.warning(
                "dualcoop_kernels: building the %s part of the asymmetric-loss extension, about a minute, once "
                "for these sources, flags and torch (cached in %s)",
                part.upper(),
                library.parent,
            )
        if part == "cuda":  # torch builds with its own guess of the toolkit, read when it compiles
            cpp_extension.CUDA_HOME = _cuda_home()
        try:
            with _arch_list(_cuda_arch() if part == "cuda" else None):
                cpp_extension.load(name=name, is_python_module=False, verbose=False, **load_arguments)
        except Exception as error:  # a compiler error, a link error
            self.status.why_not[part] = f"build failed: {str(error).strip()[-2000:]}"
            self.failed.add(part)
            return False
        setattr(self.status, f"{part}_built", True)
        setattr(self.status, f"{part}_library", str(library))
        self.status.why_not.pop(part, None)
        return True


_LOADER = _Loader()


def build_extension() -> ExtensionStatus:
    """Build (or load from the cache) every part this machine can build, and say what happened.
    ``dualcoop build-extension`` prints it."""
    return _LOADER.load(build=PARTS)


def build_and_print() -> int:
    """``dualcoop build-extension`` (and ``python -m dualcoop_kernels.extension``, which needs torch
    alone): build, print the status as JSON; 1 when the CPU part could not be built."""
    status = build_extension()
    print(json.dumps(status.as_dict(), indent=2))
    return 0 if status.cpu_built else 1


def extension_status() -> dict:
    """What of the extension is loaded in this process or built in the cache, where the cache is, and
    why a part is missing. Loads what is already built; never compiles."""
    return _LOADER.load().as_dict()


@functools.cache
def _warn_once(part: str) -> None:
    warnings.warn(
        f"dualcoop_kernels: the {part.upper()} part of the asymmetric-loss extension is not available, so "
        f"the PyTorch path runs instead: {_LOADER.status.why_not.get(part, 'unknown reason')[-600:]} "
        "(dualcoop_kernels.extension_status() tells more)",
        stacklevel=5,
    )


def _parts_for(device: torch.device) -> tuple[str, ...]:
    """The parts a device's kernels need: its own and those before it."""
    return PARTS[: PARTS.index(device.type) + 1]


def prepare(device: torch.device) -> None:
    """Before the loss considers the extension for a device: build what it needs, once a process, and
    warn once if that fails. ``DUALCOOP_KERNELS_NO_BUILD=1`` keeps it to what is built already."""
    if device.type not in PARTS or _LOADER.built(device.type):
        return
    builds_allowed = os.environ.get("DUALCOOP_KERNELS_NO_BUILD") != "1"
    _LOADER.load(build=_parts_for(device) if builds_allowed else ())
    broken = next((part for part in _parts_for(device) if part in _LOADER.failed), None)
    if broken:
        _warn_once(broken)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the extension cannot run on this device (None when it can: built, or to be built by the
    first call that considers it, which :func:`prepare` does); never compiles."""
    if device.type not in PARTS:
        return f"it has kernels for the CPU and CUDA only, not {device.type}"
    _LOADER.load()  # what is in the cache, looked at once
    if _LOADER.built(device.type):
        return None
    broken = next((part for part in _parts_for(device) if part in _LOADER.failed), None)
    if broken is None:
        reason = _unbuildable() or (_cuda_unbuildable() if device.type == "cuda" else None)
        if reason is None:
            return None
        return f"not built, and it cannot be built here: {reason}"
    return _LOADER.status.why_not.get(broken, "it is not built")
