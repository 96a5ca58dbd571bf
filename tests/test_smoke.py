"""First end-to-end check: store and read back over real HTTP on both backends."""

from __future__ import annotations

import io

import httpx
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from lightbox.index.instances import remove
from tests.conftest import RunningServer
from tests.factories import ct_dataset, to_bytes


def test_store_search_and_retrieve_round_trip(server: RunningServer) -> None:
    original = to_bytes(ct_dataset())
    ds = dcmread(io.BytesIO(original))
    client = DICOMwebClient(server.dicomweb, headers=server.headers)
    client.store_instances([ds])
    found = client.search_for_studies(search_filters={"PatientID": "PAT-1"})
    assert [s["0020000D"]["Value"][0] for s in found] == [ds.StudyInstanceUID]
    back = httpx.get(
        f"{server.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}",
        headers={
            **server.headers,
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
        },
    )
    assert back.status_code == 200
    assert original in back.content


def test_a_deleted_instance_is_not_served_from_another_process_cache(
    server: RunningServer,
) -> None:
    """A second process deleting an instance (its blob gone, its cache entry here
    still warm) must give 404, not stale bytes or a 500."""
    original = to_bytes(ct_dataset())
    ds = dcmread(io.BytesIO(original))
    DICOMwebClient(server.dicomweb, headers=server.headers).store_instances([ds])
    url = (
        f"{server.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/1"
    )
    accept = {**server.headers, "Accept": 'multipart/related; type="application/octet-stream"'}
    assert httpx.get(url, headers=accept).status_code == 200  # now cached
    # What another worker's DELETE does: rows and blob go, this process's cache stays.
    archive = server.archive
    with archive.db.write() as conn:
        keys = remove(conn, ds.StudyInstanceUID)
    for key in keys:
        archive.blobs.delete(key)
    assert httpx.get(url, headers=accept).status_code == 404
