"""Sample studies for ``lightbox demo``: small synthetic CT and MR volumes with
real geometry, made on the spot (no download, no real patient)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

UID_ROOT = "1.2.826.0.1.3680043.10.1387.9."


@dataclass(frozen=True)
class SampleSeries:
    patient_name: str
    patient_id: str
    modality: str
    description: str
    slices: int
    size: int
    thickness: float


SAMPLES = (
    SampleSeries("DEMO^CHEST", "LB-DEMO-001", "CT", "Chest phantom", 48, 256, 2.5),
    SampleSeries("DEMO^HEAD", "LB-DEMO-002", "MR", "Head phantom T1", 24, 256, 5.0),
)


def _uid(*parts: object) -> str:
    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=["|".join(map(str, parts))]))


def _volume(sample: SampleSeries) -> np.ndarray:
    n, size = sample.slices, sample.size
    z, y, x = np.mgrid[0:n, 0:size, 0:size].astype(np.float32)
    c = size / 2
    ellipsoid = (
        ((x - c) / (0.40 * size)) ** 2
        + ((y - c) / (0.32 * size)) ** 2
        + ((z - n / 2) / (0.55 * n)) ** 2
    )
    inner = ((x - c * 1.1) / (0.12 * size)) ** 2 + ((y - c) / (0.10 * size)) ** 2
    if sample.modality == "CT":
        vol = np.where(ellipsoid <= 1, 40.0, -1000.0)
        vol = np.where((inner <= 1) & (ellipsoid <= 1), 700.0, vol)
        return (vol + 1024).astype(np.uint16)
    vol = np.where(ellipsoid <= 1, 600.0, 0.0) + np.where(inner <= 1, 500.0, 0.0)
    return vol.astype(np.uint16)


def _slice(sample: SampleSeries, index: int, pixels: np.ndarray) -> Dataset:
    study, series = _uid(sample.patient_id, "study"), _uid(sample.patient_id, "series")
    sop_class = CTImageStorage if sample.modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(_uid(sample.patient_id, "slice", index))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240115", "093000", sample.patient_id[-3:]
    ds.Modality, ds.StudyDescription, ds.SeriesDescription = (
        sample.modality,
        "Demo",
        sample.description,
    )
    ds.ReferringPhysicianName, ds.PatientName, ds.PatientID = (
        "",
        sample.patient_name,
        sample.patient_id,
    )
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, index + 1
    ds.FrameOfReferenceUID = _uid(sample.patient_id, "frame")
    ds.ImagePositionPatient = [-128.0, -128.0, -index * sample.thickness]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness, ds.PixelSpacing = sample.thickness, [1.0, 1.0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = sample.size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if sample.modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
    else:
        ds.WindowCenter, ds.WindowWidth = 600, 1200
    ds.PixelData = pixels.tobytes()
    return ds


def write_samples(folder: Path) -> Iterator[Path]:
    """Write the sample series into ``folder``; yield each file written."""
    folder.mkdir(parents=True, exist_ok=True)
    for sample in SAMPLES:
        volume = _volume(sample)
        for index in range(sample.slices):
            path = folder / f"{sample.patient_id}-{index + 1:03d}.dcm"
            _slice(sample, index, volume[index]).save_as(path, enforce_file_format=True)
            yield path
