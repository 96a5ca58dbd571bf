"""The one ingest path, called directly: outcomes, blobs, frame tables, counters."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import shutil
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.encaps import generate_frames
from pydicom.uid import RLELossless, generate_uid
from sqlalchemy import select

from lightbox.archive import Archive
from lightbox.index import instances as index
from lightbox.index.schema import instances, series, studies
from lightbox.services import indexing, ingest, retrieve
from lightbox.services.ingest import FailureReason, Offer, Outcome, Status, store_instances
from tests.factories import ROOT, ct_dataset, to_bytes, write


def blob_files(archive: Archive) -> dict[Path, bytes]:
    """Every stored blob (path -> content); staging and spare files (in dot folders) excluded."""
    root = archive.settings.blob_root
    return {
        p: p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.relative_to(root).parts[0].startswith(".")
    }


def staged(archive: Archive, data: bytes) -> Offer:
    """An offer already sitting in the staging folder, as STOW-RS makes them."""
    fd, path = archive.blobs.new_staging_file()
    with open(fd, "wb") as out:
        out.write(data)
    return Offer(path, f"staged {path.name}", staged=True)


def staging_files(archive: Archive) -> list[Path]:
    return archive.blobs.staged()


def stored(archive: Archive, sop: str) -> index.StoredInstance:
    with archive.db.read() as conn:
        row = conn.execute(
            select(studies.c.study_instance_uid, series.c.series_instance_uid)
            .select_from(instances)
            .join(series, series.c.pk == instances.c.series_pk)
            .join(studies, studies.c.pk == instances.c.study_pk)
            .where(instances.c.sop_instance_uid == sop)
        ).one()
        return index.find(conn, row[0], row[1], sop)[0]


def single(outcomes: list[Outcome]) -> Outcome:
    assert len(outcomes) == 1
    return outcomes[0]


def pydicom_file(name: str) -> Path:
    """A file shipped inside pydicom (local lookup only, never a download)."""
    found = [p for p in get_testdata_files(name) if Path(p).name == name]
    assert found, f"pydicom test file {name} is missing"
    return Path(found[0])


@pytest.fixture
def overwriting(archive: Archive) -> Iterator[Archive]:
    """The same index and blob store, with settings that replace earlier copies."""
    yield Archive(
        settings=dataclasses.replace(archive.settings, overwrite=True),
        db=archive.db,
        blobs=archive.blobs,
    )


# --- stored, duplicate, replaced -------------------------------------------------


def test_store_then_duplicate_keeps_first(archive: Archive, tmp_path: Path) -> None:
    ds = ct_dataset()
    first = to_bytes(ds)
    path = write(ds, tmp_path / "first.dcm")
    outcome = single(store_instances(archive, [Offer(path, "first")]))
    assert outcome.status is Status.STORED
    assert outcome.sop_instance_uid == ds.SOPInstanceUID
    assert outcome.study_instance_uid == ds.StudyInstanceUID
    assert path.read_bytes() == first, "an offer that is not staged is copied, never moved"
    blobs = blob_files(archive)
    assert list(blobs.values()) == [first]

    ds.SeriesDescription = "changed"  # same SOP Instance UID, other bytes
    second = to_bytes(ds)
    for make in (lambda: Offer(write(ds, tmp_path / "second.dcm"), "second"),
                 lambda: staged(archive, second)):
        outcome = single(store_instances(archive, [make()]))
        assert outcome.status is Status.DUPLICATE
        assert outcome.sop_instance_uid == ds.SOPInstanceUID
        assert blob_files(archive) == blobs, "the first copy is kept, nothing else written"
        assert staging_files(archive) == []
    assert stored(archive, ds.SOPInstanceUID).size == len(first)


def test_copy_stored_after_the_look_up_is_still_a_duplicate(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The look-up (before the write transaction on SQLite, in it on
    # PostgreSQL) can be overtaken by another writer storing the same
    # instance: the write then meets the unique key, and the batch is indexed
    # again with the look-up inside the transaction.
    study, known = generate_uid(prefix=ROOT), generate_uid(prefix=ROOT)
    first = ct_dataset(study=study, series=known)
    assert single(store_instances(archive, [staged(archive, to_bytes(first))])).status is (
        Status.STORED)
    blobs = blob_files(archive)
    real = indexing._stored_and_filed
    looked: list[bool] = []

    def stale(*args: Any) -> Any:  # first: the series as it is, the copy not yet there
        taken, filed = real(*args)
        assert first.SOPInstanceUID in taken and known in filed
        looked.append(True)
        return (set() if len(looked) == 1 else taken), filed

    def transaction(*args: Any, **kwargs: Any) -> Any:
        transactions.append(kwargs.get("looked_up") is None)
        return real_transaction(*args, **kwargs)

    real_transaction, transactions = indexing._transaction, []
    monkeypatch.setattr(indexing, "_stored_and_filed", stale)
    monkeypatch.setattr(indexing, "_transaction", transaction)
    again = ct_dataset(study=study, series=known)
    again.SOPInstanceUID = first.SOPInstanceUID
    fresh = ct_dataset(study=study, series=known, instance_number=2)
    outcomes = store_instances(archive, [staged(archive, to_bytes(again)),
                                         staged(archive, to_bytes(fresh))])
    assert [o.status for o in outcomes] == [Status.DUPLICATE, Status.STORED]
    # Met the unique key, then indexed again, looking up inside the transaction.
    assert len(transactions) == 2 and transactions[1] and len(looked) == 2
    assert len(blob_files(archive)) == len(blobs) + 1
    assert staging_files(archive) == []
    with archive.db.read() as conn:
        assert conn.execute(select(series.c.number_of_instances)).scalar_one() == 2
        assert conn.execute(select(studies.c.number_of_instances)).scalar_one() == 2


def test_duplicate_within_one_batch_leaves_one_blob(archive: Archive) -> None:
    ds = ct_dataset()
    first = to_bytes(ds)
    ds.SeriesDescription = "second copy"
    offers = [staged(archive, first), staged(archive, to_bytes(ds))]
    outcomes = store_instances(archive, offers)
    assert [o.status for o in outcomes] == [Status.STORED, Status.DUPLICATE]
    assert list(blob_files(archive).values()) == [first]
    assert staging_files(archive) == []
    with archive.db.read() as conn:
        assert conn.execute(select(series.c.number_of_instances)).scalar_one() == 1


def test_overwrite_replaces_the_old_copy(archive: Archive, overwriting: Archive) -> None:
    ds = ct_dataset()
    assert single(store_instances(archive, [staged(archive, to_bytes(ds))])).status is (
        Status.STORED
    )
    old_key = stored(archive, ds.SOPInstanceUID).blob_key
    ds.SeriesDescription = "corrected"
    newer = to_bytes(ds)
    outcome = single(store_instances(overwriting, [staged(archive, newer)]))
    assert outcome.status is Status.STORED
    assert list(blob_files(archive).values()) == [newer], "the old blob is removed"
    now = stored(archive, ds.SOPInstanceUID)
    assert now.blob_key != old_key and now.size == len(newer)
    assert not archive.blobs.path(old_key).exists()
    with archive.db.read() as conn:
        assert conn.execute(select(series.c.number_of_instances)).scalar_one() == 1
        assert conn.execute(select(studies.c.number_of_instances)).scalar_one() == 1
    assert staging_files(archive) == []


def test_overwrite_into_another_series_leaves_no_empty_series(
    archive: Archive, overwriting: Archive
) -> None:
    """A corrected copy filed under a new series: the old, now empty, series goes."""
    study = generate_uid(prefix=ROOT)
    ds = ct_dataset(study=study)
    store_instances(archive, [staged(archive, to_bytes(ds))])
    ds.SeriesInstanceUID = generate_uid(prefix=ROOT)
    ds.Modality = "MR"
    assert single(store_instances(overwriting, [staged(archive, to_bytes(ds))])).status is (
        Status.STORED
    )
    with archive.db.read() as conn:
        rows = conn.execute(select(series.c.series_instance_uid, series.c.number_of_instances))
        assert [tuple(r) for r in rows] == [(ds.SeriesInstanceUID, 1)]
        counts = conn.execute(
            select(
                studies.c.number_of_series,
                studies.c.number_of_instances,
                studies.c.modalities_in_study,
            )
        ).one()
        assert tuple(counts) == (1, 1, "\\MR\\")
    assert len(blob_files(archive)) == 1


def test_overwrite_into_another_study_removes_the_empty_study(
    archive: Archive, overwriting: Archive
) -> None:
    ds = ct_dataset()
    store_instances(archive, [staged(archive, to_bytes(ds))])
    ds.StudyInstanceUID = generate_uid(prefix=ROOT)
    ds.SeriesInstanceUID = generate_uid(prefix=ROOT)
    assert single(store_instances(overwriting, [staged(archive, to_bytes(ds))])).status is (
        Status.STORED
    )
    with archive.db.read() as conn:
        rows = conn.execute(
            select(
                studies.c.study_instance_uid,
                studies.c.number_of_series,
                studies.c.number_of_instances,
            )
        )
        assert [tuple(r) for r in rows] == [(ds.StudyInstanceUID, 1, 1)]
        assert conn.execute(select(series.c.series_instance_uid)).scalars().all() == [
            ds.SeriesInstanceUID
        ]


# --- frame offset tables ---------------------------------------------------------


def frames_as_stored(archive: Archive, sop: str) -> list[bytes]:
    instance = stored(archive, sop)
    assert instance.layout is not None
    out = []
    for number in range(1, len(instance.layout.frames) + 1):
        frame = retrieve.stored_frame(archive, instance, number)
        assert frame is not None
        out.append(frame.data)
    return out


def native_frames(ds: pydicom.Dataset) -> list[bytes]:
    count = int(ds.get("NumberOfFrames") or 1)
    samples = 2 if ds.PhotometricInterpretation == "YBR_FULL_422" else ds.SamplesPerPixel
    size = ds.Rows * ds.Columns * samples * ds.BitsAllocated // 8
    data: bytes = ds.PixelData
    return [data[i * size : (i + 1) * size] for i in range(count)]


def test_native_multiframe_offsets(archive: Archive, tmp_path: Path) -> None:
    ds = ct_dataset(size=16, frames=5)
    outcome = single(store_instances(archive, [Offer(write(ds, tmp_path / "mf.dcm"), "mf")]))
    assert outcome.status is Status.STORED
    got = frames_as_stored(archive, ds.SOPInstanceUID)
    assert got == native_frames(ds)
    assert len(set(got)) == 5  # the frames really differ


NATIVE_FILES = [
    "rtdose.dcm",  # implicit VR, 15 frames of 32 bits
    "MR_small_implicit.dcm",
    "SC_rgb_small_odd.dcm",  # odd-length 8-bit colour
    "SC_ybr_full_422_uncompressed.dcm",  # two samples per pixel on average
]

ENCAPSULATED_FILES = [
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_rle_32bit_2frame.dcm",
    "rtdose_rle.dcm",  # 15 frames
    "examples_ybr_color.dcm",  # 30 frames of JPEG Baseline
    "JPEG2000.dcm",
]


@pytest.mark.parametrize("name", NATIVE_FILES + ENCAPSULATED_FILES)
def test_pydicom_files_frames_match(archive: Archive, tmp_path: Path, name: str) -> None:
    # An archive each: several of pydicom's files share their SOP Instance UIDs.
    source = tmp_path / name
    shutil.copyfile(pydicom_file(name), source)
    outcome = single(store_instances(archive, [Offer(source, name)]))
    assert outcome.status is Status.STORED, outcome.reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(source)
    count = int(ds.get("NumberOfFrames") or 1)
    if name in ENCAPSULATED_FILES:
        expected = list(generate_frames(ds.PixelData, number_of_frames=count))
    else:
        expected = native_frames(ds)
    got = frames_as_stored(archive, ds.SOPInstanceUID)
    assert len(got) == count
    assert got == expected
    assert list(blob_files(archive).values()) == [source.read_bytes()]


# --- study counters and ModalitiesInStudy ------------------------------------------


def study_row(archive: Archive, uid: str) -> tuple[int, int, str | None]:
    with archive.db.read() as conn:
        row = conn.execute(
            select(
                studies.c.number_of_series,
                studies.c.number_of_instances,
                studies.c.modalities_in_study,
            ).where(studies.c.study_instance_uid == uid)
        ).one()
    return int(row[0]), int(row[1]), row[2]


def test_study_counters_and_modalities(archive: Archive) -> None:
    study = generate_uid(prefix=ROOT)
    ct_series, mr_series = generate_uid(prefix=ROOT), generate_uid(prefix=ROOT)
    batch = [ct_dataset(study=study, series=ct_series, instance_number=n) for n in (1, 2)]
    store_instances(archive, [staged(archive, to_bytes(d)) for d in batch])
    assert study_row(archive, study) == (1, 2, "\\CT\\")
    mr = [ct_dataset(study=study, series=mr_series, Modality="MR", instance_number=n)
          for n in (1, 2, 3)]
    outcomes = store_instances(archive, [staged(archive, to_bytes(d)) for d in mr])
    assert [o.status for o in outcomes] == [Status.STORED] * 3
    assert study_row(archive, study) == (2, 5, "\\CT\\MR\\")
    # A duplicate and a rejection change no counter.
    bad = to_bytes(ct_dataset(study=study, series=mr_series))[:300]
    outcomes = store_instances(archive, [staged(archive, to_bytes(mr[0])), staged(archive, bad)])
    assert [o.status for o in outcomes] == [Status.DUPLICATE, Status.REJECTED]
    assert study_row(archive, study) == (2, 5, "\\CT\\MR\\")
    with archive.db.read() as conn:
        per_series = dict(
            conn.execute(select(series.c.series_instance_uid, series.c.number_of_instances)).all()
        )
    assert per_series == {ct_series: 2, mr_series: 3}
    assert len(blob_files(archive)) == 5


def test_one_batch_mixing_every_case(archive: Archive) -> None:
    """New series, more of an indexed series, copies (earlier and within the
    batch) and a series of another study, in one batch: each gets its own
    outcome, rows and counters match, and no blob is left unreferenced."""
    # The intruder's study sorts after the other: the batch meets its series
    # UID again after indexing that series' instances under the first study.
    study, other_study = f"{ROOT}90.1", f"{ROOT}90.2"
    known_series, new_series = f"{ROOT}90.1.1", f"{ROOT}90.1.2"
    first = ct_dataset(study=study, series=known_series, instance_number=1)
    store_instances(archive, [staged(archive, to_bytes(first))])
    more = [ct_dataset(study=study, series=known_series, instance_number=n) for n in (2, 3)]
    fresh = [ct_dataset(study=study, series=new_series, instance_number=n) for n in (1, 2, 3)]
    intruder = ct_dataset(study=other_study, series=known_series)  # series of another study
    batch = [more[0], first, fresh[0], more[1], fresh[1], intruder, fresh[1], fresh[2]]
    outcomes = store_instances(archive, [staged(archive, to_bytes(d)) for d in batch])
    assert [o.status for o in outcomes] == [
        Status.STORED, Status.DUPLICATE, Status.STORED, Status.STORED, Status.STORED,
        Status.REJECTED, Status.DUPLICATE, Status.STORED,
    ]
    assert [o.sop_instance_uid for o in outcomes] == [d.SOPInstanceUID for d in batch]
    assert study_row(archive, study) == (2, 6, "\\CT\\")
    with archive.db.read() as conn:
        per_series = dict(
            conn.execute(select(series.c.series_instance_uid, series.c.number_of_instances)).all()
        )
        sops = set(conn.execute(select(instances.c.sop_instance_uid)).scalars())
    assert per_series == {known_series: 3, new_series: 3}
    assert sops == {d.SOPInstanceUID for d in [first, *more, *fresh]}
    assert len(blob_files(archive)) == 6
    assert staging_files(archive) == []
    for d in [first, *more, *fresh]:
        found = stored(archive, d.SOPInstanceUID)
        assert archive.blobs.path(found.blob_key).read_bytes() == to_bytes(d)


# --- odd files and staging -----------------------------------------------------------


def test_file_meta_without_preamble_gets_one(archive: Archive, tmp_path: Path) -> None:
    ds = ct_dataset()
    full = to_bytes(ds)
    assert full[128:132] == b"DICM"
    bare = full[132:]  # starts directly with the (0002,0000) element
    assert bare.startswith(b"\x02\x00")
    source = tmp_path / "bare.dcm"
    source.write_bytes(bare)
    outcome = single(store_instances(archive, [Offer(source, "bare")]))
    assert outcome.status is Status.STORED, outcome.reason
    assert source.read_bytes() == bare, "the caller's file is left alone"
    assert list(blob_files(archive).values()) == [full]
    instance = stored(archive, ds.SOPInstanceUID)
    assert instance.size == len(full)
    assert frames_as_stored(archive, ds.SOPInstanceUID) == native_frames(ds)
    assert staging_files(archive) == []
    # Staged, as STOW-RS hands it over: the same, and the staged file is consumed.
    other = ct_dataset()
    outcome = single(store_instances(archive, [staged(archive, to_bytes(other)[132:])]))
    assert outcome.status is Status.STORED, outcome.reason
    assert to_bytes(other) in blob_files(archive).values()
    assert staging_files(archive) == []


def test_staged_files_are_consumed_whatever_the_outcome(archive: Archive) -> None:
    good, dup = ct_dataset(), ct_dataset()
    store_instances(archive, [staged(archive, to_bytes(dup))])
    before = len(blob_files(archive))
    offers = [
        staged(archive, to_bytes(good)),  # stored
        staged(archive, to_bytes(dup)),  # duplicate
        staged(archive, b"not DICOM at all"),  # rejected
        staged(archive, to_bytes(ct_dataset())[:-10]),  # rejected, truncated pixel data
        staged(archive, b""),  # rejected, empty
    ]
    outcomes = store_instances(archive, offers)
    assert [o.status for o in outcomes] == [
        Status.STORED, Status.DUPLICATE, Status.REJECTED, Status.REJECTED, Status.REJECTED,
    ]
    assert all(o.reason for o in outcomes if o.status is Status.REJECTED)
    assert all(not o.path.exists() for o in offers)
    assert staging_files(archive) == []
    assert len(blob_files(archive)) == before + 1


def test_rejected_offer_that_is_not_staged_is_left_alone(archive: Archive, tmp_path: Path) -> None:
    source = tmp_path / "junk.dcm"
    source.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    outcome = single(store_instances(archive, [Offer(source, "junk")]))
    assert outcome.status is Status.REJECTED and outcome.reason
    assert source.exists()
    assert blob_files(archive) == {}
    assert staging_files(archive) == []


def test_series_of_another_study_is_refused(archive: Archive) -> None:
    shared_series = generate_uid(prefix=ROOT)
    first = ct_dataset(series=shared_series)
    store_instances(archive, [staged(archive, to_bytes(first))])
    blobs = blob_files(archive)
    intruder = ct_dataset(series=shared_series)  # another study
    outcome = single(store_instances(archive, [staged(archive, to_bytes(intruder))]))
    assert outcome.status is Status.REJECTED
    assert outcome.reason and "another study" in outcome.reason
    assert blob_files(archive) == blobs
    assert staging_files(archive) == []
    with archive.db.read() as conn:
        assert conn.execute(select(studies.c.study_instance_uid)).scalars().all() == [
            first.StudyInstanceUID
        ]


def test_expected_study_mismatch_is_rejected(archive: Archive) -> None:
    ds = ct_dataset()
    other = generate_uid(prefix=ROOT)
    outcome = single(
        store_instances(archive, [staged(archive, to_bytes(ds))], expected_study=other)
    )
    assert outcome.status is Status.REJECTED
    assert outcome.reason and other in outcome.reason
    assert blob_files(archive) == {}
    assert staging_files(archive) == []


def test_stored_bytes_are_the_offered_bytes(archive: Archive, tmp_path: Path) -> None:
    ds = ct_dataset(size=8)
    data = to_bytes(ds)
    store_instances(archive, [Offer(write(ds, tmp_path / "x.dcm"), "x")])
    instance = stored(archive, ds.SOPInstanceUID)
    with archive.blobs.open(instance.blob_key) as fh:
        assert fh.read() == data
    parsed = pydicom.dcmread(io.BytesIO(data))
    assert parsed.SOPInstanceUID == ds.SOPInstanceUID


def test_concurrent_batches_into_one_study_keep_counters_exact(archive: Archive) -> None:
    """Several writers filing different series of one study at once (STOW-RS
    requests in parallel): the study's counters must still add up."""
    study = generate_uid(prefix=ROOT)
    writers, per_writer = 6, 4
    batches = [
        [to_bytes(ct_dataset(study=study, series=uid, instance_number=n))
         for n in range(per_writer)]
        for uid in (generate_uid(prefix=ROOT) for _ in range(writers))
    ]
    errors: list[BaseException] = []

    def run(batch: list[bytes]) -> None:
        try:
            for data in batch:  # one instance per transaction, as small requests do
                outcome = single(store_instances(archive, [staged(archive, data)]))
                assert outcome.status is Status.STORED, outcome.reason
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert study_row(archive, study) == (writers, writers * per_writer, "\\CT\\")


