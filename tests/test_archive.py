"""Stores: exact round trips, paper numbers against references, random access, integrity."""

from __future__ import annotations

import json
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import mpsd
from mpsd.archive.format import MANIFEST_NAME
from mpsd.archive.verify import verify_store
from mpsd.core.layout import choose_layout
from mpsd.errors import (
    ChunkNotFoundError,
    CorruptChunkError,
    OptionError,
    StoreError,
    StoreLockedError,
)
from mpsd.readers import source_from_array
from reference import contract_reference, entropy_reference, tt_svd_reference


@pytest.mark.parametrize(("order", "colour"), [("quadtree", "separate"), ("row", "separate"), ("quadtree", "site")])
def test_full_bonds_float32_round_trip_is_bit_exact(tmp_path, cifar, order, colour):
    x = cifar["x_train"][:64]
    layout = choose_layout(32, 32, 3, colour=colour)
    full = ",".join("4096" for _ in range(len(layout.sites) - 1))
    store = mpsd.compress(x, tmp_path / "s.zarr", bond=full, dtype="float32", order=order, colour=colour)
    np.testing.assert_array_equal(store[:], x)
    assert store.stats().psnr is None  # lossless


def test_grey_round_trip_keeps_the_source_form(tmp_path, fashion):
    x = fashion["x_train"][:50]
    store = mpsd.compress(x, tmp_path / "f.zarr", bond="64,64,64,64", dtype="float32", labels=fashion["y_train"][:50])
    out = store[:]
    assert out.shape == (50, 28, 28)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(store.labels, fashion["y_train"][:50])


def test_uint16_images_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    x = (rng.random((10, 16, 16)) * 65535).astype(np.uint16)
    store = mpsd.compress(x, tmp_path / "u16.zarr", bond="4096,4096,4096", dtype="float32", sites=4)
    np.testing.assert_array_equal(store[:], x)


def _reference_psnr_and_entropy(x: np.ndarray, bonds):
    layout = choose_layout(32, 32, 3)
    tensors = layout.to_sites(x) / 255.0
    recon = np.empty_like(tensors)
    ent = []
    for b in range(tensors.shape[0]):
        cores, _ = tt_svd_reference(tensors[b], bonds=bonds)
        recon[b] = contract_reference(cores)
        ent.append(entropy_reference(tensors[b]))
    images = np.clip(np.rint(layout.from_sites(recon) * 255), 0, 255)
    mse = ((images - x) ** 2).mean()
    return 10 * np.log10(255**2 / mse), np.mean(ent, axis=0)


def test_psnr_and_entropy_match_a_per_image_tt_svd_reference(tmp_path, cifar):
    """Issue 2: float32, --bond 4,6,6,4 quadtree separate on real photos, PSNR within 0.05 dB."""
    x = cifar["x_train"][:200]
    store = mpsd.compress(x, tmp_path / "c.zarr", bond="4,6,6,4", dtype="float32")
    stats = store.stats()
    ref_psnr, ref_entropy = _reference_psnr_and_entropy(x, (4, 6, 6, 4))
    assert stats.psnr == pytest.approx(ref_psnr, abs=0.05)
    np.testing.assert_allclose(stats.entropy, ref_entropy, atol=1e-3)
    # and the decoded pixels are what the stats describe
    mse = ((store[:].astype(float) - x) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) == pytest.approx(stats.psnr, abs=1e-9)


def test_stats_read_chunk_by_chunk_match_the_decoded_images(tmp_path, cifar):
    """Stats stream the metric arrays a chunk at a time; over 4 chunks (the last one partial)
    they must match numbers computed here from the decoded pixels and the whole arrays."""
    x = cifar["x_train"][:200]
    store = mpsd.compress(x, tmp_path / "c.zarr", tol=0.08, chunk_images=64)
    s = store.stats()
    per_image_mse = ((store[:].astype(float) - x) ** 2).reshape(200, -1).mean(axis=1)
    assert s.psnr == pytest.approx(10 * np.log10(255**2 / per_image_mse.mean()), abs=1e-9)
    assert s.psnr_mean == pytest.approx(np.mean(10 * np.log10(255**2 / per_image_mse)), abs=1e-9)
    ranks = store.metric("stage0/ranks").astype(float).reshape(-1, 4)  # tol: ranks differ per MPS
    assert len(np.unique(ranks, axis=0)) > 10
    np.testing.assert_allclose(s.stages[0].mean_ranks, ranks.mean(axis=0), atol=1e-4)
    full = np.concatenate([np.ones((len(ranks), 1)), ranks, np.ones((len(ranks), 1))], axis=1)
    assert s.param_ratio == pytest.approx((full[:, :-1] * 4 * full[:, 1:]).sum(axis=1).mean() / 1024, rel=1e-12)
    norm = np.linalg.norm(store.metric("metrics/norm").astype(float), axis=1)
    error = np.linalg.norm(store.metric("metrics/error").astype(float), axis=1)
    assert s.rel_error == pytest.approx((error / norm).mean(), rel=1e-12)
    entropy = store.metric("metrics/entropy").astype(float).reshape(-1, 4).mean(axis=0)
    np.testing.assert_allclose(s.entropy, entropy, rtol=1e-12)


