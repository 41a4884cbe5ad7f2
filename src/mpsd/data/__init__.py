"""Small real datasets shipped with mpsd (see ``SOURCES.md`` beside this file).

``cifar10_sample.npz``
    CIFAR-10: the first 400 training and first 100 test images (32×32 RGB), original pixels.
``fashion_mnist_sample.npz``
    Fashion-MNIST: the first 2,000 training and first 500 test images (28×28 grey).

Both hold ``x_train``, ``y_train``, ``x_test``, ``y_test`` and ``classes``.  On the command line
they are reachable as ``sample:cifar10`` and ``sample:fashion-mnist``.
"""

from __future__ import annotations

from pathlib import Path

SAMPLES = {
    "cifar10": "cifar10_sample.npz",
    "fashion-mnist": "fashion_mnist_sample.npz",
}


def sample_path(name: str) -> Path:
    """Path of a shipped sample dataset (``"cifar10"`` or ``"fashion-mnist"``)."""
    from mpsd.errors import InputError

    key = name.lower().replace("_", "-")
    if key not in SAMPLES:
        raise InputError(f"sample:{name}: unknown sample dataset (choose from {', '.join(sorted(SAMPLES))})")
    return Path(__file__).with_name(SAMPLES[key])
