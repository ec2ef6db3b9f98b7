import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError(
            "the CUDA suite runs compiled kernels: unset TRITON_INTERPRET (pytest tests/test_cuda_suite.py)"
        )
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA GPU here")
        for item in items:
            item.add_marker(skip)
