"""idx reader: RELIABILITY.md rows D19 (hostile headers) and D20 (count mismatch, gzip bombs)."""

from __future__ import annotations

import gzip
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from mpsd.errors import InputError
from mpsd.readers import idx as idx_mod
from mpsd.readers import open_source
from mpsd.readers.idx import is_idx, parse_header, read_idx

FIXTURES = Path(__file__).parent / "fixtures"


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def header(dims: tuple[int, ...], code: int = 0x08, ndim: int | None = None) -> bytes:
    ndim = len(dims) if ndim is None else ndim
    return bytes([0, 0, code, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)


def idx_file(values: np.ndarray) -> bytes:
    return header(values.shape) + values.astype(np.uint8).tobytes()


def write(path: Path, blob: bytes, gz: bool = False) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob, 6, mtime=0)
    path.write_bytes(blob)
    return path


class _PeakMemory:
    """Peak traced allocation (bytes) inside the block; numpy reports to tracemalloc."""

    def __enter__(self):
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        self.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


# ----------------------------------------------------------------------------- happy paths


def test_4d_images_keep_channel_axis(tmp_path):
    x = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    path = write(tmp_path / "x-images-idx4-ubyte", idx_file(x))
    write(tmp_path / "x-labels-idx1-ubyte", idx_file(np.array([1, 7])))
    source = read_idx(path)
    assert source.channel_axis is True and source.image_shape == (3, 4, 3)
    np.testing.assert_array_equal(source.read(0, 2), x)
    assert source.labels.tolist() == [1, 7]


def test_images_without_labels_file(tmp_path):
    x = np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5)
    source = read_idx(write(tmp_path / "foo-images-idx3-ubyte", idx_file(x), gz=True))
    assert source.labels is None
    np.testing.assert_array_equal(source.read(0, 2)[..., 0], x)


def test_labels_found_raw_or_gz(tmp_path):
    x = np.zeros((3, 2, 2), np.uint8)
    images = write(tmp_path / "train-images.idx3-ubyte", idx_file(x))  # Kaggle spelling
    write(tmp_path / "train-labels.idx1-ubyte", idx_file(np.array([4, 5, 6])), gz=True)
    assert read_idx(images).labels.tolist() == [4, 5, 6]
    assert read_idx(tmp_path).labels.tolist() == [4, 5, 6]


def test_is_idx(tmp_path):
    assert is_idx(FIXTURES / "fashion") and is_idx(FIXTURES / "fashion_gz")
    assert is_idx(FIXTURES / "fashion" / "t10k-labels-idx1-ubyte")
    assert not is_idx(FIXTURES / "cifar10")
    assert not is_idx(FIXTURES / "images")
    assert not is_idx(FIXTURES / "cifar10_source.npz")
    plain = write(tmp_path / "data.bin", idx_file(np.zeros((1, 2, 2), np.uint8)))
    assert is_idx(plain)  # by magic
    assert not is_idx(write(tmp_path / "other.bin", b"\x00\x00\x08\x09" + bytes(40)))
    assert not is_idx(tmp_path / "missing")


def test_folder_choices(tmp_path):
    with pytest.raises(
        InputError, match=r"no test images file \(like t10k-images-idx3-ubyte\[.gz\]\)"
    ):
        read_idx(_only_train(tmp_path), split="test")
    for name in ("emnist-digits-train-images-idx3-ubyte", "emnist-letters-train-images-idx3-ubyte"):
        write(tmp_path / name, idx_file(np.zeros((1, 2, 2), np.uint8)))
    with pytest.raises(InputError, match="several train images files"):
        read_idx(tmp_path)
    with pytest.raises(InputError, match="split must be 'train' or 'test'"):
        read_idx(FIXTURES / "fashion", split="valid")


def _only_train(tmp_path: Path) -> Path:
    folder = tmp_path / "only_train"
    folder.mkdir()
    shutil.copy(FIXTURES / "fashion" / "train-images-idx3-ubyte", folder)
    return folder


def test_raw_preferred_over_gz(tmp_path):
    shutil.copy(FIXTURES / "fashion" / "train-images-idx3-ubyte", tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"broken")
    assert open_source(tmp_path).n_images == 300


# ----------------------------------------------------------------------------- D19 headers


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x01\x00\x08\x03" + bytes(20), "not an idx file (magic starts 0100, expected 0000)"),
        (b"\x89PNG\r\n\x1a\n" + bytes(20), "not an idx file (magic starts 8950, expected 0000)"),
        (
            header((1, 2, 2), code=0x0B) + bytes(8),
            "idx type 0x0b (short (int16)) is not supported; mpsd reads unsigned-byte (0x08) idx files",
        ),
        (
            header((1, 2, 2), code=0x0D) + bytes(16),
            "idx type 0x0d (float (float32)) is not supported",
        ),
        (header((1, 2, 2), code=0x42) + bytes(4), "unknown idx type code 0x42"),
        (header((), ndim=0) + bytes(8), "idx ndim 0 is outside 1..4"),
        (header((1, 1, 1, 1, 1)) + bytes(1), "idx ndim 5 is outside 1..4"),
        (header((1, 2, 2))[:10], "truncated idx header (10 of 16 bytes)"),
        (b"\x00\x00", "too short for an idx header (2 bytes)"),
        (
            header((2, 2, 2)) + bytes(7),
            "header declares (2, 2, 2) = 8 bytes of data but the file holds",
        ),
        (
            header((2, 2, 2)) + bytes(9),
            "header declares (2, 2, 2) = 8 bytes of data but the file holds",
        ),
        (header((0, 28, 28)), "holds no images (sizes (0, 28, 28))"),
        (header((3,)) + bytes(3), "a 1-D idx file holds labels, not images; pass the images file"),
        (header((3, 4)) + bytes(12), "a 2-D idx file (N, 4) is not images"),
        (header((1, 2, 2, 5)) + bytes(20), "4-D idx images need 1..4 channels, found 5"),
    ],
)
def test_d19_bad_headers(tmp_path, blob, message, gz):
    path = write(tmp_path / "x-images-idx3-ubyte", blob, gz=gz)
    with pytest.raises(InputError) as exc:
        read_idx(path)
    assert one_line(exc).startswith(f"{path}: {message}")


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_d19_header_claiming_2_to_32_dims_allocates_nothing(tmp_path, gz):
    big = 2**32 - 1
    path = write(tmp_path / "x-images-idx3-ubyte", header((big, big, big)) + bytes(64), gz=gz)
    with _PeakMemory() as mem, pytest.raises(InputError) as exc:
        read_idx(path)
    msg = one_line(exc)
    assert f"declares ({big}, {big}, {big}) = {big**3} bytes" in msg
    assert mem.peak < 1_000_000


