"""Store format 3 (row-packed cores, one folder per array) and reading the formats 1 and 2 that
earlier versions wrote."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mpsd
from mpsd.archive import add_supplement
from mpsd.archive.format import FORMAT_VERSION, MANIFEST_NAME
from mpsd.archive.verify import verify_store
from mpsd.core.packing import pack_core, unpack_core
from mpsd.core.ttsvd import parameter_count

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# how tests/fixtures/format<v>-stores.zip were written: mpsd 0.1.0, format 1, commit 8af8947;
# format 2, commit 284eee4 (the same two stores each, v<v>-..., and expected.npz: store[:])
OLD_STORES = {
    "cifar": ("cifar-ratio-int8.zarr", "cifar10_source.npz",
              {"ratio": 0.3, "chunk_images": 6, "with_labels": True}),
    "fashion": ("fashion-tol-float16.zarr", "fashion_source.npz",
                {"tol": 0.1, "residual_bonds": ["2,2,2,2"], "dtype": "float16", "chunk_images": 6, "metrics": False}),
}  # fmt: skip


def _unzip(tmp_path: Path, version: int) -> Path:
    with zipfile.ZipFile(FIXTURES / f"format{version}-stores.zip") as zf:
        zf.extractall(tmp_path / f"v{version}")
    return tmp_path / f"v{version}"


@pytest.fixture
def format1(tmp_path: Path) -> Path:
    return _unzip(tmp_path, 1)


def _old_store(folder: Path, version: int, which: str) -> Path:
    return folder / f"v{version}-{OLD_STORES[which][0]}"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    err = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(255.0**2 / err))


def _assert_same_images(new: mpsd.Archive, old: mpsd.Archive, which: str | None = None) -> None:
    """``new`` holds the images ``old`` holds, up to how the encoder rounds today.

    The encoder's numbers are not part of a format: since these stores were written, its
    eigenvectors changed sign convention and tensors that need no rotation at a bond keep the
    identity there, which moves int8 and float16 rounding (stores of the same images compared
    at 49 and 67 dB PSNR, each within 0.003 dB of the other's PSNR against the source).  So: the
    same images to 40 dB, and, given the source, the same quality to 0.1 dB.
    """
    a, b = new[:], old[:]
    assert a.shape == b.shape and a.dtype == b.dtype
    assert _psnr(a, b) > 40.0
    if which is not None:
        with np.load(FIXTURES / OLD_STORES[which][1]) as data:
            x = data["x_train"][:12].reshape(a.shape)
        assert abs(_psnr(a, x) - _psnr(b, x)) < 0.1


def _compress_like_old(which: str, path: Path) -> mpsd.Archive:
    _, source, options = OLD_STORES[which]
    options = dict(options)
    with np.load(FIXTURES / source) as data:
        x, y, classes = data["x_train"][:12], data["y_train"][:12], list(data["classes"])
    if options.pop("with_labels", False):
        options.update(labels=y, classes=classes)
    return mpsd.compress(x, path, workers=1, **options)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("which", sorted(OLD_STORES))
def test_old_stores_still_decode_as_they_did(tmp_path, version, which):
    folder = _unzip(tmp_path, version)
    store = mpsd.open(_old_store(folder, version, which))
    assert store.meta.format_version == version
    with np.load(folder / "expected.npz") as expected:
        np.testing.assert_array_equal(store[:], expected[which])
        np.testing.assert_array_equal(store[7], expected[which][7])  # one image, second chunk
    assert verify_store(store.path).ok
    assert np.isfinite(store.stats().param_ratio) and store.stats().format_version == version


@pytest.mark.parametrize("which", sorted(OLD_STORES))
def test_current_format_holds_what_format1_held_in_fewer_bytes(tmp_path, format1, which):
    old = mpsd.open(_old_store(format1, 1, which))
    new = _compress_like_old(which, tmp_path / "new.zarr")
    assert new.meta.format_version == FORMAT_VERSION == 3 == new.stats().to_dict()["format_version"]
    _assert_same_images(new, old, which)
    assert new.bytes_on_disk < old.bytes_on_disk


@pytest.mark.parametrize("which", sorted(OLD_STORES))
def test_format3_has_the_chunks_of_format2_without_a_folder_per_chunk(tmp_path, which):
    old_path = _old_store(_unzip(tmp_path, 2), 2, which)
    new = _compress_like_old(which, tmp_path / "new.zarr")
    _assert_same_images(new, mpsd.open(old_path), which)
    # every chunk file of format 2 (c/<i>/0/0) has its counterpart in format 3 (c.<i>.0.0)
    old_chunks = sorted(str(f.relative_to(old_path)).replace("/c/", "/c.").replace("/", ".")
                        for f in old_path.rglob("*") if f.is_file() and "/c/" in str(f.relative_to(old_path)))
    new_chunks = sorted(str(f.relative_to(new.path)).replace("/", ".") for f in new.path.rglob("c.*") if f.is_file())
    assert old_chunks and old_chunks == new_chunks
    # the folders are the groups and arrays, no more: one per array, none per chunk
    folders = [p for p in new.path.rglob("*") if p.is_dir()]
    assert folders and all((p / "zarr.json").is_file() for p in folders)
    assert not any(p.name == "c" for p in folders)
    assert verify_store(new.path).ok


@pytest.mark.parametrize("version", [1, 2])
def test_supplement_on_an_old_store_keeps_its_format(tmp_path, version):
    old_path = _old_store(_unzip(tmp_path, version), version, "cifar")
    new = _compress_like_old("cifar", tmp_path / "new.zarr")
    bias = np.random.default_rng(0).normal(0, 8, size=(12, 32, 32, 3)).astype(np.float32)
    old = add_supplement(old_path, bias, bond="2,2,2,2")
    new = add_supplement(new.path, bias, bond="2,2,2,2")
    assert old.meta.format_version == version and new.meta.format_version == FORMAT_VERSION
    assert json.loads((old_path / MANIFEST_NAME).read_text())["format_version"] == version
    assert old.meta.stages[-1].role == "supplement"
    index = len(old.meta.stages) - 1
    # the new stage's chunks are laid out like the rest of its store
    old_core, new_core = old_path / f"stage{index}" / "core0", new.path / f"stage{index}" / "core0"
    assert any(f.is_file() for f in (old_core / "c" / "0").rglob("*")) and not list(old_core.glob("c.*"))
    assert (new_core / "c.0.0.0").is_file() and not (new_core / "c").exists()
    _assert_same_images(new, old)
    assert verify_store(old_path).ok


def test_cores_are_stored_row_packed_by_their_own_ranks(tmp_path, cifar):
    """Row t of core k holds r_{k-1}·d_k·r_k entries, then zeros; the bytes follow the parameters."""
    import zarr

    x = cifar["x_train"][:200]
    store = mpsd.compress(x, tmp_path / "r.zarr", ratio=0.1, chunk_images=100, metrics=False)
    sites = store.meta.layout.sites
    group = zarr.open_group(str(store.path), mode="r")
    ranks = group["stage0/ranks"][...].reshape(-1, len(sites) - 1).astype(np.int64)
    assert len(np.unique(ranks, axis=0)) > 1  # the ratio gives the tensors different ranks
    full = np.concatenate([np.ones((len(ranks), 1), int), ranks, np.ones((len(ranks), 1), int)], axis=1)
    core_bytes = 0
    for k, d in enumerate(sites):
        rows = group[f"stage0/core{k}"][...].reshape(len(ranks), -1)
        used = full[:, k] * d * full[:, k + 1]
        assert not (rows * (np.arange(rows.shape[1]) >= used[:, None])).any()  # zeros after the used part
        core_bytes += sum(f.stat().st_size for f in (store.path / "stage0" / f"core{k}").glob("c.*") if f.is_file())
    n_params = int(parameter_count(sites, ranks).sum())  # int8: one byte each
    # zero padding scattered through each row (format 1) cost 1.3 bytes per parameter here
    assert core_bytes <= 1.08 * n_params


@pytest.mark.parametrize("dtype", [np.int8, np.float16, np.float32, np.float64])
def test_pack_and_unpack_against_per_row_slices(dtype):
    rng = np.random.default_rng(1)
    b, r0, d, r1 = 40, 5, 3, 7
    left, right = rng.integers(1, r0 + 1, b), rng.integers(1, r1 + 1, b)
    core = (rng.normal(size=(b, r0, d, r1)) * 50).astype(dtype)
    i, k = np.arange(r0)[None, :, None, None], np.arange(r1)[None, None, None, :]
    core[np.broadcast_to((i >= left[:, None, None, None]) | (k >= right[:, None, None, None]), core.shape)] = 0
    rows = pack_core(core, left, right, r0 * d * r1 + 3)
    assert rows.dtype == core.dtype and rows.shape == (b, r0 * d * r1 + 3)
    for t in range(b):
        used = core[t, : left[t], :, : right[t]].ravel()
        np.testing.assert_array_equal(rows[t, : used.size], used)
        assert not rows[t, used.size :].any()
    np.testing.assert_array_equal(unpack_core(rows, left, right, r0, d, r1), core)
    top0, top1 = int(left.max()), int(right.max())
    np.testing.assert_array_equal(unpack_core(rows, left, right, top0, d, top1), core[:, :top0, :, :top1])
    with pytest.raises(ValueError):
        unpack_core(rows, left, right, top0 - 1, d, top1)


def test_ranks_outside_the_storage_bonds_are_refused(tmp_path, cifar):
    import zarr

    from mpsd.errors import StoreError

    store = mpsd.compress(cifar["x_train"][:8], tmp_path / "t.zarr", ratio=0.3)
    arr = zarr.open_array(str(store.path / "stage0" / "ranks"), mode="r+")
    values = arr[...]
    values[2, 0, 1] = store.meta.stages[0].bonds[1] + 1
    arr[...] = values
    with pytest.raises(StoreError, match="ranks outside"):
        mpsd.open(store.path)[2]


@pytest.mark.parametrize("dtype", ["int8", "float16", "float32"])
@pytest.mark.parametrize("options", [{"tol": 0.05}, {"ratio": 0.3, "residual_bonds": ["2,2,2,2"]}])
def test_decoding_packed_rows_matches_a_per_tensor_reference(tmp_path, cifar, dtype, options):
    """Each MPS sliced from its stored rows by its own ranks, contracted with plain numpy."""
    import zarr

    from reference import contract_reference

    x = cifar["x_train"][:40]
    store = mpsd.compress(x, tmp_path / "p.zarr", dtype=dtype, chunk_images=16, **options)
    meta, group = store.meta, zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    sites, m = meta.layout.sites, meta.mps_per_image
    total = np.zeros((len(x) * m, int(np.prod(sites))))
    for s in range(len(meta.stages)):
        ranks = group[f"stage{s}/ranks"][...].reshape(len(x) * m, -1).astype(int)
        rows = [group[f"stage{s}/core{k}"][...].reshape(len(x) * m, -1) for k in range(len(sites))]
        scales = group[f"stage{s}/scales"][...].reshape(len(x) * m, -1) if dtype == "int8" else None
        for t in range(len(x) * m):
            r = [1, *ranks[t], 1]
            cores = []
            for k, d in enumerate(sites):
                core = rows[k][t, : r[k] * d * r[k + 1]].astype(np.float64).reshape(r[k], d, r[k + 1])
                cores.append(core * (1.0 if scales is None else np.float64(scales[t, k])))
            total[t] += contract_reference(cores).ravel()
    expected_float = meta.layout.from_sites(total) * 255
    np.testing.assert_allclose(store.decode(slice(None), kind="float"), expected_float.astype(np.float32), rtol=1e-6, atol=1e-3)
    expected = np.clip(np.rint(expected_float), 0, 255).astype(np.uint8)
    diff = store[:].astype(int) - expected
    # the sums are the same up to the order of additions: a pixel within 1e-12 of .5 may round apart
    assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 1e-4


@pytest.mark.parametrize(
    ("which", "options"),
    [
        ("cifar", {"bond": "4,6,6,4", "chunk_images": 100}),  # a last chunk of 50: padded like zarr pads it
        ("cifar", {"tol": 0.05, "chunk_images": 128, "residual_bonds": ["2,2,2,2"]}),
        ("fashion", {"ratio": 0.3, "chunk_images": 64, "dtype": "float16"}),
        ("fashion", {"bond": "2,2,2,2", "chunk_images": 1024, "metrics": False, "dtype": "float32"}),  # one chunk < 1024
    ],
)
def test_chunks_written_directly_are_the_files_zarr_writes(tmp_path, monkeypatch, cifar, fashion, which, options):
    """The writer encodes whole chunks itself (bytes → zstd → CRC-32C); zarr's codec pipeline
    must produce the same files, byte for byte, so that the store stays a plain Zarr v3 store."""
    from mpsd.archive import writer

    images = (cifar if which == "cifar" else fashion)["x_train"][:350]
    trees = []
    for through_zarr in (True, False):
        monkeypatch.setattr(writer, "_ZARR_WRITES", through_zarr)
        path = tmp_path / f"zarr-{through_zarr}.zarr"
        mpsd.compress(images, path, **options)
        trees.append(writer.hash_tree(path))
    assert trees[0] == trees[1] and len(trees[0]) > 10
    assert verify_store(path).ok
    # the digests the writer took while writing are those of the files on disk
    assert json.loads((path / MANIFEST_NAME).read_text())["files"] == trees[1]
    import zarr  # zarr alone reads every array back, the padded last chunk included

    group = zarr.open_group(str(path), mode="r")
    ranks = group["stage0/ranks"][:]
    assert ranks.shape[0] == 350 and ranks.min() >= 1


def test_manifest_hashes_what_zarr_wrote_after_the_writer(tmp_path, monkeypatch, cifar):
    """Chunks of an array written first by the writer, then through zarr (library use with
    batches that are not whole chunks): the manifest must not keep the writer's digests."""
    from mpsd.archive import writer

    real = writer.StoreWriter.write_batch
    calls = []

    def write_batch(self, start, batch, sq_error, source_crc32c=None):  # type: ignore[no-untyped-def]
        calls.append(start)
        monkeypatch.setattr(writer, "_ZARR_WRITES", len(calls) > 1)  # first chunk direct, then zarr
        return real(self, start, batch, sq_error, source_crc32c)

    real_manifest, known_at_commit = writer.write_manifest, []

    def write_manifest(*args, **kwargs):  # type: ignore[no-untyped-def]
        known_at_commit.append(dict(kwargs.get("known") or {}))
        return real_manifest(*args, **kwargs)

    monkeypatch.setattr(writer.StoreWriter, "write_batch", write_batch)
    monkeypatch.setattr(writer, "write_manifest", write_manifest)
    path = tmp_path / "mixed.zarr"
    mpsd.compress(cifar["x_train"][:300], path, bond="4,6,6,4", chunk_images=100)
    assert calls == [0, 100, 200]
    # zarr wrote to every array after the writer did: none of the writer's digests is trusted
    assert known_at_commit == [{}]
    manifest = json.loads((path / MANIFEST_NAME).read_text())["files"]
    assert manifest == writer.hash_tree(path)
    assert verify_store(path).ok
