"""Small factories for DICOM test data."""

from __future__ import annotations

import io
import os
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


H264 = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264 High Profile / Level 4.1


def video_dataset(study: str, stream: bytes, syntax: str = H264, frames: int = 30) -> Dataset:
    """An endoscopy video of 64 x 64 pixels: a stream in ``syntax`` (H.264 unless
    told) of ``frames`` frames, in three fragments, as one stream is
    encapsulated (PS3.5 8.2.8)."""
    ds = ct_dataset(study=study, size=64)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.1.1"
    ds.Modality, ds.NumberOfFrames, ds.FrameTime = "ES", frames, 40.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_PARTIAL_420"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PlanarConfiguration = 8, 8, 7, 0
    ds.PixelData = encapsulate([stream], fragments_per_frame=3)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True  # encapsulated, however it is encoded
    return ds


def video_colour(number: int) -> tuple[int, int, int]:
    """The solid colour of frame ``number`` (1-based) of :func:`encoded_video`."""
    return (20 * number % 256, 255 - 20 * number % 256, 128)


def encoded_video(codec: str, container: str, frames: int = 12, size: int = 64) -> bytes:
    """A real compressed video stream: ``frames`` frames of ``size`` x ``size`` pixels,
    each a solid :func:`video_colour`, encoded by FFmpeg (``codec`` in ``container``,
    such as libx264 in h264, an elementary stream, or mpeg2video in mpeg)."""
    import av  # only the video tests need it

    out = io.BytesIO()
    with av.open(out, mode="w", format=container) as muxer:
        stream = muxer.add_stream(codec, rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qp": "4"} if codec == "libx264" else {"qscale": "2"}
        for number in range(1, frames + 1):
            pixels = np.empty((size, size, 3), dtype=np.uint8)
            pixels[:] = video_colour(number)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            muxer.mux(stream.encode(frame))
        muxer.mux(stream.encode(None))
    return out.getvalue()


def in_page_cache(path: Path) -> bool:
    """Whether all of a file is in memory: a read that must not wait for the
    disk (RWF_NOWAIT) gets every byte."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [bytearray(size)], 0, os.RWF_NOWAIT) == size
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def drop_from_page_cache(path: Path) -> bool:
    """Ask the kernel to drop a (clean) file's pages; False where it keeps
    them anyway (tmpfs, say), so that a test can tell it proves nothing."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return not in_page_cache(path)
