"""Study export: a ZIP of the stored files plus a DICOMDIR (PS3.10 media).

The ZIP is produced while it is sent: each stored file is copied in chunks,
byte for byte (transfer syntax as stored, no recompression), so memory does
not grow with the study. The DICOMDIR comes last, built from the headers read
on the way. File IDs follow the General Purpose CD-R profile (STD-GEN-CD):
``DICOM/P0000001/S0000001/I0000001`` — uppercase components of at most eight
characters, numbered by position, never derived from UIDs or names.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from lightbox.archive import Archive
from lightbox.index.instances import StoredInstance
from lightbox.services import retrieve
from lightbox.services.auth import Principal

CHUNK = 1024 * 1024
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1387.1.1"
FILE_SET_ID = "LIGHTBOX"
_IN_USE = 0xFFFF

# What the directory records need from each instance's header.
_HEADER_KEYWORDS = [
    "SpecificCharacterSet", "PatientName", "PatientID", "StudyDate", "StudyTime",
    "StudyDescription", "StudyInstanceUID", "StudyID", "AccessionNumber", "Modality",
    "SeriesInstanceUID", "SeriesNumber", "InstanceNumber", "ContentDate", "ContentTime",
    "ConceptNameCodeSequence",
]


Rewrite = Callable[[StoredInstance, BinaryIO], tuple[StoredInstance, bytes]]


@dataclass(frozen=True)
class StudyExport:
    """A study the caller may read, ready to be sent as a ZIP. With ``rewrite``
    each file is sent as it returns it (de-identified, say): its bytes, and the
    instance as the file now names it."""

    study_instance_uid: str
    instances: list[StoredInstance]
    rewrite: Rewrite | None = None

    @property
    def filename(self) -> str:
        # A UID is digits and dots: safe in a Content-Disposition header and on disk.
        return f"study-{self.study_instance_uid}.zip"


def open_study_export(archive: Archive, principal: Principal, study: str) -> StudyExport:
    """Check the caller may read ``study`` and list its instances.

    Raises NotFound for an unknown study or one the caller may not see, so
    that the answer is decided before the first byte of the ZIP goes out.
    """
    return StudyExport(study, retrieve.download_instances(archive, principal, study))


def zip_chunks(archive: Archive, export: StudyExport) -> Iterator[bytes]:
    """The ZIP archive of ``export`` as a sequence of byte chunks."""
    sink = _Sink()
    directory = _Directory()
    # An unseekable sink: zipfile writes data descriptors after each member
    # and switches to ZIP64 records when sizes or offsets need them.
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as zf:
        for instance in export.instances:
            file_id = directory.file_id(instance.series_instance_uid)
            with archive.blobs.open(instance.blob_key) as fh:
                if export.rewrite is not None:
                    instance, data = export.rewrite(instance, fh)
                    fh = io.BytesIO(data)
                header = dcmread(fh, stop_before_pixels=True, specific_tags=_HEADER_KEYWORDS)
                size = fh.seek(0, io.SEEK_END)
                fh.seek(0)
                member = _member("/".join(file_id), size)
                with zf.open(member, "w") as out:
                    while chunk := fh.read(CHUNK):
                        out.write(chunk)
                        yield sink.drain()
            directory.add(file_id, instance, header)
            yield sink.drain()
        zf.writestr(_member("DICOMDIR", 0), directory.encode())
    yield sink.drain()


class _Sink:
    """A write-only file for zipfile; what was written is taken with ``drain``."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes, /) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def drain(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def _member(name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, time.localtime()[:6])
    info.compress_type = zipfile.ZIP_STORED  # DICOM pixel data rarely deflates well
    info.file_size = size  # lets zipfile choose ZIP64 up front for large members
    return info


@dataclass
class _Node:
    """A directory record and the records one level below it."""

    record: Dataset
    children: list[_Node] = field(default_factory=list)
    by_uid: dict[str, _Node] = field(default_factory=dict)

    def child(self, key: str, make: Any, *args: Any) -> _Node:
        found = self.by_uid.get(key)
        if found is None:
            found = self.by_uid[key] = _Node(make(*args))
            self.children.append(found)
        return found


