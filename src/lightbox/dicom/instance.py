"""Reading a stored file's header into an InstanceRecord: validation, the
values the index keeps, the pixel layout and the cached DICOM JSON.

Only the header is parsed: reading stops at Pixel Data, whose element header
is decoded by hand to map the frames.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from lightbox.dicom import dicomjson, uids
from lightbox.dicom.attributes import ATTRIBUTES, Attribute, Kind
from lightbox.dicom.frames import ImageGeometry, PixelLayout, read_pixel_layout
from lightbox.errors import InvalidInstance

_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_DIGITS = re.compile(r"\d+")


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


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in _PIXEL_TAGS


def read_instance(path: Path) -> InstanceRecord:
    """Parse and validate the header of the Part 10 file at ``path``.

    Raises InvalidInstance with a reason a person can act on.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fp:
        ds = _read_header(fp)
        syntax = _transfer_syntax(ds)
        for keyword in _REQUIRED_UIDS:
            _check_uid(ds, keyword)
        layout, pixel_vr = _pixel_layout(fp, ds, syntax, size)
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    prefix = dicomjson.instance_path(study, series, sop)
    metadata = dicomjson.to_json(
        ds,
        uri_prefix=prefix,
        pixel_vr=pixel_vr,
        pixel_bulk_uri=f"{prefix}/bulkdata/7FE00010" if pixel_vr else None,
    )
    values = extract_values(ds)
    values["transfer_syntax_uid"] = syntax
    return InstanceRecord(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=syntax,
        values=values,
        layout=layout,
        metadata=metadata,
        size=size,
    )


def _read_header(fp: BinaryIO) -> Dataset:
    try:
        ds = read_partial(fp, stop_when=_stop_at_pixels, force=False)
        # Touch every top-level element now so a value pydicom cannot decode
        # is reported as a rejection here, not as an error on retrieval.
        for _elem in ds:
            pass
    except InvalidDicomError as exc:
        raise InvalidInstance(f"not a DICOM Part 10 file: {exc}") from exc
    except (EOFError, struct.error) as exc:
        raise InvalidInstance(f"truncated DICOM file: {exc}") from exc
    except (ValueError, TypeError, KeyError, NotImplementedError, OverflowError) as exc:
        raise InvalidInstance(f"unreadable DICOM header: {exc}") from exc
    if not isinstance(ds, Dataset):
        raise InvalidInstance("not a DICOM dataset")
    return ds


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if not uids.is_valid_uid(syntax):
        raise InvalidInstance("File Meta Information has no valid Transfer Syntax UID")
    return syntax


def _check_uid(ds: Dataset, keyword: str) -> None:
    try:
        value = ds.get(keyword)
    except Exception as exc:
        raise InvalidInstance(f"{keyword} cannot be read: {exc}") from exc
    if value is None or str(value) == "":
        raise InvalidInstance(f"{keyword} is missing")
    if not uids.is_valid_uid(str(value)):
        shown = str(value)[:80].encode("ascii", "backslashreplace").decode()
        raise InvalidInstance(f"{keyword} is not a valid UID: {shown!r}")


def _int(ds: Dataset, keyword: str, default: int) -> int:
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
    implicit = syntax == uids.IMPLICIT_VR_LITTLE_ENDIAN
    vr = "OB" if syntax not in uids.NATIVE_SYNTAXES else ("OW" if _int(ds, "BitsAllocated", 8) > 8 else "OB")
    if syntax in (uids.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, uids.EXPLICIT_VR_BIG_ENDIAN):
        return None, vr  # byte positions in the file do not map to frames
    if (group << 16 | elem) != 0x7FE00010:
        return None, None  # float pixel data: kept, served whole, no frame table
    geometry = ImageGeometry(
        rows=_int(ds, "Rows", 0),
        columns=_int(ds, "Columns", 0),
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1),
        bits_allocated=_int(ds, "BitsAllocated", 0),
        number_of_frames=max(_int(ds, "NumberOfFrames", 1), 1),
    )
    fp.seek(here)
    return read_pixel_layout(fp, implicit_vr=implicit, geometry=geometry, file_size=size), vr


def extract_values(ds: Dataset) -> dict[str, Any]:
    """The indexed attribute values of ``ds``, keyed by column name."""
    values: dict[str, Any] = {}
    for attribute in ATTRIBUTES:
        if attribute.kind in (Kind.COUNT, Kind.MULTI) or attribute.vr == "UI" and (
            attribute.keyword == "AvailableTransferSyntaxUID"
        ):
            continue
        try:
            raw = ds.get(attribute.keyword)
        except Exception:
            raw = None
        values[attribute.column] = _normalise(attribute, raw)
    return values


def _normalise(attribute: Attribute, raw: Any) -> Any:
    if raw is None:
        return None
    if attribute.kind is Kind.INTEGER:
        try:
            return int(raw)
        except (TypeError, ValueError):
            return None
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
