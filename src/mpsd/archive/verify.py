"""Check a store against its manifest: every file present and unchanged, every chunk decodable."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mpsd.archive.format import MANIFEST_NAME
from mpsd.errors import MpsdError

if TYPE_CHECKING:
    from mpsd.readers.base import ImageSource

_PARTIAL = re.compile(r".*\.[0-9a-f]{32}\.partial$")


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_store`.

    Attributes
    ----------
    state : {"ok", "damaged", "incomplete", "invalid", "input differs"}
        ``"input differs"``: the store is whole, but the images given to :func:`verify_inputs` are
        not those it was made from.
    problems : list of str
        One line per damaged, missing or unexpected file.
    files_checked : int
    """

    path: str
    state: str
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_store(path: str | Path) -> VerifyReport:
    """Verify every file of a store against its SHA-256 manifest, then decode every chunk.

    A store without a manifest is reported ``incomplete`` (it was never committed); a temporary
    store left by an interrupted ``compress`` next to the target is mentioned too.
    """
    root = Path(path)
    report = VerifyReport(path=str(root), state="ok")
    leftovers = sorted(p.name for p in root.parent.glob(f".{root.name}.mpsd-tmp-*")) if root.parent.is_dir() else []
    if not root.is_dir():
        report.state = "incomplete" if leftovers else "invalid"
        from mpsd.archive.writer import interrupted_runs

        hint = f" (interrupted attempt left {', '.join(leftovers)})"
        resumable = interrupted_runs(root)
        if resumable:
            hint = hint[:-1] + f"; it wrote {resumable[0][1]:,} images: the same compress command with --resume continues)"
        report.problems.append(f"{root}: no store" + (hint if leftovers else ""))
        return report
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        report.state = "incomplete"
        report.problems.append(f"{root}: no {MANIFEST_NAME}: the store was never committed")
        return report
    try:
        manifest = json.loads(manifest_path.read_bytes())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        report.state = "invalid"
        report.problems.append(f"{manifest_path}: unreadable manifest ({exc})")
        return report
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    present.discard(MANIFEST_NAME)
    for rel, digest in files.items():
        full = root / rel
        if rel not in present:
            report.problems.append(f"missing: {rel}")
            continue
        if full.is_symlink():
            report.problems.append(f"unexpected symlink: {rel}")
            continue
        report.files_checked += 1
        if _sha256(full) != digest:
            report.problems.append(f"damaged: {rel} (SHA-256 differs from the manifest)")
    for rel in sorted(present - set(files)):
        kind = "leftover partial write" if _PARTIAL.match(rel) else "file not in the manifest"
        report.problems.append(f"unexpected: {rel} ({kind})")
    if not report.problems:
        # decode everything once: catches damage the manifest cannot see (e.g. a hash recomputed
        # after tampering would still have to pass the chunk checksums and the metadata checks)
        from mpsd.archive.reader import Archive

        try:
            archive = Archive(root)
            for _start, _block in archive.iter_batches():
                pass
        except MpsdError as exc:
            report.problems.append(f"decode: {exc}")
    if report.problems:
        report.state = "damaged"
    return report


def verify_inputs(path: str | Path, source: ImageSource, report: VerifyReport | None = None) -> VerifyReport:
    """Check that ``source`` gives the images the committed store ``path`` was made from.

    ``compress`` keeps a CRC-32C of the source images of each chunk in the manifest
    (``source_crc32c``); the source is read again chunk by chunk (nothing is decoded from the
    store) and every chunk that differs is reported by its image range.

    Parameters
    ----------
    path : str or Path
        A committed store.
    source : ImageSource
        The input, opened as it was for ``compress`` (same split, resize and ``skip_bad``).
    report : VerifyReport, optional
        A report of :func:`verify_store` to add to.
    """
    from mpsd.archive.writer import source_crc32c

    root = Path(path)
    report = report or VerifyReport(path=str(root), state="ok")
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_bytes())
        n_committed = int(manifest["n_committed"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report.problems.append(f"{root}: no readable manifest to check the input against ({exc})")
        report.state = "invalid" if report.state == "ok" else report.state
        return report
    crcs, chunk = manifest.get("source_crc32c"), manifest.get("source_chunk_images")
    where = str(source.path)
    if not isinstance(crcs, list) or not isinstance(chunk, int) or chunk < 1 or len(crcs) != -(-n_committed // chunk):
        report.problems.append(f"{root}: the store keeps no checksums of its input (made by an earlier version of mpsd)")
    elif source.n_images != n_committed:
        report.problems.append(f"{where}: {source.n_images:,} images; the store was made from {n_committed:,}")
    else:
        for start, block in source.iter_chunks(chunk):
            if source_crc32c(block) != crcs[start // chunk]:
                stop = start + block.shape[0]
                report.problems.append(f"{where}: images {start}..{stop - 1} are not those the store was made from")
    if report.problems and report.state == "ok":
        report.state = "input differs"
    return report
