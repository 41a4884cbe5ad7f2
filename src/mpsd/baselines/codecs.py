"""Image-codec baselines: every image as its own JPEG or lossy WebP file.

The size on disk is the sum of the encoded files (what a user would keep), plus the labels
stored as mpsd stores them.  One quality (1..100) is used for the whole set: the largest whose
total fits the budget.  The training images are the decoded files.

Encoding goes through imagecodecs when it is installed (about five times faster for JPEG) and
Pillow otherwise.  Both wrap the same libjpeg-turbo / libwebp with the same settings (JPEG: 4:2:0
chroma subsampling for colour, no Huffman optimisation, baseline; WebP: lossy, method 4), so the
files are byte-identical for the library versions shipped with them; the tests check this.
WebP has no greyscale mode: grey images are encoded as RGB with R = G = B and decoded back to
grey with Pillow's ``L`` weights (ITU-R 601-2 luma, computed here so both backends agree).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from mpsd.baselines.base import (
    BaselineMethod,
    Budget,
    Reconstruction,
    budget_error,
    measure,
    search_largest,
)
from mpsd.errors import MissingExtraError, OptionError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "imagecodecs", "pillow")
#: Qualities scanned, lowest first.
QUALITIES = tuple(range(1, 101))
#: Images encoded to guess the quality before the search over a large set.
_SAMPLE = 1000


def _grey_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """Pillow's ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 2**15) >> 16``; keeps a last axis of 1."""
    v = rgb[..., :3].astype(np.uint32)
    return ((v[..., 0] * 19595 + v[..., 1] * 38470 + v[..., 2] * 7471 + 0x8000) >> 16).astype(
        np.uint8
    )[..., None]


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise OptionError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "pillow":
        return backend
    try:
        import imagecodecs  # noqa: F401
    except ImportError as exc:
        if backend == "imagecodecs":
            raise MissingExtraError("imagecodecs", "bench", "the imagecodecs backend") from exc
        return "pillow"
    return "imagecodecs"


class _ImageCodec(BaselineMethod):
    """Shared quality search; subclasses provide ``_encoder(backend, channels)``."""

    name = ""
    format = ""
    channels = (1, 3)

    def __init__(self, *, backend: str = "auto") -> None:
        self.backend = _resolve_backend(backend)

    def _encoder(
        self, channels: int
    ) -> tuple[Callable[[np.ndarray, int], bytes], Callable[[bytes], np.ndarray]]:
        raise NotImplementedError

    def _extra_settings(self) -> dict[str, Any]:
        return {}

    def encode(self, images: np.ndarray, quality: int) -> list[bytes]:
        """Encode every image (N, H, W, C) at ``quality``; one file each."""
        encode, _ = self._encoder(images.shape[3])
        return [encode(image, quality) for image in images]

    def decode(self, files: list[bytes], channels: int) -> np.ndarray:
        """Decode files back into images of shape (N, H, W, channels), uint8."""
        _, decode = self._encoder(channels)
        return np.stack([decode(f) for f in files])

    def _guess(self, images: np.ndarray, budget: float) -> int | None:
        """Where to start the search: the answer for an evenly spaced sample of the images.

        Only saves encoding passes over large sets; the answer does not depend on it.
        """
        n = images.shape[0]
        if n < 4 * _SAMPLE:
            return None
        sample = images[np.linspace(0, n - 1, _SAMPLE).astype(np.int64)]
        share = budget * _SAMPLE / n
        found = search_largest(
            len(QUALITIES), lambda i: sum(len(f) for f in self.encode(sample, QUALITIES[i])), share
        )
        return 0 if found is None else found

    def _fit(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        budget: Budget,
        *,
        seed: int,
        features: np.ndarray | None,
    ) -> Reconstruction:
        """Encode ``images`` (N, H, W, C) at the budget; see :class:`~mpsd.baselines.base.Baseline`."""
        if budget.kind != "bytes":
            raise OptionError(
                f"{self.name}: an image codec has no parameter ratio; give budget_bytes"
            )
        label_bytes = 0 if labels is None else measure({}, labels)
        best: dict[int, list[bytes]] = {}
        sizes: dict[int, int] = {}

        def cost(i: int) -> float:
            files = self.encode(images, QUALITIES[i])
            sizes[i] = sum(len(f) for f in files) + label_bytes
            logger.debug("%s: quality %d takes %d bytes", self.name, QUALITIES[i], sizes[i])
            if sizes[i] <= budget.value and all(i > j for j in best):
                best.clear()
                best[i] = files
            return sizes[i]

        chosen = search_largest(
            len(QUALITIES),
            cost,
            budget.value,
            start=self._guess(images, budget.value - label_bytes),
        )
        if chosen is None:
            raise budget_error(self.name, f"quality {QUALITIES[0]}", sizes[0], budget)
        quality = QUALITIES[chosen]
        logger.info("%s: quality %d, %d bytes", self.name, quality, sizes[chosen])
        return Reconstruction(
            method=self.name,
            images=self.decode(best[chosen], images.shape[3]),
            labels=None if labels is None else labels.copy(),
            indices=None,
            bytes_on_disk=int(sizes[chosen]),
            param_ratio=None,
            settings={
                "quality": quality,
                "format": self.format,
                "backend": self.backend,
                **self._extra_settings(),
            },
        )


