"""Offer every file of pydicom's bundled test data to the ingest service and
print what happened to each as a markdown table (``file | outcome | reason``).

    .venv/bin/python tests/corpus_report.py

Uses a throw-away SQLite archive in a temporary folder. The test module
tests/test_pydicom_corpus.py runs the same ingest on both backends.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from pydicom.data import get_testdata_files

from lightbox.archive import Archive
from lightbox.services.ingest import Offer, Outcome, Status, store_instances
from lightbox.settings import Settings

PREAMBLE = bytes(128) + b"DICM"


def corpus_root() -> Path:
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files"


def corpus_files() -> list[Path]:
    """The files (not the folders, which the list also names) in a stable order."""
    return sorted(Path(f) for f in get_testdata_files() if Path(f).is_file())


def name_of(path: Path) -> str:
    return path.relative_to(corpus_root()).as_posix()


def offer_all(archive: Archive) -> list[tuple[Path, Outcome]]:
    """Offer each file on its own, in order, as ``lightbox import`` would one by one."""
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every oddity on purpose
        for path in corpus_files():
            [outcome] = store_instances(archive, [Offer(path, name_of(path))])
            results.append((path, outcome))
    return results


def expected_bytes(path: Path) -> bytes:
    """What the archive keeps for an accepted file: the file itself, with the
    Part 10 preamble added when it started directly with its File Meta group."""
    data = path.read_bytes()
    if data[128:132] != b"DICM" and data.startswith(b"\x02\x00"):
        return PREAMBLE + data
    return data


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(results: list[tuple[Path, Outcome]]) -> str:
    first: dict[str, str] = {}
    lines = ["| file | outcome | reason |", "|---|---|---|"]
    for path, outcome in results:
        reason = outcome.reason or ""
        if outcome.status is Status.STORED and outcome.sop_instance_uid:
            first.setdefault(outcome.sop_instance_uid, name_of(path))
        elif outcome.status is Status.DUPLICATE and outcome.sop_instance_uid:
            reason = f"same SOP Instance UID as {first.get(outcome.sop_instance_uid, '?')}"
        lines.append(f"| {name_of(path)} | {outcome.status.value} | {_cell(reason)} |")
    return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        archive = Archive.open(Settings(data=data, database=f"sqlite:///{data / 'index.sqlite'}"))
        try:
            results = offer_all(archive)
        finally:
            archive.close()
    print(table(results))
    counts = {s: sum(1 for _, o in results if o.status is s) for s in Status}
    print()
    print(", ".join(f"{n} {s.value}" for s, n in counts.items()) + f" of {len(results)} files")


if __name__ == "__main__":
    main()
