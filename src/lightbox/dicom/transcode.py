"""Transfer syntax conversion for WADO-RS.

Everything here turns stored objects (any transfer syntax the archive accepted)
into Explicit VR Little Endian for clients that ask for it, either one frame at
a time (``/frames``) or as a whole Part-10 file (``/instances``).

Photometric interpretation contract: frames of a *compressed* transfer syntax
are decoded the way pydicom does by default, so YBR_FULL / YBR_FULL_422 (JPEG)
and YBR_RCT / YBR_ICT (JPEG 2000) come out as RGB, planar configuration 0.
Frames of a *native* transfer syntax are returned byte for byte (only swapped
to little endian), so a native YBR_FULL_422 object stays YBR_FULL_422.
:func:`to_explicit_little_endian` writes the same photometric interpretation
and planar configuration that :func:`decode_frame` implies, so the frames it
returns are exactly the frames of the converted file.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, validate_file_meta
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import pack_bits, pixel_array
from pydicom.uid import UID

from lightbox.dicom.uids import (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    NATIVE_SYNTAXES,
)
from lightbox.errors import NotFound, Unavailable

__all__ = [
    "EXPLICIT_VR_LITTLE_ENDIAN",
    "can_decode",
    "decode_frame",
    "frame_array",
    "number_of_frames",
    "to_explicit_little_endian",
]


# Elements holding a pixel matrix; a frame is a slice of whichever is present.
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Byte-string VRs whose words are endian dependent (PS3.5 6.2). OB and UN are
# left alone: OB has no byte order and UN's true VR is unknown.
_WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
# Only valid for encapsulated pixel data; they would lie about native data.
_ENCAPSULATION_ONLY = (0x7FE00001, 0x7FE00002)


def can_decode(transfer_syntax_uid: str) -> bool:
    """Return whether an installed plugin can decode pixel data in this transfer syntax.

    Native (uncompressed) syntaxes always can; unknown UIDs and syntaxes pydicom
    has no decoder for (JPEG XL, MPEG, ...) cannot.
    """
    try:
        decoder = get_decoder(UID(transfer_syntax_uid))
    except NotImplementedError:
        return False
    return bool(decoder.is_available)


def number_of_frames(ds: Dataset) -> int:
    """Return the number of frames, treating a missing, zero or garbled value as 1."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1
    return max(frames, 1)


def frame_array(ds: Dataset, frame_number: int) -> npt.NDArray[Any]:
    """Decode one frame (1-based) into an array for display.

    Shape is (rows, columns) or (rows, columns, samples); signed data is sign
    extended, BitsStored < BitsAllocated masked, subsampling removed and YBR
    colour converted to RGB (native data included). Byte order is whatever
    pydicom chose; callers that need bytes use :func:`decode_frame`.

    Raises NotFound when the object has no pixel data or the frame does not
    exist, Unavailable when no installed plugin can decode it or decoding fails.
    """
    index = _frame_index(ds, frame_number)
    tsyntax = _transfer_syntax(ds)
    return _decode(ds, index, tsyntax)


