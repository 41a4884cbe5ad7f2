"""Folder reader: RELIABILITY.md group D, rows D1–D11 (files are built in ``tmp_path``)."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from mpsd.errors import InputError
from mpsd.readers import folder as folder_mod
from mpsd.readers import open_source
from mpsd.readers.folder import MAX_PIXELS, read_folder

RNG = np.random.default_rng(1234)


def _rand(*shape: int, dtype=np.uint8, high: int = 256) -> np.ndarray:
    return RNG.integers(0, high, shape, dtype=dtype)


def save(path: Path, image, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, fmt, **kw)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, depth: int, colour: int, idat: bytes) -> bytes:
    """A PNG written by hand: IHDR with any size, the given (compressed) IDAT, IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def png_bomb(width: int, height: int, colour: int = 0) -> bytes:
    """Huge IHDR, tiny IDAT: zlib of 1 MiB of zeros (a few rows at most)."""
    return raw_png(width, height, 8, colour, zlib.compress(bytes(2**20), 9))


def fits_bytes() -> bytes:
    cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                    8",
        "NAXIS   =                    2",
        "NAXIS1  =                    4",
        "NAXIS2  =                    4",
        "END",
    ]
    head = b"".join(c.ljust(80).encode() for c in cards).ljust(2880, b" ")
    return head + bytes(16).ljust(2880, b"\0")


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "\r" not in msg
    return msg


def _all(source):
    return source.read(0, source.n_images)


# ----------------------------------------------------------------------------- D1 bombs


@pytest.mark.parametrize(
    "width, height, expect",
    [
        (9000, 9000, "exceeds the cap"),  # 81 M pixels: over our cap, under Pillow's warning
        (10000, 10000, "exceeds the cap"),  # 100 M: Pillow warns (an error under pytest)
        (100000, 100000, "decompression bomb"),  # 10 G: Pillow raises DecompressionBombError
    ],
)
@pytest.mark.parametrize("skip_bad", [False, True])
def test_d1_png_bomb_refused_from_header(tmp_path, width, height, expect, skip_bad):
    save(tmp_path / "ok.png", _rand(8, 8))
    (tmp_path / "bomb.png").write_bytes(png_bomb(width, height))
    # The IDAT holds a few rows at most: had anything been decoded, the reason would be a
    # truncation error, not the size check.
    if skip_bad:
        source = read_folder(tmp_path, skip_bad=True)
        assert source.names == ["ok.png"]
        [(name, reason)] = source.skipped
        assert name == "bomb.png" and expect in reason
        if expect == "exceeds the cap":
            assert f"{width}x{height}" in reason and str(MAX_PIXELS) in reason
    else:
        with pytest.raises(InputError) as exc:
            read_folder(tmp_path)
        msg = one_line(exc)
        assert msg.startswith(str(tmp_path / "bomb.png") + ":") and expect in msg


def test_d1_pixel_cap_is_the_module_constant(tmp_path, monkeypatch):
    save(tmp_path / "a.png", _rand(10, 10))
    monkeypatch.setattr(folder_mod, "MAX_PIXELS", 99)
    with pytest.raises(InputError, match=r"10x10 = 100 pixels exceeds the cap of 99"):
        read_folder(tmp_path)


def test_d1_bomb_under_memory_limit(tmp_path):
    """With skip_bad (full decodes in the scan) and RLIMIT_AS at +200 MiB, an RGBA bomb that would
    need 268 MB is refused by its header; decoding it would die with MemoryError instead."""
    (tmp_path / "d").mkdir()
    save(tmp_path / "d" / "ok.png", _rand(8, 8, 3))
    (tmp_path / "d" / "bomb.png").write_bytes(png_bomb(8192, 8193, colour=6))
    code = f"""
import resource, sys
from mpsd.readers.folder import read_folder
def vm():
    for line in open('/proc/self/status'):
        if line.startswith('VmSize:'):
            return int(line.split()[1]) * 1024
limit = vm() + 200 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
s = read_folder({str(tmp_path / "d")!r}, skip_bad=True)
print(s.names, s.skipped[0][1])
"""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "['ok.png']" in out.stdout and "exceeds the cap" in out.stdout


