"""C-FIND matches encoded straight from DICOM JSON.

A match goes back as the identifier of a Pending C-FIND-RSP: the keys the
request asked for, filled from the search result, which is DICOM JSON
(PS3.18 F.2). Building a pydicom Dataset from that JSON and letting pydicom
encode it cost about a third of a millisecond of processor time per match,
more than the search. Here the JSON is encoded in the presentation context's
transfer syntax (implicit or explicit VR little endian, PS3.5 7.1) directly,
and pynetdicom sends the bytes as they are (``install``).

Anything out of the ordinary (a binary value, a value too long for its
length field, a value of the wrong kind, another transfer syntax) makes
``encode`` return None: the caller then builds the Dataset and
pydicom encodes it, as before.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import DSfloat
from pynetdicom import service_class

from lightbox.dicom.dicomjson import CHARSET_VRS, NUMBER_FORMATS, person_name

# PS3.5 Table 7.1-1: these VRs have a 32-bit length after two reserved bytes.
_LONG_LENGTH = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
# VRs whose values are text, several values joined by backslashes.
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
             "UC", "UI", "UR", "UT"}
_IMPLICIT_HEADER = struct.Struct("<HHL")
_SHORT_HEADER = struct.Struct("<HH2sH")
_LONG_HEADER = struct.Struct("<HH2sxxL")

EXPLICIT_SYNTAXES: dict[str, bool] = {str(ImplicitVRLittleEndian): False,
                                      str(ExplicitVRLittleEndian): True}
"""The transfer syntaxes ``encode`` writes: UID -> explicit VR."""


_Encoding = tuple[bytes, bool, Callable[[], Dataset]]


class Encoded(Dataset):
    """A match already encoded for one transfer syntax; pynetdicom sends its
    bytes (``install``). ``build`` makes the Dataset itself, for any other use."""

    def __init__(self, data: bytes, explicit: bool, build: Callable[[], Dataset]) -> None:
        super().__init__()
        # Not through Dataset.__setattr__, which looks names up as DICOM keywords.
        object.__setattr__(self, "_lightbox_encoding", (data, explicit, build))

    def encoded(self, implicit: bool, little: bool, deflated: bool) -> bytes | Dataset:
        """Its bytes in that encoding, or the Dataset to encode when they are not."""
        encoding = cast(_Encoding, object.__getattribute__(self, "_lightbox_encoding"))
        data, explicit, build = encoding
        if little and not deflated and explicit is not implicit:
            return data
        return build()


def encode(obj: dict[str, Any], *, explicit: bool) -> bytes | None:
    """The DICOM JSON object ``obj`` (strings in UTF-8 or ASCII, as its
    Specific Character Set says) as a little endian dataset, or None."""
    out = bytearray()
    for key in sorted(obj):
        element = _element(int(key, 16), obj[key], explicit)
        if element is None:
            return None
        out += element
    return bytes(out)


def _element(tag: int, attribute: dict[str, Any], explicit: bool) -> bytes | None:
    vr = attribute.get("vr")
    if not isinstance(vr, str) or len(vr) != 2 or "BulkDataURI" in attribute \
            or "InlineBinary" in attribute:
        return None
    values = attribute.get("Value") or []
    value = _value(vr, values, explicit) if values else b""
    if value is None:
        return None
    group, number = tag >> 16, tag & 0xFFFF
    if not explicit:
        return _IMPLICIT_HEADER.pack(group, number, len(value)) + value
    if vr in _LONG_LENGTH:
        return _LONG_HEADER.pack(group, number, vr.encode(), len(value)) + value
    if len(value) > 0xFFFF:
        return None
    return _SHORT_HEADER.pack(group, number, vr.encode(), len(value)) + value


def _value(vr: str, values: list[Any], explicit: bool) -> bytes | None:
    if vr == "SQ":
        return _items(values, explicit)
    if vr in NUMBER_FORMATS:
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return None
        try:
            return struct.pack(f"<{len(values)}{NUMBER_FORMATS[vr]}", *values)
        except struct.error:  # out of range for the VR
            return None
    if vr == "AT":
        try:
            return b"".join(struct.pack("<HH", int(v[:4], 16), int(v[4:], 16))
                            for v in values if isinstance(v, str) and len(v) == 8)
        except ValueError:
            return None
    if vr not in _TEXT_VRS:
        return None  # a binary VR with a Value
    text = _text(vr, values)
    if text is None:
        return None
    if vr not in CHARSET_VRS and not text.isascii():
        return None
    data = text.encode()
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return data


def _items(values: list[Any], explicit: bool) -> bytes | None:
    """A sequence's items, each of defined length (PS3.5 7.5)."""
    out = bytearray()
    for value in values:
        item = encode(value, explicit=explicit) if isinstance(value, dict) else None
        if item is None:
            return None
        out += _IMPLICIT_HEADER.pack(0xFFFE, 0xE000, len(item)) + item
    return bytes(out)


def _text(vr: str, values: list[Any]) -> str | None:
    parts = []
    for value in values:
        if value is None:
            parts.append("")
        elif vr == "PN":
            if not isinstance(value, dict):
                return None
            parts.append(person_name(value))
        elif isinstance(value, bool):
            return None
        elif vr == "DS" and isinstance(value, int | float):
            parts.append(str(DSfloat(value)))
        elif vr == "IS" and isinstance(value, int):
            parts.append(str(value))
        elif isinstance(value, str):
            parts.append(value)
        else:
            return None
    return "\\".join(parts)


def install() -> None:
    """Make pynetdicom send an ``Encoded`` match's bytes as they are (its
    C-FIND service encodes each Pending identifier with this function)."""
    module = cast(Any, service_class)  # it imports dsutils.encode under that name
    original = module.encode
    if getattr(original, "lightbox", False):
        return

    def encode_identifier(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool,
                          deflated: bool = False) -> bytes | None:
        if isinstance(ds, Encoded):
            found = ds.encoded(is_implicit_vr, is_little_endian, deflated)
            if isinstance(found, bytes):
                return found
            ds = found
        return cast(bytes | None, original(ds, is_implicit_vr, is_little_endian, deflated))

    encode_identifier.lightbox = True  # type: ignore[attr-defined]
    module.encode = encode_identifier
