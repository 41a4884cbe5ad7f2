from __future__ import annotations

import numpy as np
import pytest

from mpsd.data import sample_path


@pytest.fixture(scope="session")
def cifar() -> dict[str, np.ndarray]:
    """Real CIFAR-10 images shipped with the package (400 train, 100 test, 32×32×3 uint8)."""
    with np.load(sample_path("cifar10")) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def fashion() -> dict[str, np.ndarray]:
    """Real Fashion-MNIST images shipped with the package (2,000 train, 500 test, 28×28 uint8)."""
    with np.load(sample_path("fashion-mnist")) as data:
        return {k: data[k] for k in data.files}