class JPEG(_ImageCodec):
    """Baseline JPEG (libjpeg-turbo), greyscale ``L`` or ``RGB`` with 4:2:0 chroma subsampling.

    Parameters
    ----------
    backend : {"auto", "imagecodecs", "pillow"}
        Encoder; ``auto`` uses imagecodecs when installed.  Both give the same files.
    """

    name = "jpeg"
    format = "JPEG"

    def _encoder(
        self, channels: int
    ) -> tuple[Callable[[np.ndarray, int], bytes], Callable[[bytes], np.ndarray]]:
        squeeze = channels == 1
        if self.backend == "imagecodecs":
            import imagecodecs

            def enc(image: np.ndarray, q: int) -> bytes:
                return bytes(imagecodecs.jpeg8_encode(image[..., 0] if squeeze else image, level=q))

            def dec(data: bytes) -> np.ndarray:
                out = imagecodecs.jpeg8_decode(data)
                return out[..., None] if out.ndim == 2 else out

            return enc, dec
        from PIL import Image

        def enc_pil(image: np.ndarray, q: int) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(image[..., 0] if squeeze else image).save(buf, format="JPEG", quality=q)
            return buf.getvalue()

        def dec_pil(data: bytes) -> np.ndarray:
            with Image.open(io.BytesIO(data)) as im:
                out = np.asarray(im.convert("L" if squeeze else "RGB"))
            return out[..., None] if out.ndim == 2 else out

        return enc_pil, dec_pil


class WebP(_ImageCodec):
    """Lossy WebP (libwebp, VP8), every image as RGB (grey replicated).

    Parameters
    ----------
    backend : {"auto", "imagecodecs", "pillow"}
        Encoder; ``auto`` uses imagecodecs when installed.  Both give the same files.
    method : int
        libwebp's speed/size trade-off, 0 (fast) to 6 (smallest); 4 is both libraries' default.
    """

    name = "webp"
    format = "WEBP"

    def __init__(self, *, backend: str = "auto", method: int = 4) -> None:
        super().__init__(backend=backend)
        if int(method) != method or not 0 <= method <= 6:
            raise OptionError(f"webp: method must be an integer 0..6, got {method!r}")
        self.method = int(method)

    def _extra_settings(self) -> dict[str, Any]:
        return {"method": self.method}

    def _encoder(
        self, channels: int
    ) -> tuple[Callable[[np.ndarray, int], bytes], Callable[[bytes], np.ndarray]]:
        grey = channels == 1
        method = self.method

        def rgb(image: np.ndarray) -> np.ndarray:
            return np.repeat(image, 3, axis=2) if grey else image

        def finish(out: np.ndarray) -> np.ndarray:
            return _grey_from_rgb(out) if grey else np.ascontiguousarray(out[..., :3])

        if self.backend == "imagecodecs":
            import imagecodecs

            def enc(image: np.ndarray, q: int) -> bytes:
                return bytes(
                    imagecodecs.webp_encode(rgb(image), level=q, lossless=False, method=method)
                )

            def dec(data: bytes) -> np.ndarray:
                return finish(imagecodecs.webp_decode(data))

            return enc, dec
        from PIL import Image

        def enc_pil(image: np.ndarray, q: int) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(rgb(image)).save(
                buf, format="WEBP", quality=q, method=method, lossless=False
            )
            return buf.getvalue()

        def dec_pil(data: bytes) -> np.ndarray:
            with Image.open(io.BytesIO(data)) as im:
                return finish(np.asarray(im.convert("RGB")))

        return enc_pil, dec_pil
