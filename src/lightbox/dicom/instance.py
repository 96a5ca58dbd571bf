"""Reading a stored file's header into an InstanceRecord: validation, the
values the index keeps, the pixel layout and the cached DICOM JSON.

Only the header is parsed: reading stops at Pixel Data, whose element header
is decoded by hand to map the frames.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from lightbox.dicom import dicomjson, fastheader, uids
from lightbox.dicom.attributes import ATTRIBUTES, Attribute, Kind
from lightbox.dicom.frames import ImageGeometry, PixelLayout, read_pixel_layout
from lightbox.errors import InvalidInstance

_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_DIGITS = re.compile(r"\d+")
_READ_DIRECTLY = (*_REQUIRED_UIDS, "Rows", "Columns", "SamplesPerPixel", "BitsAllocated",
                  "NumberOfFrames")
_TAGS = {keyword: int(tag_for_keyword(keyword) or 0) for keyword in _READ_DIRECTLY}
_VR = {keyword: dictionary_VR(_TAGS[keyword]) for keyword in _READ_DIRECTLY}
_PHOTOMETRIC = 0x00280004


class MissingOrInvalidUID(InvalidInstance):
    """A readable data set without a well-formed SOP Class, SOP Instance, Study
    or Series Instance UID (STOW-RS Failure Reason A900, not C000)."""


@dataclass(frozen=True)
class InstanceRecord:
    """Everything the index keeps about one stored instance."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    values: dict[str, Any]
    layout: PixelLayout | None
    metadata: bytes
    size: int


_UNDEFINED_LENGTH = 0xFFFFFFFF
# What pydicom (or our own decoding) raises on malformed bytes.
_PARSE_ERRORS = (
    ValueError, TypeError, KeyError, NotImplementedError, OverflowError, EOFError,
    struct.error, OSError, IndexError, RecursionError,
)


class _HeaderCallback:
    """The parser's per-element callback: stop at Pixel Data, and note the first
    top-level element whose length runs past the end of the file (pydicom would
    take the rest of the file as its value and carry on).

    Noted, not raised: in a deflated file the parser reads an inflated copy,
    whose positions are not the file's.
    """

    def __init__(self, fp: BinaryIO, size: int) -> None:
        self._fp = fp
        self._size = size
        self.overrun: str | None = None

    def __call__(self, tag: BaseTag, vr: str | None, length: int) -> bool:
        if int(tag) in _PIXEL_TAGS:
            return True
        remaining = self._size - self._fp.tell()
        if self.overrun is None and length != _UNDEFINED_LENGTH and length > remaining:
            self.overrun = (
                f"element {tag} has length {length} but only {max(remaining, 0)} bytes "
                "remain in the file"
            )
        return False


MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage (DICOMDIR)

# Where the instance's own URL goes in its JSON, until the UIDs are known to be valid.
_INSTANCE = "@@LIGHTBOX_INSTANCE@@"


def read_instance(path: Path, size: int | None = None) -> InstanceRecord:
    """Parse and validate the header of the Part 10 file at ``path`` (of
    ``size`` bytes, when the caller has just looked).

    Raises InvalidInstance with a reason a person can act on.
    """
    if size is None:
        size = os.path.getsize(path)
    with open(path, "rb") as fp:
        record = _read_directly(fp, size)
        if record is not None:
            return record
        fp.seek(0)
        ds = _read_header(fp, size)
        syntax = _transfer_syntax(ds)
        if getattr(ds.file_meta, "MediaStorageSOPClassUID", None) == MEDIA_DIRECTORY:
            raise InvalidInstance(
                "a DICOMDIR indexes files and is not itself an image: import its folder"
            )
        sop_class, sop, study, series = (_check_uid(ds, keyword) for keyword in _REQUIRED_UIDS)
        try:
            # Reads the elements that describe the pixels (BitsAllocated, say).
            layout, pixel_vr = _pixel_layout(fp, ds, syntax, size)
        except _PARSE_ERRORS as exc:
            raise InvalidInstance(f"unreadable DICOM value: {exc}") from exc
    try:
        # Nested sequences are only parsed here, so their errors surface here.
        obj = dicomjson.to_dict(ds, uri_prefix=_INSTANCE, pixel_vr=pixel_vr)
    except _PARSE_ERRORS as exc:
        raise InvalidInstance(f"unreadable DICOM value: {exc}") from exc
    return _record(obj, syntax, (sop_class, sop, study, series), layout, size)


