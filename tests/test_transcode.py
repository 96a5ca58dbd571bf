"""Transfer syntax conversion, checked against pydicom's own decoding of its test files."""

from __future__ import annotations

import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian

from lightbox.dicom.transcode import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    can_decode,
    decode_frame,
    number_of_frames,
    to_explicit_little_endian,
)
from lightbox.errors import NotFound, Unavailable

# Elements that decoding is allowed to change.
PIXEL_DESCRIPTION = {"PixelData", "PhotometricInterpretation", "PlanarConfiguration"}

CONVERTIBLE = [
    "MR_small_RLE.dcm",  # RLE Lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian
    "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "JPEG2000.dcm",  # JPEG 2000, lossy
    "JPGExtended.dcm",  # JPEG Extended 12-bit
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS near lossless
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline, YBR_FULL
    "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG Baseline, YBR_FULL_422
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless SV1
    "GDCMJ2K_TextGBR.dcm",  # JPEG 2000 Lossless, YBR_RCT
    "J2K_pixelrep_mismatch.dcm",  # signedness differs between header and codestream
    "SC_rgb_rle_2frame.dcm",  # RLE, multi-frame colour
    "SC_rgb_rle_32bit_2frame.dcm",
    "examples_ybr_color.dcm",  # 30 frames of JPEG Baseline
    "rtdose_expb.dcm",  # big endian, 32-bit, multi-frame
    "SC_rgb_small_odd_big_endian.dcm",  # big endian, odd length 8-bit OW
    "ExplVR_BigEnd.dcm",
    "liver_expb_1frame.dcm",  # big endian, 1 bit
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    "SC_ybr_full_422_uncompressed.dcm",  # already Explicit VR LE
]