class _Directory:
    """The PATIENT → STUDY → SERIES → IMAGE tree of a file-set, and its DICOMDIR."""

    def __init__(self) -> None:
        self.root = _Node(Dataset())
        self._series_numbers: dict[str, int] = {}
        self._counts: dict[str, int] = {}

    def file_id(self, series_uid: str) -> list[str]:
        """The next file ID in ``series_uid``'s folder (one patient per export)."""
        number = self._series_numbers.setdefault(series_uid, len(self._series_numbers) + 1)
        self._counts[series_uid] = self._counts.get(series_uid, 0) + 1
        return ["DICOM", "P0000001", f"S{number:07d}", f"I{self._counts[series_uid]:07d}"]

    def add(self, file_id: list[str], instance: StoredInstance, header: Dataset) -> None:
        patient_key = str(header.get("PatientID", "")) + "|" + str(header.get("PatientName", ""))
        patient = self.root.child(patient_key, _patient_record, header)
        study = patient.child(instance.study_instance_uid, _study_record, header, instance)
        series = study.child(instance.series_instance_uid, _series_record, header, instance)
        series.children.append(_Node(_instance_record(file_id, header, instance)))

    def encode(self) -> bytes:
        """The DICOMDIR file: records in depth-first order, offsets from the file start."""
        nodes = list(_depth_first(self.root.children))
        # Generated once: a UID's length varies, and the offsets depend on it.
        uid = generate_uid(prefix="1.2.826.0.1.3680043.10.1387.2.")
        head_size = len(_head(uid, 0, 0)) + 12  # + the sequence's tag, VR, reserved, length
        positions: dict[int, int] = {}
        offset = head_size
        for node in nodes:
            positions[id(node)] = offset
            offset += 8 + len(_encode_record(node.record))
        _link(self.root.children, positions)
        top = self.root.children
        first = positions[id(top[0])] if top else 0
        last = positions[id(top[-1])] if top else 0
        body = [_head(uid, first, last), _SEQUENCE_START]
        for node in nodes:
            encoded = _encode_record(node.record)
            body += [_ITEM_TAG, len(encoded).to_bytes(4, "little"), encoded]
        body.append(_SEQUENCE_END)
        return b"".join(body)


# Directory Record Sequence (0004,1220), explicit VR, undefined length.
_SEQUENCE_START = b"\x04\x00\x20\x12SQ\x00\x00\xff\xff\xff\xff"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_ITEM_TAG = b"\xfe\xff\x00\xe0"


def _depth_first(nodes: list[_Node]) -> Iterator[_Node]:
    for node in nodes:
        yield node
        yield from _depth_first(node.children)


def _link(siblings: list[_Node], positions: dict[int, int]) -> None:
    """Fill each record's next-sibling and first-child offsets (0 means none)."""
    for i, node in enumerate(siblings):
        following = siblings[i + 1] if i + 1 < len(siblings) else None
        node.record.OffsetOfTheNextDirectoryRecord = (
            positions[id(following)] if following else 0
        )
        node.record.OffsetOfReferencedLowerLevelDirectoryEntity = (
            positions[id(node.children[0])] if node.children else 0
        )
        _link(node.children, positions)


def _head(uid: str, first: int, last: int) -> bytes:
    """Preamble, File Meta Information and the elements before the record sequence."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MEDIA_STORAGE_DIRECTORY)
    meta.MediaStorageSOPInstanceUID = UID(uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = "LIGHTBOX_01"
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(bytes(128) + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    ds = Dataset()
    ds.FileSetID = FILE_SET_ID
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = first
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = last
    ds.FileSetConsistencyFlag = 0
    write_dataset(out, ds)
    return bytes(out.getvalue())


def _encode_record(record: Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, record)
    return bytes(out.getvalue())


def _record(kind: str, header: Dataset) -> Dataset:
    record = Dataset()
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = _IN_USE
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = kind
    if "SpecificCharacterSet" in header:
        record.SpecificCharacterSet = header.SpecificCharacterSet
    return record


def _text(header: Dataset, keyword: str, fallback: object = "") -> Any:
    """A header value, or ``fallback`` when absent or empty.

    Type 1 record keys get a fallback so that the DICOMDIR stays readable
    when a stored instance left them empty.
    """
    value = header.get(keyword)
    return value if value not in (None, "") else fallback


def _patient_record(header: Dataset) -> Dataset:
    record = _record("PATIENT", header)
    record.PatientName = _text(header, "PatientName")
    record.PatientID = _text(header, "PatientID", "UNKNOWN")
    return record


def _study_record(header: Dataset, instance: StoredInstance) -> Dataset:
    record = _record("STUDY", header)
    record.StudyDate = _text(header, "StudyDate", "19000101")
    record.StudyTime = _text(header, "StudyTime", "000000")
    record.StudyDescription = _text(header, "StudyDescription")
    record.StudyInstanceUID = instance.study_instance_uid
    record.StudyID = _text(header, "StudyID", "1")
    record.AccessionNumber = _text(header, "AccessionNumber")
    return record


def _series_record(header: Dataset, instance: StoredInstance) -> Dataset:
    record = _record("SERIES", header)
    record.Modality = _text(header, "Modality", "OT")
    record.SeriesInstanceUID = instance.series_instance_uid
    record.SeriesNumber = _text(header, "SeriesNumber", 0)
    return record


def _instance_record(file_id: list[str], header: Dataset, instance: StoredInstance) -> Dataset:
    if instance.sop_class_uid == KEY_OBJECT_SELECTION:
        record = _record("KEY OBJECT DOC", header)
        record.ContentDate = _text(header, "ContentDate", "19000101")
        record.ContentTime = _text(header, "ContentTime", "000000")
        concept = header.get("ConceptNameCodeSequence")
        record.ConceptNameCodeSequence = DicomSequence(list(concept or []))
    else:
        record = _record("IMAGE", header)
    record.ReferencedFileID = file_id
    record.ReferencedSOPClassUIDInFile = instance.sop_class_uid
    record.ReferencedSOPInstanceUIDInFile = instance.sop_instance_uid
    record.ReferencedTransferSyntaxUIDInFile = instance.transfer_syntax_uid
    record.InstanceNumber = _text(header, "InstanceNumber", 0)
    return record

