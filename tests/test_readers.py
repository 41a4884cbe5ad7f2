"""Round trips of the shipped reader fixtures (``tests/fixtures``, made by ``make_fixtures.py``).

Each fixture was made from the arrays in ``cifar10_source.npz`` / ``fashion_source.npz`` (cuts of
the real CIFAR-10 and Fashion-MNIST), so reading it must give those arrays back exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mpsd.readers import open_source
from mpsd.readers.cifar import is_cifar, read_cifar
from mpsd.readers.folder import read_folder
from mpsd.readers.idx import is_idx, read_idx

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def cifar_src() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "cifar10_source.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def fashion_src() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "fashion_source.npz") as f:
        return {k: f[k] for k in f.files}


def _all(source):
    return source.read(0, source.n_images)


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("where", ["cifar10", "cifar-10-python.tar.gz"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_fixture_round_trip(where, split, cifar_src):
    source = read_cifar(FIXTURES / where, split=split)
    x, y = cifar_src[f"x_{split}"], cifar_src[f"y_{split}"]
    assert source.n_images == len(x) == (100 if split == "train" else 20)
    assert source.image_shape == (32, 32, 3)
    assert source.dtype == np.uint8
    assert source.channel_axis is True
    np.testing.assert_array_equal(_all(source), x)
    np.testing.assert_array_equal(source.labels, y)
    assert source.labels.dtype == np.int64
    assert source.classes == [str(c) for c in cifar_src["classes"]]


def test_cifar_single_batch_file(cifar_src):
    source = read_cifar(FIXTURES / "cifar10" / "data_batch_2", split="test")  # split ignored
    np.testing.assert_array_equal(_all(source), cifar_src["x_train"][50:100])
    np.testing.assert_array_equal(source.labels, cifar_src["y_train"][50:100])
    assert source.classes[0] == "airplane"


def test_cifar_chunks_match_whole(cifar_src):
    source = read_cifar(FIXTURES / "cifar10")
    chunks = [block for _, block in source.iter_chunks(33)]
    assert [len(c) for c in chunks] == [33, 33, 33, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), cifar_src["x_train"])


def test_cifar_parent_of_extracted_folder(tmp_path, cifar_src):
    shutil.copytree(FIXTURES / "cifar10", tmp_path / "cifar-10-batches-py")
    assert is_cifar(tmp_path)
    source = open_source(tmp_path, split="test")
    np.testing.assert_array_equal(_all(source), cifar_src["x_test"])


# ----------------------------------------------------------------------------- idx


@pytest.mark.parametrize("folder, suffix", [("fashion", ""), ("fashion_gz", ".gz")])
@pytest.mark.parametrize("split, prefix", [("train", "train"), ("test", "t10k")])
def test_idx_fixture_round_trip(folder, suffix, split, prefix, fashion_src):
    by_file = read_idx(FIXTURES / folder / f"{prefix}-images-idx3-ubyte{suffix}")
    by_folder = read_idx(FIXTURES / folder, split=split)
    x, y = fashion_src[f"x_{split}"], fashion_src[f"y_{split}"]
    for source in (by_file, by_folder):
        assert source.n_images == len(x) == (300 if split == "train" else 50)
        assert source.image_shape == (28, 28, 1)
        assert source.channel_axis is False
        np.testing.assert_array_equal(_all(source)[..., 0], x)
        np.testing.assert_array_equal(source.labels, y)


def test_idx_slices(fashion_src):
    source = read_idx(FIXTURES / "fashion" / "train-images-idx3-ubyte")
    np.testing.assert_array_equal(source.read(17, 40)[..., 0], fashion_src["x_train"][17:40])
    assert source.read(299, 300).shape == (1, 28, 28, 1)


# ----------------------------------------------------------------------------- image folder


def test_folder_fixture(cifar_src):
    source = read_folder(FIXTURES / "images")
    classes = [str(c) for c in cifar_src["classes"]]
    assert source.n_images == 24
    assert source.image_shape == (32, 32, 3)
    assert source.conversions == {}
    assert source.skipped == []
    assert source.names[:3] == ["airplane/0003.jpg", "airplane/0003.png", "airplane/0010.png"]
    assert source.classes == sorted({classes[y] for y in cifar_src["y_test"]})
    images = _all(source)
    for name, image, label in zip(source.names, images, source.labels, strict=True):
        cls, file = name.split("/")
        index = int(file[:4])
        assert source.classes[label] == cls == classes[cifar_src["y_test"][index]]
        if file.endswith(".png"):
            np.testing.assert_array_equal(image, cifar_src["x_test"][index])
        else:  # JPEG quality 95: close, not equal
            diff = np.abs(image.astype(int) - cifar_src["x_test"][index])
            assert 0 < diff.mean() < 4


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    "rel, reader",
    [
        ("cifar10", "cifar"),
        ("cifar-10-python.tar.gz", "cifar"),
        ("cifar10/test_batch", "cifar"),
        ("fashion", "idx"),
        ("fashion_gz/train-images-idx3-ubyte.gz", "idx"),
        ("images", "folder"),
    ],
)
def test_detection(rel, reader):
    path = FIXTURES / rel
    assert is_cifar(path) == (reader == "cifar")
    assert is_idx(path) == (reader == "idx")
    source = open_source(path)
    assert source.n_images in (20, 24, 100, 300)
    assert source.path.startswith(str(path))
