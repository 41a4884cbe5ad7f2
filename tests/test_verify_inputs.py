"""``mpsd verify --inputs``: is this the input the store was made from?  (RELIABILITY D13.)

The manifest keeps a CRC-32C of the source images of each chunk; the tests compute the expected
checksums with the ``crc32c`` package directly, from the images as the test holds them.
"""

from __future__ import annotations

import json
from pathlib import Path

import crc32c
import numpy as np
import pytest
from PIL import Image

import mpsd
from cli_helpers import cli, printed
from mpsd.archive import add_supplement
from mpsd.archive.format import MANIFEST_NAME


def test_manifest_keeps_a_checksum_of_each_source_chunk(cifar, tmp_path: Path) -> None:
    x = cifar["x_train"][:250]
    store = mpsd.compress(x, tmp_path / "s.zarr", bond="2,3,3,2", chunk_images=100)
    manifest = json.loads((store.path / MANIFEST_NAME).read_text())
    assert manifest["source_chunk_images"] == 100
    assert manifest["source_crc32c"] == [crc32c.crc32c(x[i : i + 100].tobytes()) for i in (0, 100, 200)]
    # a supplement rewrites the manifest and keeps the record
    add_supplement(store.path, np.zeros(x.shape, np.float32), bond="1,1,1,1")
    again = json.loads((store.path / MANIFEST_NAME).read_text())
    assert again["source_crc32c"] == manifest["source_crc32c"] and again["files"] != manifest["files"]


def test_verify_inputs_finds_the_changed_images(cifar, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, store = tmp_path / "in.npy", tmp_path / "s.zarr"
    x = cifar["x_train"][:300].copy()
    np.save(src, x)
    assert cli("compress", str(src), str(store), "--bond", "2,3,3,2", "--chunk-images", "100", "-q") == 0
    assert cli("verify", str(store), "--inputs", str(src)) == 0
    assert "ok" in printed(capsys)

    x[150, 0, 0, 0] ^= 1  # one bit of one pixel
    np.save(src, x)
    assert cli("verify", str(store), "--inputs", str(src), "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["state"] == "input differs"
    assert report["problems"] == [f"{src}: images 100..199 are not those the store was made from"]

    np.save(src, x[:200])
    assert cli("verify", str(store), "--inputs", str(src)) == 1
    assert "200 images; the store was made from 300" in printed(capsys)


def test_verify_inputs_of_a_folder_that_changed_after_compress(fashion, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "images"
    for label in (0, 1):
        (folder / str(label)).mkdir(parents=True)
    images = fashion["x_train"][:40]
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / str(i % 2) / f"{i:03d}.png")
    store = tmp_path / "s.zarr"
    assert cli("compress", str(folder), str(store), "--bond", "2,3,3,2", "--chunk-images", "16", "-q") == 0
    assert cli("verify", str(store), "--inputs", str(folder)) == 0
    capsys.readouterr()
    changed = np.array(Image.open(folder / "1" / "031.png"))
    changed[5, 5] = 255 - changed[5, 5]
    Image.fromarray(changed).save(folder / "1" / "031.png")
    assert cli("verify", str(store), "--inputs", str(folder)) == 1
    out = printed(capsys)
    # files are read in sorted order: 0/000..0/038 are images 0-19, 1/031 is image 35
    assert "images 32..39 are not those the store was made from" in out and "input differs" in out


def test_store_without_the_record_says_so(cifar, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, store = tmp_path / "in.npy", tmp_path / "s.zarr"
    np.save(src, cifar["x_train"][:50])
    mpsd.compress(src, store, bond="2,2,2,2")
    manifest_path = store / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    del manifest["source_crc32c"]  # as an earlier mpsd wrote it (the manifest is not in itself)
    manifest_path.write_text(json.dumps(manifest))
    assert cli("verify", str(store)) == 0
    assert cli("verify", str(store), "--inputs", str(src)) == 1
    assert "keeps no checksums of its input" in printed(capsys)