def _encapsulated_with_offsets(offsets: list[int], fragments: list[bytes]) -> bytes:
    """Two frames of RLE (never decoded here) in the given fragments, with this BOT."""
    ds = ct_dataset(size=8)
    ds.file_meta.TransferSyntaxUID = RLELossless
    items = [struct.pack(f"<HHI{len(offsets)}I", 0xFFFE, 0xE000, 4 * len(offsets), *offsets)]
    items += [struct.pack("<HHI", 0xFFFE, 0xE000, len(f)) + f for f in fragments]
    ds.PixelData = b"".join(items) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.NumberOfFrames = 2
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_basic_offset_table_groups_fragments(archive: Archive) -> None:
    fragments = [b"A" * 10, b"B" * 6, b"C" * 8]  # frame 1: A+B, frame 2: C
    data = _encapsulated_with_offsets([0, 8 + 10 + 8 + 6], fragments)
    outcome = single(store_instances(archive, [staged(archive, data)]))
    assert outcome.status is Status.STORED, outcome.reason
    assert outcome.sop_instance_uid is not None
    assert frames_as_stored(archive, outcome.sop_instance_uid) == [b"A" * 10 + b"B" * 6, b"C" * 8]


@pytest.mark.parametrize(
    "offsets",
    [[0, 0], [0, 5], [18, 0], [8, 34]],
    ids=["repeated", "mid-item", "backwards", "first-not-0"],
)
def test_bad_basic_offset_table_is_rejected(archive: Archive, offsets: list[int]) -> None:
    fragments = [b"A" * 10, b"B" * 6, b"C" * 8]
    outcome = single(
        store_instances(archive, [staged(archive, _encapsulated_with_offsets(offsets, fragments))])
    )
    assert outcome.status is Status.REJECTED
    assert outcome.reason and "Offset Table" in outcome.reason
    assert blob_files(archive) == {}
    assert staging_files(archive) == []


