"""Key images: a Key Object Selection Document (PS3.3 A.35.4) per marked image.

The document references one image (and frame, for multi-frame images), copies
the patient and study attributes of that image, sits in a new series of its
own (Modality KO) and is stored through the one ingest path like any instance.
"""

from __future__ import annotations

import os
from datetime import datetime

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from lightbox.archive import Archive
from lightbox.dicom import uids
from lightbox.errors import BadRequest, InvalidInstance
from lightbox.index.instances import StoredInstance
from lightbox.services import access, retrieve
from lightbox.services.auth import Principal
from lightbox.services.ingest import Offer, Status, store_instances

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1387.1.1"
UID_PREFIX = "1.2.826.0.1.3680043.10.1387.3."
KO_SERIES_NUMBER = 9000

# Copied from the referenced image: Patient and General Study modules.
_COPIED = [
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
    "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "StudyID", "AccessionNumber", "StudyDescription",
]


def mark_key_image(
    archive: Archive, principal: Principal, *, study: str, series: str, sop: str,
    frame: int | None,
) -> str:
    """Store a Key Object Selection Document referencing one image; return its SOP
    Instance UID.

    Raises NotFound when the image is not stored (or not visible to the caller),
    Forbidden for read-only callers, BadRequest for malformed UIDs or a frame
    the image does not have. Nothing is stored when any check fails.
    """
    for value, what in ((study, "StudyInstanceUID"), (series, "SeriesInstanceUID"),
                        (sop, "SOPInstanceUID")):
        uids.require_uid(value, what)
    principal.require_write()
    access.require_add_to(principal, study)
    instance = retrieve.find_instances(archive, principal, study, series, sop)[0]
    if not _is_image(instance):
        raise BadRequest(f"instance {sop} has no pixel data: only images can be key images")
    if frame is not None and not 1 <= frame <= instance.number_of_frames:
        raise BadRequest(f"frame {frame} not in the image (it has {instance.number_of_frames})")
    with archive.blobs.open(instance.blob_key) as fh:
        source = dcmread(fh, stop_before_pixels=True, specific_tags=_COPIED)
    document = key_object(source, instance, frame, observer=principal.user)
    return _store(archive, document, study)


# Pixel data that ingest does not map into frames (it is decoded when served).
_UNMAPPED = (uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, uids.EXPLICIT_VR_BIG_ENDIAN)


def _is_image(instance: StoredInstance) -> bool:
    return instance.layout is not None or instance.transfer_syntax_uid in _UNMAPPED


def key_object(
    source: Dataset, instance: StoredInstance, frame: int | None, *, observer: str
) -> Dataset:
    """The Key Object Selection Document ("Of Interest") for one image or frame."""
    now = datetime.now()
    ds = Dataset()
    for keyword in _COPIED:
        if keyword in source:
            ds[keyword] = source[keyword]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        ds.setdefault(keyword, "")  # Type 2: present, possibly empty
    ds.StudyInstanceUID = instance.study_instance_uid
    ds.SOPClassUID = UID(KEY_OBJECT_SELECTION)
    ds.SOPInstanceUID = generate_uid(prefix=UID_PREFIX)
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.Modality = "KO"
    ds.SeriesInstanceUID = generate_uid(prefix=UID_PREFIX)
    ds.SeriesNumber = KO_SERIES_NUMBER
    ds.SeriesDescription = "Key images"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.Manufacturer = "Lightbox"
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("113000", "DCM", "Of Interest")])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2010"
    ds.ContentTemplateSequence = Sequence([template])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([_evidence(instance)])
    ds.ContentSequence = Sequence([_observer(observer), _image_item(instance, frame)])
    ds.file_meta = _meta(ds)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _reference(instance: StoredInstance) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = instance.sop_class_uid
    ref.ReferencedSOPInstanceUID = instance.sop_instance_uid
    return ref


def _evidence(instance: StoredInstance) -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = instance.series_instance_uid
    series.ReferencedSOPSequence = Sequence([_reference(instance)])
    study = Dataset()
    study.StudyInstanceUID = instance.study_instance_uid
    study.ReferencedSeriesSequence = Sequence([series])
    return study


def _observer(name: str) -> Dataset:
    """TID 1002 observer context: who marked the image (a person, by user name)."""
    item = Dataset()
    item.RelationshipType, item.ValueType = "HAS OBS CONTEXT", "PNAME"
    item.ConceptNameCodeSequence = Sequence([_code("121008", "DCM", "Person Observer Name")])
    item.PersonName = name[:64].replace("^", " ").replace("\\", " ")
    return item


def _image_item(instance: StoredInstance, frame: int | None) -> Dataset:
    ref = _reference(instance)
    if instance.number_of_frames > 1:
        ref.ReferencedFrameNumber = frame or 1
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "IMAGE"
    item.ReferencedSOPSequence = Sequence([ref])
    return item


def _meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = "LIGHTBOX_01"
    return meta


def _store(archive: Archive, document: Dataset, study: str) -> str:
    fd, path = archive.blobs.new_staging_file()
    try:
        with os.fdopen(fd, "wb") as out:
            document.save_as(out, enforce_file_format=True)
    except Exception:
        path.unlink(missing_ok=True)
        raise
    offer = Offer(path, "key object", staged=True, synced=False)
    outcome = store_instances(archive, [offer], expected_study=study)[0]
    if outcome.status is not Status.STORED:
        raise InvalidInstance(f"key object not stored: {outcome.reason or outcome.status.value}")
    return str(document.SOPInstanceUID)