def _record(
    obj: dict[str, Any], syntax: str, required: tuple[str, str, str, str],
    layout: PixelLayout | None, size: int,
) -> InstanceRecord:
    sop_class, sop, study, series = required
    prefix = dicomjson.instance_path(study, series, sop).encode()
    metadata = dicomjson.dumps(obj).replace(_INSTANCE.encode(), prefix)
    values = extract_values(obj)
    values["transfer_syntax_uid"] = syntax
    return InstanceRecord(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        transfer_syntax_uid=syntax,
        values=values,
        layout=layout,
        metadata=metadata,
        size=size,
    )


def _read_directly(fp: BinaryIO, size: int) -> InstanceRecord | None:
    """The record of a file whose header needs no pydicom (see ``fastheader``);
    None for pydicom to read it, and to give the reason when it is refused."""
    header = fastheader.read(fp, size)
    if header is None or header.media_storage_sop_class == MEDIA_DIRECTORY:
        return None
    try:
        required = (
            _uid_directly(header, _TAGS["SOPClassUID"]),
            _uid_directly(header, _TAGS["SOPInstanceUID"]),
            _uid_directly(header, _TAGS["StudyInstanceUID"]),
            _uid_directly(header, _TAGS["SeriesInstanceUID"]),
        )
        layout, pixel_vr = _pixel_layout_directly(fp, header, size)
    except (fastheader.GiveUp, InvalidInstance):
        return None
    obj = fastheader.to_dict(header, uri_prefix=_INSTANCE)
    if obj is None:
        return None
    if pixel_vr:
        obj["7FE00010"] = {"vr": pixel_vr, "BulkDataURI": f"{_INSTANCE}/bulkdata/7FE00010"}
    return _record(obj, header.syntax, required, layout, size)


def _uid_directly(header: fastheader.Header, tag: int) -> str:
    found = header.value(tag)
    uid = None if found is None else uids.from_bytes(found[1])
    if uid is None:
        raise fastheader.GiveUp
    return uid


def _pixel_layout_directly(
    fp: BinaryIO, header: fastheader.Header, size: int
) -> tuple[PixelLayout | None, str | None]:
    """As ``_pixel_layout``, from the header's bytes."""
    if header.pixel_offset is None:
        return None, None
    fp.seek(header.pixel_offset)
    group, elem = struct.unpack("<HH", fp.read(4))
    fp.seek(header.pixel_offset)
    return _frame_layout(
        fp, group << 16 | elem, header.syntax, size,
        number=lambda keyword, default: header.number(_TAGS[keyword], default),
        photometric=lambda: header.text(_PHOTOMETRIC) or "",
    )


def _read_header(fp: BinaryIO, size: int) -> Dataset:
    callback = _HeaderCallback(fp, size)
    try:
        # Values stay raw: the DICOM JSON encoder reads most of them straight
        # from their bytes, and one that cannot be decoded is left out of the
        # metadata rather than refusing the instance (its bytes are kept as sent).
        ds = read_partial(fp, stop_when=callback, force=False)
    except InvalidDicomError as exc:
        raise InvalidInstance(
            "not a DICOM Part 10 file (no 'DICM' marker after the 128-byte preamble "
            "and no File Meta Information at the start)"
        ) from exc
    except (EOFError, struct.error, OSError) as exc:
        # pydicom reports a sequence that runs off the end of the file as OSError.
        raise InvalidInstance(f"truncated DICOM file: {exc}") from exc
    except _PARSE_ERRORS as exc:
        raise InvalidInstance(f"unreadable DICOM header: {exc}") from exc
    if not isinstance(ds, Dataset):
        raise InvalidInstance("not a DICOM dataset")
    deflated = _transfer_syntax(ds) == uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    if callback.overrun is not None and not deflated:
        raise InvalidInstance(callback.overrun)
    return ds


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if not uids.is_valid_uid(syntax):
        raise InvalidInstance("File Meta Information has no valid Transfer Syntax UID")
    return syntax


def _check_uid(ds: Dataset, keyword: str) -> str:
    """The UID ``keyword`` names, or MissingOrInvalidUID.

    A well-formed UID is taken from the element's bytes as pydicom decodes
    them (Latin-1, trailing NULs and spaces removed, one value); anything
    else goes through pydicom for the reason."""
    raw = _raw(ds, keyword)
    uid = None if raw is None else uids.from_bytes(raw[1])
    if uid is not None:
        return uid
    try:
        value = ds.get(keyword)
    except Exception as exc:
        raise MissingOrInvalidUID(f"{keyword} cannot be read: {exc}") from exc
    if value is None or str(value) == "":
        raise MissingOrInvalidUID(f"{keyword} is missing")
    if not uids.is_valid_uid(str(value)):
        shown = str(value)[:80].encode("ascii", "backslashreplace").decode()
        raise MissingOrInvalidUID(f"{keyword} is not a valid UID: {shown!r}")
    return str(value)