def test_concurrent_batches_across_studies_do_not_deadlock(archive: Archive) -> None:
    """Two writers filing instances of the same two studies in opposite orders:
    both must succeed (row locks taken in one order, not a deadlock abort)."""
    study_a, study_b = generate_uid(prefix=ROOT), generate_uid(prefix=ROOT)
    series_uids = {s: [generate_uid(prefix=ROOT) for _ in range(2)] for s in (study_a, study_b)}
    rounds = 12
    errors: list[BaseException] = []
    barrier = threading.Barrier(2, timeout=30)

    def run(writer: int) -> None:
        order = (study_a, study_b) if writer == 0 else (study_b, study_a)
        try:
            for _ in range(rounds):
                batch = [to_bytes(ct_dataset(study=s, series=series_uids[s][writer]))
                         for s in order]
                barrier.wait()
                outcomes = store_instances(archive, [staged(archive, d) for d in batch])
                assert [o.status for o in outcomes] == [Status.STORED] * 2, outcomes
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    for study in (study_a, study_b):
        assert study_row(archive, study) == (2, 2 * rounds, "\\CT\\")


def test_new_blob_folders_are_made_durable(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob's directory entry and every folder created for it reach the disk
    before the instance is acknowledged (fsync of each new folder's parent)."""
    from lightbox.storage import blobs as blob_module

    synced: list[Path] = []
    real = blob_module.fsync_dir

    def recording(path: Path) -> None:
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(blob_module, "fsync_dir", recording)
    ds = ct_dataset()
    assert single(store_instances(archive, [staged(archive, to_bytes(ds))])).status is (
        Status.STORED
    )
    blob = archive.blobs.path(stored(archive, ds.SOPInstanceUID).blob_key)
    root = archive.settings.blob_root
    assert blob.parent.parent == root
    for folder in (root, blob.parent):
        assert folder in synced, f"{folder} was not fsynced"


def test_multi_valued_ul_element_is_stored(archive: Archive) -> None:
    """Raw numeric values inside sequence items are sized little-endian (UL: 4 bytes)."""
    ds = ct_dataset()
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = generate_uid(prefix=ROOT)
    item.SimpleFrameList = [1, 2]  # (0008,1161) UL, 8 bytes, inside a sequence item
    ds.ReferencedImageSequence = pydicom.Sequence([item])
    outcome = single(store_instances(archive, [staged(archive, to_bytes(ds))]))
    assert outcome.status is Status.STORED, outcome.reason


def test_unreadable_offers_are_rejected_alone(archive: Archive, tmp_path: Path) -> None:
    good = ct_dataset()
    folder = tmp_path / "a-folder"
    folder.mkdir()
    offers = [
        Offer(folder, "folder"),
        Offer(tmp_path / "gone.dcm", "gone"),
        Offer(write(good, tmp_path / "good.dcm"), "good"),
    ]
    outcomes = store_instances(archive, offers)
    assert [o.status for o in outcomes] == [Status.REJECTED, Status.REJECTED, Status.STORED]
    assert all(o.reason for o in outcomes[:2])
    assert list(blob_files(archive).values()) == [to_bytes(good)]


def test_a_pixel_description_with_a_mangled_vr_is_refused_with_the_reason(
    archive: Archive,
) -> None:
    """BitsAllocated whose VR bytes are not a VR (a bit flipped on the way):
    refused as unreadable, alone or in a batch, not an internal error."""
    good = ct_dataset()
    encoded = to_bytes(ct_dataset())
    element = b"\x28\x00\x00\x01US"  # (0028,0100) BitsAllocated, explicit VR
    assert encoded.count(element) == 1
    mangled = encoded.replace(element, b"\x28\x00\x00\x01U\x97")
    alone = single(store_instances(archive, [_unsynced_bytes(archive, mangled)]))
    batch = store_instances(archive, [staged(archive, mangled), staged(archive, to_bytes(good))])
    for outcome in (alone, batch[0]):
        assert outcome.status is Status.REJECTED
        assert outcome.failure is FailureReason.CANNOT_UNDERSTAND
        assert outcome.reason is not None and "unreadable DICOM value" in outcome.reason
    assert batch[1].status is Status.STORED
    assert list(blob_files(archive).values()) == [to_bytes(good)]
    assert staging_files(archive) == []


def test_many_tiny_frames_cost_a_constant_layout(archive: Archive) -> None:
    """A million 1-byte frames (a 1 MB upload) must not become a million index
    entries: native frames are recorded as offset, size and count."""
    count = 1_000_000
    ds = ct_dataset(size=1, NumberOfFrames=count)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(range(256)) * (count // 256) + bytes(count % 256)
    outcome = single(store_instances(archive, [staged(archive, to_bytes(ds))]))
    assert outcome.status is Status.STORED, outcome.reason
    with archive.db.read() as conn:
        encoded = conn.execute(select(instances.c.pixel_layout)).scalar_one()
    assert len(encoded) < 100
    instance = stored(archive, ds.SOPInstanceUID)
    assert instance.layout is not None and len(instance.layout.frames) == count
    for number in (1, 2, 257, count):
        frame = retrieve.stored_frame(archive, instance, number)
        assert frame is not None and frame.data == ds.PixelData[number - 1 : number]


def test_layout_encoding_round_trips() -> None:
    from lightbox.dicom.frames import PixelLayout, UniformFrames

    uniform = PixelLayout(False, (100, 40), UniformFrames(100, 10, 4))
    explicit = PixelLayout(False, (100, 40), tuple(((100 + 10 * i, 10),) for i in range(4)))
    assert uniform == explicit and uniform.frames[-1] == ((130, 10),)
    assert uniform.frames[1:3] == (((110, 10),), ((120, 10),))
    encapsulated = PixelLayout(True, (7, -1), (((20, 5), (33, 9)), ((50, 4),)))
    for layout in (uniform, explicit, encapsulated):
        assert PixelLayout.from_bytes(layout.to_bytes()) == layout
    assert len(uniform.to_bytes()) < len(explicit.to_bytes())


def _unsynced(archive: Archive, ds: pydicom.Dataset) -> Offer:
    """A staged offer whose bytes ingest must still fsync (as C-STORE hands them over)."""
    return _unsynced_bytes(archive, to_bytes(ds))


def _unsynced_bytes(archive: Archive, data: bytes) -> Offer:
    return dataclasses.replace(staged(archive, data), synced=False)


def test_index_work_overlaps_the_fsync_and_commits_after_it(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a batch, the index transaction does its work while the blobs are
    fsynced, and commits only once they are durable: readers do not see the
    instances before that."""
    batch = [ct_dataset(), ct_dataset()]
    ds = batch[0]
    events: list[str] = []
    real_fsync, real_insert = ingest.fsync_file, index.insert_instances

    index_worked = threading.Event()

    def slow_fsync(path: Path) -> None:
        # Not done before the index work is: a fsync that held the index work
        # back would wait out the timeout and come first in ``events``.
        index_worked.wait(30)
        real_fsync(path)
        with archive.db.read() as conn:
            seen = conn.execute(select(instances.c.pk).where(
                instances.c.sop_instance_uid == ds.SOPInstanceUID)).first()
        events.append("fsync, indexed" if seen else "fsync, not indexed yet")

    def recording_insert(conn: Any, rows: Any) -> None:
        events.append("index work")
        real_insert(conn, rows)
        index_worked.set()

    monkeypatch.setattr(ingest, "fsync_file", slow_fsync)
    monkeypatch.setattr(index, "insert_instances", recording_insert)
    outcomes = store_instances(archive, [_unsynced(archive, d) for d in batch])
    assert [o.status for o in outcomes] == [Status.STORED, Status.STORED]
    assert events == ["index work", "fsync, not indexed yet", "fsync, not indexed yet"]
    assert stored(archive, ds.SOPInstanceUID).size == len(to_bytes(ds))


def test_one_file_is_fsynced_while_its_header_is_read_and_indexed_after(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of one unsynced file (a C-STORE): its header is read on another
    thread while the calling thread fsyncs the blob, and the index sees the
    instance only once the blob is durable."""
    ds = ct_dataset()
    events: list[str] = []
    real_fsync, real_read = ingest.fsync_file, ingest.read_instance
    caller = threading.get_ident()
    header_read = threading.Event()

    def slow_fsync(path: Path) -> None:
        # Returns only once the header was read elsewhere meanwhile (or after
        # the timeout, which the events below would then show).
        events.append("fsync in the caller" if threading.get_ident() == caller else "fsync")
        header_read.wait(30)
        real_fsync(path)
        with archive.db.read() as conn:
            seen = conn.execute(select(instances.c.pk)).first()
        events.append("fsynced, indexed" if seen else "fsynced, not indexed yet")

    def recording_read(path: Path, size: int | None = None) -> Any:
        where = "header read aside" if threading.get_ident() != caller else "header read"
        record = real_read(path, size)
        events.append(where)
        header_read.set()
        return record

    monkeypatch.setattr(ingest, "fsync_file", slow_fsync)
    monkeypatch.setattr(ingest, "read_instance", recording_read)
    assert single(store_instances(archive, [_unsynced(archive, ds)])).status is Status.STORED
    assert events == ["fsync in the caller", "header read aside", "fsynced, not indexed yet"]
    assert stored(archive, ds.SOPInstanceUID).size == len(to_bytes(ds))


def _assert_nothing_left(archive: Archive) -> None:
    """No instance indexed, no blob, nothing in staging."""
    with archive.db.read() as conn:
        assert conn.execute(select(instances.c.pk)).first() is None
    assert blob_files(archive) == {} and staging_files(archive) == []


def test_one_file_whose_header_read_breaks_leaves_nothing(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error nobody expected while the header is read aside reaches the
    caller (a C-STORE answers 0x0110), and the blob made durable meanwhile
    is removed."""
    def broken_read(path: Path, size: int | None = None) -> Any:
        raise RuntimeError("a bug in the header reader")

    monkeypatch.setattr(ingest, "read_instance", broken_read)
    with pytest.raises(RuntimeError, match="a bug in the header reader"):
        store_instances(archive, [_unsynced(archive, ct_dataset())])
    _assert_nothing_left(archive)


def test_a_batch_whose_header_read_breaks_leaves_nothing(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_read, calls = ingest.read_instance, []

    def breaks_second(path: Path, size: int | None = None) -> Any:
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("a bug in the header reader")
        return real_read(path, size)

    monkeypatch.setattr(ingest, "read_instance", breaks_second)
    with pytest.raises(RuntimeError, match="a bug in the header reader"):
        store_instances(archive, [_unsynced(archive, ct_dataset()) for _ in range(3)])
    _assert_nothing_left(archive)


def test_one_file_whose_fsync_fails_is_refused_and_leaves_nothing(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = ct_dataset()

    def failing_fsync(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ingest, "fsync_file", failing_fsync)
    outcome = single(store_instances(archive, [_unsynced(archive, ds)]))
    assert (outcome.status, outcome.reason) == (Status.REJECTED, "storage is not writable")
    assert outcome.failure is FailureReason.OUT_OF_RESOURCES
    _assert_nothing_left(archive)


def _assert_refused_alone(archive: Archive, outcomes: list[Outcome], kept: pydicom.Dataset) -> None:
    """The first of two offers was refused for storage, the second stored, and
    nothing of the first is left in the index, the blobs or staging."""
    assert [(o.status, o.reason) for o in outcomes] == [
        (Status.REJECTED, "storage is not writable"), (Status.STORED, None)]
    with archive.db.read() as conn:
        indexed = set(conn.execute(select(instances.c.sop_instance_uid)).scalars())
    assert indexed == {kept.SOPInstanceUID}
    assert list(blob_files(archive).values()) == [to_bytes(kept)]
    assert staging_files(archive) == []


def test_synced_parts_share_one_directory_sync_that_the_commit_waits_for(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts whose bytes are fsynced already (STOW-RS) need their new names
    made durable: one directory sync for the batch, under way while the
    headers are checked and the index transaction does its work, and done
    before the transaction commits."""
    batch = [ct_dataset(), ct_dataset()]
    events: list[str] = []
    real_sync, real_insert = archive.blobs.sync, index.insert_instances

    index_worked = threading.Event()

    def slow_sync(keys: Any) -> None:
        index_worked.wait(30)  # as in the test above
        real_sync(keys)
        with archive.db.read() as conn:
            seen = conn.execute(select(instances.c.pk)).first()
        events.append(f"{len(list(keys))} synced, " + ("indexed" if seen else "not indexed yet"))

    def recording_insert(conn: Any, rows: Any) -> None:
        events.append("index work")
        real_insert(conn, rows)
        index_worked.set()

    monkeypatch.setattr(archive.blobs, "sync", slow_sync)
    monkeypatch.setattr(index, "insert_instances", recording_insert)
    outcomes = store_instances(archive, [staged(archive, to_bytes(ds)) for ds in batch])
    assert [o.status for o in outcomes] == [Status.STORED, Status.STORED]
    assert events == ["index work", "2 synced, not indexed yet"]


def test_when_the_shared_directory_sync_fails_each_blob_is_tried_alone(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing, kept = ct_dataset(), ct_dataset()
    real_sync = archive.blobs.sync
    keys: dict[str, str] = {}

    def sync(asked: Any) -> None:
        asked = list(asked)
        time.sleep(0.2)  # still under way when the headers are checked
        if len(asked) > 1:
            raise OSError(5, "Input/output error")  # the batch's sync
        if keys.get(asked[0]) == failing.SOPInstanceUID:
            raise OSError(5, "Input/output error")  # and this blob's own try
        real_sync(asked)

    real_put = archive.blobs.put_file

    def put_file(source: Path, *, sync_dir: bool = True) -> str:
        content = source.read_bytes()
        key = real_put(source, sync_dir=sync_dir)
        keys[key] = failing.SOPInstanceUID if failing.SOPInstanceUID.encode() in content else ""
        return key

    monkeypatch.setattr(archive.blobs, "sync", sync)
    monkeypatch.setattr(archive.blobs, "put_file", put_file)
    outcomes = store_instances(archive, [staged(archive, to_bytes(ds)) for ds in (failing, kept)])
    _assert_refused_alone(archive, outcomes, kept)


def test_a_blob_that_cannot_be_made_durable_is_refused_alone(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing, kept = ct_dataset(), ct_dataset()
    real_fsync = ingest.fsync_file

    def fsync(path: Path) -> None:
        time.sleep(0.2)  # still under way when the index transaction starts
        if failing.SOPInstanceUID.encode() in Path(path).read_bytes():
            raise OSError(5, "Input/output error")
        real_fsync(path)

    undone: list[set[int]] = []
    real_without = indexing._without

    def without(archive: Archive, items: Any, failed: set[int]) -> list[Outcome]:
        undone.append(failed)  # the transaction was undone for the failed fsync
        return real_without(archive, items, failed)

    monkeypatch.setattr(ingest, "fsync_file", fsync)
    monkeypatch.setattr(indexing, "_without", without)
    outcomes = store_instances(archive, [_unsynced(archive, ds) for ds in (failing, kept)])
    assert undone == [{0}]
    _assert_refused_alone(archive, outcomes, kept)


@pytest.mark.parametrize("value", ["2147483648", "-2147483649", "99999999999"])
def test_an_integer_its_vr_cannot_hold_is_kept_but_not_indexed(
    archive: Archive, tmp_path: Path, value: str
) -> None:
    """An IS beyond -2^31..2^31-1 (PS3.5 Table 6.2-1) does not fit the index's
    column on PostgreSQL: the instance is stored on both databases all the
    same, the index leaves the value out, and the metadata keeps it as sent."""
    ds = ct_dataset(instance_number=7)
    ds.SeriesNumber = value
    path = tmp_path / "odd.dcm"
    write(ds, path)
    assert single(store_instances(archive, [Offer(path, "test")])).status is Status.STORED
    with archive.db.read() as conn:
        indexed = conn.execute(select(series.c.series_number, instances.c.instance_number)
                               .join(instances, instances.c.series_pk == series.c.pk)).one()
        metadata = json.loads(conn.execute(select(instances.c.dicom_json)).scalar_one())
    assert tuple(indexed) == (None, 7)
    assert metadata["00200011"]["Value"] == [int(value)]
    key = stored(archive, ds.SOPInstanceUID).blob_key
    assert archive.blobs.path(key).read_bytes() == path.read_bytes()
