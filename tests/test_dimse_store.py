"""C-ECHO and C-STORE against our SCP with real peers (DCMTK echoscu/storescu and
pynetdicom), read back over WADO-RS; bad input and broken connections."""

from __future__ import annotations

import io
import logging
import socket
import threading
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import build_context
from sqlalchemy import func, select

from lightbox.archive import Archive
from lightbox.dimse import contexts, store
from lightbox.dimse.scp import DicomServer
from lightbox.dimse.status import Store
from lightbox.index.schema import instances
from lightbox.services import nodes
from tests.conftest import serving
from tests.dimse_peers import association_request, dcmtk, make_corpus, read_pdu, scp, with_settings
from tests.factories import ROOT, ct_dataset, video_dataset, write
from tests.test_ingest import blob_files

ALL_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# Real-world files in many transfer syntaxes, with the storescu option that proposes
# their syntax (MR_small in big endian: its implicit and explicit twins share its
# SOP Instance UID; uncompressed files go with the synthetic native corpora).
PYDICOM_FILES = {
    "CT_small.dcm": "native", "MR_small_bigendian.dcm": "native", "rtplan.dcm": "native",
    "image_dfl.dcm": "native", "JPEG2000.dcm": "-xw", "SC_rgb_jpeg_gdcm.dcm": "-xs",
    "JPGExtended.dcm": "-xx", "SC_rgb_dcmtk_+eb+cy+n1.dcm": "-xy",
}
# Synthetic corpora: make_corpus --syntax, and the storescu option proposing it.
CORPORA = {"explicit": "native", "implicit": "native", "jpeg2000": "-xv", "rle": "-xr",
           "jpegls": "-xt"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of files to send, by the storescu option that proposes their syntax."""
    root = tmp_path_factory.mktemp("corpus")
    for seed, (syntax, option) in enumerate(CORPORA.items(), 1):
        make_corpus(root / option / syntax, "--patients", "1", "--slices", "4", "--size", "64",
                    "--seed", str(seed), "--syntax", syntax)
    for name, option in PYDICOM_FILES.items():
        source = get_testdata_file(name)
        assert source is not None, name
        (root / option).mkdir(exist_ok=True)
        (root / option / name).write_bytes(Path(source).read_bytes())
    return {option: root / option for option in sorted(set(PYDICOM_FILES.values()))}


def _count(archive: Archive) -> int:
    with archive.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(instances)).scalar_one())


def _staging_is_empty(archive: Archive) -> bool:
    return not archive.blobs.staged()


def _retrieved(archive: Archive, studies: set[str]) -> dict[str, Dataset]:
    """Every instance of ``studies`` over WADO-RS as stored, by SOP Instance UID."""
    found: dict[str, Dataset] = {}
    with serving(archive) as server:
        for study in studies:
            response = httpx.get(f"{server.dicomweb}/studies/{study}",
                                 headers={**server.headers, "Accept": ALL_AS_STORED}, timeout=30)
            assert response.status_code == 200, response.text
            boundary = response.headers["content-type"].split("boundary=")[1].strip('"')
            for chunk in response.content.split(b"--" + boundary.encode())[1:-1]:
                ds = pydicom.dcmread(io.BytesIO(chunk.split(b"\r\n\r\n", 1)[1][:-2]))
                found[str(ds.SOPInstanceUID)] = ds
    return found


def _assert_same_content(sent: Dataset, back: Dataset) -> None:
    """DIMSE transfers the dataset, not the file: the receiver writes its own File
    Meta Information, and storescu may re-encode between the native transfer
    syntaxes (implicit/explicit VR, byte order) the SCP accepted. So the check is
    that every element and the pixel data are the same, not the bytes of the file.
    Dataset Trailing Padding and group lengths carry no content; DCMTK drops them."""
    sent_tags, back_tags = _content_tags(sent), _content_tags(back)
    assert sent_tags == back_tags
    for tag in sent_tags:
        assert back[tag].value == sent[tag].value, f"{tag} differs"
    if "PixelData" not in sent:
        return
    same_syntax = sent.file_meta.TransferSyntaxUID == back.file_meta.TransferSyntaxUID
    if same_syntax or sent.file_meta.TransferSyntaxUID.is_compressed:
        assert back.PixelData == sent.PixelData
    else:
        assert np.array_equal(back.pixel_array, sent.pixel_array)


def _content_tags(ds: Dataset) -> set[int]:
    return {int(e.tag) for e in ds
            if e.tag not in (0x7FE00010, 0xFFFCFFFC) and e.tag.element != 0x0000}


def test_echoscu_verifies_lightbox(archive: Archive) -> None:
    with scp(archive) as server:
        done = dcmtk("echoscu", "-aec", "LIGHTBOX", "127.0.0.1", str(server.port))
    assert done.returncode == 0


def test_storescu_folder_comes_back_with_identical_content(
    archive: Archive, corpus: dict[str, Path]
) -> None:
    files = sorted(f for folder in corpus.values() for f in folder.rglob("*.dcm"))
    with scp(archive) as server:
        for option, folder in corpus.items():
            # One association per folder, as a modality or PACS sends it; the option makes
            # storescu propose the files' own compressed syntax rather than decompress.
            proposal = [] if option == "native" else [option]
            dcmtk("storescu", "-aec", "LIGHTBOX", "+sd", "+r", *proposal, "127.0.0.1",
                  str(server.port), str(folder))
    sent = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in files)}
    back = _retrieved(archive, {str(ds.StudyInstanceUID) for ds in sent.values()})
    assert set(back) == set(sent)
    for sop, ds in sent.items():
        _assert_same_content(ds, back[sop])
    assert _staging_is_empty(archive)


def test_unknown_caller_is_rejected_when_policy_is_none(archive: Archive) -> None:
    strict = with_settings(archive, dicom_accept_unknown="none")
    nodes.add_node(archive, name="elsewhere", ae_title="ECHOSCU", host="10.9.8.7", port=104)
    with scp(strict) as server:
        refused = dcmtk("echoscu", "-aec", "LIGHTBOX", "127.0.0.1", str(server.port),
                        check=False)
        assert refused.returncode != 0
        assert "Rejected" in refused.stdout + refused.stderr
        nodes.add_node(archive, name="here", ae_title="ECHOSCU", host="127.0.0.1", port=104)
        dcmtk("echoscu", "-aec", "LIGHTBOX", "127.0.0.1", str(server.port))


def test_every_association_and_its_outcome_is_logged(
    archive: Archive, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Accepted, rejected, and how each ended with what it did."""
    strict = with_settings(archive, dicom_accept_unknown="none")
    nodes.add_node(archive, name="here", ae_title="STORESCU", host="127.0.0.1", port=104)
    write(ct_dataset(), tmp_path / "one.dcm")
    with caplog.at_level(logging.INFO, logger="lightbox"), scp(strict) as server:
        dcmtk("storescu", "-aet", "STORESCU", "-aec", "LIGHTBOX", "127.0.0.1",
              str(server.port), str(tmp_path / "one.dcm"))
        dcmtk("echoscu", "-aet", "STRANGER", "-aec", "LIGHTBOX", "127.0.0.1",
              str(server.port), check=False)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lightbox.dimse")]
    assert any("from STORESCU@127.0.0.1" in m and " accepted, " in m for m in lines), lines
    assert any("from STORESCU@127.0.0.1" in m and " released after " in m
               and "C-STORE stored 1" in m for m in lines), lines
    assert any("from STRANGER@127.0.0.1" in m and " rejected: " in m for m in lines), lines


# --- pynetdicom as SCU: cases DCMTK would refuse to send --------------------------


def _associate(server: DicomServer, *syntaxes: str, ts: list[str] | None = None) -> Association:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    cxs = [build_context(s, ts or [ExplicitVRLittleEndian]) for s in syntaxes]
    assoc = ae.associate("127.0.0.1", server.port, contexts=cxs, ae_title="LIGHTBOX")
    assert assoc.is_established
    return assoc


def _file(path: Path, ds: Dataset, meta_sop_class: str | None = None) -> Path:
    """A Part 10 file whose File Meta may name another SOP Class than its dataset
    (pynetdicom takes the C-STORE request's Affected SOP Class from the File Meta)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(meta_sop_class or ds.SOPClassUID)
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(ROOT + "1")
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    head = DicomBytesIO()
    write_file_meta_info(head, meta)
    path.write_bytes(bytes(128) + b"DICM" + head.getvalue() + body.getvalue())
    return path


def test_store_failures_name_the_reason_and_store_nothing(
    archive: Archive, tmp_path: Path
) -> None:
    contexts.configure_pynetdicom()  # chunked sending of files, as the SCP's process does
    mismatched = ct_dataset()
    mismatched.SOPClassUID = MRImageStorage  # the request will say CT
    no_study = ct_dataset()
    del no_study.StudyInstanceUID
    junk = write(ct_dataset(), tmp_path / "junk.dcm")
    _meta, offset = split_dataset(junk)
    # Valid File Meta, then a SOP Class UID element claiming more bytes than follow.
    junk.write_bytes(junk.read_bytes()[:offset] + b"\x08\x00\x16\x00UI\xff\x7f" + b"1" * 64)
    with scp(archive) as server:
        assoc = _associate(server, CTImageStorage)
        try:
            mismatch = assoc.send_c_store(_file(tmp_path / "m.dcm", mismatched, CTImageStorage))
            missing = assoc.send_c_store(_file(tmp_path / "n.dcm", no_study))
            unreadable = assoc.send_c_store(junk)
        finally:
            assoc.release()
    assert mismatch.Status == Store.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert "SOP Class" in mismatch.ErrorComment
    assert missing.Status == Store.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert "StudyInstanceUID" in missing.ErrorComment
    assert unreadable.Status in (Store.CANNOT_UNDERSTAND, Store.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    assert unreadable.ErrorComment
    assert _count(archive) == 0
    assert _staging_is_empty(archive)
    assert blob_files(archive) == {}


def test_a_failure_between_the_blob_and_the_index_leaves_no_blob(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something nobody expected after the blob is durable and before it is
    indexed: the peer hears 0x0110, and the blob is removed."""
    def broken(*args: object) -> None:
        raise RuntimeError("a bug between the blob and the index")

    monkeypatch.setattr(store, "_check_identity", broken)
    contexts.configure_pynetdicom()
    with scp(archive) as server:
        assoc = _associate(server, CTImageStorage)
        try:
            status = assoc.send_c_store(_file(tmp_path / "c.dcm", ct_dataset()))
        finally:
            assoc.release()
    assert status.Status == Store.PROCESSING_FAILURE
    assert _count(archive) == 0
    assert _staging_is_empty(archive)
    assert blob_files(archive) == {}


def test_unknown_sop_class_is_refused_at_negotiation(archive: Archive) -> None:
    private_class = "1.2.826.0.1.3680043.10.1387.77.99"
    with scp(archive) as server:
        assoc = _associate(server, contexts.VERIFICATION, private_class)
        try:
            assoc_cx = {str(cx.abstract_syntax): cx for cx in assoc.accepted_contexts}
            assert private_class not in assoc_cx
            assert contexts.VERIFICATION in assoc_cx
        finally:
            assoc.release()


def test_every_common_transfer_syntax_is_accepted_for_storage(archive: Archive) -> None:
    with scp(archive) as server:
        ae = AE(ae_title="TESTSCU")
        for syntax in contexts.TRANSFER_SYNTAXES:
            ae.add_requested_context(CTImageStorage, [syntax])
        assoc = ae.associate("127.0.0.1", server.port, ae_title="LIGHTBOX")
        try:
            accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        finally:
            assoc.release()
    assert accepted == set(contexts.TRANSFER_SYNTAXES)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_garbage_stalls_and_aborts_do_not_take_the_server_down(
    archive: Archive, tmp_path: Path
) -> None:
    impatient = with_settings(archive, dicom_acse_timeout=1, dicom_network_timeout=2)
    with scp(impatient) as server:
        peers = [socket.create_connection(("127.0.0.1", server.port), timeout=5)
                 for _ in range(4)]
        peers[0].sendall(b"\x55\x00\x00\x00\x00\x10" + b"\x00" * 16)  # unknown PDU type
        peers[1].sendall(b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 64)  # a 4 GB A-ASSOCIATE-RQ
        peers[2].sendall(b"\x01\x00\x00\x00\x01\x00" + b"\x00" * 16)  # stops mid-PDU
        # peers[3] sends nothing: the ACSE timeout ends it.
        for peer in peers:
            assert _closed_within(peer, 10)
            peer.close()

        # The connection drops while a large dataset is on the wire: the sender is held
        # inside its 8th PDU-sent event while its socket is shut down under it.
        assoc = _associate(server, CTImageStorage)
        reached, gate = threading.Event(), threading.Event()
        sent = [0]

        def hold_after_eighth_pdu(_event: object) -> None:
            sent[0] += 1
            if sent[0] == 8:
                reached.set()
                gate.wait(10)

        assoc.bind(evt.EVT_PDU_SENT, hold_after_eighth_pdu)
        result: dict[str, Dataset] = {}
        big = ct_dataset(size=2048, frames=4)  # 32 MB: 32 P-DATA PDUs of our 1 MiB maximum
        sender = threading.Thread(target=lambda: result.update(status=assoc.send_c_store(big)))
        sender.start()
        assert reached.wait(10)
        wire = assoc.dul.socket.socket if assoc.dul.socket else None
        assert wire is not None
        wire.shutdown(socket.SHUT_RDWR)
        gate.set()
        sender.join(timeout=30)
        assert not sender.is_alive()
        assert result["status"].get("Status") is None  # never answered
        dcmtk("echoscu", "-aec", "LIGHTBOX", "127.0.0.1", str(server.port))
    assert _count(archive) == 0
    assert _staging_is_empty(archive)


def test_duplicate_is_success_and_keeps_one_copy(archive: Archive, tmp_path: Path) -> None:
    path = write(ct_dataset(sop=generate_uid(prefix=ROOT)), tmp_path / "one.dcm")
    with scp(archive) as server:
        for _ in range(2):
            dcmtk("storescu", "-aec", "LIGHTBOX", "127.0.0.1", str(server.port), str(path))
    assert _count(archive) == 1


def test_p_data_longer_than_the_negotiated_maximum_is_aborted(archive: Archive) -> None:
    # An established association announces a P-DATA-TF PDU of 16 MiB, over the
    # 1 MiB maximum the SCP negotiated: the SCP drops the association without
    # reading (or storing) it, and goes on serving others.
    request = association_request("LIGHTBOX", CTImageStorage)
    with scp(archive) as server, socket.create_connection(("127.0.0.1", server.port),
                                                           timeout=10) as raw:
        raw.sendall(request)
        assert read_pdu(raw)[0] == 0x02  # A-ASSOCIATE-AC
        raw.sendall(b"\x04\x00" + (16 * 1024 * 1024).to_bytes(4, "big") + b"\x00" * 4096)
        assert _closed_within(raw, 10)
        dcmtk("echoscu", "-aec", "LIGHTBOX", "127.0.0.1", str(server.port))
    assert _count(archive) == 0
    assert _staging_is_empty(archive)


def test_a_video_sent_by_c_store_is_served_as_its_stream(archive: Archive) -> None:
    """An endoscope's H.264 video over DIMSE, in its own transfer syntax: stored,
    and played back over WADO-RS as the stream it holds."""
    stream = bytes(range(200)) * 64
    ds = video_dataset(generate_uid(prefix=ROOT), stream)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    with scp(archive) as server:
        assoc = _associate(server, str(ds.SOPClassUID), ts=[syntax])
        try:
            assert assoc.accepted_contexts[0].transfer_syntax[0] == syntax
            assert int(assoc.send_c_store(ds).Status) == Store.SUCCESS
        finally:
            assoc.release()
    with serving(archive) as web:
        uri = (f"{web.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
               f"/instances/{ds.SOPInstanceUID}/bulkdata/7FE00010?accept=video/mp4")
        played = httpx.get(uri, headers=web.headers)
    assert played.status_code == 200 and played.headers["content-type"] == "video/mp4"
    assert played.content == stream