# ----------------------------------------------------------------------------- D2 formats


def _other_format(kind: str) -> bytes:
    if kind == "FITS":
        return fits_bytes()
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, kind)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["FITS", "PCX", "SGI", "PPM", "GIF", "TGA", "DDS"])
def test_d2_other_format_renamed_png_is_refused(tmp_path, kind):
    path = tmp_path / "x.png"
    path.write_bytes(_other_format(kind))
    with Image.open(path) as im:  # Pillow itself would happily decode it
        assert im.format == kind
    with pytest.raises(InputError) as exc:
        read_folder(tmp_path)
    assert (
        one_line(exc)
        == f"{path}: not a PNG, JPEG, BMP, TIFF or WebP image (unknown or disallowed format)"
    )


@pytest.mark.parametrize(
    "fmt, ext",
    [("PNG", ".PNG"), ("JPEG", ".JpEg"), ("BMP", ".bmp"), ("TIFF", ".tif"), ("WEBP", ".webp")],
)
def test_d2_allowed_formats_any_case(tmp_path, fmt, ext):
    img = _rand(6, 5, 3)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    save(tmp_path / f"a{ext}", img, fmt, **kw)
    (tmp_path / "notes.txt").write_text("not an image")
    source = read_folder(tmp_path)
    assert source.names == [f"a{ext}"]
    got = _all(source)[0]
    if fmt == "JPEG":
        assert got.shape == (6, 5, 3)
    else:
        np.testing.assert_array_equal(got, img)


# ----------------------------------------------------------------------------- D3 / D4 bad files


