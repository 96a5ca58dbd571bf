"""Reading a header straight from its bytes, for the files that need nothing more.

Most instances are little endian data sets of public elements, which
``dicomjson`` encodes straight from their bytes. For those, walking the
elements here costs a small part of building a pydicom Dataset first (a
512x512 CT header: about a fifth). Everything else returns None and is read
with pydicom as before: deflate and big endian, private or UN elements,
undefined lengths other than sequences', values that run past the end of
the file, a data set whose VRs contradict its transfer syntax, a character
set other than ASCII, Latin-1 or UTF-8, and any value that cannot be
encoded from its bytes alone. That file's record or its reason for refusal
then comes from pydicom.

A test reads every file of pydicom's test data both ways and compares the
outcome, byte for byte.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Union

from pydicom.datadict import dictionary_VR

from lightbox.dicom import dicomjson, uids

_FIRST_READ = 16 * 1024  # enough for most headers: the rest is pixel data
_META_READ = 4096  # enough for any usual File Meta Information
_MAX_HEADER = 4 * 1024 * 1024  # longer headers are left to pydicom
_MAX_DEPTH = 32  # sequences nested deeper are left to pydicom

_VRS = frozenset({
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF",
    "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN",
    "UR", "US", "UT", "UV",
})
# VRs whose explicit VR element header has a 4-byte length (PS3.5 §7.1.2).
_LONG = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Transfer syntaxes whose data set is explicit (or implicit) VR little endian.
_SYNTAXES = frozenset({
    uids.IMPLICIT_VR_LITTLE_ENDIAN, uids.EXPLICIT_VR_LITTLE_ENDIAN, *uids.FRAME_MEDIA_TYPES,
})
_TAG_VR = struct.Struct("<HH2sH")
_TAG_LENGTH = struct.Struct("<HHL")
_LENGTH = struct.Struct("<L")
_ENCODED_CHARACTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ ")

# An element: tag, VR and value (bytes; a sequence's value is its items).
Element = tuple[int, str, Union[bytes, "list[list[Element]]"]]


class GiveUp(Exception):
    """This file is for pydicom to read."""


class _NeedMore(Exception):
    """The header goes on past the bytes read so far."""


@dataclass(frozen=True)
class Header:
    """A header read from bytes: the transfer syntax, the data set's
    elements up to Pixel Data, and where Pixel Data starts (None: absent)."""

    syntax: str
    media_storage_sop_class: str | None
    elements: list[Element]
    pixel_offset: int | None

    def value(self, tag: int) -> tuple[str, bytes] | None:
        """A top-level element's VR and bytes (None when absent)."""
        for element_tag, vr, value in self.elements:
            if element_tag == tag and isinstance(value, bytes):
                return vr, value
            if element_tag >= tag:
                break
        return None

    def text(self, tag: int) -> str | None:
        """A top-level single text value as pydicom decodes it, when it is
        plain (capitals, digits, underscores, spaces); None when absent.
        Anything else is given up on."""
        found = self.value(tag)
        if found is None:
            return None
        if not set(found[1]) <= _ENCODED_CHARACTERS:
            raise GiveUp
        return found[1].decode("ascii").strip()

    def number(self, tag: int, default: int) -> int:
        """A top-level US or IS value as an integer, ``default`` when absent
        or empty; anything unusual is given up on."""
        found = self.value(tag)
        if found is None or not found[1]:
            return default
        vr, raw = found
        if vr == "US" and len(raw) == 2:
            return int.from_bytes(raw, "little")
        digits = raw.decode("latin-1").strip(" ")
        if vr == "IS" and digits.isascii() and digits.isdigit():
            return int(digits)
        raise GiveUp