def path_of(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def load(source: str | bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(source, bytes):
            return pydicom.dcmread(BytesIO(source))
        return pydicom.dcmread(path_of(source))


def frame_length(ds: Dataset) -> int:
    """Bytes per frame of native pixel data (not 1-bit)."""
    samples = ds.Rows * ds.Columns * ds.SamplesPerPixel
    if ds.PhotometricInterpretation == "YBR_FULL_422":
        samples = samples // 3 * 2
    return int(samples * ds.BitsAllocated // 8)


@pytest.mark.parametrize(
    "uid",
    [
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.203",
        "1.2.840.10008.1.2.5",
    ],
)
def test_can_decode_installed(uid: str) -> None:
    assert can_decode(uid)


@pytest.mark.parametrize(
    "uid",
    ["1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.8.1", "1.2.3"],
)
def test_cannot_decode(uid: str) -> None:
    assert not can_decode(uid)


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_decode_lossless_frame_equals_uncompressed(name: str) -> None:
    assert decode_frame(load(name), 1) == load("MR_small.dcm").PixelData


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("rtdose_rle.dcm", "rtdose.dcm"),
        ("rtdose_expb.dcm", "rtdose.dcm"),
        ("MR_small_bigendian.dcm", "MR_small.dcm"),
        ("SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd.dcm"),
    ],
)
def test_decode_every_frame_equals_little_endian_reference(name: str, reference: str) -> None:
    ds, ref = load(name), load(reference)
    size = frame_length(ref)
    for frame in range(number_of_frames(ref)):
        expected = ref.PixelData[frame * size : (frame + 1) * size]
        assert decode_frame(ds, frame + 1) == expected, frame + 1


def test_decode_one_bit_frame() -> None:
    expected = load("liver_1frame.dcm").PixelData[: 512 * 512 // 8]
    assert decode_frame(load("liver_expb_1frame.dcm"), 1) == expected


def test_decode_jpeg_baseline_frame_is_rgb() -> None:
    ds = load("SC_rgb_jpeg_dcmtk.dcm")  # YBR_FULL
    data = decode_frame(ds, 1)
    assert len(data) == 100 * 100 * 3
    rgb = np.frombuffer(data, dtype=np.uint8).reshape(100, 100, 3).astype(np.int64)
    reference = load("SC_rgb_rle.dcm").pixel_array.astype(np.int64)
    assert np.abs(rgb - reference).mean() < 2


def test_decode_missing_frame_and_pixels() -> None:
    ds = load("examples_ybr_color.dcm")
    for frame in (0, 31):
        with pytest.raises(NotFound):
            decode_frame(ds, frame)
    del ds.PixelData
    with pytest.raises(NotFound):
        decode_frame(ds, 1)


def test_decode_without_decoder_is_unavailable() -> None:
    ds = load("CT_small.dcm")
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.110")
    with pytest.raises(Unavailable, match=r"1\.2\.840\.10008\.1\.2\.4\.110"):
        decode_frame(ds, 1)


# pydicom's rtdose_expb.dcm has a UID with a component starting with 0.
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("name", CONVERTIBLE)
def test_to_explicit_little_endian(name: str) -> None:
    source = load(name)
    output = load(to_explicit_little_endian(path_of(name)))

    assert output.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
    for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"):
        assert output.file_meta[keyword].value == source.file_meta[keyword].value
    assert np.array_equal(output.pixel_array, source.pixel_array)
    # Retired group lengths (gggg,0000) are not written by pydicom, whatever the input.
    kept = {elem.tag for elem in source if elem.tag.element != 0}
    assert set(output.keys()) == kept
    for tag in kept:
        if source[tag].keyword not in PIXEL_DESCRIPTION:
            assert output[tag].value == source[tag].value, source[tag].keyword
    if number_of_frames(output) > 1 or output.BitsAllocated != 1:
        size = frame_length(output)
        for frame in range(number_of_frames(output)):
            expected = output.PixelData[frame * size : (frame + 1) * size]
            assert decode_frame(source, frame + 1) == expected, frame + 1


def test_big_endian_matches_little_endian_original() -> None:
    output = load(to_explicit_little_endian(path_of("MR_small_bigendian.dcm")))
    reference = load("MR_small.dcm")
    assert output.PixelData == reference.PixelData
    assert output.Rows == reference.Rows
    assert output.PixelSpacing == reference.PixelSpacing


def test_ybr_422_jpeg_becomes_rgb() -> None:
    output = load(to_explicit_little_endian(path_of("SC_rgb_dcmtk_+eb+cy+np.dcm")))
    assert output.PhotometricInterpretation == "RGB"
    assert output.PlanarConfiguration == 0
    assert len(output.PixelData) == 100 * 100 * 3


def test_keeps_instance_uid() -> None:
    source = load("MR_small_RLE.dcm")
    output = load(to_explicit_little_endian(path_of("MR_small_RLE.dcm")))
    assert output.SOPInstanceUID == source.SOPInstanceUID


def test_explicit_little_endian_is_returned_unchanged() -> None:
    path = path_of("CT_small.dcm")
    original = path.read_bytes()
    assert to_explicit_little_endian(path) == original
    assert to_explicit_little_endian(BytesIO(original)) == original


def test_accepts_binary_stream() -> None:
    data = path_of("MR_small_RLE.dcm").read_bytes()
    output = load(to_explicit_little_endian(BytesIO(data)))
    assert output.PixelData == load("MR_small.dcm").PixelData


def test_undecodable_pixel_data_is_unavailable() -> None:
    with pytest.raises(Unavailable):
        to_explicit_little_endian(path_of("JPEG-lossy.dcm"))


def test_not_dicom_is_unavailable() -> None:
    with pytest.raises(Unavailable):
        to_explicit_little_endian(BytesIO(b"not a dicom file at all"))


def test_big_endian_byte_strings_are_swapped(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Rows = 258  # US, re-encoded by pydicom itself
    ds.add_new(0x60003000, "OW", b"\x01\x02\x03\x04")  # Overlay Data: words 0x0102, 0x0304
    item = Dataset()
    item.LUTDescriptor = [2, 0, 16]
    item.add_new(0x00283006, "OW", b"\x0a\x0b\x0c\x0d")  # LUT Data in a sequence
    ds.VOILUTSequence = [item]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True)  # byte strings are written as given

    output = load(to_explicit_little_endian(path))
    assert output.Rows == 258
    assert output[0x60003000].value == b"\x02\x01\x04\x03"
    assert output.VOILUTSequence[0][0x00283006].value == b"\x0b\x0a\x0d\x0c"
    assert output.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"


def test_one_bit_frames_not_on_byte_boundaries() -> None:
    frames = [np.ones(9, dtype=np.uint8), np.array([1, 0] * 4 + [1], dtype=np.uint8)]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = 3
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = 2
    ds.PixelData = np.packbits(np.concatenate(frames), bitorder="little").tobytes()
    for number, bits in enumerate(frames, start=1):
        assert decode_frame(ds, number) == np.packbits(bits, bitorder="little").tobytes()
