"""DICOM JSON (PS3.18 §F.2) for stored instances, built once at ingest.

Binary values larger than a threshold become BulkDataURIs. URIs are written
relative to a placeholder that the web layer replaces with the caller's
DICOMweb root, so the cached bytes serve every root (plain or shared link).

Most elements are encoded straight from the raw bytes pydicom read (a few
microseconds each); anything unusual (private or ambiguous VRs, character
sets other than ASCII/Latin-1/UTF-8, big endian) goes through pydicom.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

BASE_PLACEHOLDER = "@@LIGHTBOX_BASE@@"
BULK_THRESHOLD = 1024
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_SINGLE_TEXT = {"LT", "ST", "UT", "UR"}
CHARSET_VRS = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}  # text in the Specific Character Set
_ASCII_VRS = {"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR", "IS", "DS"}
NUMBER_FORMATS = {  # struct codes of the binary number VRs
    "US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q",
}
_FLOAT_VRS = {"FL", "FD", "DS"}
_SIMPLE_CHARSETS = {
    "": "latin-1",
    "ISO_IR 6": "latin-1",
    "ISO_IR 100": "latin-1",
    "ISO_IR 192": "utf-8",
}
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# Sequences need parsing, UN may hide a known VR, AT is rare: pydicom handles these.
_DELEGATED = {"SQ", "UN", "AT"}


def instance_path(study: str, series: str, sop: str) -> str:
    return f"{BASE_PLACEHOLDER}/studies/{study}/series/{series}/instances/{sop}"


def to_json(
    ds: Dataset, *, uri_prefix: str, pixel_vr: str | None, pixel_bulk_uri: str | None
) -> bytes:
    """Encode ``ds`` (read without pixel data) as one DICOM JSON object.

    ``pixel_vr``/``pixel_bulk_uri`` add the Pixel Data element as a BulkDataURI
    when the stored file has one.
    """
    obj = to_dict(ds, uri_prefix=uri_prefix, pixel_vr=pixel_vr)
    if pixel_vr and pixel_bulk_uri:
        obj["7FE00010"] = {"vr": pixel_vr, "BulkDataURI": pixel_bulk_uri}
    return dumps(obj)


def to_dict(ds: Dataset, *, uri_prefix: str, pixel_vr: str | None) -> dict[str, Any]:
    """``ds`` as a DICOM JSON object (a dict), Pixel Data as a BulkDataURI."""
    obj = _dataset(ds, f"{uri_prefix}/bulkdata", "", _text_encoding(ds))
    if pixel_vr:
        obj["7FE00010"] = {"vr": pixel_vr, "BulkDataURI": f"{uri_prefix}/bulkdata/7FE00010"}
    return obj


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; a NaN or infinity left in ``obj`` raises ValueError
    rather than becoming ``NaN``, which JSON parsers (browsers') refuse."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _finite(values: list[Any]) -> list[Any]:
    """``values`` with NaN and infinities as None (JSON null).

    PS3.18 Table F.2.3-1 maps FL and FD to a JSON Number and gives no
    encoding for IEEE 754 NaN or infinities, which JSON (RFC 8259 §6) cannot
    represent; such a value is sent as null, the way an empty value within a
    Value array is. The stored file keeps the value as sent.
    """
    return [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]


def first_value(obj: dict[str, Any], tag: int) -> str | int | float | None:
    """The value of a top-level element as the index keeps it: numbers as they
    are, person names as ``Alphabetic=Ideographic=Phonetic``, several values
    joined with backslashes."""
    values = obj.get(f"{tag:08X}", {}).get("Value")
    if not values:
        return None
    if len(values) == 1 and isinstance(values[0], int | float):
        return values[0]
    parts = []
    for value in values:
        if isinstance(value, dict):
            value = person_name(value)
        parts.append("" if value is None else str(value))
    return "\\".join(parts)


def person_name(value: dict[str, Any]) -> str:
    """A PN value of DICOM JSON as DICOM encodes it: its component groups
    joined by ``=``, trailing empty groups left out."""
    return "=".join(str(value.get(k, "")) for k in PN_GROUPS).rstrip("=")


def belongs_in_json(tag: int) -> bool:
    """File meta elements and group lengths do not belong in DICOM JSON."""
    return tag >> 16 != 0x0002 and tag & 0xFFFF != 0


def _text_encoding(ds: Dataset) -> str | None:
    raw = ds.get_item(0x00080005)
    return "latin-1" if raw is None else simple_encoding(raw.value)


def simple_encoding(charset: object) -> str | None:
    """The codec of a Specific Character Set value (its bytes, or as pydicom
    decoded it) when it is ASCII, Latin-1 or UTF-8; None for any other."""
    if isinstance(charset, bytes):
        charset = charset.decode("latin-1")
    if not isinstance(charset, str):
        return None  # multi-valued (code extensions): let pydicom decode
    return _SIMPLE_CHARSETS.get(charset.strip())


def _dataset(ds: Dataset, bulk_root: str, path: str, encoding: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset would convert every element
        if not belongs_in_json(tag):
            continue
        key = f"{int(tag):08X}"
        item = ds.get_item(tag)
        encoded = None
        if isinstance(item, RawDataElement) and ds.is_little_endian is not False:
            encoded = _raw(item, encoding, f"{bulk_root}/{path}{key}")
        if encoded is None:
            try:
                elem = ds[tag]
            except Exception:
                # pydicom cannot decode this value: keep it out of the JSON; the
                # stored file still holds it as sent.
                out[key] = {"vr": item.VR or "UN"}
                continue
            encoded = _element(elem, bulk_root, f"{path}{key}", encoding)
        out[key] = encoded
    return out


def _raw(item: RawDataElement, encoding: str | None, bulk_uri: str) -> dict[str, Any] | None:
    """Encode a raw element directly, or None to leave it to pydicom."""
    vr = item.VR
    if vr is None or item.tag >> 16 & 1:  # implicit VR, or private: dictionary needed
        if item.tag >> 16 & 1:
            return None
        try:
            vr = dictionary_VR(item.tag)
        except KeyError:
            return None
    value = item.value
    if value is None or not isinstance(value, bytes):
        return None
    return encode_raw(item.tag, vr, value, encoding, bulk_uri)


def encode_raw(
    tag: int, vr: str, value: bytes, encoding: str | None, bulk_uri: str
) -> dict[str, Any] | None:
    """Encode a public element of VR ``vr`` from its little endian bytes, or
    None when pydicom must decode it."""
    if tag >> 16 & 1 or vr in _DELEGATED or len(vr) != 2:
        return None
    if not value:
        return {"vr": vr}
    if vr in _BINARY_VRS:
        if len(value) > BULK_THRESHOLD:
            return {"vr": vr, "BulkDataURI": bulk_uri}
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode()}
    if vr in NUMBER_FORMATS:
        code = NUMBER_FORMATS[vr]
        size = struct.calcsize("<" + code)
        if len(value) % size:
            return None
        numbers = list(struct.unpack(f"<{len(value) // size}{code}", value))
        return {"vr": vr, "Value": _finite(numbers) if vr in _FLOAT_VRS else numbers}
    if vr in CHARSET_VRS and encoding is None:
        return None
    return _text(vr, value, encoding or "latin-1")


def _text(vr: str, value: bytes, encoding: str) -> dict[str, Any] | None:
    try:
        text = value.decode("latin-1" if vr in _ASCII_VRS else encoding)
    except UnicodeDecodeError:
        return None
    text = text.rstrip(" \x00")
    parts = [text] if vr in _SINGLE_TEXT else [p.strip(" \x00") for p in text.split("\\")]
    if not any(parts):
        return {"vr": vr}
    try:
        values: list[Any] = [_value(vr, p) for p in parts]
    except ValueError:
        return None
    return {"vr": vr, "Value": values}


def _value(vr: str, text: str) -> Any:
    if not text:
        return None
    if vr == "IS":
        return int(text)
    if vr == "DS":
        number = float(text)
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError("not a finite number")
        return number
    if vr == "PN":
        return {k: v for k, v in zip(PN_GROUPS, text.split("="), strict=False) if v}
    return text


def _element(elem: DataElement, bulk_root: str, path: str, encoding: str | None) -> dict[str, Any]:
    vr = elem.VR
    if vr == "SQ":
        items = [
            _dataset(item, bulk_root, f"{path}/{i + 1}/", encoding)
            for i, item in enumerate(elem.value)
        ]
        return {"vr": vr, "Value": items} if items else {"vr": vr}
    if vr in _BINARY_VRS:
        value = elem.value
        if value is None or value == b"":
            return {"vr": vr}
        if isinstance(value, bytes | bytearray) and len(value) > BULK_THRESHOLD:
            return {"vr": vr, "BulkDataURI": f"{bulk_root}/{path}"}
        if isinstance(value, bytes | bytearray):
            return {"vr": vr, "InlineBinary": base64.b64encode(value).decode()}
    try:
        result: dict[str, Any] = elem.to_json_dict(None, BULK_THRESHOLD)
    except Exception:
        # A value pydicom cannot convert (bad number, odd encoding) is kept
        # out of the JSON rather than making the whole instance unreadable.
        return {"vr": vr}
    if vr in _FLOAT_VRS and isinstance(result.get("Value"), list):
        result["Value"] = _finite(result["Value"])
    return result