def test_stored_error_bound_and_ratio(tmp_path, cifar):
    x = cifar["x_train"][:100]
    store = mpsd.compress(x, tmp_path / "c.zarr", bond="4,6,6,4", residual_bonds=["4,6,6,4"], dtype="float32")
    s = store.stats()
    assert s.param_ratio == pytest.approx(2 * 368 / 1024)
    assert s.rel_error <= s.error_bound * (1 + 1e-3)
    assert [st.bonds for st in s.stages] == [[4, 6, 6, 4], [4, 6, 6, 4]]
    assert s.bytes_on_disk == sum(p.stat().st_size for p in (tmp_path / "c.zarr").rglob("*") if p.is_file())
    assert s.raw_bytes == x.nbytes and s.byte_ratio == pytest.approx(s.bytes_on_disk / x.nbytes)


def test_int8_is_close_to_float32_and_smaller(tmp_path, cifar):
    x = cifar["x_train"][:300]
    f32 = mpsd.compress(x, tmp_path / "a.zarr", bond="4,6,6,4", dtype="float32").stats()
    i8 = mpsd.compress(x, tmp_path / "b.zarr", bond="4,6,6,4", dtype="int8").stats()
    assert i8.bytes_on_disk < f32.bytes_on_disk / 2
    assert i8.psnr > f32.psnr - 0.3


def test_tol_holds_for_every_stored_image(tmp_path, cifar):
    x = cifar["x_train"][:100]
    store = mpsd.compress(x, tmp_path / "t.zarr", tol=0.05, dtype="float32")
    err = store.metric("metrics/error").astype(float)
    norm = store.metric("metrics/norm").astype(float)
    assert (err <= 0.05 * norm * (1 + 1e-4) + 1e-6).all()
    decoded = store.decode(slice(None), kind="float") / 255.0
    per_image = np.linalg.norm((decoded - x / 255.0).reshape(100, -1), axis=1)
    assert (per_image <= 0.05 * np.linalg.norm((x / 255.0).reshape(100, -1), axis=1) * (1 + 1e-4) + 1e-5).all()


def test_selection_and_indexing(tmp_path, cifar):
    x = cifar["x_train"][:130]
    store = mpsd.compress(x, tmp_path / "s.zarr", bond="4,6,6,4", chunk_images=32)
    everything = store[:]
    np.testing.assert_array_equal(store[5], everything[5])
    np.testing.assert_array_equal(store[-1], everything[-1])
    np.testing.assert_array_equal(store[[100, 3, 100, 31, 32]], everything[[100, 3, 100, 31, 32]])
    np.testing.assert_array_equal(store[10:90:7], everything[10:90:7])
    with pytest.raises(IndexError):
        store[130]


@pytest.mark.parametrize("kind", ["image", "float"])
def test_outputs_in_base_pages_decode_the_same(tmp_path, cifar, monkeypatch, kind):
    """Large outputs come from an anonymous map on Linux (no huge-page advice): same values."""
    from mpsd.archive import reader

    x = cifar["x_train"][:130]
    store = mpsd.compress(x, tmp_path / "s.zarr", bond="4,6,6,4", chunk_images=32)
    monkeypatch.setattr(reader, "BASE_PAGES_FROM_BYTES", 2**62)
    plain = store.decode(slice(None), kind=kind)
    monkeypatch.setattr(reader, "BASE_PAGES_FROM_BYTES", 1)
    mapped = store.decode(slice(None), kind=kind)
    owner = mapped
    while isinstance(owner, np.ndarray):
        owner = owner.base
    owner = owner.obj if isinstance(owner, memoryview) else owner
    assert isinstance(owner, mmap.mmap) == sys.platform.startswith("linux")
    assert mapped.flags.writeable and mapped.flags.c_contiguous
    assert mapped.dtype == plain.dtype and mapped.shape == plain.shape == (130, 32, 32, 3)
    np.testing.assert_array_equal(mapped, plain)


