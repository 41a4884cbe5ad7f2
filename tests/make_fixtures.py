"""Regenerate ``tests/fixtures/`` from the datasets in ``../shared/data`` (not needed by the tests).

Run from the repository root::

    .venv/bin/python tests/make_fixtures.py [--data ../shared/data]

It writes small *real* fixtures, byte-reproducible (fixed timestamps, gzip mtime 0):

- ``cifar10/``: ``data_batch_1`` and ``data_batch_2`` (CIFAR-10 train images 0–49 and 50–99),
  ``test_batch`` (test images 0–19) and ``batches.meta``, pickled like the originals: a dict
  with ``b'batch_label'``, ``b'labels'``, ``b'data'`` (uint8, (N, 3072), channel-planar rows),
  ``b'filenames'``, protocol 2;
- ``cifar-10-python.tar.gz``: the same four files under ``cifar-10-batches-py/``;
- ``cifar10_source.npz``: the arrays they were made from (x_train (100, 32, 32, 3), y_train,
  x_test (20, 32, 32, 3), y_test, classes);
- ``fashion/`` and ``fashion_gz/``: Fashion-MNIST train images 0–299 and test images 0–49 as idx
  files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-…``), raw and ``.gz``;
- ``fashion_source.npz``: x_train (300, 28, 28), y_train, x_test (50, 28, 28), y_test, classes;
- ``images/``: CIFAR-10 test images 0–19 as ``<class>/<index>.png`` plus four ``.jpg`` copies
  (``<class>/<index>.jpg``, quality 95), for the folder reader.
"""

from __future__ import annotations

import argparse
import gzip
import io
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
N_TRAIN_CIFAR, PER_BATCH, N_TEST_CIFAR = 100, 50, 20
N_TRAIN_FASHION, N_TEST_FASHION = 300, 50
JPEG_COPIES = (0, 3, 7, 11)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez_compressed`` but byte-reproducible (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) → (N, 3072) channel-planar rows, as CIFAR stores them."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def cifar_batch(images: np.ndarray, labels: np.ndarray, batch_label: str, first: int) -> bytes:
    batch = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": cifar_rows(images),
        b"filenames": [f"fixture_{first + i:05d}.png".encode() for i in range(len(images))],
    }
    return pickle.dumps(batch, protocol=2)


def idx_bytes(values: np.ndarray) -> bytes:
    """idx encoding of a uint8 array: 00 00 08 ndim, big-endian sizes, values."""
    assert values.dtype == np.uint8
    head = bytes([0, 0, 0x08, values.ndim]) + b"".join(d.to_bytes(4, "big") for d in values.shape)
    return head + values.tobytes()


def make_cifar(data: Path) -> None:
    src = np.load(data / "cifar10.npz")
    x_train, y_train = src["x_train"][:N_TRAIN_CIFAR], src["y_train"][:N_TRAIN_CIFAR]
    x_test, y_test = src["x_test"][:N_TEST_CIFAR], src["y_test"][:N_TEST_CIFAR]
    classes = [str(c) for c in src["classes"]]
    files = {}
    for k in range(N_TRAIN_CIFAR // PER_BATCH):
        sl = slice(k * PER_BATCH, (k + 1) * PER_BATCH)
        files[f"data_batch_{k + 1}"] = cifar_batch(
            x_train[sl], y_train[sl], f"training batch {k + 1} of 5", k * PER_BATCH
        )
    files["test_batch"] = cifar_batch(x_test, y_test, "testing batch 1 of 1", 0)
    files["batches.meta"] = pickle.dumps(
        {
            b"num_cases_per_batch": PER_BATCH,
            b"label_names": [c.encode() for c in classes],
            b"num_vis": 3072,
        },
        protocol=2,
    )
    folder = FIXTURES / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name in ("batches.meta", *sorted(n for n in files if n != "batches.meta")):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size, info.mtime, info.mode = len(files[name]), 0, 0o644
            tf.addfile(info, io.BytesIO(files[name]))
    (FIXTURES / "cifar-10-python.tar.gz").write_bytes(gzip.compress(tar.getvalue(), 9, mtime=0))
    write_npz(
        FIXTURES / "cifar10_source.npz",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        classes=np.array(classes),
    )

    images = FIXTURES / "images"
    shutil.rmtree(images, ignore_errors=True)
    for i, (img, label) in enumerate(zip(x_test, y_test, strict=True)):
        cls = images / classes[label]
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(cls / f"{i:04d}.png", optimize=True)
        if i in JPEG_COPIES:
            Image.fromarray(img).save(cls / f"{i:04d}.jpg", quality=95)


def make_fashion(data: Path) -> None:
    src = np.load(data / "fashion_mnist.npz")
    x_train, y_train = src["x_train"][:N_TRAIN_FASHION], src["y_train"][:N_TRAIN_FASHION]
    x_test, y_test = src["x_test"][:N_TEST_FASHION], src["y_test"][:N_TEST_FASHION]
    files = {
        "train-images-idx3-ubyte": idx_bytes(x_train),
        "train-labels-idx1-ubyte": idx_bytes(y_train.astype(np.uint8)),
        "t10k-images-idx3-ubyte": idx_bytes(x_test),
        "t10k-labels-idx1-ubyte": idx_bytes(y_test.astype(np.uint8)),
    }
    raw, gz = FIXTURES / "fashion", FIXTURES / "fashion_gz"
    raw.mkdir(parents=True, exist_ok=True)
    gz.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (raw / name).write_bytes(blob)
        (gz / f"{name}.gz").write_bytes(gzip.compress(blob, 9, mtime=0))
    write_npz(
        FIXTURES / "fashion_source.npz",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        classes=np.array([str(c) for c in src["classes"]]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    args = parser.parse_args()
    FIXTURES.mkdir(exist_ok=True)
    make_cifar(args.data)
    make_fashion(args.data)
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"wrote {FIXTURES} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