def _truncated(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rand(64, 64, 3)).save(buf, fmt)
    data = buf.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize("fmt, ext", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_d3_truncated_fails_at_read_without_skip_bad(tmp_path, fmt, ext):
    good = save(tmp_path / "a.png", _rand(64, 64, 3))
    bad = tmp_path / f"b{ext}"
    bad.write_bytes(_truncated(fmt))
    source = read_folder(tmp_path)  # headers are fine
    assert source.names == ["a.png", f"b{ext}"]
    np.testing.assert_array_equal(source.read(0, 1)[0], np.asarray(Image.open(good)))
    with pytest.raises(InputError) as exc:
        source.read(0, 2)
    msg = one_line(exc)
    assert msg.startswith(f"{bad}: cannot decode: ")
    assert "truncated" in msg.lower() or "broken" in msg.lower()


@pytest.mark.parametrize("fmt, ext", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_d3_truncated_skipped_with_skip_bad(tmp_path, fmt, ext):
    save(tmp_path / "a.png", _rand(64, 64, 3))
    (tmp_path / f"b{ext}").write_bytes(_truncated(fmt))
    source = read_folder(tmp_path, skip_bad=True)
    assert source.names == ["a.png"]
    [(name, reason)] = source.skipped
    assert name == f"b{ext}" and reason.startswith("cannot decode: ")
    assert _all(source).shape == (1, 64, 64, 3)


def test_d3_load_truncated_images_untouched(tmp_path):
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    (tmp_path / "b.png").write_bytes(_truncated("PNG"))
    read_folder(tmp_path, skip_bad=False)
    with pytest.raises(InputError):
        read_folder(tmp_path, skip_bad=True)  # all skipped → nothing left
    assert ImageFile.LOAD_TRUNCATED_IMAGES is before is False


def test_d4_zero_byte_and_skip_bad_semantics(tmp_path):
    a = save(tmp_path / "a_good.png", _rand(8, 8, 3))
    (tmp_path / "b_empty.png").write_bytes(b"")
    (tmp_path / "c_trunc.png").write_bytes(_truncated("PNG"))
    (tmp_path / "d_fits.png").write_bytes(fits_bytes())
    (tmp_path / "d_text.jpg").write_text("hello, not a JPEG")
    e = save(tmp_path / "e_good.png", _rand(8, 8, 3))
    with pytest.raises(InputError) as exc:
        read_folder(tmp_path)
    assert one_line(exc) == f"{tmp_path / 'b_empty.png'}: empty file (0 bytes)"
    source = read_folder(tmp_path, skip_bad=True)
    assert source.names == ["a_good.png", "e_good.png"]
    assert [name for name, _ in source.skipped] == [
        "b_empty.png",
        "c_trunc.png",
        "d_fits.png",
        "d_text.jpg",
    ]
    reasons = dict(source.skipped)
    assert reasons["b_empty.png"] == "empty file (0 bytes)"
    assert reasons["c_trunc.png"].startswith("cannot decode")
    assert reasons["d_fits.png"].startswith("not a PNG, JPEG")
    images = _all(source)
    np.testing.assert_array_equal(images[0], np.asarray(Image.open(a)))
    np.testing.assert_array_equal(images[1], np.asarray(Image.open(e)))


def test_d4_nothing_usable(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError) as exc:
        read_folder(tmp_path, skip_bad=True)
    msg = one_line(exc)
    assert msg.startswith(f"{tmp_path}: no images found") and "a.png: empty file" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as exc:
        read_folder(tmp_path / "empty")
    assert one_line(exc) == (
        f"{tmp_path / 'empty'}: no images found (looked for .bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp)"
    )


def test_file_changed_after_scan(tmp_path):
    path = save(tmp_path / "a.png", _rand(8, 8))
    source = read_folder(tmp_path)
    save(path, _rand(9, 9))
    with pytest.raises(InputError, match="changed since the folder was scanned"):
        source.read(0, 1)


# ----------------------------------------------------------------------------- D5 sizes


def test_d5_mixed_sizes_lists_offenders(tmp_path):
    for i in range(4):
        save(tmp_path / f"ok{i}.png", _rand(8, 8))
    odd = {
        "odd0.png": (10, 6),
        "odd1.png": (5, 5),
        "odd2.png": (5, 5),
        "odd3.png": (3, 4),
        "odd4.png": (2, 2),
        "odd5.png": (7, 7),
        "odd6.png": (7, 9),
    }
    for name, (h, w) in odd.items():
        save(tmp_path / name, _rand(h, w))
    with pytest.raises(InputError) as exc:
        read_folder(tmp_path)
    msg = one_line(exc)
    assert msg.startswith(f"{tmp_path}: images differ in size (H x W): 4 are 8x8 but ")
    assert (
        "odd0.png is 10x6, odd1.png is 5x5, odd2.png is 5x5, odd3.png is 3x4, odd4.png is 2x2 and 2 more"
        in msg
    )
    assert "--resize" in msg


def test_d5_resize(tmp_path):
    a = _rand(8, 8, 3)
    b = _rand(10, 6, 3)
    save(tmp_path / "a.png", a)
    save(tmp_path / "b.png", b)
    source = read_folder(tmp_path, resize=(8, 8))
    assert source.image_shape == (8, 8, 3)
    assert source.conversions == {"resize to 8x8 (LANCZOS)": 1}
    images = _all(source)
    np.testing.assert_array_equal(images[0], a)  # already the right size: untouched
    expected = np.asarray(Image.fromarray(b).resize((8, 8), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(images[1], expected)


def test_d5_resize_16bit(tmp_path):
    a = _rand(4, 6, dtype=np.uint16, high=65536)
    b = _rand(5, 5, dtype=np.uint16, high=65536)
    save(tmp_path / "a.png", a)
    save(tmp_path / "b.png", b)
    source = read_folder(tmp_path, resize=(4, 6))
    assert (source.dtype, source.image_shape) == (np.uint16, (4, 6, 1))
    images = _all(source)
    np.testing.assert_array_equal(images[0, ..., 0], a)
    expected = np.asarray(Image.fromarray(b).resize((6, 4), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(images[1, ..., 0], expected)


@pytest.mark.parametrize("bad", [(0, 5), (5,), (2.5, 3), (-1, 4)])
def test_d5_bad_resize(tmp_path, bad):
    save(tmp_path / "a.png", _rand(4, 4))
    with pytest.raises(InputError, match="resize must be two positive integers"):
        read_folder(tmp_path, resize=bad)


# ----------------------------------------------------------------------------- D6 modes


def _palette_image(index: np.ndarray, transparent: bool) -> tuple[Image.Image, np.ndarray]:
    palette = _rand(256, 3)
    im = Image.frombytes("P", index.shape[::-1], index.tobytes())
    im.putpalette(palette.ravel().tolist())
    rgb = palette[index]
    if not transparent:
        return im, rgb
    alpha = np.where(index == 0, 0, 255).astype(np.uint8)
    return im, np.dstack([rgb, alpha])


def _mode_case(kind: str, tmp_path: Path):
    """(file written, expected pixels (H, W, C), expected dtype, expected conversions)."""
    h, w = 5, 7
    path = tmp_path / "img.png"
    if kind == "1":
        bits = _rand(h, w, high=2).astype(bool)
        save(path, Image.fromarray(bits))
        return path, (bits * 255).astype(np.uint8)[..., None], np.uint8, {"1->L": 1}
    if kind == "L":
        a = _rand(h, w)
        save(path, a)
        return path, a[..., None], np.uint8, {}
    if kind == "LA":
        a = _rand(h, w, 2)
        save(path, Image.fromarray(a, "LA"))
        return path, a[..., :1], np.uint8, {"LA->L": 1}
    if kind in ("P", "P+tRNS"):
        index = _rand(h, w)
        im, expected = _palette_image(index, kind == "P+tRNS")
        save(path, im, **({"transparency": 0} if kind == "P+tRNS" else {}))
        return path, expected, np.uint8, {"P->RGBA": 1} if kind == "P+tRNS" else {"P->RGB": 1}
    if kind in ("RGB", "RGBA"):
        a = _rand(h, w, len(kind))
        save(path, a)
        return path, a, np.uint8, {}
    if kind == "I;16":
        a = _rand(h, w, dtype=np.uint16, high=65536)
        a[0, 0], a[0, 1] = 0, 65535
        save(path, a)
        with Image.open(path) as im:
            assert im.mode == "I;16"
        return path, a[..., None], np.uint16, {}
    if kind == "RGB;16":  # Pillow decodes 16-bit colour PNG to 8 bits: recorded
        a = _rand(h, w, 3, dtype=np.uint16, high=65536)
        rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in a)
        path.write_bytes(raw_png(w, h, 16, 2, zlib.compress(rows)))
        return path, (a >> 8).astype(np.uint8), np.uint8, {"RGB;16->RGB": 1}
    tif = tmp_path / "img.tif"
    if kind == "I":
        a = _rand(h, w, dtype=np.int32, high=65536)
        save(tif, Image.fromarray(a, "I"))
        return tif, a.astype(np.uint16)[..., None], np.uint16, {"I->I;16": 1}
    if kind == "F":
        a = _rand(h, w, dtype=np.int32, high=65536).astype(np.float32)
        save(tif, Image.fromarray(a, "F"))
        return tif, a.astype(np.uint16)[..., None], np.uint16, {"F->I;16": 1}
    if kind in ("CMYK", "YCbCr", "LAB"):
        save(
            tif,
            Image.fromarray(_rand(h, w, 3)).convert(kind)
            if kind != "LAB"
            else Image.frombytes("LAB", (w, h), _rand(h, w, 3).tobytes()),
        )
        with Image.open(tif) as im:
            assert im.mode == kind
            expected = np.asarray(im.convert("RGB"))
        return tif, expected, np.uint8, {f"{kind}->RGB": 1}
    raise AssertionError(kind)


MODES = [
    "1",
    "L",
    "LA",
    "P",
    "P+tRNS",
    "RGB",
    "RGBA",
    "I;16",
    "RGB;16",
    "I",
    "F",
    "CMYK",
    "YCbCr",
    "LAB",
]


@pytest.mark.parametrize("kind", MODES)
def test_d6_mode_table(tmp_path, kind):
    path, expected, dtype, conversions = _mode_case(kind, tmp_path)
    source = read_folder(tmp_path)
    assert source.names == [path.name]
    assert source.dtype == dtype
    assert source.image_shape == expected.shape
    assert source.channel_axis == (expected.shape[-1] > 1)
    assert source.conversions == conversions
    got = _all(source)[0]
    np.testing.assert_array_equal(got, expected)
    # skip_bad decodes in the scan; the result must be the same
    np.testing.assert_array_equal(_all(read_folder(tmp_path, skip_bad=True))[0], expected)


@pytest.mark.parametrize(
    "mode, values, reason",
    [
        ("I", np.array([[-1, 5]], dtype=np.int32), "values -1..5, outside uint16"),
        ("I", np.array([[0, 70000]], dtype=np.int32), "values 0..70000, outside uint16"),
        ("F", np.array([[0.5, 2.0]], dtype=np.float32), "non-integer values"),
        ("F", np.array([[np.nan, 2.0]], dtype=np.float32), "non-integer values"),
    ],
)
def test_d6_wide_modes_out_of_range(tmp_path, mode, values, reason):
    path = save(tmp_path / "x.tif", Image.fromarray(values, mode))
    source = read_folder(tmp_path)  # header only: the values are not known yet
    with pytest.raises(InputError) as exc:
        source.read(0, 1)
    assert one_line(exc).startswith(f"{path}: ") and reason in str(exc.value)
    with pytest.raises(InputError, match="no images found"):
        read_folder(tmp_path, skip_bad=True)
    save(tmp_path / "y.tif", Image.fromarray(np.array([[1, 2]], dtype=np.int32), "I"))
    source = read_folder(tmp_path, skip_bad=True)
    assert source.names == ["y.tif"]
    [(name, why)] = source.skipped
    assert name == "x.tif" and reason in why


def test_d6_mixed_channels_promoted(tmp_path):
    grey, rgb, rgba = _rand(4, 4), _rand(4, 4, 3), _rand(4, 4, 4)
    save(tmp_path / "a.png", grey)
    save(tmp_path / "b.png", rgb)
    save(tmp_path / "c.png", rgba)
    source = read_folder(tmp_path)
    assert source.image_shape == (4, 4, 4)
    assert source.conversions == {"L->RGBA": 1, "RGB->RGBA": 1}
    images = _all(source)
    np.testing.assert_array_equal(images[0], np.dstack([grey, grey, grey, np.full_like(grey, 255)]))
    np.testing.assert_array_equal(images[1], np.dstack([rgb, np.full_like(grey, 255)]))
    np.testing.assert_array_equal(images[2], rgba)


def test_d6_la_keeps_alpha_when_promoted_to_rgba(tmp_path):
    la = _rand(4, 4, 2)
    save(tmp_path / "a.png", Image.fromarray(la, "LA"))
    save(tmp_path / "b.png", _rand(4, 4, 4))
    source = read_folder(tmp_path)
    assert source.conversions == {"LA->RGBA": 1}
    got = _all(source)[0]
    np.testing.assert_array_equal(got, np.dstack([la[..., 0]] * 3 + [la[..., 1]]))


def test_d6_mixed_bit_depths_refused(tmp_path):
    save(tmp_path / "a.png", _rand(4, 4))
    save(tmp_path / "b.png", _rand(4, 4, dtype=np.uint16, high=65536))
    with pytest.raises(InputError) as exc:
        read_folder(tmp_path)
    assert one_line(exc) == (
        f"{tmp_path}: the folder mixes 8-bit and 16-bit images (a.png is 8-bit (L), "
        "b.png is 16-bit (I;16)); convert them to one bit depth first"
    )


# ----------------------------------------------------------------------------- D7 EXIF


@pytest.mark.parametrize("orientation", range(1, 9))
def test_d7_exif_orientation_png(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path / "a.png", _rand(4, 6, 3), exif=exif)
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im))
    source = read_folder(tmp_path)
    assert source.image_shape == ((6, 4, 3) if orientation >= 5 else (4, 6, 3))
    assert source.conversions == ({} if orientation == 1 else {"EXIF orientation applied": 1})
    np.testing.assert_array_equal(_all(source)[0], expected)


def test_d7_exif_orientation_6_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path / "a.jpg", _rand(16, 24, 3), exif=exif, quality=90)
    with Image.open(path) as im:
        assert im.size == (24, 16)
        expected = np.asarray(ImageOps.exif_transpose(im))
    source = read_folder(tmp_path)
    assert source.image_shape == (24, 16, 3)  # W and H swapped
    np.testing.assert_array_equal(_all(source)[0], expected)


def test_d7_rotated_files_sized_after_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    save(tmp_path / "a.png", _rand(4, 6), exif=exif)
    save(tmp_path / "b.png", _rand(6, 4))
    assert read_folder(tmp_path).image_shape == (6, 4, 1)


# ----------------------------------------------------------------------------- D8 links


def test_d8_symlinks(tmp_path):
    root = tmp_path / "root"
    inside = save(root / "cls" / "a.png", _rand(4, 4))
    outside = save(tmp_path / "secret.png", _rand(4, 4))
    (root / "cls" / "out.png").symlink_to(outside)
    (root / "cls" / "in.png").symlink_to(inside)
    (root / "cls" / "dangling.png").symlink_to(tmp_path / "nope.png")
    (root / "loop").symlink_to(root)  # a folder loop
    (root / "cls" / "up").symlink_to("..")
    (root / "outdir").symlink_to(tmp_path)
    os.link(inside, root / "cls" / "hard.png")
    source = read_folder(root)
    assert source.names == ["cls/a.png", "cls/hard.png", "cls/in.png"]
    assert source.classes == ["cls"]
    images = _all(source)
    np.testing.assert_array_equal(images[2], images[0])
    assert dict(source.skipped) == {
        "cls/dangling.png": "broken symbolic link (No such file or directory)",
        "cls/out.png": "symbolic link to a file outside the folder, not followed",
        "cls/up": "symbolic link to a folder, not followed",
        "loop": "symbolic link to a folder, not followed",
        "outdir": "symbolic link to a folder, not followed",
    }


def test_d8_root_given_as_symlink(tmp_path):
    save(tmp_path / "real" / "a.png", _rand(4, 4))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    source = read_folder(tmp_path / "link")
    assert source.names == ["a.png"] and source.path == str(tmp_path / "link")


# ----------------------------------------------------------------------------- D9 special files


def test_d9_fifo_and_socket_not_opened(tmp_path):
    save(tmp_path / "a.png", _rand(4, 4))
    os.mkfifo(tmp_path / "pipe.png")
    os.mkfifo(tmp_path / "pipe_no_ext")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "sock.png"))
    except OSError:  # path too long for AF_UNIX
        sock.close()
        sock = None
    result: dict = {}

    def run() -> None:
        try:
            result["source"] = read_folder(tmp_path)
        except BaseException as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)  # opening a FIFO would block forever
    thread.start()
    thread.join(30)
    if sock is not None:
        sock.close()
    assert not thread.is_alive(), "read_folder blocked on a FIFO"
    source = result["source"]
    assert source.names == ["a.png"]
    expected = {"pipe.png": "not a regular file (FIFO), not opened"}
    if sock is not None:
        expected["sock.png"] = "not a regular file (socket), not opened"
    assert dict(source.skipped) == expected