def _raw(ds: Dataset, keyword: str) -> tuple[str | None, bytes] | None:
    """The VR (None: implicit) and undecoded value of a top-level element of a
    little endian data set (None when it is decoded already, absent, or big
    endian)."""
    if ds.is_little_endian is False:
        return None
    item = ds.get_item(_TAGS[keyword])
    if isinstance(item, RawDataElement) and isinstance(item.value, bytes):
        return item.VR, item.value
    return None


def _int(ds: Dataset, keyword: str, default: int) -> int:
    raw = _raw(ds, keyword)
    # Implicit VR, or explicit as the dictionary says: two bytes, little endian.
    if raw is not None and _VR[keyword] == "US" and raw[0] in (None, "US") and len(raw[1]) == 2:
        return int.from_bytes(raw[1], "little")
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInstance(f"{keyword} is not a number: {value!r}") from exc


def _pixel_layout(
    fp: BinaryIO, ds: Dataset, syntax: str, size: int
) -> tuple[PixelLayout | None, str | None]:
    """Map the frames; (None, vr) when the file has pixels we cannot address directly."""
    here = fp.tell()
    head = fp.read(8)
    if len(head) < 4:
        return None, None
    group, elem = struct.unpack_from("<HH", head)
    if (group << 16 | elem) not in _PIXEL_TAGS:
        return None, None
    fp.seek(here)
    return _frame_layout(
        fp, group << 16 | elem, syntax, size,
        number=lambda keyword, default: _int(ds, keyword, default),
        photometric=lambda: str(ds.get("PhotometricInterpretation", "")).strip(),
    )


def _frame_layout(
    fp: BinaryIO, tag: int, syntax: str, size: int, *,
    number: Callable[[str, int], int], photometric: Callable[[], str],
) -> tuple[PixelLayout | None, str | None]:
    """The frame table of the pixel element ``tag`` at ``fp``'s position, from
    the header's values (``number``: an integer attribute, or its default)."""
    wide = syntax in uids.NATIVE_SYNTAXES and number("BitsAllocated", 8) > 8
    vr = "OW" if wide else "OB"
    if syntax in (uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, uids.EXPLICIT_VR_BIG_ENDIAN):
        return None, vr  # byte positions in the file do not map to frames
    if tag != 0x7FE00010:
        return None, None  # float pixel data: kept, served whole, no frame table
    samples = number("SamplesPerPixel", 1)
    if photometric() == "YBR_FULL_422":
        # Native YBR_FULL_422 stores Y Y Cb Cr per two pixels (PS3.3 C.7.6.3.1.2):
        # two samples per pixel on average, not three.
        samples = 2
    geometry = ImageGeometry(
        rows=number("Rows", 0),
        columns=number("Columns", 0),
        samples_per_pixel=samples,
        bits_allocated=number("BitsAllocated", 0),
        # A video is one stream across all its fragments, however many frames
        # it shows (PS3.5 8.2.5-8.2.8): its frame table has that one entry.
        number_of_frames=1 if syntax in uids.VIDEO_MEDIA_TYPES
        else max(number("NumberOfFrames", 1), 1),
    )
    implicit = syntax == uids.IMPLICIT_VR_LITTLE_ENDIAN
    return read_pixel_layout(fp, implicit_vr=implicit, geometry=geometry, file_size=size), vr


def extract_values(obj: dict[str, Any]) -> dict[str, Any]:
    """The indexed attribute values of a DICOM JSON object, keyed by column name."""
    values: dict[str, Any] = {}
    for attribute in ATTRIBUTES:
        if attribute.kind in (Kind.COUNT, Kind.MULTI) or (
            attribute.keyword == "AvailableTransferSyntaxUID"
        ):
            continue
        values[attribute.column] = _normalise(attribute, dicomjson.first_value(obj, attribute.tag))
    return values


def _normalise(attribute: Attribute, raw: Any) -> Any:
    if raw is None:
        return None
    if attribute.kind is Kind.INTEGER:
        # A value the VR cannot hold (an IS of 2^31, say) is not indexed; the
        # instance is kept whole, with the value as sent in its metadata.
        low, high = attribute.integer_range
        try:
            value = int(raw)
        except (TypeError, ValueError):
            return None
        return value if low <= value <= high else None
    text = str(raw).strip().replace("\x00", "")
    if not text:
        return None
    if attribute.kind is Kind.TIME:
        text = normalise_time(text)
    return text[: attribute.length]


def normalise_time(text: str) -> str:
    """``HH[MM[SS[.F]]]`` (or with colons) padded so that strings compare as times."""
    text = text.replace(":", "")
    whole, _, fraction = text.partition(".")
    if not _DIGITS.fullmatch(whole or "x"):
        return text
    whole = (whole + "000000")[:6]
    return f"{whole}.{fraction}" if fraction else whole
