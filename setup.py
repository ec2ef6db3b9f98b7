"""Installs the Python package only. Nothing here imports torch: the optional C++/CUDA extension is
built separately (just in time on first use, or ahead of time by its own documented command)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "dualcoop_kernels" / "__init__.py").read_text(), re.M)[1]

setup(
    name="dualcoop_kernels",
    version=VERSION,
    description="Fused Triton and C++/CUDA kernels for the DualCoOp++ multi-label head and asymmetric loss",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    # csrc/ travels inside the package as dualcoop_kernels/csrc, for just-in-time builds of the extension
    packages=[*find_packages(include=["dualcoop_kernels", "dualcoop_kernels.*"]), "dualcoop_kernels.csrc"],
    package_dir={"dualcoop_kernels.csrc": "csrc"},
    package_data={
        "dualcoop_kernels.csrc": ["*.h", "*.cpp", "cpu/*.cpp", "cuda/*.cu"],
        "dualcoop_kernels.data": ["*.json"],
    },
    # Python 3.9 and 3.10 are checked statically (vermin in the README's check line); 3.11 runs
    python_requires=">=3.9",
    # The oldest stack CI tests (constraints/oldest.txt), no upper pins: GPU users keep their own torch.
    install_requires=["torch>=2.6", "numpy>=1.26", 'triton>=3.2; platform_system == "Linux"'],
    entry_points={"console_scripts": ["dualcoop = dualcoop_kernels.cli:main"]},
    extras_require={
        # the model, training and the dualcoop command (torchvision, tqdm); shared prompts in safetensors
        "clip": ["open_clip_torch>=2.26.1", "torchvision>=0.21", "safetensors"],
        "plot": ["matplotlib"],  # pictures of a training run
        "bigearthnet": ["pyarrow"],  # BigEarthNet v2.0's metadata table
        "extension": ["ninja"],  # builds the optional C++/CUDA loss (also needs a C++ compiler)
        # selenium drives Debian's chromium (and chromium-driver) in the report's browser test
        "test": ["pytest", "pytest-benchmark", "ninja", "ruff", "vermin", "matplotlib", "pyarrow", "selenium"],
    },
)
