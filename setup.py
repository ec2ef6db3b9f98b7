"""What the package's metadata (pyproject.toml) cannot say: csrc/ travels inside the package as
dualcoop_kernels/csrc, for just-in-time builds of the optional C++/CUDA extension. Nothing here imports
torch: the extension is built separately (on first use, or by ``dualcoop build-extension``)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["dualcoop_kernels", "dualcoop_kernels.*"]), "dualcoop_kernels.csrc"],
    package_dir={"dualcoop_kernels.csrc": "csrc"},
    package_data={
        "dualcoop_kernels": ["py.typed"],
        "dualcoop_kernels.csrc": ["*.h", "*.cpp", "cpu/*.cpp", "cuda/*.cu"],
        "dualcoop_kernels.data": ["*.json"],
    },
)