def test_decode_blocks_bounded_by_bytes_decode_the_same(tmp_path, cifar, monkeypatch):
    from mpsd.archive import reader

    x = cifar["x_train"][:70]
    store = mpsd.compress(x, tmp_path / "s.zarr", bond="4,6,6,4", residual_bonds=["2,2,2,2"], chunk_images=32)
    whole = store.decode(slice(None))
    whole_floats = store.decode(slice(None), kind="float")
    some = store.decode([69, 3, 40, 3])
    calls: list[int] = []
    round_images = reader.Archive._round_images

    def counted(self, part, *args, **kwargs):
        calls.append(len(part[0][0][0]))
        return round_images(self, part, *args, **kwargs)

    monkeypatch.setattr(reader.Archive, "_round_images", counted)
    monkeypatch.setattr(reader, "DECODE_BLOCK_BYTES", 3 * 32 * 32 * 3 * 8)  # three images a block
    np.testing.assert_array_equal(store.decode(slice(None)), whole)
    assert max(calls) == 3 * 3 and len(calls) == 11 + 11 + 2  # tensors: 3 per image; chunks 32, 32, 6
    np.testing.assert_array_equal(store.decode([69, 3, 40, 3]), some)
    floated: list[int] = []
    decode_stages = reader.decode_stages

    def counted_floats(stages):
        floated.append(len(stages[0][0][0]))
        return decode_stages(stages)

    monkeypatch.setattr(reader, "decode_stages", counted_floats)
    floats = store.decode(slice(None), kind="float")  # blocks of three images too
    assert max(floated) == 3 * 3 and len(floated) == 11 + 11 + 2 and floats.dtype == np.float32
    np.testing.assert_allclose(floats, whole_floats, rtol=0, atol=1e-4)
    assert np.abs(np.clip(floats, 0, 255) - whole).max() <= 0.5 + 1e-3  # the images are these, rounded


@pytest.mark.parametrize("through_zarr", [False, True])
def test_decoding_one_image_reads_only_its_chunk(tmp_path, cifar, monkeypatch, through_zarr):
    x = np.concatenate([cifar["x_train"]] * 3)  # 1,200 images, 10 chunks of 128
    mpsd.compress(x, tmp_path / "big.zarr", bond="4,6,6,4", chunk_images=128)
    store = mpsd.open(tmp_path / "big.zarr")
    expected = mpsd.compress(x[768:896], tmp_path / "one.zarr", bond="4,6,6,4")[9]
    from zarr.storage import LocalStore

    from mpsd.archive.reader import Archive

    if through_zarr:  # the general path, for stores written with other codecs
        monkeypatch.setattr(Archive, "_direct_dtype", lambda self, name, arr: None)
    seen: list[str] = []
    original_get, original_direct = LocalStore.get, Archive._read_chunk_direct

    async def spy(self, key, *args, **kwargs):
        seen.append(key)
        return await original_get(self, key, *args, **kwargs)

    def spy_direct(self, name, key, *args):
        seen.append(key)
        return original_direct(self, name, key, *args)

    monkeypatch.setattr(LocalStore, "get", spy)
    monkeypatch.setattr(Archive, "_read_chunk_direct", spy_direct)
    np.testing.assert_array_equal(store[777], expected)
    chunk_reads = [k for k in seen if "/c." in k and k.startswith("stage")]
    assert chunk_reads and all(k.split("/c.")[1].split(".")[0] == "6" for k in chunk_reads)
    # one read per array of the chunk: 5 cores, their scales and ranks (which unpack the cores)
    assert sorted(k.split("/c.")[0] for k in chunk_reads) == sorted(
        [f"stage0/core{k}" for k in range(5)] + ["stage0/scales", "stage0/ranks"]
    )


# ---------------------------------------------------------------- whole or absent
class _Boom(RuntimeError):
    pass


def test_failure_midway_leaves_no_store_and_no_temp(tmp_path, cifar):
    x = cifar["x_train"][:300]
    src = source_from_array(x)
    original = src.read

    def read(start, stop):
        if start >= 200:
            raise _Boom("disk went away")
        return original(start, stop)

    src.read = read
    with pytest.raises(_Boom):
        mpsd.compress(src, tmp_path / "x.zarr", bond="4,6,6,4", chunk_images=100)
    assert os.listdir(tmp_path) == []


def test_existing_store_needs_overwrite_and_is_replaced_only_when_done(tmp_path, cifar):
    target = tmp_path / "s.zarr"
    mpsd.compress(cifar["x_train"][:20], target, bond="2,2,2,2")
    with pytest.raises(OptionError, match="already exists"):
        mpsd.compress(cifar["x_train"][:30], target, bond="2,2,2,2")
    src = source_from_array(cifar["x_train"][:30])
    src.read = lambda a, b: (_ for _ in ()).throw(_Boom("fail"))
    with pytest.raises(_Boom):
        mpsd.compress(src, target, bond="2,2,2,2", overwrite=True)
    assert len(mpsd.open(target)) == 20  # old store intact
    mpsd.compress(cifar["x_train"][:30], target, bond="2,2,2,2", overwrite=True)
    assert len(mpsd.open(target)) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_second_writer_fails_fast(tmp_path, cifar):
    lock = tmp_path / ".s.zarr.lock"
    lock.write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(StoreLockedError):
        mpsd.compress(cifar["x_train"][:10], tmp_path / "s.zarr", bond="2,2,2,2")
    lock.write_text("999999999")  # stale lock: taken over
    mpsd.compress(cifar["x_train"][:10], tmp_path / "s.zarr", bond="2,2,2,2")