# ----------------------------------------------------------------------------- D10 names


def test_d10_unicode_names_survive(tmp_path):
    names = [
        "caf\u00e9.png",  # NFC
        "cafe\u0301.png",  # NFD: a different file
        "\U0001f431.png",
        "\u05e9\u05dc\u05d5\u05dd.png",  # RTL
        "x" * 240 + ".png",
        os.fsdecode(b"\xff\xfe.png"),  # undecodable bytes
        "new\nline.png",
        "sp ace.png",
    ]
    expected = {}
    for i, name in enumerate(names):
        save(tmp_path / name, np.full((3, 3), i, np.uint8), "PNG")
        expected[name] = i
    source = read_folder(tmp_path)
    assert source.names == sorted(names, key=os.fsencode)
    assert {os.fsencode(n) for n in source.names} == {os.fsencode(n) for n in names}
    for name, image in zip(source.names, _all(source), strict=True):
        assert image[0, 0, 0] == expected[name]


_NAME_TEXT = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="/\0"), min_size=1, max_size=40
).filter(lambda t: not t.startswith(".") and len(os.fsencode(t)) <= 200)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stems=st.lists(_NAME_TEXT, min_size=1, max_size=4, unique_by=os.fsencode))
def test_d10_any_text_names_round_trip(stems):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = [f"{stem}.png" for stem in stems]
        for i, name in enumerate(names):
            Image.fromarray(np.full((2, 2), i, np.uint8)).save(root / name, "PNG")
        source = read_folder(root)
        assert source.names == sorted(names, key=os.fsencode)
        for name, image in zip(source.names, _all(source), strict=True):
            assert image[0, 0, 0] == names.index(name)


