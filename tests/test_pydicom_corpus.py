"""pydicom's bundled test files as an edge-case corpus, on SQLite and PostgreSQL.

Every file is offered to the one ingest path. Each must end up stored and
then come back byte for byte through WADO-RS (transfer-syntax=*), or be a
duplicate of an earlier file's SOP Instance UID, or be rejected with a
reason. One archive per backend serves the whole module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.datadict import DicomDictionary, dictionary_VR
from pydicom.dataset import Dataset
from pynetdicom import service_class
from pynetdicom.dsutils import encode

from lightbox.archive import Archive
from lightbox.dimse import contexts, matches, query
from lightbox.index.schema import instances
from lightbox.services import search
from lightbox.services.auth import Principal
from lightbox.services.ingest import Offer, Outcome, Status, store_instances
from tests.conftest import BACKENDS, RunningServer, database_url, make_settings, serving
from tests.corpus_report import corpus_files, expected_bytes, name_of, offer_all

FILES = corpus_files()
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'

# Not DICOM Part 10 files at all, or with a value running past the end of the file.
MUST_REJECT = {
    "README.txt", "dicomdirtests/README.txt", "dicomdirtests/TINY_ALPHA/README",
    "crayons.icc", "rtplan.dump", "rtstruct.dump", "test1.json", "test_PN.json", "zipMR.gz",
    "MR_truncated.dcm",
}
# Damaged or incomplete in ways an archive may refuse (or, if it grows lenient, repair):
# no File Meta Information, no Transfer Syntax, no SOP Class / Study Instance UID,
# a malformed number, an implicit-VR Pixel Data element in an explicit-VR file, a
# truncated sequence. DICOMDIRs (no SOP Class UID) are added below.
MAY_REJECT = {
    "ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm", "no_meta.dcm", "rtstruct.dcm",
    "meta_missing_tsyntax.dcm", "no_meta_group_length.dcm", "empty_charset_LEI.dcm",
    "priv_SQ.dcm", "nested_priv_SQ.dcm", "UN_sequence.dcm", "JPEGLSNearLossless_08.dcm",
    "JPEGLSNearLossless_16.dcm", "SC_rgb_jls_lossy_line.dcm", "SC_rgb_jls_lossy_sample.dcm",
    "SC_rgb_jpeg.dcm", "badVR.dcm", "rtplan_truncated.dcm",
}
MUST_REJECT |= {name_of(p) for p in FILES if p.name.startswith("DICOMDIR")}
def _params() -> list[Any]:
    params = []
    for path in FILES:
        name = name_of(path)
        params.append(pytest.param(path, id=name))
    return params


@dataclass
class Ingested:
    server: RunningServer
    http: httpx.Client
    outcomes: dict[Path, Outcome]
    first_stored: dict[str, Path]  # SOP Instance UID -> the file that was stored

    def retrieve(self, outcome: Outcome) -> list[bytes]:
        response = self.http.get(
            f"/studies/{outcome.study_instance_uid}/series/{outcome.series_instance_uid}"
            f"/instances/{outcome.sop_instance_uid}",
            headers={"Accept": AS_STORED},
        )
        assert response.status_code == 200, response.text
        boundary = response.headers["content-type"].split("boundary=")[1].strip('"')
        chunks = response.content.split(b"--" + boundary.encode())
        return [c.split(b"\r\n\r\n", 1)[1][:-2] for c in chunks[1:-1]]


@pytest.fixture(scope="module", params=BACKENDS)
def ingested(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Ingested]:
    data = tmp_path_factory.mktemp(f"corpus-{request.param}")
    with database_url(str(request.param), data) as url:
        archive = Archive.open(make_settings(data, url))
        try:
            results = offer_all(archive)
            first: dict[str, Path] = {}
            for path, outcome in results:
                if outcome.status is Status.STORED and outcome.sop_instance_uid:
                    first.setdefault(outcome.sop_instance_uid, path)
            with serving(archive) as server, httpx.Client(
                base_url=server.dicomweb, headers=server.headers
            ) as http:
                yield Ingested(server, http, dict(results), first)
        finally:
            archive.close()


@pytest.mark.parametrize("path", _params())
def test_each_file_is_stored_intact_duplicate_or_rejected(ingested: Ingested, path: Path) -> None:
    outcome = ingested.outcomes[path]
    name = name_of(path)
    assert outcome.source == name
    if outcome.status is Status.REJECTED:
        assert outcome.reason and outcome.reason.strip()
        assert outcome.failure is not None
        assert name in MUST_REJECT | MAY_REJECT, f"a valid file was rejected: {outcome.reason}"
        return
    assert name not in MUST_REJECT, f"{name} is not a storable DICOM instance"
    assert outcome.sop_instance_uid and outcome.study_instance_uid
    stored = ingested.first_stored[outcome.sop_instance_uid]
    if outcome.status is Status.STORED:
        assert stored == path
    else:
        assert outcome.status is Status.DUPLICATE
        assert stored != path and FILES.index(stored) < FILES.index(path)
    # A duplicate keeps the first copy: that is what comes back.
    assert ingested.retrieve(outcome) == [expected_bytes(stored)]


def test_the_index_holds_exactly_the_stored_files(ingested: Ingested) -> None:
    with ingested.server.archive.db.read() as conn:
        indexed = set(conn.execute(instances.select().with_only_columns(
            instances.c.sop_instance_uid)).scalars())
    assert indexed == set(ingested.first_stored)
    counts = {s: sum(1 for o in ingested.outcomes.values() if o.status is s) for s in Status}
    assert counts[Status.STORED] == len(indexed)
    # The corpus really is mixed: plenty of each outcome.
    assert counts[Status.STORED] > 100
    assert counts[Status.DUPLICATE] > 10
    assert counts[Status.REJECTED] > 10
    root = Path(ingested.server.archive.settings.blob_root)
    blobs = [p for p in root.rglob("*")
             if p.is_file() and not p.relative_to(root).parts[0].startswith(".")]
    assert len(blobs) == len(indexed)  # nothing left behind by duplicates or rejections


def test_native_ybr_full_422_is_stored_with_its_frame(server: RunningServer) -> None:
    # In the corpus it shares its SOP Instance UID with an earlier file, so on its own:
    # two bytes per pixel (Y Y Cb Cr per pixel pair), not three (PS3.3 C.7.6.3.1.2).
    path = Path(str(get_testdata_file("SC_ybr_full_422_uncompressed.dcm")))
    [outcome] = store_instances(server.archive, [Offer(path, path.name)])
    assert outcome.status is Status.STORED, outcome.reason
    response = httpx.get(
        f"{server.dicomweb}/studies/{outcome.study_instance_uid}"
        f"/series/{outcome.series_instance_uid}/instances/{outcome.sop_instance_uid}/frames/1",
        headers={**server.headers, "Accept": 'multipart/related; type="application/octet-stream"'},
    )
    assert response.status_code == 200, response.text
    pixels = dcmread(path).PixelData
    assert len(pixels) == 100 * 100 * 2
    assert pixels in response.content and len(response.content) < len(pixels) + 400


def test_unreadable_offer_is_rejected_not_fatal(archive: Archive, tmp_path: Path) -> None:
    # get_testdata_files() lists folders too; a file may also vanish after listing.
    good = Path(str(get_testdata_file("CT_small.dcm")))
    folder = next(Path(f) for f in get_testdata_files() if Path(f).is_dir())
    outcomes = store_instances(archive, [
        Offer(folder, "folder"), Offer(tmp_path / "gone.dcm", "gone"), Offer(good, "good"),
    ])
    assert [o.status for o in outcomes] == [Status.REJECTED, Status.REJECTED, Status.STORED]
    assert all(o.reason for o in outcomes[:2])


def _return_keys(stored: list[Path], limit: int) -> list[tuple[int, str]]:
    """Public top-level attributes of the stored files (pixel data and file
    meta aside), the most common first: return keys for every VR the corpus has."""
    seen: dict[int, int] = {}
    for path in stored:
        for elem in dcmread(path, stop_before_pixels=True):
            tag = int(elem.tag)
            if tag >> 16 not in (0x0002, 0x7FE0) and not tag >> 16 & 1 and tag & 0xFFFF:
                seen[tag] = seen.get(tag, 0) + 1
    tags = sorted(seen, key=lambda t: (-seen[t], t))[:limit]
    return [(t, dictionary_VR(t).split(" or ")[0]) for t in sorted(tags) if t in DicomDictionary]


@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
def test_c_find_matches_encoded_from_json_are_what_pydicom_encodes(
    ingested: Ingested, level: str
) -> None:
    """The SCP encodes each C-FIND match straight from the search result's
    DICOM JSON (``dimse.matches``): over the whole corpus, with every kind of
    value it holds (sequences, numbers, names, other character sets made
    UTF-8) and keys it lacks, the bytes are pydicom's for the same match in
    both little endian transfer syntaxes."""
    archive = ingested.server.archive
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for tag, vr in _return_keys(list(ingested.first_stored.values()), query.MAX_KEYS - 10):
        if tag == query.SPECIFIC_CHARACTER_SET:
            continue  # added to a match where a value needs it (UTF-8)
        identifier.add_new(tag, vr, [] if vr == "SQ" else None)
    identifier.RetrieveAETitle = identifier.InstanceAvailability = None
    identifier.add_new(0x00091001, "LO", None)  # a private key: returned empty
    request = query.find_request(identifier, contexts.STUDY_ROOT_FIND)
    request.query.limit = 1000
    items = search.search(archive, Principal(user="admin", is_admin=True), request.query).items
    assert len(items) > {"STUDY": 20, "SERIES": 30, "IMAGE": 100}[level]
    beyond_ascii = 0
    for item in items:
        obj = query.response_json(item, request, "LIGHTBOX")
        for explicit in (False, True):
            expected = encode(Dataset.from_json(obj), not explicit, True)
            assert matches.encode(obj, explicit=explicit) == expected, item
        beyond_ascii += "00080005" in obj
    assert beyond_ascii >= 2  # values read in other character sets, sent in UTF-8
    # And pynetdicom sends an encoded match's bytes as they are, or pydicom's
    # encoding of the match for any other transfer syntax.
    obj = query.response_json(items[0], request, "LIGHTBOX")
    match = query.response(items[0], request, "LIGHTBOX", explicit=False)
    assert isinstance(match, matches.Encoded)
    contexts.configure_pynetdicom()
    assert service_class.encode(match, True, True) == matches.encode(obj, explicit=False)
    assert service_class.encode(match, False, False) == encode(Dataset.from_json(obj), False, False)
