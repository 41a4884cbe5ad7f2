"""Coverage-guided fuzzing of the store reader with atheris (RELIABILITY E6).

A small committed store is built from the shipped CIFAR-10 sample (twelve images, chunks of six,
with metrics, labels and a residual stage).  Each input picks one of its files and replaces the
file's bytes; the harness then opens the store, decodes every image, computes the stats and runs
``verify``.  Anything raised that is not an :class:`mpsd.errors.MpsdError` (a ``ValueError`` from
numpy, a ``KeyError`` from a metadata lookup, ...) is a finding: atheris stops and writes the
input to ``crash-*``.  A hang is one too (``-timeout``).

Not part of the test suite (the replay of fixed seeds is,
``tests/test_untrusted.py::test_fuzzed_store_bytes_give_only_mpsd_errors``).  Run::

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/fuzz_store.py -max_total_time=300 -timeout=30 -len_control=0 /tmp/mpsd-fuzz-corpus

The corpus folder is seeded with every file of the store as it is, so mutations start from
valid metadata and chunks (the seeds all run the same code, so libFuzzer keeps one of them at
first; ``-len_control=0`` lets it mutate inputs of the seeds' full length from the start).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np

# coverage feedback from mpsd's reader and from zarr's metadata parsing (imported here, so that
# the modules mpsd imports lazily are instrumented too)
with atheris.instrument_imports(include=["mpsd", "zarr", "numcodecs"]):
    import zarr  # noqa: F401

    import mpsd
    import mpsd.api
    import mpsd.archive.codecs
    import mpsd.archive.reader
    import mpsd.stats
    from mpsd.archive.verify import verify_store
    from mpsd.data import sample_path
    from mpsd.errors import MpsdError

WORK = Path(tempfile.mkdtemp(prefix="mpsd-fuzz-"))
BASE = WORK / "base.zarr"
STORE = WORK / "store.zarr"


def build() -> list[Path]:
    """The base store and the sorted list of its files (relative paths)."""
    with np.load(sample_path("cifar10")) as f:
        images, labels = f["x_train"][:12], f["y_train"][:12]
    mpsd.compress(images, BASE, bond="2,3,3,2", residual_bonds=["2,2,2,2"], labels=labels, chunk_images=6)
    shutil.copytree(BASE, STORE)
    return sorted(p.relative_to(BASE) for p in BASE.rglob("*") if p.is_file())


FILES = build()


def seed_corpus(folder: Path) -> None:
    """One seed per file: its index byte, then its bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, rel in enumerate(FILES):
        (folder / f"seed-{i:03d}").write_bytes(bytes([i]) + (BASE / rel).read_bytes())


def test_one_input(data: bytes) -> None:
    if not data:
        return
    rel = FILES[data[0] % len(FILES)]
    victim = STORE / rel
    victim.write_bytes(data[1:])
    try:
        try:
            store = mpsd.open(STORE)
            store[:]
            store.stats()
        except MpsdError:
            pass
        report = verify_store(STORE)
        if report.state not in ("ok", "damaged", "invalid"):
            raise AssertionError(f"verify gave state {report.state!r}")
    finally:
        shutil.copyfile(BASE / rel, victim)  # the next input starts from the intact store


def main() -> None:
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    if corpus:
        seed_corpus(Path(corpus[0]))
    atheris.Setup(sys.argv, test_one_input)
    try:
        atheris.Fuzz()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