def read(fp: BinaryIO, size: int) -> Header | None:
    """The header of the Part 10 file open as ``fp`` (``size`` bytes), or
    None when pydicom must read it. Leaves ``fp`` anywhere."""
    fp.seek(0)
    data = fp.read(min(size, _FIRST_READ))
    try:
        try:
            return _parse(data, size)
        except _NeedMore:
            if size > _MAX_HEADER:
                return None
            fp.seek(0)
            return _parse(fp.read(size), size)
    except (GiveUp, _NeedMore, struct.error, ValueError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class FileMeta:
    """What a stored file's File Meta Information says it holds, and where
    its data set starts."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    data_set_offset: int


def file_meta(path: Path) -> FileMeta | None:
    """The File Meta Information of the Part 10 file at ``path``, or None
    when it is not of the usual form (no preamble, a UID missing or not
    valid, more than its first 4 KiB): pydicom must read that one."""
    with open(path, "rb", buffering=0) as fp:
        size = os.fstat(fp.fileno()).st_size
        data = fp.read(_META_READ)
    if data[128:132] != b"DICM":
        return None
    try:
        meta, position = _meta(data, size)
        return FileMeta(_uid(meta.get(0x00020002)), _uid(meta.get(0x00020003)),
                        _uid(meta.get(0x00020010)), position)
    except (GiveUp, _NeedMore, struct.error, UnicodeDecodeError):
        return None


def to_dict(header: Header, *, uri_prefix: str) -> dict[str, Any] | None:
    """The header as DICOM JSON, as ``dicomjson.to_dict`` makes it from a
    pydicom Dataset (without Pixel Data); None when pydicom must encode it."""
    charset = header.value(0x00080005)
    encoding = "latin-1" if charset is None else dicomjson.simple_encoding(charset[1])
    if encoding is None:
        return None
    try:
        return _encode(header.elements, f"{uri_prefix}/bulkdata", "", encoding)
    except GiveUp:
        return None


def _encode(elements: list[Element], bulk_root: str, path: str, encoding: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag, vr, value in elements:
        if not dicomjson.belongs_in_json(tag):
            continue
        key = f"{tag:08X}"
        if isinstance(value, list):
            items = [_encode(item, bulk_root, f"{path}{key}/{i + 1}/", encoding)
                     for i, item in enumerate(value)]
            out[key] = {"vr": vr, "Value": items} if items else {"vr": vr}
            continue
        encoded = dicomjson.encode_raw(tag, vr, value, encoding, f"{bulk_root}/{path}{key}")
        if encoded is None:
            raise GiveUp
        out[key] = encoded
    return out


def _parse(data: bytes, size: int) -> Header:
    if data[128:132] != b"DICM":
        raise GiveUp  # no preamble: ingest adds it, or pydicom says what is wrong
    meta, position = _meta(data, size)
    syntax = _uid(meta.get(0x00020010))
    if syntax not in _SYNTAXES:
        raise GiveUp
    media = meta.get(0x00020002)
    reader = _Reader(data, size, implicit=syntax == uids.IMPLICIT_VR_LITTLE_ENDIAN)
    elements, pixels = reader.top_level(position)
    return Header(syntax, None if media is None else _uid(media), elements, pixels)


def _meta(data: bytes, size: int) -> tuple[dict[int, bytes], int]:
    """The File Meta Information (explicit VR little endian, group 0002)."""
    meta: dict[int, bytes] = {}
    position = 132
    while True:
        if position + 8 > len(data):
            raise _NeedMore if len(data) < size else GiveUp
        group, element, raw_vr, length = _TAG_VR.unpack_from(data, position)
        if group != 0x0002:
            return meta, position
        vr = raw_vr.decode("latin-1")
        if vr not in _VRS:
            raise GiveUp
        position += 8
        if vr in _LONG:
            if position + 4 > len(data):
                raise _NeedMore
            (length,) = _LENGTH.unpack_from(data, position)
            position += 4
        if length == _UNDEFINED or position + length > size:
            raise GiveUp
        if position + length > len(data):
            raise _NeedMore
        meta[0x00020000 | element] = data[position:position + length]
        position += length


def _uid(raw: bytes | None) -> str:
    """A UID value as pydicom decodes it (one trailing pad removed); any
    other padding, or several values, is given up on."""
    if raw is None:
        raise GiveUp
    text = raw.decode("latin-1")
    if text[-1:] in ("\x00", " "):
        text = text[:-1]
    if not uids.is_valid_uid(text):
        raise GiveUp
    return text


class _Reader:
    def __init__(self, data: bytes, size: int, *, implicit: bool) -> None:
        self.data = data
        self.size = size
        self.implicit = implicit
        self.depth = 0  # sequences entered

    def top_level(self, position: int) -> tuple[list[Element], int | None]:
        """The data set's elements up to Pixel Data, and Pixel Data's position."""
        elements, end = self._elements(position, self.size, top=True)
        return elements, (end if end < self.size else None)

    def _check_first(self, position: int) -> None:
        """pydicom reads a data set whose first VR contradicts the transfer
        syntax the other way (with a warning): leave those to it."""
        if position + 6 > len(self.data):
            if position >= self.size:
                return
            raise _NeedMore
        a, b = self.data[position + 4], self.data[position + 5]
        if (0x40 < a < 0x5B and 0x40 < b < 0x5B) == self.implicit:
            raise GiveUp

    def _element_header(self, position: int) -> tuple[int, str, int, int]:
        """Tag, VR, length and the position of the value."""
        data = self.data
        if position + 8 > len(data):
            raise _NeedMore if len(data) < self.size else GiveUp
        if self.implicit:
            group, element, length = _TAG_LENGTH.unpack_from(data, position)
            tag = group << 16 | element
            return tag, _implicit_vr(tag), length, position + 8
        group, element, raw_vr, length = _TAG_VR.unpack_from(data, position)
        tag = group << 16 | element
        if tag >> 16 == 0xFFFE:
            (length,) = _LENGTH.unpack_from(data, position + 4)
            return tag, "", length, position + 8
        vr = raw_vr.decode("latin-1")
        if vr not in _VRS:
            raise GiveUp
        if vr in _LONG:
            if position + 12 > len(data):
                raise _NeedMore
            (length,) = _LENGTH.unpack_from(data, position + 8)
            return tag, vr, length, position + 12
        return tag, vr, length, position + 8

    def _value(self, tag: int, vr: str, length: int, start: int) -> tuple[Any, int]:
        if tag >> 16 & 1:
            raise GiveUp  # private: its VR needs its creator's dictionary
        if vr == "SQ":
            return self._sequence(start, length)
        if length == _UNDEFINED:
            raise GiveUp
        end = start + length
        if end > self.size:
            raise GiveUp  # runs past the end: pydicom gives the reason
        if end > len(self.data):
            raise _NeedMore
        return self.data[start:end], end

    def _sequence(self, start: int, length: int) -> tuple[list[list[Element]], int]:
        self.depth += 1
        try:
            if self.depth > _MAX_DEPTH:
                raise GiveUp  # pydicom gives the reason
            return self._items(start, length)
        finally:
            self.depth -= 1

    def _items(self, start: int, length: int) -> tuple[list[list[Element]], int]:
        end = None if length == _UNDEFINED else start + length
        if end is not None and end > self.size:
            raise GiveUp
        items: list[list[Element]] = []
        position = start
        while end is None or position < end:
            tag, _vr, item_length, value = self._item_header(position)
            if tag == _SEQUENCE_END and end is None:
                return items, value
            if tag != _ITEM:
                raise GiveUp
            item_end = None if item_length == _UNDEFINED else value + item_length
            if item_end is not None and end is not None and item_end > end:
                raise GiveUp
            elements, position = self._elements(value, item_end)
            items.append(elements)
        if position != end:
            raise GiveUp
        return items, position

    def _item_header(self, position: int) -> tuple[int, str, int, int]:
        if position + 8 > len(self.data):
            raise _NeedMore if len(self.data) < self.size else GiveUp
        group, element, length = _TAG_LENGTH.unpack_from(self.data, position)
        return group << 16 | element, "", length, position + 8

    def _elements(
        self, position: int, end: int | None, *, top: bool = False
    ) -> tuple[list[Element], int]:
        """A data set's elements, up to ``end`` or its item delimiter (None),
        and where they end; at the top level, also where Pixel Data starts."""
        if position != end:
            self._check_first(position)
        elements: list[Element] = []
        last = -1
        while end is None or position < end:
            tag, vr, length, start = self._element_header(position)
            if top and tag in _PIXEL_TAGS:
                return elements, position
            if tag == _ITEM_END and end is None:
                return elements, start
            if tag <= last or tag >> 16 in (0x0002, 0xFFFE):
                raise GiveUp
            last = tag
            value, position = self._value(tag, vr, length, start)
            elements.append((tag, vr, value))
        if position != end:
            raise GiveUp
        return elements, position


_implicit_vrs: dict[int, str] = {}


def _implicit_vr(tag: int) -> str:
    """The dictionary VR of a public tag in an implicit VR data set."""
    vr = _implicit_vrs.get(tag)
    if vr is None:
        if tag >> 16 & 1 or tag >> 16 == 0xFFFE:
            return "" if tag >> 16 == 0xFFFE else "UN"  # private: given up on when read
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return "UN"  # not remembered: a file could bring any number of them
        if vr not in _VRS:
            vr = "UN"  # "US or SS" and the like: pydicom decides
        _implicit_vrs[tag] = vr  # at most one entry per tag of the dictionary
    return vr
