"""The command line: the issue's examples, JSON keys, errors as one line with exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import mpsd
from cli_helpers import mpsd_subprocess
from mpsd.cli import app
from mpsd.data import sample_path

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_compress_stats_decompress_on_a_shipped_sample(tmp_path):
    store = tmp_path / "fm.zarr"
    r = run("compress", "sample:fashion-mnist", str(store), "--bond", "2,6,5,2", "--residual-bond", "2,2,2,2", "-q")
    assert r.exit_code == 0, r.output
    r = run("stats", str(store), "--json")
    data = json.loads(r.stdout)
    for key in ("images", "image_shape", "sites", "stages", "param_ratio", "bytes_on_disk", "raw_bytes",
                "byte_ratio", "entropy", "psnr", "rel_error", "error_bound"):
        assert key in data
    assert data["images"] == 2000 and data["image_shape"] == [28, 28, 1] and data["sites"] == [2, 4, 7, 7, 2]
    assert [s["bonds"] for s in data["stages"]] == [[2, 6, 5, 2], [2, 2, 2, 2]]
    assert len(data["entropy"]) == 4
    assert data["param_ratio"] == pytest.approx((336 + 80) / 784)
    table = run("stats", str(store)).stdout
    assert "entropy per bond" in table and "bytes on disk" in table

    r = run("decompress", str(store), str(tmp_path / "recon.npz"), "-q")
    assert r.exit_code == 0
    with np.load(tmp_path / "recon.npz") as out, np.load(sample_path("fashion-mnist")) as src:
        assert out["x"].shape == (2000, 28, 28) and out["x"].dtype == np.uint8
        np.testing.assert_array_equal(out["y"], src["y_train"])
        mse = ((out["x"].astype(float) - src["x_train"]) ** 2).mean()
        assert 10 * np.log10(255**2 / mse) == pytest.approx(data["psnr"], abs=1e-6)


def test_decompress_pngs_into_class_folders_with_select(tmp_path, cifar):
    from PIL import Image

    store = tmp_path / "c.zarr"
    mpsd.compress(cifar["x_train"][:50], store, bond="4,6,6,4", labels=cifar["y_train"][:50], classes=list(cifar["classes"]))
    r = run("decompress", str(store), str(tmp_path / "png"), "--select", "0:10", "-q")
    assert r.exit_code == 0, r.output
    files = sorted(p.relative_to(tmp_path / "png").as_posix() for p in (tmp_path / "png").rglob("*.png"))
    assert len(files) == 10
    first_class = str(cifar["classes"][cifar["y_train"][0]])
    assert files.count(f"{first_class}/000000.png") == 1
    img = np.asarray(Image.open(tmp_path / "png" / first_class / "000000.png"))
    np.testing.assert_array_equal(img, mpsd.open(store)[0])


def test_folder_names_survive_the_round_trip(tmp_path, cifar):
    from PIL import Image

    src = tmp_path / "imgs"
    for i, cls in enumerate(["cat", "cat", "dog"]):
        (src / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(cifar["x_train"][i]).save(src / cls / f"pic{i}.png")
    assert run("compress", str(src), str(tmp_path / "s.zarr"), "--bond", "4,16,16,4", "--dtype", "float32", "-q").exit_code == 0
    assert run("decompress", str(tmp_path / "s.zarr"), str(tmp_path / "out"), "-q").exit_code == 0
    for i, cls in enumerate(["cat", "cat", "dog"]):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / cls / f"pic{i}.png")), cifar["x_train"][i])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compress", "missing.npz", "o.zarr"], "no such file"),
        (["compress", "sample:cifar10", "o.zarr", "--bond", "4,6,6"], "expected 4 bonds"),
        (["compress", "sample:cifar10", "o.zarr", "--bond", "4,x"], "comma-separated integers"),
        (["compress", "sample:cifar10", "o.zarr", "--tol", "0.1", "--ratio", "0.3"], "cannot be combined"),
        (["compress", "sample:cifar10", "o.zarr", "--sites", "3,3"], "smaller than the image"),
        (["stats", "nowhere.zarr"], "no such store"),
        (["decompress", "nowhere.zarr", "out"], "no such store"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_2(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "mpsd", *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not any(p.name.endswith(".zarr") or "mpsd-tmp" in p.name for p in tmp_path.iterdir())


def test_verify_exit_codes(tmp_path, cifar):
    store = tmp_path / "s.zarr"
    mpsd.compress(cifar["x_train"][:20], store, bond="2,2,2,2")
    assert run("verify", str(store)).exit_code == 0
    (store / "stage0" / "ranks" / "c.0.0.0").unlink()
    r = runner.invoke(app, ["verify", str(store)])
    assert r.exit_code == 1 and "missing: stage0/ranks/c.0.0.0" in r.output


@pytest.mark.parametrize("point", ["after_first_batch", "before_commit", "before_manifest", "after_manifest"])
def test_killed_compress_leaves_nothing_that_opens(tmp_path, point):
    """A run killed at any point leaves no store that opens as complete (or the old one)."""
    target = tmp_path / "s.zarr"
    proc = mpsd_subprocess("compress", "sample:cifar10", str(target), "--bond", "4,6,6,4", "--chunk-images", "100", "-q",
                           env={"MPSD_FAULT": point})
    assert proc.returncode == 137
    assert not target.exists()
    assert mpsd_subprocess("verify", str(target)).returncode != 0


def test_sigkill_during_overwrite_keeps_the_previous_store(tmp_path, cifar):
    target = tmp_path / "s.zarr"
    mpsd.compress(cifar["x_train"][:40], target, bond="2,2,2,2")
    big = tmp_path / "big.npy"
    np.save(big, np.concatenate([cifar["x_train"]] * 50))  # 20,000 images: a few seconds of work
    for delay in (0.5, 1.0, 1.5):
        proc = subprocess.Popen([sys.executable, "-m", "mpsd", "compress", str(big), str(target), "--overwrite",
                                 "--tol", "0.02", "-q", "--workers", "1"])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = mpsd.open(target)
        assert len(store) in (40, 20000)
        assert mpsd_subprocess("verify", str(target)).returncode == 0
        if len(store) == 20000:
            break


def test_fault_between_renames_is_finished_on_next_open(tmp_path, cifar):
    target = tmp_path / "s.zarr"
    mpsd.compress(cifar["x_train"][:40], target, bond="2,2,2,2")
    proc = mpsd_subprocess("compress", "sample:cifar10", str(target), "--overwrite", "--bond", "2,2,2,2", "-q",
                           env={"MPSD_FAULT": "between_renames"})
    assert proc.returncode == 137
    assert not target.exists()  # the crash hit between the two renames
    assert len(mpsd.open(target)) == 400  # the journal rolls the committed new store forward
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    assert mpsd_subprocess("verify", str(target)).returncode == 0


def test_interrupted_swap_without_a_committed_new_store_rolls_back(tmp_path, cifar):
    from mpsd.archive.writer import recover

    target = tmp_path / "s.zarr"
    mpsd.compress(cifar["x_train"][:40], target, bond="2,2,2,2")
    aside = tmp_path / ".s.zarr.mpsd-old-0000"
    target.rename(aside)
    (tmp_path / ".s.zarr.mpsd-swap.json").write_text(json.dumps({"old": aside.name, "new": ".s.zarr.mpsd-tmp-1-x"}))
    assert recover(target) == "rolled back an interrupted replacement"
    assert len(mpsd.open(target)) == 40 and sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_leftovers_of_killed_runs_are_cleaned_by_the_next_run(tmp_path, cifar):
    target = tmp_path / "s.zarr"
    proc = mpsd_subprocess("compress", "sample:cifar10", str(target), "--bond", "2,2,2,2", "-q", env={"MPSD_FAULT": "before_commit"})
    assert proc.returncode == 137
    assert any(".mpsd-tmp-" in p.name for p in tmp_path.iterdir())  # the dead run's temp folder
    mpsd.compress(cifar["x_train"][:10], target, bond="2,2,2,2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_python_m_mpsd_and_help_examples():
    proc = mpsd_subprocess("--help")
    assert proc.returncode == 0 and "compress" in proc.stdout
    for cmd in ("compress", "decompress", "stats", "verify"):
        out = mpsd_subprocess(cmd, "--help").stdout
        assert "mpsd " + cmd in out  # every command's help has an example


# ---------------------------------------------------------------- hostile inputs end to end
class _Payload:
    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def _hostile_inputs(tmp_path: Path) -> dict[str, list[str]]:
    import pickle
    import struct
    import zlib

    cases: dict[str, list[str]] = {}
    folder = tmp_path / "pickle"
    folder.mkdir()
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": _Payload(tmp_path / "canary"), b"labels": [0]}, fh, protocol=2)
    cases["pickle payload"] = ["compress", str(folder / "data_batch_1"), str(tmp_path / "o1.zarr")]

    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "train-images-idx3-ubyte").write_bytes(struct.pack(">I", 0x803) + struct.pack(">III", 2**31, 2**16, 2**16) + b"\0" * 64)
    (idx / "train-labels-idx1-ubyte").write_bytes(struct.pack(">I", 0x801) + struct.pack(">I", 2**31) + b"\0" * 64)
    cases["idx claiming terabytes"] = ["compress", str(idx / "train-images-idx3-ubyte"), str(tmp_path / "o2.zarr")]

    bomb_dir = tmp_path / "bomb"
    bomb_dir.mkdir()
    width = height = 30000
    raw = zlib.compress(b"\0" * ((width + 1) * 1000), 9)  # only the first rows; the header is what counts

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    (bomb_dir / "bomb.png").write_bytes(png)
    cases["PNG bomb"] = ["compress", str(bomb_dir), str(tmp_path / "o3.zarr")]
    return cases


def test_malicious_inputs_exit_2_with_one_line_and_write_nothing(tmp_path):
    import resource

    for name, args in _hostile_inputs(tmp_path).items():
        before = set(tmp_path.iterdir())
        proc = subprocess.run(
            [sys.executable, "-m", "mpsd", *args], capture_output=True, text=True, timeout=120,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30)),
        )
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, proc.stderr)
        assert len(lines) == 1 and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert set(tmp_path.iterdir()) == before, name
    assert not (tmp_path / "canary").exists()


def test_traversal_names_in_a_store_exit_2_on_decompress(tmp_path, cifar):
    from mpsd.readers import source_from_array

    mpsd.compress(source_from_array(cifar["x_train"][:2], names=["a.png", "../../evil.png"]), tmp_path / "s.zarr", bond="2,2,2,2")
    proc = mpsd_subprocess("decompress", str(tmp_path / "s.zarr"), str(tmp_path / "out"))
    assert proc.returncode == 2 and "unsafe file name" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path.parent / "evil.png").exists()
