"""``lightbox import``: files, folders (recursively), .zip archives and DICOMDIRs,
stored in parallel batches through the one ingest path."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from tqdm import tqdm

from lightbox.archive import Archive
from lightbox.services.ingest import Offer, Outcome, Status, store_instances

BATCH = 32
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


@dataclass
class Summary:
    counts: Counter[str] = field(default_factory=Counter)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Files unpacked from a zip archive, by the name they are reported under.
    labels: dict[str, str] = field(default_factory=dict)

    def label(self, path: Path) -> str:
        """How the user knows ``path``: ``archive.zip:member`` for an unpacked one."""
        return self.labels.get(str(path), str(path))

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append((self.label(path), reason))

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.status.value] += 1
        if outcome.status is Status.REJECTED:
            self.rejected.append((outcome.source, outcome.reason or "rejected"))


def _is_part10(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _dicomdir_files(path: Path) -> Iterator[Path]:
    """Files a DICOMDIR refers to (Referenced File ID is relative to its folder)."""
    ds = dcmread(path)
    for record in getattr(ds, "DirectoryRecordSequence", []):
        ref = record.get("ReferencedFileID")
        if ref:
            parts = [ref] if isinstance(ref, str) else list(ref)
            candidate = path.parent.joinpath(*parts)
            if candidate.resolve().is_relative_to(path.parent.resolve()):
                yield candidate


def _unzip(path: Path, into: Path, limit: int, summary: Summary) -> Iterator[Path]:
    """The members of a zip archive as files in ``into``; a member larger than
    ``limit`` (an instance Lightbox would refuse) is skipped, not written out."""
    with zipfile.ZipFile(path) as archive:
        for i, member in enumerate(archive.infolist()):
            if member.is_dir():
                continue
            where = f"{path}:{member.filename}"
            if member.file_size > limit:
                summary.skipped.append((where, f"larger than {limit:,} bytes"))
                continue
            # Members are written under generated names: a name in the zip is never a path.
            target = into / f"{i:08d}.dcm"
            summary.labels[str(target)] = where
            written = 0
            with archive.open(member) as src, open(target, "wb") as out:
                while written <= limit and (chunk := src.read(1024 * 1024)):
                    out.write(chunk)
                    written += len(chunk)
            if written > limit:  # the member's header understated it
                target.unlink()
                summary.skipped.append((where, f"larger than {limit:,} bytes"))
                continue
            yield target


def collect(paths: Iterable[Path], summary: Summary, scratch: ExitStack, *,
            limit: int = 1 << 62, nested: bool = False) -> Iterator[Path]:
    """Every candidate DICOM file under ``paths``; the rest go to ``summary``
    with the reason. Zip archives and DICOMDIRs are opened one level deep: what
    they hold is not opened again (a zip that holds itself would never end).
    Inside a folder, as inside a DICOMDIR's, a link to a file elsewhere is not
    followed: only what the folder holds is imported."""
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                yield from collect(_inside(path, Path(root), dirs, files, summary), summary,
                                   scratch, limit=limit, nested=nested)
        elif not path.exists():
            summary.skip(path, "no such file")
        elif not path.is_file():  # a device or a pipe would be read forever, or block
            summary.skip(path, "not a regular file")
        elif zipfile.is_zipfile(path):
            if nested:
                summary.skip(path, "a zip archive inside another or a DICOMDIR")
                continue
            yield from _zip_members(path, summary, scratch, limit)
        elif not _is_part10(path):
            summary.skip(path, "not a DICOM file")
        elif path.name.upper() == "DICOMDIR":
            if nested:
                summary.skip(path, "a DICOMDIR inside another or a zip archive")
                continue
            yield from collect(_referred(path, summary), summary, scratch, limit=limit,
                               nested=True)
        else:
            yield path


def _inside(folder: Path, root: Path, dirs: list[str], files: list[str],
            summary: Summary) -> Iterator[Path]:
    """The files of ``root`` (``folder`` or a folder under it), as ``os.walk``
    lists them. A link among them or among its folders that leads outside
    ``folder`` is skipped with the reason (``os.walk`` enters no linked
    folder; one inside ``folder`` is walked as itself)."""
    within = folder.resolve()
    file_names = set(files)
    for name in sorted(dirs + files):
        path = root / name
        if path.is_symlink() and not (target := path.resolve()).is_relative_to(within):
            summary.skip(path, f"a link to {target}, outside {folder}")
        elif name in file_names:
            yield path


def _referred(path: Path, summary: Summary) -> list[Path]:
    """The files a DICOMDIR refers to; none, with the reason, when it cannot be read."""
    try:
        referred = list(_dicomdir_files(path))
    except Exception as exc:  # pydicom raises many kinds on a damaged file
        summary.skip(path, f"DICOMDIR cannot be read: {exc}")
        return []
    if not referred:
        summary.skip(path, "DICOMDIR refers to no file in its folder")
    return referred


def _zip_members(path: Path, summary: Summary, scratch: ExitStack, limit: int) -> Iterator[Path]:
    into = Path(scratch.enter_context(tempfile.TemporaryDirectory()))
    try:
        yield from collect(_unzip(path, into, limit, summary), summary, scratch, limit=limit,
                           nested=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError,
            OSError, ValueError) as exc:
        # A damaged archive (bad CRC, truncated, unknown compression, encrypted):
        # what came out before stays; the rest is named here.
        summary.skip(path, f"zip archive cannot be read further: {exc}")


def _batches(items: Iterator[Path], size: int) -> Iterator[list[Path]]:
    batch: list[Path] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def import_paths(
    archive: Archive, paths: list[Path], *, workers: int = 4, progress: bool = True
) -> Summary:
    """Store everything found under ``paths``; return what happened to each file."""
    summary = Summary()
    seen: set[Path] = set()
    with (
        ExitStack() as scratch,
        ThreadPoolExecutor(workers) as pool,
        tqdm(unit="file", disable=not progress, desc="importing") as bar,
    ):
        limit = archive.settings.max_instance_bytes
        files = (p for p in collect(paths, summary, scratch, limit=limit)
                 if _first(p.resolve(), seen))
        futures = [
            pool.submit(store_instances, archive, [Offer(p, summary.label(p)) for p in batch])
            for batch in _batches(files, BATCH)
        ]
        for future in futures:
            for outcome in future.result():
                summary.add(outcome)
                bar.update(1)
    return summary


def _first(path: Path, seen: set[Path]) -> bool:
    """True the first time ``path`` is met (a DICOMDIR and its folder overlap)."""
    if path in seen:
        return False
    seen.add(path)
    return True
