"""The mpsd store format: names, version, metadata schema and its validation.

See ``docs/format.md`` for the full description.  Everything read from a store is untrusted:
:func:`parse_metadata` checks every field against caps and against each other before anything
is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpsd.core.layout import SiteLayout
from mpsd.core.packing import bond_ranks, pack_core, unpack_core
from mpsd.core.quantize import STORAGE_DTYPES
from mpsd.core.ttsvd import exact_ranks
from mpsd.errors import StoreError

FORMAT_NAME = "mpsd"
#: Version written.  3: chunk files named ``c.<i>.<j>...`` inside their array's folder (no folder
#: per chunk); 2: cores row-packed by each tensor's own ranks, chunk keys ``c/<i>/<j>/...``;
#: 1: cores zero-padded to the storage bonds.  1 and 2 are read, never written.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST_NAME = "mpsd-manifest.json"


def chunk_separator(version: int) -> str:
    """Separator of the chunk keys of arrays in a store of this format version."""
    return "." if version >= 3 else "/"


def chunk_key(name: str, arr: Any, index: int) -> str:
    """Store key of chunk ``index`` (along axis 0) of the zarr array ``arr`` at ``name``, as its
    metadata encodes it (``stage0/core2/c.1.0.0`` in format 3, ``.../c/1/0/0`` before)."""
    return f"{name}/{arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))}"

ATTRS_KEY = "mpsd"

#: Caps applied to metadata read from a store before anything is allocated.
MAX_IMAGES = 2**40
MAX_SIDE = 2**16
MAX_CHANNELS = 4
MAX_SITES = 64
MAX_BOND = 4096
MAX_STAGES = 16
MAX_CHUNK_ELEMENTS = 2**28

IMAGE_DTYPES = {"uint8": 255, "uint16": 65535}
STAGE_ROLES = ("image", "residual", "supplement")


@dataclass
class StageMeta:
    """One stored stage: its role, the truncation asked for and the storage shape of its cores."""

    role: str
    bonds: tuple[int, ...]
    spec: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "bonds": list(self.bonds), "truncation": self.spec}


@dataclass
class StoreMeta:
    """Everything needed to decode a store (kept in the root group's ``mpsd`` attribute)."""

    layout: SiteLayout
    image_dtype: str
    channel_axis: bool
    n_images: int
    stages: list[StageMeta]
    storage_dtype: str
    chunk_images: int
    classes: list[str] | None = None
    has_labels: bool = False
    has_names: bool = False
    has_metrics: bool = True
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def max_value(self) -> int:
        return IMAGE_DTYPES[self.image_dtype]

    @property
    def mps_per_image(self) -> int:
        return self.layout.mps_per_image

    @property
    def packed(self) -> bool:
        """Whether cores are row-packed (formats 2 and 3) rather than zero-padded (format 1)."""
        return self.format_version >= 2

    def core_shape(self, stage: int, k: int) -> tuple[int, ...]:
        """Shape of the array ``stage{stage}/core{k}`` (see ``docs/format.md``)."""
        bonds = (1, *self.stages[stage].bonds, 1)
        d = self.layout.sites[k]
        per_mps = (bonds[k] * d * bonds[k + 1],) if self.packed else (bonds[k], d, bonds[k + 1])
        return (self.n_images, self.mps_per_image, *per_mps)

    def to_attrs(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "n_images": self.n_images,
            "image": {
                "height": self.layout.height,
                "width": self.layout.width,
                "channels": self.layout.channels,
                "dtype": self.image_dtype,
                "channel_axis": self.channel_axis,
            },
            "layout": {
                **self.layout.to_dict(),
                "sites": list(self.layout.sites),
                "padded_height": self.layout.padded_height,
                "padded_width": self.layout.padded_width,
            },
            "stages": [s.to_dict() for s in self.stages],
            "quantisation": {"dtype": self.storage_dtype, "scale": "per image, per core: max|x|/127" if self.storage_dtype == "int8" else None},
            "normalisation": f"pixels / {self.max_value}",
            "chunk_images": self.chunk_images,
            "classes": self.classes,
            "has_labels": self.has_labels,
            "has_names": self.has_names,
            "has_metrics": self.has_metrics,
            "source": self.source,
        }


def _int(data: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise StoreError(f"{where}: metadata field {key!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _ints(values: Any, lo: int, hi: int, where: str, what: str) -> tuple[int, ...]:
    if not isinstance(values, list) or not 1 <= len(values) <= MAX_SITES:
        raise StoreError(f"{where}: metadata field {what!r} must be a list of 1..{MAX_SITES} integers")
    out = []
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise StoreError(f"{where}: metadata field {what!r} has {v!r}, expected integers in [{lo}, {hi}]")
        out.append(v)
    return tuple(out)


def parse_metadata(attrs: Any, where: str) -> StoreMeta:
    """Validate the ``mpsd`` attribute of a store and build a :class:`StoreMeta`.

    Raises
    ------
    StoreError
        On any missing, mistyped, out-of-range or inconsistent field.
    """
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{where}: not an mpsd store (no 'mpsd' format attribute)")
    version = attrs.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise StoreError(
            f"{where}: store format version {version!r} is not supported "
            f"(this mpsd reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    image = attrs.get("image")
    layout_d = attrs.get("layout")
    if not isinstance(image, dict) or not isinstance(layout_d, dict):
        raise StoreError(f"{where}: metadata lacks 'image' or 'layout'")
    height = _int(image, "height", 1, MAX_SIDE, where)
    width = _int(image, "width", 1, MAX_SIDE, where)
    channels = _int(image, "channels", 1, MAX_CHANNELS, where)
    dtype = image.get("dtype")
    if dtype not in IMAGE_DTYPES:
        raise StoreError(f"{where}: image dtype {dtype!r} is not one of {sorted(IMAGE_DTYPES)}")
    rows = _ints(layout_d.get("row_factors"), 1, MAX_SIDE, where, "row_factors")
    cols = _ints(layout_d.get("col_factors"), 1, MAX_SIDE, where, "col_factors")
    if len(rows) != len(cols) or math.prod(rows) > MAX_SIDE or math.prod(cols) > MAX_SIDE:
        raise StoreError(f"{where}: row/column factors {rows} / {cols} do not describe a valid padded image")
    order, colour = layout_d.get("order"), layout_d.get("colour")
    if order not in ("quadtree", "row") or colour not in ("separate", "site"):
        raise StoreError(f"{where}: unknown order {order!r} or colour mode {colour!r}")
    try:
        layout = SiteLayout(height, width, channels, rows, cols, order, colour)
    except ValueError as exc:
        raise StoreError(f"{where}: inconsistent layout: {exc}") from exc
    n_images = _int(attrs, "n_images", 1, MAX_IMAGES, where)
    chunk_images = _int(attrs, "chunk_images", 1, MAX_IMAGES, where)
    quant = attrs.get("quantisation")
    storage = quant.get("dtype") if isinstance(quant, dict) else None
    if storage not in STORAGE_DTYPES:
        raise StoreError(f"{where}: core dtype {storage!r} is not one of {STORAGE_DTYPES}")
    stages_d = attrs.get("stages")
    if not isinstance(stages_d, list) or not 1 <= len(stages_d) <= MAX_STAGES:
        raise StoreError(f"{where}: metadata must list 1..{MAX_STAGES} stages")
    exact = exact_ranks(layout.sites)
    stages = []
    for i, sd in enumerate(stages_d):
        if not isinstance(sd, dict) or sd.get("role") not in STAGE_ROLES:
            raise StoreError(f"{where}: stage {i} has no valid role")
        bonds = _ints(sd.get("bonds"), 1, MAX_BOND, where, f"stages[{i}].bonds")
        if len(bonds) != len(layout.sites) - 1 or any(b > e for b, e in zip(bonds, exact, strict=True)):
            raise StoreError(
                f"{where}: stage {i} bonds {list(bonds)} do not fit sites {list(layout.sites)} "
                f"(exact ranks {list(exact)})"
            )
        stages.append(StageMeta(role=sd["role"], bonds=bonds, spec=sd.get("truncation") or {}))
    classes = attrs.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise StoreError(f"{where}: 'classes' must be a list of strings")
    return StoreMeta(
        layout=layout,
        image_dtype=dtype,
        channel_axis=bool(image.get("channel_axis", True)),
        n_images=n_images,
        stages=stages,
        storage_dtype=storage,
        chunk_images=chunk_images,
        classes=classes,
        has_labels=bool(attrs.get("has_labels")),
        has_names=bool(attrs.get("has_names")),
        has_metrics=bool(attrs.get("has_metrics", True)),
        source=attrs.get("source") if isinstance(attrs.get("source"), dict) else {},
        format_version=version,
    )


def stored_cores(meta: StoreMeta, stage: int, cores: list[np.ndarray], ranks: np.ndarray) -> list[np.ndarray]:
    """The cores of one stage of a batch as the store keeps them.

    Parameters
    ----------
    meta : StoreMeta
    stage : int
        Index of the stage.
    cores : list of ndarray
        Core k of shape (T, R_{k-1}, d_k, R_k) in the storage dtype, zero-padded to the batch's
        largest ranks (T = images · MPS per image).
    ranks : ndarray of shape (T, n−1)
        The ranks each tensor uses.

    Returns
    -------
    list of ndarray
        Core k as (T, *meta.core_shape(stage, k)[2:]): row-packed (format 2) or zero-padded to the
        storage bonds (format 1).
    """
    full = bond_ranks(ranks)
    out = []
    for k, core in enumerate(cores):
        core = np.asarray(core).astype(meta.storage_dtype, copy=False)
        shape = meta.core_shape(stage, k)[2:]
        if meta.packed:
            out.append(pack_core(core, full[:, k], full[:, k + 1], shape[0]))
        elif core.shape[1:] == shape:
            out.append(np.ascontiguousarray(core))
        else:
            padded = np.zeros((core.shape[0], *shape), dtype=core.dtype)
            padded[:, : core.shape[1], :, : core.shape[3]] = core
            out.append(padded)
    return out


def checked_ranks(meta: StoreMeta, stage: int, ranks: np.ndarray, where: str) -> np.ndarray:
    """Ranks read from a store as int64 (T, n−1), each checked to lie in 1..the storage bond.

    Packed rows are read by these ranks: a rank above its storage bond would read past a core.

    Raises
    ------
    StoreError
        When a rank is out of range.
    """
    bonds = np.asarray(meta.stages[stage].bonds, dtype=np.int64)
    ranks = np.asarray(ranks, dtype=np.int64).reshape(-1, bonds.size)
    if ranks.size and ((ranks < 1).any() or (ranks > bonds).any()):
        raise StoreError(f"{where}: stage {stage} has ranks outside 1..{list(bonds)}")
    return ranks


def cores_from_storage(meta: StoreMeta, stage: int, stored: list[np.ndarray], ranks: np.ndarray | None, where: str) -> list[np.ndarray]:
    """Inverse of :func:`stored_cores`: zero-padded cores (T, R_{k-1}, d_k, R_k) to contract.

    For format 2 the cores are padded to the largest ranks among these T tensors (not to the
    storage bonds), so that a chunk of low-rank tensors is contracted at its own size.

    Raises
    ------
    StoreError
        When a rank is outside 1..storage bond (format 2 needs ``ranks``).
    """
    t = stored[0].shape[0] if stored else 0
    if not meta.packed:
        return [s.reshape(t, *meta.core_shape(stage, k)[2:]) for k, s in enumerate(stored)]
    if ranks is None:
        raise StoreError(f"{where}: stage {stage} needs its ranks to unpack its cores")
    full = bond_ranks(checked_ranks(meta, stage, ranks, where))
    top = full.max(axis=0) if t else np.ones(len(meta.stages[stage].bonds) + 2, dtype=np.int64)
    sites = meta.layout.sites
    return [
        unpack_core(s.reshape(t, -1), full[:, k], full[:, k + 1], int(top[k]), sites[k], int(top[k + 1]))
        for k, s in enumerate(stored)
    ]
