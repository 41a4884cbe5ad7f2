"""``compress --resume``: a killed or interrupted run goes on, and ends in the same store file for file.

RELIABILITY A1: "--resume finishes with output hash-identical to an uninterrupted run".  Every
test compares the resumed store with an uninterrupted run's (``hash_tree``: SHA-256 of every file
but the manifest, whose only difference is its commit time).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import mpsd
from cli_helpers import cli, mpsd_subprocess, printed
from mpsd.archive import writer as writer_module
from mpsd.archive.writer import PROGRESS_NAME, hash_tree, interrupted_runs

ARGS = ("--bond", "4,6,6,4", "--chunk-images", "100")


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory, cifar) -> Path:
    """A folder with ``in.npy`` (400 real images), the reference store ``ref.zarr`` and what a
    compress of ``s.zarr`` killed (``os._exit(137)``) after its first chunk left behind."""
    root = tmp_path_factory.mktemp("killed")
    np.save(root / "in.npy", cifar["x_train"][:400])
    proc = mpsd_subprocess("compress", str(root / "in.npy"), str(root / "s.zarr"), *ARGS, "-q",
                           env={"MPSD_FAULT": "after_first_batch"})  # fmt: skip
    assert proc.returncode == 137, proc.stderr
    assert not (root / "s.zarr").exists()
    assert cli("compress", str(root / "in.npy"), str(root / "ref.zarr"), *ARGS, "-q") == 0
    return root


def copy_of(killed: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The killed run's input and leftover, copied to ``tmp_path``; (input, target store)."""
    for item in killed.iterdir():
        if item.name.startswith(".s.zarr.mpsd-tmp-"):
            shutil.copytree(item, tmp_path / item.name)
    shutil.copy(killed / "in.npy", tmp_path / "in.npy")
    return tmp_path / "in.npy", tmp_path / "s.zarr"


