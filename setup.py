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
    python_requires=">=3.9",
    # No upper pins: GPU users keep their own torch. CI pins live in constraints/cpu.txt.
    install_requires=["torch>=2.4", "numpy", 'triton; platform_system == "Linux"'],
    entry_points={"console_scripts": ["dualcoop = dualcoop_kernels.cli:main"]},
    extras_require={
        # the model, training and the dualcoop command (torchvision, tqdm); shared prompts in safetensors
        "clip": ["open_clip_torch>=2.24", "safetensors"],
        "plot": ["matplotlib"],  # pictures of a training run
        "bigearthnet": ["pyarrow"],  # BigEarthNet v2.0's metadata table
        "extension": ["ninja"],  # builds the optional C++/CUDA loss (also needs a C++ compiler)
        # selenium drives Debian's chromium (and chromium-driver) in the report's browser test
        "test": ["pytest", "pytest-benchmark", "ninja", "ruff", "matplotlib", "pyarrow", "selenium"],
    },
)
