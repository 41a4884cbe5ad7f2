"""Torch integration: models, training, a Dataset over stores and the task-specific supplement.

This package is the only place in mpsd that imports :mod:`torch` (the ``mpsd[torch]`` extra).
Importing it without torch installed raises :class:`mpsd.errors.MissingExtraError`, whose message
names the extra.  Other parts of mpsd import it lazily, inside functions, with
``import mpsd.integrations.torch``.

Imported before torch, it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it
(see the comment in the code).

Submodules
----------
models
    ``SmallCNN``, ``ResNet18``, ``VGG16``, ``MobileNetV2`` and :func:`~.models.build_model`.
train
    Recipes, the training loop with early stopping, evaluation, device selection, seeding.
data
    :class:`~.data.StoreDataset` (decodes a store on the fly), :class:`~.data.ArrayDataset`.
supplement
    :func:`~.supplement.learn_bias`: the knowledge-distillation bias of Section 4.2.
"""

from __future__ import annotations

import os
import sys

from mpsd.errors import MissingExtraError

if "torch" not in sys.modules:
    # torch's OpenMP threads spin while waiting for work by default; on a small machine shared with
    # other processes that makes training several times slower.  Passive waiting costs nothing
    # measurable when the machine is idle.  An explicit setting in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import torch as _torch
except ImportError as _exc:  # pragma: no cover - torch is installed in CI
    raise MissingExtraError("torch", "torch", "mpsd supplement") from _exc

__all__ = ["torch_version"]


def torch_version() -> str:
    """The installed torch version, e.g. ``"2.13.0+cpu"``."""
    return str(_torch.__version__)