def test_store_without_manifest_is_incomplete(tmp_path, cifar):
    mpsd.compress(cifar["x_train"][:10], tmp_path / "s.zarr", bond="2,2,2,2")
    (tmp_path / "s.zarr" / MANIFEST_NAME).unlink()
    with pytest.raises(StoreError, match="incomplete"):
        mpsd.open(tmp_path / "s.zarr")
    assert verify_store(tmp_path / "s.zarr").state == "incomplete"


# ---------------------------------------------------------------- damage
def _store(tmp_path, cifar) -> Path:
    x = cifar["x_train"][:64]
    mpsd.compress(x, tmp_path / "s.zarr", bond="4,6,6,4", chunk_images=32)
    return tmp_path / "s.zarr"


def test_flipped_bit_is_caught_by_checksum_and_verify(tmp_path, cifar):
    path = _store(tmp_path, cifar)
    chunk = path / "stage0" / "core2" / "c.1.0.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    store = mpsd.open(path)
    np.testing.assert_array_equal(store[0:32], mpsd.open(path)[0:32])  # chunk 0 still fine
    with pytest.raises(CorruptChunkError, match="stage0/core2"):
        store[40]
    report = verify_store(path)
    assert not report.ok and any("stage0/core2/c.1" in p and "damaged" in p for p in report.problems)


def test_deleted_chunk_is_reported_not_zero_filled(tmp_path, cifar):
    path = _store(tmp_path, cifar)
    (path / "stage0" / "core0" / "c.0.0.0").unlink()
    with pytest.raises(ChunkNotFoundError):
        mpsd.open(path)[3]
    assert any(p.startswith("missing: stage0/core0/c.0") for p in verify_store(path).problems)


def test_truncated_chunk_is_an_error(tmp_path, cifar):
    path = _store(tmp_path, cifar)
    chunk = path / "stage0" / "core4" / "c.0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:7])
    with pytest.raises(CorruptChunkError):
        mpsd.open(path)[0]
    assert not verify_store(path).ok


def test_tampered_metadata_is_refused(tmp_path, cifar):
    path = _store(tmp_path, cifar)
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["mpsd"]["stages"][0]["bonds"] = [4, 600, 6, 4]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="do not fit"):
        mpsd.open(path)
    assert any("damaged: zarr.json" in p for p in verify_store(path).problems)


@pytest.mark.parametrize("metrics", [True, False])
def test_encoded_chunk_waiting_for_the_writer_holds_no_float_reconstruction(cifar, metrics):
    # an encoded chunk may wait for the previous one to be written: it must not keep the
    # (B·M, pixels) float64 reconstruction alive, not even as the base of an empty view
    from mpsd.api import _encode_images, plan_stages

    layout = choose_layout(32, 32, 3)
    specs = plan_stages(layout, bond="4,6,6,4", tol=None, ratio=None, residual_bonds=["2,2,2,2"])
    batch, sq_error = _encode_images(cifar["x_train"][:64], layout, specs, "int8", 255, metrics)
    assert batch.reconstruction.size == 0
    assert batch.reconstruction.base is None or batch.reconstruction.base.nbytes == 0
    assert sq_error.shape == (64,) and np.isfinite(sq_error).all() == metrics


@pytest.mark.parametrize(
    "kw",
    [{"bond": "4,6,6,4"}, {"bond": "4,6,6,4", "residual_bonds": ["2,4,4,2"]}, {"tol": 0.05}, {"ratio": 0.2}],
)
def test_no_metrics_keeps_only_what_decoding_needs(tmp_path, cifar, kw):
    # without metrics the encoder skips the spectra and the last contraction: the stored cores
    # must not change (the same eigendecompositions are computed, only fewer of them)
    x = cifar["x_train"][:100]
    full = mpsd.compress(x, tmp_path / "a.zarr", **kw)
    lean = mpsd.compress(x, tmp_path / "b.zarr", metrics=False, **kw)
    for name in (f"stage{i}/core{k}" for i in range(len(full.meta.stages)) for k in range(5)):
        np.testing.assert_array_equal(lean.metric(name), full.metric(name))
    np.testing.assert_array_equal(lean[:], full[:])
    s = lean.stats()
    assert not s.metrics_recorded and s.psnr is None and s.entropy == [] and s.error_bound is None
    assert s.bytes_on_disk < full.stats().bytes_on_disk
    assert s.param_ratio == full.stats().param_ratio
    assert not (tmp_path / "b.zarr" / "metrics").exists()
    assert verify_store(tmp_path / "b.zarr").ok