def test_d10_bad_file_with_odd_name_gives_one_line(tmp_path):
    name = os.fsdecode(b"bad\n\xff.png")
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(InputError) as exc:
        read_folder(tmp_path)
    msg = one_line(exc)
    assert "bad\\n\\udcff.png: empty file" in msg


# ----------------------------------------------------------------------------- D11 order, labels


def test_d11_order_by_bytes_and_repeatable(tmp_path):
    names = ["b.png", "B.png", "a10.png", "a2.png", "\u00e9.png", "a-b.png", "Z.png"]
    for order in (names, names[::-1]):
        folder = tmp_path / ("fwd" if order is names else "rev")
        for name in order:
            save(folder / name, _rand(3, 3))
    first = read_folder(tmp_path / "fwd")
    assert first.names == ["B.png", "Z.png", "a-b.png", "a10.png", "a2.png", "b.png", "\u00e9.png"]
    assert read_folder(tmp_path / "rev").names == first.names
    again = read_folder(tmp_path / "fwd")
    np.testing.assert_array_equal(_all(first), _all(again))


def test_labels_from_class_subfolders(tmp_path):
    save(tmp_path / "dog" / "x.png", _rand(3, 3))
    save(tmp_path / "cat" / "deep" / "er" / "y.png", _rand(3, 3))
    save(tmp_path / "cat" / "z.png", _rand(3, 3))
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    save(tmp_path / ".hidden" / "h.png", _rand(3, 3))
    save(tmp_path / "cat" / "._z.png", _rand(3, 3))
    source = read_folder(tmp_path)
    assert source.names == ["cat/deep/er/y.png", "cat/z.png", "dog/x.png"]
    assert source.classes == ["cat", "dog"]
    np.testing.assert_array_equal(source.labels, [0, 0, 1])
    assert source.labels.dtype == np.int64


def test_no_labels_when_files_in_root(tmp_path):
    save(tmp_path / "dog" / "x.png", _rand(3, 3))
    save(tmp_path / "y.png", _rand(3, 3))
    source = open_source(tmp_path)
    assert source.names == ["dog/x.png", "y.png"]
    assert source.labels is None and source.classes is None


def test_not_a_folder(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        read_folder(tmp_path / "missing")


def test_d8_folder_reached_twice_is_visited_once(tmp_path, monkeypatch):
    """A bind mount of a parent inside the folder (simulated: ``loop`` reports the root's inode)."""
    save(tmp_path / "a.png", _rand(3, 3))
    save(tmp_path / "loop" / "b.png", _rand(3, 3))
    real_lstat = os.lstat

    def fake_lstat(path, *args, **kwargs):
        if os.fspath(path) == str(tmp_path / "loop"):
            return real_lstat(tmp_path)
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", fake_lstat)
    source = read_folder(tmp_path)
    assert source.names == ["a.png"]
    assert source.skipped == [("loop", "folder already visited (mount loop), not followed")]
