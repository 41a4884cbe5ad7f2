"""Add a task-specific bias (paper section 4.2) to a committed store as a ``supplement`` stage.

The dense bias S̃ learned by knowledge distillation is compressed like an image — folded onto the
same sites and factorised by TT-SVD with small bonds — and stored as one more stage whose role is
``supplement``.  Decoding then returns ``MPSTotal(S) + S̃``; ``stats`` counts its bytes separately
and leaves it out of the parameter ratio of the task-agnostic stages.

The store is rewritten in a temporary sibling and swapped in like ``compress --overwrite`` does, so
a crash leaves the previous store.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mpsd.archive.codecs import array_codecs
from mpsd.archive.format import ATTRS_KEY, MANIFEST_NAME, StageMeta, chunk_separator, stored_cores
from mpsd.archive.reader import Archive
from mpsd.archive.writer import _Lock, recover, swap_into_place, write_manifest
from mpsd.core.codec import StageSpec, encode_batch
from mpsd.core.ttsvd import check_bonds
from mpsd.errors import OptionError, StoreError


def add_supplement(
    path: str | Path,
    bias: np.ndarray,
    *,
    bond: str | Sequence[int],
    dtype: str | None = None,
    settings: dict[str, object] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Archive:
    """Store a dense bias as a low-bond MPS stage of a committed store (replacing an older one).

    Parameters
    ----------
    path : str or Path
        A committed store.
    bias : ndarray of shape (N, H, W, C) (or (N, H, W) for greyscale)
        The bias in pixel units (the same units as decoded images), float.
    bond : str or sequence of int
        Bond dimensions of the bias MPS, e.g. ``"2,2,2,2"`` (capped by the exact ranks).
    dtype : {"int8", "float16", "float32"}, optional
        Must match the store's core dtype (the default).
    settings : dict, optional
        What produced the bias (teacher, temperature, ...), kept in the stage metadata.
    progress : callable, optional
        Called with the number of images done.

    Returns
    -------
    Archive
        The store, reopened.
    """
    from mpsd.api import parse_bonds

    path = Path(path)
    archive = Archive(path)
    meta = archive.meta
    n = len(archive)
    h, w, c = archive.image_shape
    bias = np.asarray(bias, dtype=np.float32)
    if bias.ndim == 3 and c == 1:
        bias = bias[..., np.newaxis]
    if bias.shape != (n, h, w, c):
        raise OptionError(f"{path}: bias must have shape {(n, h, w, c)}, got {bias.shape}")
    if not np.isfinite(bias).all():
        raise OptionError(f"{path}: bias has NaN or Inf values")
    if dtype is not None and dtype != meta.storage_dtype:
        raise OptionError(f"{path}: the store keeps {meta.storage_dtype} cores; the supplement must too")
    sites = meta.layout.sites
    bonds = check_bonds(parse_bonds(bond) or (), sites)
    keep = [i for i, s in enumerate(meta.stages) if s.role != "supplement"]
    index = len(keep)

    lock = _Lock(path.parent / f".{path.name}.lock")
    lock.acquire()
    tmp = path.parent / f".{path.name}.mpsd-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        recover(path)
        shutil.copytree(path, tmp, ignore=shutil.ignore_patterns(MANIFEST_NAME))
        # drop an older supplement stage (always the last stages)
        for i, st in enumerate(meta.stages):
            if st.role == "supplement":
                shutil.rmtree(tmp / f"stage{i}", ignore_errors=True)
        _write_stage(tmp, archive, bias, index, bonds, progress)
        root_meta_path = tmp / "zarr.json"
        root_meta = json.loads(root_meta_path.read_text())
        attrs = root_meta["attributes"][ATTRS_KEY]
        attrs["stages"] = [attrs["stages"][i] for i in keep] + [
            StageMeta(role="supplement", bonds=bonds, spec={"bonds": list(bonds), **(settings or {})}).to_dict()
        ]
        root_meta_path.write_text(json.dumps(root_meta, indent=2))
        old_manifest = json.loads((path / MANIFEST_NAME).read_text())
        kept = {k: old_manifest[k] for k in ("source_crc32c", "source_chunk_images") if k in old_manifest}
        write_manifest(tmp, n, kept, version=meta.format_version)
        swap_into_place(tmp, path)
    except OSError as exc:
        raise StoreError(f"{path}: writing the supplement failed: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.release()
    return Archive(path)


def _write_stage(
    root: Path,
    archive: Archive,
    bias: np.ndarray,
    index: int,
    bonds: tuple[int, ...],
    progress: Callable[[int], None] | None,
) -> None:
    import zarr
    from zarr.storage import LocalStore

    old = archive.meta
    # the store's metadata with the new stage in place: the shapes and packing of its cores
    meta = dataclasses.replace(old, stages=[*old.stages[:index], StageMeta(role="supplement", bonds=bonds)])
    n, m = len(archive), meta.mps_per_image
    sites = meta.layout.sites
    group = zarr.open_group(LocalStore(root), mode="r+", zarr_format=3)
    ch = meta.chunk_images
    codecs = array_codecs(chunk_separator(meta.format_version))  # the store's own key layout

    def make(name: str, shape: tuple[int, ...], dtype: str):  # type: ignore[no-untyped-def]
        return group.create_array(
            name, shape=shape, dtype=dtype, chunks=(min(ch, n), *shape[1:]),
            fill_value=0, config={"write_empty_chunks": True}, **codecs,
        )

    cores = [make(f"stage{index}/core{k}", meta.core_shape(index, k), meta.storage_dtype) for k in range(len(sites))]
    scales = make(f"stage{index}/scales", (n, m, len(sites)), "float32") if meta.storage_dtype == "int8" else None
    ranks = make(f"stage{index}/ranks", (n, m, len(sites) - 1), "uint16")
    local = make(f"stage{index}/local_error", (n, m, len(sites) - 1), "float32") if meta.has_metrics else None
    spec = [StageSpec(bonds=bonds)]
    for start in range(0, n, ch):
        stop = min(start + ch, n)
        b = stop - start
        tensors = meta.layout.to_sites(bias[start:stop]) / meta.max_value
        stage = encode_batch(tensors, spec, dtype=meta.storage_dtype).stages[0]
        for k, rows in enumerate(stored_cores(meta, index, stage.cores, stage.ranks)):
            cores[k][start:stop] = rows.reshape(b, m, *rows.shape[1:])
        if scales is not None:
            scales[start:stop] = stage.scales.reshape(b, m, -1)  # type: ignore[union-attr]
        ranks[start:stop] = stage.ranks.astype(np.uint16).reshape(b, m, -1)
        if local is not None:
            local[start:stop] = stage.local_errors.astype(np.float32).reshape(b, m, -1)
        if progress is not None:
            progress(stop)
