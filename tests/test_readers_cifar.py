"""CIFAR reader: RELIABILITY.md rows D14 (hostile pickles), D15 (wrong structure), D16 (archives)."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mpsd.errors import InputError
from mpsd.readers import cifar
from mpsd.readers.cifar import SafeUnpickler, is_cifar, read_cifar

FIXTURES = Path(__file__).parent / "fixtures"
RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def src() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "cifar10_source.npz") as f:
        return {k: f[k] for k in f.files}


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def rows(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


# ----------------------------------------------------------------------------- pickle builders


def _str(b: bytes) -> bytes:
    """Python 2 ``str``: SHORT_BINSTRING or BINSTRING."""
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    return b"J" + struct.pack("<i", v)


def _py2_value(v) -> bytes:
    if isinstance(v, bytes):
        return _str(v)
    if isinstance(v, int):
        return _int(v)
    if isinstance(v, list):
        return b"]" + (b"(" + b"".join(_py2_value(x) for x in v) + b"e" if v else b"")
    if isinstance(v, np.ndarray):  # as numpy 1.x under Python 2 wrote it (the CIFAR files)
        assert v.dtype == np.uint8 and v.ndim == 2
        return (
            b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02"
            + _int(0)
            + b"\x85"
            + _str(b"b")
            + b"\x87R("
            + _int(1)
            + _int(v.shape[0])
            + _int(v.shape[1])
            + b"\x86"
            + b"cnumpy\ndtype\n"
            + _str(b"u1")
            + _int(0)
            + _int(1)
            + b"\x87R("
            + _int(3)
            + _str(b"|")
            + b"NNN"
            + b"J\xff\xff\xff\xff" * 2
            + _int(0)
            + b"tb"
            + b"\x89"
            + _str(v.tobytes())
            + b"tb"
        )
    raise TypeError(type(v))


def py2_pickle(d: dict) -> bytes:
    """A dict pickled the way Python 2 cPickle (protocol 2) did for the original CIFAR files."""
    body = b"".join(_str(k) + _py2_value(v) for k, v in d.items())
    return b"\x80\x02}q\x00(" + body + b"u."


def _arg(a) -> bytes:
    if isinstance(a, dict):
        return b"}"
    enc = a.encode()
    return b"X" + struct.pack("<I", len(enc)) + enc


def call2(module: str, name: str, *args) -> bytes:
    """Protocol-2 opcodes calling ``module.name(*args)`` (GLOBAL + REDUCE), no PROTO/STOP."""
    return b"c" + f"{module}\n{name}\n".encode() + b"(" + b"".join(_arg(a) for a in args) + b"tR"


def call4(module: str, name: str, *args) -> bytes:
    """Protocol-4 opcodes: STACK_GLOBAL, which allows dotted names (``os`` / ``path.join``)."""

    def short(s: str) -> bytes:
        enc = s.encode()
        return b"\x8c" + bytes([len(enc)]) + enc

    return short(module) + short(name) + b"\x93(" + b"".join(_arg(a) for a in args) + b"tR"


def batch_with(payload: bytes, proto: int = 2) -> bytes:
    """A batch dict whose ``data`` value is built by ``payload``."""
    return bytes([0x80, proto]) + b"}(" + _str(b"data") + payload + b"u."


# ----------------------------------------------------------------------------- format variants


def test_original_python2_pickle_format(tmp_path, src):
    data = rows(src["x_train"][:7])
    blob = py2_pickle(
        {
            b"batch_label": b"training batch 1 of 5",
            b"labels": [int(v) for v in src["y_train"][:7]],
            b"data": data,
            b"filenames": [b"a.png"] * 7,
        }
    )
    assert b"numpy.core.multiarray" in blob and b"_codecs" not in blob
    (tmp_path / "data_batch_1").write_bytes(blob)
    source = read_cifar(tmp_path / "data_batch_1")
    np.testing.assert_array_equal(source.read(0, 7), src["x_train"][:7])
    np.testing.assert_array_equal(source.labels, src["y_train"][:7])
    assert source.classes is None
    assert read_cifar(tmp_path).n_images == 7  # the folder too


def test_cifar100_layout(tmp_path):
    x = RNG.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    fine = [0, 99, 5, 42, 7, 1]
    names = [f"class{i}".encode() for i in range(100)]
    for split, sl in (("train", slice(0, 4)), ("test", slice(4, 6))):
        batch = {
            b"filenames": [b"x"] * len(x[sl]),
            b"batch_label": split.encode(),
            b"fine_labels": fine[sl],
            b"coarse_labels": [0] * len(x[sl]),
            b"data": rows(x[sl]),
        }
        (tmp_path / split).write_bytes(pickle.dumps(batch, protocol=2))
    (tmp_path / "meta").write_bytes(
        pickle.dumps({b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20}, protocol=2)
    )
    assert is_cifar(tmp_path) and is_cifar(tmp_path / "train")
    for split, sl in (("train", slice(0, 4)), ("test", slice(4, 6))):
        source = read_cifar(tmp_path, split=split)
        np.testing.assert_array_equal(source.read(0, source.n_images), x[sl])
        assert source.labels.tolist() == fine[sl]
        assert source.classes[99] == "class99" and len(source.classes) == 100
    single = read_cifar(tmp_path / "test")
    assert single.labels.tolist() == [4 and 7, 1] and single.classes is not None


def test_is_cifar_negative(tmp_path):
    (tmp_path / "train").write_text("not a pickle")
    assert not is_cifar(tmp_path / "train")
    assert not is_cifar(tmp_path)
    assert not is_cifar(FIXTURES / "fashion")
    assert not is_cifar(FIXTURES / "images")
    assert not is_cifar(tmp_path / "missing")


def test_missing_batch_in_sequence(tmp_path):
    shutil.copy(FIXTURES / "cifar10" / "data_batch_1", tmp_path / "data_batch_1")
    shutil.copy(FIXTURES / "cifar10" / "data_batch_2", tmp_path / "data_batch_3")
    with pytest.raises(
        InputError, match=r"data_batch_2 is missing \(found data_batch_1, data_batch_3\)"
    ):
        read_cifar(tmp_path)
    with pytest.raises(InputError, match="no 'test_batch' for split 'test'"):
        read_cifar(tmp_path, split="test")
    with pytest.raises(InputError, match="split must be 'train' or 'test'"):
        read_cifar(tmp_path, split="valid")


def test_meta_alone_is_not_images():
    with pytest.raises(InputError, match="holds class names, not images"):
        read_cifar(FIXTURES / "cifar10" / "batches.meta")


# ----------------------------------------------------------------------------- D14 hostile pickles


def _payloads(canary: Path) -> dict[str, bytes]:
    code = f"open({str(canary)!r}, 'w').close()"
    touch = f"touch {canary}"
    return {
        "os.system": batch_with(call2("os", "system", touch)),
        "posix.system": batch_with(call2("posix", "system", touch)),
        "builtins.eval": batch_with(call2("builtins", "eval", code)),
        "builtins.exec": batch_with(call2("builtins", "exec", code)),
        "__builtin__.eval": batch_with(call2("__builtin__", "eval", code)),
        "subprocess.getoutput": batch_with(call2("subprocess", "getoutput", touch)),
        "numpy runstring": batch_with(call2("numpy.testing._private.utils", "runstring", code, {})),
        "dotted numpy gadget": batch_with(
            call4("numpy", "testing._private.utils.runstring", code, {}), 4
        ),
        "dotted os.path.join": batch_with(call4("os", "path.join", "a", "b"), 4),
        "dotted on allowed module": batch_with(call4("numpy", "ndarray.__reduce__"), 4),
        "builtins.getattr": batch_with(call2("builtins", "getattr", "x", "y")),
        "numpy.load": batch_with(call2("numpy", "load", str(canary))),
        "top-level reduce": b"\x80\x02" + call2("os", "system", touch) + b".",
    }


def test_d14_payloads_are_live_with_plain_pickle(tmp_path):
    """Control: the same bytes run code under ``pickle.loads`` (so the test below can fail)."""
    for key in ("os.system", "builtins.eval", "dotted numpy gadget"):
        canary = tmp_path / f"canary_{key.replace(' ', '_')}"
        pickle.loads(_payloads(canary)[key])  # deliberately unsafe: the control
        assert canary.exists()


@pytest.mark.parametrize("key", list(_payloads(Path("x"))))
def test_d14_malicious_pickle_runs_nothing(tmp_path, key):
    canary = tmp_path / "canary"
    batch = tmp_path / "data_batch_1"
    batch.write_bytes(_payloads(canary)[key])
    with pytest.raises(InputError) as exc:
        read_cifar(batch)
    msg = one_line(exc)
    assert msg.startswith(f"{batch}: refused to unpickle: global '")
    assert "is not allowed" in msg
    assert not canary.exists()
    assert os.listdir(tmp_path) == ["data_batch_1"]


@pytest.mark.parametrize(
    "payload, message",
    [
        (
            call2("_codecs", "encode", "x", "rot13"),
            "_codecs.encode is only allowed as encode(str, 'latin1')",
        ),
        (call2("numpy", "dtype", "O"), "numpy dtype 'O' is not allowed"),
        (call2("numpy", "dtype", "V8"), "numpy dtype 'V8' is not allowed"),
        (
            b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n"
            + _int(0)
            + b"\x85"
            + _str(b"b")
            + b"tR",
            None,
        ),  # the normal call: allowed, then fails validation (no labels)
        (
            b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(J\x00\x00\x00\x40J\x00\x00\x00\x40t"
            + _str(b"b")
            + b"tR",
            "_reconstruct asked for (1073741824, 1073741824) elements, refused",
        ),
        (
            b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\ndtype\n"
            + _str(b"u1")
            + b"\x85R"
            + b"K\x00\x85"
            + _str(b"b")
            + b"tR",
            "_reconstruct called with arguments numpy never writes",
        ),
    ],
)
def test_d14_allowed_globals_only_take_numpys_arguments(tmp_path, payload, message):
    batch = tmp_path / "test_batch"
    batch.write_bytes(batch_with(payload))
    with pytest.raises(InputError) as exc:
        read_cifar(batch)
    if message is None:
        assert "'data' must be a uint8 array, found int8" in one_line(exc)
    else:
        assert one_line(exc) == f"{batch}: refused to unpickle: {message}"


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"", "unpickling failed: EOFError"),
        (b"\x80\x02}(U\x04data", "unpickling failed"),
        (b"\x80\x02P\x01x\x00.", "persistent"),  # persistent id
        (np.random.default_rng(3).bytes(64), "unpickling failed"),
    ],
    ids=["empty", "truncated", "persistent-id", "random"],
)
def test_d14_garbage_bytes(tmp_path, blob, message):
    batch = tmp_path / "data_batch_1"
    batch.write_bytes(blob)
    with pytest.raises(InputError) as exc:
        read_cifar(batch)
    assert one_line(exc).startswith(f"{batch}: ") and message in str(exc.value)


def test_unpickler_class_refuses_directly():
    with pytest.raises(pickle.UnpicklingError, match=r"global 'os\.system' is not allowed"):
        SafeUnpickler(io.BytesIO(b"\x80\x02cos\nsystem\n.")).load()


# ----------------------------------------------------------------------------- D15 structure


def _good(n: int = 2) -> dict:
    return {
        b"batch_label": b"b",
        b"labels": list(range(n)),
        b"data": np.zeros((n, 3072), np.uint8),
        b"filenames": [b"f"] * n,
    }


def _with(**changes) -> dict:
    d = _good()
    for k, v in changes.items():
        if v is None:
            del d[k.encode()]
        else:
            d[k.encode()] = v
    return d


@pytest.mark.parametrize(
    "obj, message",
    [
        ([1, 2, 3], "a CIFAR batch must be a dict, found list"),
        (_with(data=None), "no 'data' in the batch (keys: ['batch_label', 'filenames', 'labels'])"),
        (
            _with(data=np.zeros((2, 3072), np.float32)),
            "'data' must be a uint8 array, found float32",
        ),
        (_with(data=[[0] * 3072] * 2), "'data' must be a uint8 array, found list"),
        (
            _with(data=np.zeros((2, 3071), np.uint8)),
            "'data' must have shape (N, 3072) with N >= 1, found (2, 3071)",
        ),
        (
            _with(data=np.zeros(3072, np.uint8)),
            "'data' must have shape (N, 3072) with N >= 1, found (3072,)",
        ),
        (
            _with(data=np.zeros((0, 3072), np.uint8), labels=[]),
            "'data' must have shape (N, 3072) with N >= 1, found (0, 3072)",
        ),
        (
            _with(labels=None),
            "no 'labels' or 'fine_labels' in the batch (keys: ['batch_label', 'data', 'filenames'])",
        ),
        (_with(labels=[0, 10]), "labels range 0..10 is outside 0..9 (the number of class names)"),
        (_with(labels=[-1, 0]), "labels range -1..0 is outside 0..9 (the number of class names)"),
        (_with(labels=[0, 1, 2]), "2 images but 3 labels"),
        (_with(labels=[b"a", b"b"]), "'labels' must be a list of integers"),
        (_with(labels=[0.0, 1.0]), "'labels' must be a list of integers"),
        (_with(labels=np.zeros((2, 1), np.int64)), "'labels' must be a list of integers"),
    ],
)
def test_d15_wrong_structure(tmp_path, obj, message):
    shutil.copy(FIXTURES / "cifar10" / "batches.meta", tmp_path / "batches.meta")
    batch = tmp_path / "data_batch_1"
    batch.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(InputError) as exc:
        read_cifar(batch)
    assert one_line(exc) == f"{batch}: {message}"


def test_d15_label_range_without_meta(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(_with(labels=[0, 10]), protocol=2))
    with pytest.raises(InputError, match=r"labels range 0..10 is outside 0..9$"):
        read_cifar(tmp_path)
    d = _with(labels=None)
    d[b"fine_labels"] = [0, 99]
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(d, protocol=2))
    assert read_cifar(tmp_path).labels.tolist() == [0, 99]


@pytest.mark.parametrize(
    "meta, message",
    [
        ({b"num_vis": 3072}, "expected 'label_names' or 'fine_label_names' as a list of strings"),
        ({b"label_names": [1, 2]}, "expected 'label_names'"),
        ("nope", "a CIFAR meta file must be a dict, found str"),
    ],
)
def test_d15_bad_meta(tmp_path, meta, message):
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(_good(), protocol=2))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    with pytest.raises(InputError) as exc:
        read_cifar(tmp_path)
    assert one_line(exc).startswith(f"{tmp_path / 'batches.meta'}: {message}")


# ----------------------------------------------------------------------------- D16 archives


def _fixture_members() -> dict[str, bytes]:
    return {
        n: (FIXTURES / "cifar10" / n).read_bytes()
        for n in ("batches.meta", "data_batch_1", "data_batch_2", "test_batch")
    }


def make_tar(path: Path, extra: list[tarfile.TarInfo], *, drop: tuple[str, ...] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, blob in _fixture_members().items():
            if name in drop:
                continue
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
        for info in extra:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return path


def _info(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


@pytest.mark.parametrize(
    "member, drop, message",
    [
        (_info("../data_batch_1", size=5), ("data_batch_1",), "has a '..' path"),
        (
            _info("cifar-10-batches-py/../../data_batch_1", size=5),
            ("data_batch_1",),
            "has a '..' path",
        ),
        (_info("/etc/data_batch_1", size=5), ("data_batch_1",), "has an absolute path"),
        (
            _info("cifar-10-batches-py/data_batch_1", tarfile.SYMTYPE, link="/etc/passwd"),
            ("data_batch_1",),
            "is a link or special file",
        ),
        (
            _info(
                "cifar-10-batches-py/data_batch_1",
                tarfile.LNKTYPE,
                link="cifar-10-batches-py/test_batch",
            ),
            ("data_batch_1",),
            "is a link or special file",
        ),
        (
            _info("cifar-10-batches-py/test_batch", tarfile.CHRTYPE),
            ("test_batch",),
            "is a link or special file",
        ),
    ],
)
def test_d16_unsafe_member_with_a_batch_name_refused(tmp_path, member, drop, message):
    archive = make_tar(tmp_path / "cifar-10-python.tar.gz", [member], drop=drop)
    split = "test" if "test_batch" in drop else "train"
    with pytest.raises(InputError) as exc:
        read_cifar(archive, split=split)
    assert one_line(exc) == f"{archive}: archive member {member.name!r} {message}, refused"
    assert sorted(os.listdir(tmp_path)) == ["cifar-10-python.tar.gz"]


def test_d16_unsafe_other_members_ignored_and_nothing_extracted(tmp_path, src):
    work = tmp_path / "work"
    work.mkdir()
    extra = [
        _info("../evil.sh", size=10),
        _info("/tmp/evil_abs", size=10),
        _info("cifar-10-batches-py/link", tarfile.SYMTYPE, link="/etc/passwd"),
        _info("cifar-10-batches-py/readme.html", size=20),
    ]
    archive = make_tar(work / "cifar-10-python.tar.gz", extra)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        source = read_cifar(archive)
    finally:
        os.chdir(cwd)
    np.testing.assert_array_equal(source.read(0, 100), src["x_train"])
    assert os.listdir(work) == ["cifar-10-python.tar.gz"]
    assert os.listdir(tmp_path) == ["work"]
    assert not Path("/tmp/evil_abs").exists()


def test_d16_member_size_cap(tmp_path, monkeypatch):
    archive = make_tar(tmp_path / "cifar-10-python.tar.gz", [])
    monkeypatch.setattr(cifar, "MAX_MEMBER_BYTES", 100_000)
    with pytest.raises(InputError) as exc:
        read_cifar(archive)
    assert "declares" in one_line(exc) and "caps: 100000 per member" in str(exc.value)


def test_d16_total_and_count_caps(tmp_path, monkeypatch):
    archive = make_tar(
        tmp_path / "cifar-10-python.tar.gz", [_info(f"junk{i}", size=1) for i in range(5)]
    )
    monkeypatch.setattr(cifar, "MAX_ARCHIVE_BYTES", 300_000)
    with pytest.raises(InputError, match="300000 in all"):
        read_cifar(archive)
    monkeypatch.setattr(cifar, "MAX_ARCHIVE_BYTES", 2**30)
    monkeypatch.setattr(cifar, "MAX_ARCHIVE_MEMBERS", 6)
    with pytest.raises(InputError, match="more than 6 archive members, refused"):
        read_cifar(archive)


def test_d16_duplicate_and_corrupt_archives(tmp_path):
    dup = make_tar(tmp_path / "cifar-10-python.tar.gz", [_info("other/data_batch_2", size=4)])
    with pytest.raises(InputError, match="the archive holds more than one 'data_batch_2'"):
        read_cifar(dup)
    good = (FIXTURES / "cifar-10-python.tar.gz").read_bytes()
    cut = tmp_path / "cut" / "cifar-10-python.tar.gz"
    cut.parent.mkdir()
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError) as exc:
        read_cifar(cut)
    assert one_line(exc).startswith(f"{cut}: not a readable tar archive")
    junk = tmp_path / "junk-cifar.tgz"
    junk.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match="not a readable tar archive"):
        read_cifar(junk)
