"""Stores from elsewhere are untrusted (RELIABILITY.md groups A and E): refuse, never mis-decode."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

import mpsd
from mpsd.archive.export import export_pngs, safe_relative_name
from mpsd.archive.verify import verify_store
from mpsd.errors import StoreError


@pytest.fixture
def store_path(tmp_path, cifar) -> Path:
    mpsd.compress(cifar["x_train"][:40], tmp_path / "s.zarr", bond="4,6,6,4", chunk_images=16,
                  labels=cifar["y_train"][:40], classes=list(cifar["classes"]))
    return tmp_path / "s.zarr"


def _rewrite_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "name",
    ["../x.png", "/etc/x.png", "C:\\x.png", "C:x.png", "a/../../b.png", "a\x00b.png", "CON.png", "a//b.png", "./a.png", ""],
)
def test_unsafe_stored_names_are_refused(name):
    with pytest.raises(StoreError, match="unsafe"):
        safe_relative_name(name)


def test_safe_names_keep_folders_and_become_png():
    assert str(safe_relative_name("cat/ünï cödé 🐈.jpg")) == "cat/ünï cödé 🐈.png"


def _store_with_names(tmp_path, cifar, names) -> Path:
    from mpsd.readers import source_from_array

    src = source_from_array(cifar["x_train"][: len(names)], names=names)
    mpsd.compress(src, tmp_path / "n.zarr", bond="2,2,2,2")
    return tmp_path / "n.zarr"


def test_traversal_name_in_store_writes_nothing_outside(tmp_path, cifar):
    path = _store_with_names(tmp_path, cifar, ["ok.png", "../../escape.png"])
    out = tmp_path / "out"
    with pytest.raises(StoreError, match="unsafe"):
        export_pngs(mpsd.open(path), out, slice(None))
    assert not (tmp_path / "escape.png").exists() and not (tmp_path.parent / "escape.png").exists()
    assert not out.exists() or list(out.rglob("*")) == []


def test_case_insensitive_collision_is_detected(tmp_path, cifar):
    path = _store_with_names(tmp_path, cifar, ["A.png", "a.png"])
    with pytest.raises(StoreError, match="collide"):
        export_pngs(mpsd.open(path), tmp_path / "out", slice(None))


def test_preplanted_symlink_is_replaced_not_followed(tmp_path, cifar):
    path = _store_with_names(tmp_path, cifar, ["x.png"])
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.png").symlink_to(victim)
    export_pngs(mpsd.open(path), out, slice(None), overwrite=True)
    assert victim.read_text() == "keep me" and not (out / "x.png").is_symlink()


def test_symlinked_folder_inside_output_is_refused(tmp_path, cifar):
    path = _store_with_names(tmp_path, cifar, ["sub/x.png"])
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError, match="outside"):
        export_pngs(mpsd.open(path), out, slice(None))
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a.update(n_images=2**50), "n_images"),
        (lambda a: a["image"].update(height=10**9), "height"),
        (lambda a: a["image"].update(dtype="float64"), "dtype"),
        (lambda a: a["layout"].update(row_factors=[2, 2, 2, 2]), "factors"),
        (lambda a: a["stages"][0].update(bonds=[4, 6, 6]), "do not fit"),
        (lambda a: a.update(format_version=99), "version"),
        (lambda a: a.update(format="other"), "not an mpsd store"),
        (lambda a: a["quantisation"].update(dtype="float64"), "core dtype"),
    ],
)
def test_metadata_out_of_caps_or_inconsistent_is_refused(store_path, edit, message):
    _rewrite_json(store_path / "zarr.json", lambda d: edit(d["attributes"]["mpsd"]))
    with pytest.raises(StoreError, match=message):
        mpsd.open(store_path)


def test_array_shape_that_disagrees_with_metadata_is_refused(store_path):
    _rewrite_json(store_path / "stage0" / "core1" / "zarr.json", lambda d: d.update(shape=[40, 3, 4, 4, 600]))
    with pytest.raises(StoreError, match="shape"):
        mpsd.open(store_path)[0]


def test_codec_outside_the_allow_list_is_refused(store_path):
    def edit(d):
        d["codecs"].append({"name": "numcodecs.pickle", "configuration": {}})

    _rewrite_json(store_path / "stage0" / "core0" / "zarr.json", edit)
    with pytest.raises(StoreError):
        mpsd.open(store_path)[0]


def test_zarr_v2_store_is_refused(tmp_path):
    import zarr

    g = zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    g.attrs["mpsd"] = {"format": "mpsd"}
    (tmp_path / "v2.zarr" / "mpsd-manifest.json").write_text('{"files": {}, "n_committed": 1}')
    with pytest.raises(StoreError, match="v3"):
        mpsd.open(tmp_path / "v2.zarr")


def test_invalid_manifest_or_metadata_json(store_path):
    (store_path / "mpsd-manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        mpsd.open(store_path)
    assert verify_store(store_path).state == "invalid"


def test_truncated_zarr_json_is_a_clear_error(store_path):
    meta = store_path / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:50])
    with pytest.raises(StoreError, match="not valid JSON"):
        mpsd.open(store_path)


def test_nan_cores_are_an_error(tmp_path, cifar):
    mpsd.compress(cifar["x_train"][:8], tmp_path / "f.zarr", bond="2,2,2,2", dtype="float32")
    import zarr

    arr = zarr.open_array(str(tmp_path / "f.zarr" / "stage0" / "core2"), mode="r+")
    values = arr[...]
    values[3, 0, 0] = np.nan
    arr[...] = values
    store = mpsd.open(tmp_path / "f.zarr")
    with pytest.raises(StoreError, match="NaN"):
        store[3]


def test_chunk_rewritten_with_a_valid_checksum_is_caught_by_the_manifest(store_path):
    """A8: the tamperer re-encodes the chunk (zstd + fresh CRC): zarr reads it, verify does not accept it."""
    import zarr

    arr = zarr.open_array(str(store_path / "stage0" / "core4"), mode="r+")
    values = arr[0:16]
    values[0] = -values[0]
    arr[0:16] = values
    assert mpsd.open(store_path)[0].shape == (32, 32, 3)  # decodes: checksums alone cannot see this
    report = verify_store(store_path)
    assert not report.ok and any("damaged: stage0/core4/c.0" in p for p in report.problems)


@pytest.mark.parametrize("content", ["bomb", "short", "not zstd"])
def test_chunk_with_a_valid_checksum_but_the_wrong_content_is_a_corrupt_chunk(store_path, content):
    """A zstd frame that inflates to 64 MB (or to too little, or is no frame at all), given a fresh
    CRC-32C: refused as a corrupt chunk, and nothing of the claimed size is allocated."""
    import resource

    import google_crc32c
    from numcodecs import Zstd

    from mpsd.errors import CorruptChunkError

    body = {
        "bomb": Zstd(level=1).encode(np.zeros(64 * 2**20, dtype=np.uint8)),
        "short": Zstd(level=1).encode(np.zeros(10, dtype=np.uint8)),
        "not zstd": b"definitely not a zstd frame",
    }[content]
    body = bytes(body)
    chunk = store_path / "stage0" / "core2" / "c.0.0.0"
    chunk.write_bytes(body + np.uint32(google_crc32c.value(body)).tobytes())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CorruptChunkError, match="stage0/core2"):
        mpsd.open(store_path)[0]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 * 1024  # KiB: < 32 MB more


def test_no_space_left_is_one_clean_error_and_keeps_the_old_store(tmp_path, cifar, monkeypatch):
    """A13: ENOSPC on the 20th write: clean StoreError, no temp left, previous store intact."""
    from zarr.storage import LocalStore

    from mpsd.archive import writer

    target = tmp_path / "s.zarr"
    mpsd.compress(cifar["x_train"][:16], target, bond="2,2,2,2")
    calls = {"n": 0}
    original, original_file = LocalStore.set, writer._write_file

    def full() -> None:  # every file write counts: zarr's (metadata) and the writer's own (chunks)
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async def failing_set(self, key, value, *args, **kwargs):
        full()
        return await original(self, key, value, *args, **kwargs)

    def failing_file(path, *parts):
        full()
        return original_file(path, *parts)

    monkeypatch.setattr(LocalStore, "set", failing_set)
    monkeypatch.setattr(writer, "_write_file", failing_file)
    with pytest.raises(StoreError, match="No space left"):
        mpsd.compress(cifar["x_train"][:200], target, bond="2,2,2,2", overwrite=True, chunk_images=50)
    monkeypatch.undo()
    assert calls["n"] == 20
    assert len(mpsd.open(target)) == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_leftover_partial_file_is_reported_by_verify(store_path):
    (store_path / "stage0" / "core0" / ("c.0." + "a" * 32 + ".partial")).write_bytes(b"junk")
    report = verify_store(store_path)
    assert any("leftover partial write" in p for p in report.problems)


def test_all_black_images_still_write_every_chunk(tmp_path):
    """A6: zero chunks are written (write_empty_chunks), so deleting one is detectable."""
    x = np.zeros((20, 32, 32), dtype=np.uint8)
    store = mpsd.compress(x, tmp_path / "black.zarr", bond="4,6,6,4", chunk_images=10)
    np.testing.assert_array_equal(store[:], x)
    chunk = tmp_path / "black.zarr" / "stage0" / "core0" / "c.1.0.0"
    assert chunk.is_file()
    chunk.unlink()
    from mpsd.errors import ChunkNotFoundError

    with pytest.raises(ChunkNotFoundError):
        mpsd.open(tmp_path / "black.zarr")[15]


def test_manifest_count_must_match_metadata(store_path):
    _rewrite_json(store_path / "mpsd-manifest.json", lambda d: d.update(n_committed=39))
    with pytest.raises(StoreError, match="manifest commits 39"):
        mpsd.open(store_path)


def test_npz_with_object_arrays_is_refused(tmp_path):
    from mpsd.errors import InputError
    from mpsd.readers import open_source

    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="pickle"):
        open_source(path)


def test_npz_member_over_the_cap_is_refused_before_reading(tmp_path, monkeypatch):
    from mpsd.errors import InputError
    from mpsd.readers import arrays, open_source

    path = tmp_path / "big.npz"
    np.savez_compressed(path, x=np.zeros((100, 32, 32), np.uint8))
    monkeypatch.setattr(arrays, "MAX_MEMBER_BYTES", 1000)
    with pytest.raises(InputError, match="would inflate"):
        open_source(path)


def test_fuzzed_store_bytes_give_only_mpsd_errors(tmp_path, cifar):
    """E6 (seed replay): random byte damage to metadata and chunks never escapes as another error."""
    import shutil

    from mpsd.errors import MpsdError

    base = tmp_path / "base.zarr"
    mpsd.compress(cifar["x_train"][:12], base, bond="2,3,3,2", chunk_images=6)
    files = sorted(p.relative_to(base) for p in base.rglob("*") if p.is_file())
    rng = np.random.default_rng(1234)
    for trial in range(40):
        work = tmp_path / f"f{trial}.zarr"
        shutil.copytree(base, work)
        victim = work / files[rng.integers(len(files))]
        data = bytearray(victim.read_bytes())
        for _ in range(int(rng.integers(1, 4))):
            if data:
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(len(data) + 1))]
        victim.write_bytes(bytes(data))
        try:
            store = mpsd.open(work)
            store[:]
            store.stats()
        except MpsdError:
            pass
        report = verify_store(work)
        assert report.state in ("ok", "damaged", "invalid")
        shutil.rmtree(work)