def decode_frame(ds: Dataset, frame_number: int) -> bytes:
    """Return frame ``frame_number`` (1-based) as Explicit VR Little Endian pixel bytes.

    The bytes are exactly that frame's slice of the Pixel Data (or Float /
    Double Float Pixel Data) of ``to_explicit_little_endian(ds)``: native data
    unchanged except for byte order (1-bit frames repacked to start on a byte),
    compressed data decoded with YBR converted to RGB (see module docstring).
    No odd-length padding byte is added.

    Raises NotFound / Unavailable like :func:`frame_array`.
    """
    index = _frame_index(ds, frame_number)
    tsyntax = _transfer_syntax(ds)
    if tsyntax in NATIVE_SYNTAXES:
        return _native_frame(ds, index, big_endian=tsyntax == EXPLICIT_VR_BIG_ENDIAN)
    arr = _decode(ds, index, tsyntax)
    if int(ds.BitsAllocated) == 1:
        return bytes(pack_bits(arr, pad=False))
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def to_explicit_little_endian(source: Path | BinaryIO) -> bytes:
    """Re-encode a stored DICOM file as a Part-10 file in Explicit VR Little Endian.

    Compressed pixel data is decompressed (whole object, all frames) with the
    photometric interpretation and planar configuration updated to what was
    decoded; big endian binary values are byte swapped; deflated data is
    inflated. The SOP Instance UID, the Media Storage SOP Class/Instance UIDs,
    the preamble and every other element stay as they were; only the file
    meta Transfer Syntax UID changes (and retired group length elements
    outside group 0002 are dropped, as pydicom always does). A file that
    already is a Part-10 Explicit VR Little Endian file is returned byte for
    byte.

    Raises Unavailable when the file is not DICOM or its pixel data cannot be
    decoded with the installed plugins.
    """
    data = source.read_bytes() if isinstance(source, Path) else source.read()
    try:
        ds = pydicom.dcmread(BytesIO(data), force=True)
    except InvalidDicomError as exc:
        raise Unavailable(f"stored object is not readable as DICOM: {exc}") from exc
    tsyntax = _source_transfer_syntax(ds)
    if tsyntax == EXPLICIT_VR_LITTLE_ENDIAN and data[128:132] == b"DICM":
        return data
    if tsyntax.is_compressed and _pixel_keyword(ds) is not None:
        _decompress(ds, tsyntax)
    elif tsyntax == EXPLICIT_VR_BIG_ENDIAN:
        _swap_to_little_endian(ds)
    _complete_file_meta(ds)
    out = BytesIO()
    # Not enforce_file_format: _complete_file_meta already made it valid Part-10.
    pydicom.dcmwrite(out, ds, enforce_file_format=False)
    return out.getvalue()


def _transfer_syntax(ds: Dataset) -> UID:
    """The object's transfer syntax, or Unavailable when pydicom has no decoder for it."""
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    if not value:
        raise Unavailable("the object has no Transfer Syntax UID; its pixel data cannot be read")
    tsyntax = UID(value)
    if not can_decode(tsyntax):
        raise Unavailable(f"no decoder is installed for transfer syntax {_describe(tsyntax)}")
    return tsyntax


def _source_transfer_syntax(ds: Dataset) -> UID:
    """Transfer syntax from the file meta, else from how pydicom actually read the body."""
    value = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if value:
        return UID(value)
    implicit, little = ds.original_encoding
    if implicit:
        return UID(IMPLICIT_VR_LITTLE_ENDIAN)
    return UID(EXPLICIT_VR_LITTLE_ENDIAN if little else EXPLICIT_VR_BIG_ENDIAN)


def _pixel_keyword(ds: Dataset) -> str | None:
    return next((kw for kw in _PIXEL_KEYWORDS if kw in ds), None)


def _frame_index(ds: Dataset, frame_number: int) -> int:
    """Validate a 1-based frame number and return the 0-based index."""
    if _pixel_keyword(ds) is None:
        raise NotFound("the instance has no pixel data")
    frames = number_of_frames(ds)
    if not 1 <= frame_number <= frames:
        raise NotFound(f"frame {frame_number} does not exist; the instance has {frames} frame(s)")
    return frame_number - 1


def _decode(ds: Dataset, index: int, tsyntax: UID) -> npt.NDArray[Any]:
    try:
        arr: npt.NDArray[Any] = pixel_array(ds, index=index)
    except (RuntimeError, ValueError, AttributeError, KeyError, NotImplementedError) as exc:
        raise Unavailable(
            f"cannot decode frame {index + 1} ({tsyntax.name}): {_reason(exc)}"
        ) from exc
    return arr


def _describe(uid: UID) -> str:
    return str(uid) if uid.name == str(uid) else f"{uid} ({uid.name})"


def _reason(exc: BaseException) -> str:
    """One line of at most 300 characters for an error message."""
    # pydicom reports each plugin's failure on its own line.
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return (text or type(exc).__name__)[:300]


