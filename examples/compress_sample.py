"""Compress the shipped CIFAR-10 sample three ways and compare what each keeps.

Run: python examples/compress_sample.py [OUTPUT_FOLDER]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import mpsd
from mpsd.data import sample_path


def main(out: Path) -> None:
    with np.load(sample_path("cifar10")) as data:
        images, labels, classes = data["x_train"], data["y_train"], list(data["classes"])
    settings = {
        "bond 4,6,6,4": {"bond": "4,6,6,4"},
        "bond 4,6,6,4 + residual 4,6,6,4": {"bond": "4,6,6,4", "residual_bonds": ["4,6,6,4"]},
        "ratio 0.72 (adaptive)": {"ratio": 0.72},
    }
    print(f"{'setting':34} {'rho':>6} {'bytes/img':>10} {'PSNR dB':>8}")
    for name, options in settings.items():
        path = out / (name.split()[0] + f"-{len(name)}.zarr")
        store = mpsd.compress(images, path, labels=labels, classes=classes, overwrite=True, **options)
        s = store.stats()
        print(f"{name:34} {s.param_ratio:6.3f} {s.bytes_per_image:10.1f} {s.psnr:8.2f}")
    first = store[0]  # decodes one chunk only
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
