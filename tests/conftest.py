import os

# The main suite runs the Triton kernels on CPU tensors in Triton's interpreter, on any machine: a
# process-wide choice, read when triton is first imported, so it is made here, before any import.
# The CUDA suite (tests/cuda) runs compiled kernels on a GPU, in a process of its own
# (tests/test_cuda_suite.py starts it where there is a GPU).
CUDA_SUITE = os.environ.get("DUALCOOP_CUDA_SUITE") == "1"
if not CUDA_SUITE:
    os.environ["TRITON_INTERPRET"] = "1"
collect_ignore = [] if CUDA_SUITE else ["cuda"]

import pytest  # noqa: E402
import torch  # noqa: E402

SEED = int(os.environ.get("DUALCOOP_TEST_SEED", "0"))


def pytest_report_header(config):
    return (
        f"dualcoop_kernels: seed {SEED} (DUALCOOP_TEST_SEED), "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, torch {torch.__version__}"
    )


@pytest.fixture(autouse=True, scope="session")
def user_cache(tmp_path_factory):
    """The record of checked images (data/image_check.py) goes to a folder of the tests', not the user's."""
    os.environ["DUALCOOP_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws fresh random inputs from a known seed, so a failure can be replayed."""
    torch.manual_seed(SEED)


@pytest.fixture(scope="module")
def small_task(tmp_path_factory):
    """The synthetic task, small: 96 training and 32 test images of coloured shapes, a tiny CLIP."""
    from dualcoop_kernels.data.shapes import write_shapes, write_tiny_clip

    root = tmp_path_factory.mktemp("shapes")
    return dict(
        root=root,
        train=write_shapes(root, 96, seed=0),
        test=write_shapes(root, 32, seed=1, name="test.csv"),
        clip=write_tiny_clip(root),
    )
