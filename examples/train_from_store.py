"""Train a classifier straight from an mpsd store, without writing the images back to disk.

Needs the torch extra (``pip install "mpsd[torch]"``, which pins torch 2.13.0).

Run: python examples/train_from_store.py [OUTPUT_FOLDER]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import mpsd
from mpsd.data import sample_path


def main(out: Path) -> None:
    # mpsd's torch integration first: imported before torch, it keeps torch's idle threads from
    # spinning (OMP_WAIT_POLICY=PASSIVE), which matters on a small shared machine
    from mpsd.integrations.torch.data import StoreDataset  # isort: skip

    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    with np.load(sample_path("fashion-mnist")) as data:
        x_train, y_train = data["x_train"], data["y_train"]
        x_test, y_test, classes = data["x_test"], data["y_test"], list(data["classes"])

    # 30 % of the parameters; labels and class names go into the store with the images
    store = mpsd.compress(x_train, out / "fm.zarr", ratio=0.3, labels=y_train, classes=classes, overwrite=True, metrics=False)
    stats = store.stats()
    print(f"{store.path}: {len(store)} images in {stats.bytes_on_disk:,} bytes ({stats.byte_ratio:.1%} of the raw bytes)")

    # batches are decoded on the fly (x: float32 (C, H, W) in [0, 1], y: the stored label);
    # num_workers > 0 works too: each worker opens the store itself
    torch.manual_seed(0)
    loader = DataLoader(StoreDataset(store.path), batch_size=64, shuffle=True, num_workers=0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, len(classes)),
    )  # fmt: skip
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for epoch in range(3):
        total = 0.0
        for x, y in loader:
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(y)
        print(f"epoch {epoch + 1}: training loss {total / len(store):.3f}")

    # tested on the untouched test images
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x_test).float().div(255).unsqueeze(1))
    accuracy = float((logits.argmax(1).numpy() == y_test).mean())
    print(f"test accuracy {accuracy:.1%} on {len(y_test)} test images (trained on {len(store)} compressed images)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
