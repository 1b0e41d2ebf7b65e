"""Shared fixtures: the real MNIST files beside the repository (never downloaded in tests)."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"


@pytest.fixture(scope="session")
def mnist_dir():
    """The directory holding the four gzipped MNIST IDX files (../shared/mnist)."""
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {SHARED_MNIST}")
    return str(SHARED_MNIST)