def _word_size(ds: Dataset, keyword: str, vr: str) -> int:
    """Bytes per swapped unit for a binary element of ``ds`` (1 = nothing to swap).

    Pixel Data follows pydicom's reading of big endian data: one unit per pixel
    cell for BitsAllocated > 8, 16-bit words for 8/1-bit data encoded as OW.
    """
    if keyword == "PixelData" and int(ds.get("BitsAllocated") or 0) > 8:
        return int(ds.BitsAllocated) // 8
    return _WORD_SIZE.get(vr, 1)


def _byteswap(value: bytes, size: int) -> bytes:
    usable = len(value) - len(value) % size
    swapped = np.frombuffer(value, dtype=f">u{size}", count=usable // size).astype(f"<u{size}")
    return swapped.tobytes() + value[usable:]


def _native_frame(ds: Dataset, index: int, *, big_endian: bool) -> bytes:
    """Slice one frame out of native pixel data, converting it to little endian."""
    keyword = _pixel_keyword(ds)
    assert keyword is not None  # _frame_index checked
    elem = ds[keyword]
    value = bytes(elem.value)
    if big_endian:
        value = _byteswap(value, _word_size(ds, keyword, str(elem.VR)))
    bits = _frame_bits(ds, keyword)
    start = index * bits
    if (start + bits + 7) // 8 > len(value):
        raise Unavailable(f"pixel data is shorter than frame {index + 1} needs")
    if start % 8 == 0 and bits % 8 == 0:
        return value[start // 8 : (start + bits) // 8]
    # 1-bit frames need not start on a byte boundary: re-pack from the frame's first bit.
    unpacked = np.unpackbits(np.frombuffer(value, dtype=np.uint8), bitorder="little")
    return np.packbits(unpacked[start : start + bits], bitorder="little").tobytes()


def _frame_bits(ds: Dataset, keyword: str) -> int:
    samples = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1)
    if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
        samples = samples // 3 * 2  # two chroma samples are shared by each pixel pair
    bits = {"FloatPixelData": 32, "DoubleFloatPixelData": 64}.get(keyword)
    return samples * (bits or int(ds.BitsAllocated))


def _decompress(ds: Dataset, tsyntax: UID) -> None:
    try:
        # Explicit indices take pydicom's per-frame path, the same one pixel_array(index=)
        # uses: frames then match decode_frame, and it avoids the all-frames path's
        # in-place sign correction on read-only buffers (fails for some JPEG 2000).
        ds.decompress(generate_instance_uid=False, indices=range(number_of_frames(ds)))
    except (RuntimeError, ValueError, AttributeError, NotImplementedError) as exc:
        if not can_decode(tsyntax):
            raise Unavailable(
                f"no decoder is installed for transfer syntax {_describe(tsyntax)}"
            ) from exc
        raise Unavailable(f"cannot decompress {tsyntax.name} pixel data: {_reason(exc)}") from exc
    for tag in _ENCAPSULATION_ONLY:
        if tag in ds:
            del ds[tag]


def _swap_to_little_endian(ds: Dataset) -> None:
    """Byte swap every endian-dependent byte-string value, recursing into sequences.

    pydicom re-encodes numeric VRs (US, FL, ...) itself but leaves byte strings
    as read, so those have to be turned around here before writing.
    """
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _swap_to_little_endian(item)
        elif isinstance(elem.value, bytes):
            size = _word_size(ds, elem.keyword, str(elem.VR))
            if size > 1:
                elem.value = _byteswap(elem.value, size)


def _complete_file_meta(ds: Dataset) -> None:
    """Point the file meta at Explicit VR LE, filling in only what a meta-less file lacks.

    Existing Media Storage UIDs are kept even when they disagree with the
    dataset (pydicom's enforce_file_format would overwrite them).
    """
    meta = ds.file_meta
    meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
    if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "FileMetaInformationGroupLength" not in meta:
        meta.FileMetaInformationGroupLength = 0  # recomputed by the writer
    try:
        validate_file_meta(meta, enforce_standard=True)
    except (AttributeError, ValueError) as exc:
        raise Unavailable(f"stored object cannot be written as Part-10: {_reason(exc)}") from exc
    if not getattr(ds, "preamble", None):
        ds.preamble = b"\0" * 128