def test_killed_run_resumes_to_the_same_store(killed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, target = copy_of(killed, tmp_path)
    assert [n for _, n in interrupted_runs(target)] == [100]  # the first chunk was written
    # verify names the leftover and says how to go on
    assert cli("verify", str(target)) != 0
    assert "it wrote 100 images: the same compress command with --resume continues" in printed(capsys)

    seen: list[int] = []
    real = writer_module.StoreWriter.write_batch

    def counting(self, start, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(start)
        return real(self, start, *args, **kwargs)

    writer_module.StoreWriter.write_batch = counting  # type: ignore[method-assign]
    try:
        assert cli("compress", str(src), str(target), *ARGS, "--resume") == 0
    finally:
        writer_module.StoreWriter.write_batch = real  # type: ignore[method-assign]
    assert "an interrupted run wrote 100 images; checking them" in printed(capsys)
    assert seen == [100, 200, 300]  # only the chunks the killed run had not finished
    assert hash_tree(target) == hash_tree(killed / "ref.zarr")
    manifests = [json.loads((s / "mpsd-manifest.json").read_text()) for s in (target, killed / "ref.zarr")]
    assert manifests[0]["source_crc32c"] == manifests[1]["source_crc32c"]  # the input's record too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "s.zarr"]  # nothing left over
    assert not (target / PROGRESS_NAME).exists()
    assert cli("verify", str(target)) == 0
    np.testing.assert_array_equal(mpsd.open(target)[:], mpsd.open(killed / "ref.zarr")[:])


def test_resume_of_an_overwrite_replaces_the_old_store_only_at_the_end(
    killed: Path, tmp_path: Path, cifar, capsys: pytest.CaptureFixture[str]
) -> None:
    # the store an --overwrite run was replacing when it was killed (made first: any other write to
    # the target discards an interrupted run)
    mpsd.compress(cifar["x_train"][:40], tmp_path / "s.zarr", bond="2,2,2,2")
    old = hash_tree(tmp_path / "s.zarr")
    src, target = copy_of(killed, tmp_path)
    assert cli("compress", str(src), str(target), *ARGS, "--resume", "-q") == 2  # not without --overwrite
    assert "already exists" in printed(capsys)
    assert hash_tree(target) == old and [n for _, n in interrupted_runs(target)] == [100]
    assert cli("compress", str(src), str(target), *ARGS, "--resume", "--overwrite", "-q") == 0
    assert hash_tree(target) == hash_tree(killed / "ref.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "s.zarr"]


def test_resume_with_other_settings_is_refused_and_keeps_the_leftover(
    killed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, target = copy_of(killed, tmp_path)
    leftover = sorted(p.name for p in tmp_path.iterdir())
    assert cli("compress", str(src), str(target), "--bond", "4,5,5,4", "--chunk-images", "100", "--resume", "-q") == 2
    err = capsys.readouterr().err
    assert "cannot resume: the interrupted run had other settings (stages was" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == leftover  # nothing written, nothing removed
    # the same settings then resume it (the refused attempt did not leave its lock behind)
    assert cli("compress", str(src), str(target), *ARGS, "--resume", "-q") == 0
    assert hash_tree(target) == hash_tree(killed / "ref.zarr")


def test_resume_with_a_changed_input_is_refused(killed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, target = copy_of(killed, tmp_path)
    images = np.load(src)
    images[57, 3, 3, 0] ^= 1  # one pixel of the chunk the killed run wrote
    np.save(src, images)
    assert cli("compress", str(src), str(target), *ARGS, "--resume", "-q") == 2
    err = capsys.readouterr().err
    assert "images 0..99 of the input are not those the interrupted run compressed" in err
    assert [n for _, n in interrupted_runs(target)] == [100]  # kept for the right input
    assert not target.exists()
    # without --resume the run starts again and the leftover goes, with a note
    assert cli("compress", str(src), str(target), *ARGS) == 0
    assert "discarding what an interrupted run wrote (100 images); --resume would have continued it" in printed(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "s.zarr"]


@pytest.mark.parametrize("damage", ["flip", "delete", "progress", "metadata"])
def test_damaged_chunks_of_the_interrupted_run_are_written_again(killed: Path, tmp_path: Path, damage: str) -> None:
    src, target = copy_of(killed, tmp_path)
    (leftover, _n), = interrupted_runs(target)
    chunk = leftover / "stage0" / "core2" / "c.0.0.0"
    if damage == "flip":  # what a crash can do to data that was never synced
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    elif damage == "delete":
        chunk.unlink()
    elif damage == "progress":  # an unreadable progress record: nothing to resume, the run starts again
        (leftover / PROGRESS_NAME).write_text("{")
    else:  # an array's metadata lost: nothing to resume either
        (leftover / "stage0" / "core1" / "zarr.json").write_bytes(b"")
    seen: list[int] = []
    mpsd.compress(src, target, bond="4,6,6,4", chunk_images=100, resume=True, progress=seen.append)
    assert seen[0] == 100  # chunk 0 encoded again
    assert hash_tree(target) == hash_tree(killed / "ref.zarr")


@contextlib.contextmanager
def ctrl_c_at_chunk(n: int) -> Iterator[None]:
    """Ctrl-C (``KeyboardInterrupt``) where the ``n``-th chunk would be written."""
    real, calls = writer_module.StoreWriter.write_batch, []

    def write_batch(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writer_module.StoreWriter, "write_batch", write_batch)
        yield


def test_ctrl_c_keeps_the_finished_chunks_for_resume(cifar, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, target = tmp_path / "in.npy", tmp_path / "s.zarr"
    np.save(src, cifar["x_train"][:400])
    with ctrl_c_at_chunk(3):
        assert cli("compress", str(src), str(target), *ARGS, "--tol", "0.05", "-q") == 130
    err = capsys.readouterr().err
    assert "interrupted; 200 images are written. The same command with --resume continues." in err
    assert not target.exists()
    assert cli("compress", str(src), str(target), *ARGS, "--tol", "0.05", "--resume", "-q") == 0
    ref = tmp_path / "ref.zarr"
    assert cli("compress", str(src), str(ref), *ARGS, "--tol", "0.05", "-q") == 0
    assert hash_tree(target) == hash_tree(ref)

    # interrupted before any chunk is written: nothing is kept, as before
    with ctrl_c_at_chunk(1), pytest.raises(KeyboardInterrupt):
        mpsd.compress(np.load(src), tmp_path / "t.zarr", bond="2,2,2,2")
    assert interrupted_runs(tmp_path / "t.zarr") == []
    assert not list(tmp_path.glob(".t.zarr.mpsd-tmp-*"))


def test_ratio_runs_resume_only_with_the_same_worker_count(cifar, tmp_path: Path) -> None:
    """``--ratio`` spends its budget per worker's piece of a chunk: the worker count decides the bytes."""
    from mpsd.errors import OptionError

    x = cifar["x_train"][:300]
    with ctrl_c_at_chunk(2), pytest.raises(KeyboardInterrupt):
        mpsd.compress(x, tmp_path / "s.zarr", ratio=0.3, chunk_images=100, workers=2)
    with pytest.raises(OptionError, match=r"other settings \(workers was 2, now 1\)"):
        mpsd.compress(x, tmp_path / "s.zarr", ratio=0.3, chunk_images=100, workers=1, resume=True)
    mpsd.compress(x, tmp_path / "s.zarr", ratio=0.3, chunk_images=100, workers=2, resume=True)
    mpsd.compress(x, tmp_path / "ref.zarr", ratio=0.3, chunk_images=100, workers=2)
    assert hash_tree(tmp_path / "s.zarr") == hash_tree(tmp_path / "ref.zarr")


def test_resume_without_an_interrupted_run_starts_from_the_beginning(cifar, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.npy"
    np.save(src, cifar["x_train"][:200])
    assert cli("compress", str(src), str(tmp_path / "s.zarr"), *ARGS, "--resume") == 0
    assert "no interrupted run to resume; starting from the beginning" in printed(capsys)
    assert len(mpsd.open(tmp_path / "s.zarr")) == 200


def test_sigkill_at_random_moments_then_resume(cifar, tmp_path: Path) -> None:
    """A real SIGKILL at a random moment after the first chunk (mid-chunk, between chunks, during
    the commit), then ``--resume``: the same store as an uninterrupted run."""
    src = tmp_path / "in.npy"
    np.save(src, np.concatenate([cifar["x_train"]] * 50))  # 20,000 images: a few seconds of work
    args = (str(src), "--tol", "0.03", "--chunk-images", "256", "--workers", "1", "-q")
    ref = tmp_path / "ref.zarr"
    assert cli("compress", args[0], str(ref), *args[1:]) == 0
    rng = np.random.default_rng(0)
    resumed = []
    for attempt in range(2):
        target = tmp_path / f"s{attempt}.zarr"
        proc = subprocess.Popen([sys.executable, "-m", "mpsd", "compress", args[0], str(target), *args[1:]])
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(f".{target.name}.mpsd-tmp-*/{PROGRESS_NAME}")) and time.monotonic() < deadline:
            time.sleep(0.01)  # the first chunk is written
        time.sleep(float(rng.uniform(0.0, 0.5)))  # the whole run takes seconds
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not target.exists():
            resumed += [n for _, n in interrupted_runs(target)][:1]
            assert cli("compress", args[0], str(target), *args[1:], "--resume") == 0
        assert hash_tree(target) == hash_tree(ref)
    assert resumed and min(resumed) >= 256  # at least one kill landed mid-run, after a chunk


class PowerLoss(BaseException):
    """Stands for the machine losing power at a fault point (no cleanup runs)."""


@pytest.mark.parametrize(("point", "survivors", "kept"), [
    ("after_first_batch", 0.0, 0),  # nothing synced yet: every file written so far is lost
    ("batch 3", 0.0, 0),
    ("batch 3", 0.5, None),  # the kernel had written back half of the unsynced files, at random
    ("batch 3", 1.0, 300),  # ... or all of them
    ("before_commit", 0.5, None),
    ("before_commit", 1.0, 400),
    ("before_manifest", 0.0, 0),  # everything synced but the manifest; the progress record is gone
])  # fmt: skip
def test_power_loss_then_resume(
    cifar, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, survivors: float, kept: int | None
) -> None:
    """RELIABILITY A3, emulated: every file not fsynced since it was written is zero-truncated
    (each one survives with probability ``survivors``).  The target is never a store that opens
    with data missing, and ``--resume`` (or a fresh start, when nothing usable is left) ends in the
    same store as an uninterrupted run."""
    x = cifar["x_train"][:400]
    target, ref = tmp_path / "out" / "s.zarr", tmp_path / "ref.zarr"
    target.parent.mkdir()
    mpsd.compress(x, ref, bond="4,6,6,4", chunk_images=100)

    synced: set[str] = set()
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    batches = []

    def fault(name: str) -> None:
        if name == "after_first_batch":
            batches.append(1)
        if name == point or (point == "batch 3" and name == "after_first_batch" and len(batches) == 3):
            raise PowerLoss

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", spy)
        m.setattr(writer_module, "_fault", fault)
        m.setattr(writer_module.StoreWriter, "_cleanup", lambda self: None)  # no cleanup runs
        with pytest.raises(PowerLoss):
            mpsd.compress(x, target, bond="4,6,6,4", chunk_images=100)
    rng = np.random.default_rng(1)
    for path in sorted(target.parent.rglob("*")):
        if path.is_file() and os.path.realpath(path) not in synced and rng.random() >= survivors:
            path.write_bytes(b"")  # lost with the page cache
    (target.parent / ".s.zarr.lock").unlink(missing_ok=True)  # the process is gone

    assert not target.exists()
    with pytest.raises(mpsd.errors.StoreError):
        mpsd.open(target)
    seen: list[int] = []
    mpsd.compress(x, target, bond="4,6,6,4", chunk_images=100, resume=True, progress=seen.append)
    if kept is not None:  # the first progress report is what the resumed run kept
        assert seen[0] == (kept or 100)
    assert hash_tree(target) == hash_tree(ref)
    assert sorted(p.name for p in target.parent.iterdir()) == ["s.zarr"]