def test_d19_sparse_file_over_the_cap(tmp_path):
    dims = (2**20, 256, 256)  # 64 GiB, matching the apparent file size
    path = tmp_path / "x-images-idx3-ubyte"
    with open(path, "wb") as f:
        f.write(header(dims))
        try:
            f.truncate(len(header(dims)) + 2**36)
        except OSError:
            pytest.skip("file system without sparse files")
    with _PeakMemory() as mem, pytest.raises(InputError) as exc:
        read_idx(path)
    assert (
        one_line(exc)
        == f"{path}: {2**36} bytes of data is over the cap of {idx_mod.MAX_DATA_BYTES}"
    )
    assert mem.peak < 1_000_000


def test_d19_sparse_file_under_the_cap_is_read_lazily(tmp_path):
    dims = (2**16, 64, 64)  # 256 MiB of holes
    path = tmp_path / "x-images-idx3-ubyte"
    with open(path, "wb") as f:
        f.write(header(dims))
        f.truncate(len(header(dims)) + 2**28)
    with _PeakMemory() as mem:
        source = read_idx(path)
        block = source.read(10, 12)
    assert source.n_images == 2**16 and block.shape == (2, 64, 64, 1) and not block.any()
    assert mem.peak < 1_000_000


def test_parse_header_direct():
    assert parse_header(header((60000, 28, 28)), where="f").dims == (60000, 28, 28)
    with pytest.raises(InputError, match=r"^f: idx ndim 0"):
        parse_header(b"\x00\x00\x08\x00", where="f")


# ----------------------------------------------------------------------------- D20 counts, gz


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_d20_count_mismatch(tmp_path, gz):
    images = write(
        tmp_path / "train-images-idx3-ubyte", idx_file(np.zeros((10, 2, 2), np.uint8)), gz=gz
    )
    write(tmp_path / "train-labels-idx1-ubyte", idx_file(np.zeros(9, np.uint8)), gz=gz)
    with pytest.raises(InputError) as exc:
        read_idx(images)
    suffix = ".gz" if gz else ""
    assert (
        one_line(exc) == f"{images}: 10 images but train-labels-idx1-ubyte{suffix} holds 9 labels"
    )


def test_d20_bad_labels_file(tmp_path):
    images = write(tmp_path / "train-images-idx3-ubyte", idx_file(np.zeros((2, 2, 2), np.uint8)))
    labels = write(tmp_path / "train-labels-idx1-ubyte", idx_file(np.zeros((2, 1), np.uint8)))
    with pytest.raises(InputError, match=r"labels must be 1-D, found sizes \(2, 1\)"):
        read_idx(images)
    labels.write_bytes(header((2,), code=0x0C) + bytes(8))
    with pytest.raises(InputError) as exc:
        read_idx(images)
    assert one_line(exc).startswith(f"{labels}: idx type 0x0c")


def test_d20_gzip_bomb(tmp_path):
    """Header says 10 images of 28x28; the stream inflates to 64 MiB of zeros."""
    blob = header((10, 28, 28)) + bytes(64 * 2**20)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(blob, 9, mtime=0))
    assert path.stat().st_size < 200_000
    t0 = time.perf_counter()
    with _PeakMemory() as mem, pytest.raises(InputError) as exc:
        read_idx(path)
    assert (
        one_line(exc)
        == f"{path}: header declares (10, 28, 28) = 7840 bytes of data but the file holds more"
    )
    assert mem.peak < 2_000_000
    assert time.perf_counter() - t0 < 2


def test_d20_gz_header_over_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_mod, "MAX_GZ_DATA_BYTES", 1000)
    path = write(
        tmp_path / "x-images-idx3-ubyte", idx_file(np.zeros((2, 30, 30), np.uint8)), gz=True
    )
    with pytest.raises(
        InputError, match=r"declares \(2, 30, 30\) = 1800 bytes, over the cap of 1000"
    ):
        read_idx(path)


def test_d20_truncated_and_corrupt_gz(tmp_path):
    good = gzip.compress(
        idx_file(np.arange(4 * 16 * 16, dtype=np.uint8).reshape(4, 16, 16) * 7), mtime=0
    )
    cut = tmp_path / "a-images-idx3-ubyte.gz"
    cut.write_bytes(good[:-30])
    with pytest.raises(InputError) as exc:
        read_idx(cut)
    assert one_line(exc).startswith(f"{cut}: corrupt or truncated gzip data")
    bad = tmp_path / "b-images-idx3-ubyte.gz"
    bad.write_bytes(b"\x1f\x8b" + bytes(30))
    with pytest.raises(InputError) as exc:
        read_idx(bad)
    assert one_line(exc).startswith(f"{bad}: ")
