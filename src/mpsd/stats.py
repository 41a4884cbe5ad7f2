"""Numbers about a store, as a dataclass (no printing here; the CLI formats them).

Definitions
-----------
param_ratio
    The paper's ρ: MPS parameters kept, ``Σ_stages Σ_k r_{k-1}·d_k·r_k`` with each image's actual
    ranks, divided by the number of tensor entries ``prod_k d_k`` (padded pixels), averaged over
    every MPS of the dataset.
bytes_on_disk
    Sum of the sizes of every file of the store (cores, scales, metrics, labels, names, metadata,
    manifest), measured with ``lstat``.
raw_bytes
    ``N·H·W·C·itemsize`` at the source dtype.
psnr
    ``10·log10(MAX² / MSE)`` with MSE the mean squared pixel error over the whole dataset of the
    decoded integer images (what ``mpsd decompress`` writes); ``None`` if every image is exact.
rel_error
    Mean over images of ``‖S − Ŝ‖_F / ‖S‖_F`` for the stored reconstruction before rounding
    (after quantisation), images with ``‖S‖ = 0`` left out.
error_bound
    Mean over images of the Theorem 1 bound of the last stage, ``sqrt(Σ ε_k²)`` over every bond
    and every MPS of the image, divided by ``‖S‖_F``: an upper bound on the relative error of the
    unquantised reconstruction.
metrics_recorded
    False for stores written with ``--no-metrics``: entropy, PSNR, errors and the bound were not
    kept (they need the original images) and are reported as null.
entropy
    Mean entanglement entropy (Eq. 3, natural log) of the unfoldings of the original images at
    each bond, over every MPS (stage 1 input).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mpsd.core.ttsvd import parameter_count

if TYPE_CHECKING:
    from mpsd.archive.reader import Archive


@dataclass
class StageStats:
    role: str
    bonds: list[int]
    mean_ranks: list[float]
    param_ratio: float
    bytes_on_disk: int
    truncation: dict[str, Any] = field(default_factory=dict)


@dataclass
class StoreStats:
    path: str
    images: int
    image_shape: list[int]
    image_dtype: str
    sites: list[int]
    order: str
    colour: str
    core_dtype: str
    format_version: int
    stages: list[StageStats]
    param_ratio: float
    bytes_on_disk: int
    raw_bytes: int
    byte_ratio: float
    bytes_per_image: float
    metrics_recorded: bool
    entropy: list[float]
    psnr: float | None
    psnr_mean: float | None
    rel_error: float | None
    error_bound: float | None
    supplement_bytes: int
    classes: list[str] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dir_bytes(path: Any) -> int:
    import os

    total = 0
    if path.is_dir():
        for dirpath, _dirs, files in os.walk(path):
            total += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in files)
    return total


class _Mean:
    """Running mean of the rows of 2-d blocks (column-wise), or of scalars."""

    def __init__(self) -> None:
        self.total: np.ndarray | float = 0.0
        self.count = 0

    def add(self, values: np.ndarray) -> None:
        self.total = self.total + values.sum(axis=0)
        self.count += values.shape[0]

    def value(self) -> Any:
        return self.total / self.count if self.count else None


def _metric_blocks(archive: Archive, names: list[str]) -> Iterator[list[np.ndarray]]:
    """The arrays ``names`` chunk by chunk along the image axis: memory does not grow with N."""
    step = archive.meta.chunk_images
    for start in range(0, len(archive), step):
        yield archive.metric_rows(names, start, min(start + step, len(archive)))


def _quality(archive: Archive) -> dict[str, Any]:
    """Entropy, PSNR, errors and the bound from the per-image metric arrays, read chunk by chunk."""
    meta = archive.meta
    h, w, c = archive.image_shape
    last = len([s for s in meta.stages if s.role != "supplement"]) - 1
    names = ["metrics/entropy", "metrics/norm", "metrics/error", f"stage{last}/local_error", "metrics/sq_error"]
    entropy, rel_error, bound, log_ratio = _Mean(), _Mean(), _Mean(), _Mean()
    sq_total, n_images = 0.0, 0
    pixels = h * w * c
    peak = float(meta.max_value)
    for ent, norm, error, local, sq in _metric_blocks(archive, names):
        entropy.add(ent.astype(np.float64).reshape(-1, ent.shape[-1]))
        img_norm = np.sqrt((norm.astype(np.float64) ** 2).sum(axis=1))
        img_error = np.sqrt((error.astype(np.float64) ** 2).sum(axis=1))
        img_bound = np.sqrt((local.astype(np.float64) ** 2).sum(axis=(1, 2)))  # Theorem 1, every MPS
        nz = img_norm > 0
        rel_error.add(img_error[nz] / img_norm[nz])
        bound.add(img_bound[nz] / img_norm[nz])
        sq = sq.astype(np.float64)
        sq_total += float(sq.sum())
        n_images += sq.shape[0]
        per_image_mse = sq[sq > 0] / pixels
        log_ratio.add(10 * np.log10(peak**2 / per_image_mse))
    mse = sq_total / (pixels * n_images) if n_images else 0.0
    return {
        "entropy": [float(v) for v in entropy.value()] if entropy.count else [],
        "psnr": None if mse == 0 else float(10 * np.log10(peak**2 / mse)),
        "psnr_mean": None if log_ratio.value() is None else float(log_ratio.value()),
        "rel_error": float(rel_error.value()) if rel_error.count else 0.0,
        "error_bound": float(bound.value()) if bound.count else 0.0,
    }


def compute_stats(archive: Archive) -> StoreStats:
    """Compute :class:`StoreStats` for an opened store.

    Reads only the small per-image arrays (ranks and metrics), one chunk of images at a time, so
    memory does not grow with the number of images.
    """
    meta = archive.meta
    sites = meta.layout.sites
    total_entries = math.prod(sites)
    h, w, c = archive.image_shape
    stages = []
    ratio_total = 0.0
    supplement_bytes = 0
    for i, st in enumerate(meta.stages):
        mean_ranks, params = _Mean(), _Mean()
        for (ranks,) in _metric_blocks(archive, [f"stage{i}/ranks"]):
            ranks = ranks.astype(np.int64).reshape(-1, ranks.shape[-1])
            mean_ranks.add(ranks)
            params.add(parameter_count(sites, ranks))
        ratio = float(params.value() / total_entries) if params.count else 0.0
        nbytes = _dir_bytes(archive.path / f"stage{i}")
        if st.role == "supplement":
            supplement_bytes += nbytes
        else:
            ratio_total += ratio
        stages.append(
            StageStats(
                role=st.role,
                bonds=list(st.bonds),
                mean_ranks=[round(float(v), 4) for v in mean_ranks.value()] if mean_ranks.count else [],
                param_ratio=ratio,
                bytes_on_disk=nbytes,
                truncation=st.spec,
            )
        )
    quality = _quality(archive) if meta.has_metrics else {}
    bytes_on_disk = archive.bytes_on_disk
    raw = len(archive) * h * w * c * np.dtype(meta.image_dtype).itemsize
    return StoreStats(
        path=str(archive.path),
        images=len(archive),
        image_shape=[h, w, c],
        image_dtype=meta.image_dtype,
        sites=list(sites),
        order=meta.layout.order,
        colour=meta.layout.colour,
        core_dtype=meta.storage_dtype,
        format_version=meta.format_version,
        stages=stages,
        param_ratio=ratio_total,
        bytes_on_disk=bytes_on_disk,
        raw_bytes=int(raw),
        byte_ratio=bytes_on_disk / raw,
        bytes_per_image=bytes_on_disk / len(archive),
        metrics_recorded=meta.has_metrics,
        entropy=quality.get("entropy", []),
        psnr=quality.get("psnr"),
        psnr_mean=quality.get("psnr_mean"),
        rel_error=quality.get("rel_error"),
        error_bound=quality.get("error_bound"),
        supplement_bytes=supplement_bytes,
        classes=archive.classes,
    )
