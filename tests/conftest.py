import os
import shutil

# Triton must see this before it is first imported: with no GPU, kernels run in its CPU interpreter.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

SEED = int(os.environ.get("DUALCOOP_TEST_SEED", "0"))


def pytest_report_header(config):
    return (
        f"dualcoop_kernels: seed {SEED} (DUALCOOP_TEST_SEED), "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, torch {torch.__version__}"
    )


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws fresh random inputs from a known seed, so a failure can be replayed."""
    torch.manual_seed(SEED)
