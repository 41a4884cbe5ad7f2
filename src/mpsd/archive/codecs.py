"""The codecs every mpsd array is written with, and the allow-list a reader accepts."""

from __future__ import annotations

from typing import Any

#: zstd level used for every array.  Level 1: on CIFAR-10 stores it writes 0.1–0.6 % more bytes
#: than zstd's default level 3 in half the CPU time, and level 19 saves only 0.5–1.5 % for 30–110×
#: the time (``docs/benchmarks.md``, "zstd level 1 instead of 3").
ZSTD_LEVEL = 1

#: Codec names a store may use; anything else is refused on open (untrusted stores).
ALLOWED_CODECS = frozenset({"bytes", "zstd", "crc32c", "transpose"})


def array_codecs(separator: str = ".") -> dict[str, Any]:
    """Keyword arguments for :func:`zarr.create_array`: zstd, then a CRC-32C checksum.

    The checksum comes after the compressor, so a flipped bit in a chunk is caught before
    decompression and reported as a corrupt chunk instead of turning into wrong pixels.

    Parameters
    ----------
    separator : {".", "/"}
        Of the chunk keys: ``"."`` (store format 3) puts every chunk file of an array in the
        array's folder (``c.0.0.0``); ``"/"`` (formats 1 and 2) makes a folder per chunk index
        (``c/0/0/0``), and on ext4 creating those folders cost more CPU than encoding did
        (``docs/format.md``).
    """
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return {
        "compressors": [ZstdCodec(level=ZSTD_LEVEL), Crc32cCodec()],
        "chunk_key_encoding": {"name": "default", "separator": separator},
    }


def stored_nbytes(arrays: dict[str, Any], *, chunk_rows: int = 1024) -> int:
    """Bytes the given arrays take when written the way mpsd writes its stores.

    Writes every array into an in-memory Zarr v3 group with :func:`array_codecs` (chunked along
    axis 0 by ``chunk_rows``) and sums the sizes of all stored values, metadata included.  Used to
    count baselines' bytes the same way as an mpsd store's.

    Parameters
    ----------
    arrays : dict of str to ndarray
        Arrays to measure, by name.
    """
    import numpy as np
    import zarr
    from zarr.storage import MemoryStore

    store = MemoryStore()
    group = zarr.open_group(store, mode="w", zarr_format=3)
    for name, value in arrays.items():
        value = np.asarray(value)
        chunks = (min(chunk_rows, max(value.shape[0], 1)), *value.shape[1:]) if value.ndim else ()
        arr = group.create_array(name, shape=value.shape, dtype=value.dtype, chunks=chunks, **array_codecs())
        arr[...] = value
    return sum(len(buf) for buf in store._store_dict.values())
