"""Small factories for DICOM test data."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = "1.2.826.0.1.3680043.10.1387.77."


def ct_dataset(
    *,
    study: str | None = None,
    series: str | None = None,
    sop: str | None = None,
    patient_id: str = "PAT-1",
    patient_name: str = "Test^Patient",
    size: int = 32,
    frames: int = 1,
    instance_number: int = 1,
    **attributes: Any,
) -> Dataset:
    """A small, valid CT image with a recognisable pixel pattern."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop or generate_uid(prefix=ROOT)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid(prefix=ROOT)
    ds.SeriesInstanceUID = series or generate_uid(prefix=ROOT)
    ds.PatientID, ds.PatientName = patient_id, patient_name
    ds.PatientBirthDate, ds.PatientSex = "19800101", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240301", "101500", "ACC1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, instance_number
    ds.StudyDescription, ds.SeriesDescription = "Chest", "Axial"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    pixels = (np.arange(size * size * frames, dtype=np.uint32) * 7 + instance_number) % 4096
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write(ds: Dataset, path: Path) -> Path:
    path.write_bytes(to_bytes(ds))
    return path


def make_instance(**attributes: Any) -> bytes:
    """One small CT as Part 10 bytes."""
    return to_bytes(ct_dataset(**attributes))


def stow_body(parts: list[bytes], boundary: str = "lightbox-test-boundary") -> tuple[bytes, str]:
    """A STOW-RS request body and its Content-Type for Part 10 ``parts``."""
    from lightbox.web.multipart import encode_parts

    body = encode_parts([("application/dicom", part) for part in parts], boundary)
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def video_dataset(study: str, stream: bytes) -> Dataset:
    """An endoscopy video: an H.264 stream (its bytes are opaque here) in three
    fragments, as one stream of 30 frames is encapsulated (PS3.5 8.2.8)."""
    ds = ct_dataset(study=study, size=64)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264 High
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.1.1"
    ds.Modality, ds.NumberOfFrames, ds.FrameTime = "ES", 30, 33.3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_PARTIAL_420"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PlanarConfiguration = 8, 8, 7, 0
    ds.PixelData = encapsulate([stream], fragments_per_frame=3)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True  # encapsulated, however it is encoded
    return ds
