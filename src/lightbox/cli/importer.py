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


def _unzip(path: Path, into: Path) -> Iterator[Path]:
    with zipfile.ZipFile(path) as archive:
        for i, member in enumerate(archive.infolist()):
            if member.is_dir():
                continue
            # Members are written under generated names: a name in the zip is never a path.
            target = into / f"{i:08d}.dcm"
            with archive.open(member) as src, open(target, "wb") as out:
                while chunk := src.read(1024 * 1024):
                    out.write(chunk)
            yield target


def collect(paths: Iterable[Path], summary: Summary, scratch: ExitStack) -> Iterator[Path]:
    """Every candidate DICOM file under ``paths``; non-DICOM files go to ``summary``."""
    for path in paths:
        if path.is_dir():
            for root, _dirs, files in os.walk(path):
                yield from collect((Path(root) / f for f in sorted(files)), summary, scratch)
        elif zipfile.is_zipfile(path):
            into = Path(scratch.enter_context(tempfile.TemporaryDirectory()))
            yield from collect(_unzip(path, into), summary, scratch)
        elif not path.exists():
            summary.skipped.append((str(path), "no such file"))
        elif not _is_part10(path):
            summary.skipped.append((str(path), "not a DICOM file"))
        elif path.name.upper() == "DICOMDIR":
            yield from collect(_dicomdir_files(path), summary, scratch)
        else:
            yield path


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
        files = (p for p in collect(paths, summary, scratch) if _first(p.resolve(), seen))
        futures = [
            pool.submit(store_instances, archive, [Offer(p, str(p)) for p in batch])
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
