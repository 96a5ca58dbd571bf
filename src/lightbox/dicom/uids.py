"""UID rules (PS3.5 §9) and the transfer syntaxes Lightbox knows by name."""

from __future__ import annotations

import re

from lightbox.errors import BadRequest

MAX_UID_LENGTH = 64
# Digits and dots, no empty component. Leading zeros are forbidden by PS3.5
# but common in real-world data; we accept them because they are harmless
# (the charset is what keeps a UID from becoming a path or a query trick).
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

NATIVE_SYNTAXES = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_BIG_ENDIAN,
    }
)

# Media types of single frames in their stored compressed form (PS3.18 Table 8.7.3-2).
FRAME_MEDIA_TYPES: dict[str, str] = {
    JPEG_BASELINE: "image/jpeg",
    JPEG_EXTENDED: "image/jpeg",
    JPEG_LOSSLESS: "image/jpeg",
    JPEG_LOSSLESS_SV1: "image/jpeg",
    JPEG_LS_LOSSLESS: "image/jls",
    JPEG_LS_NEAR_LOSSLESS: "image/jls",
    JPEG_2000_LOSSLESS: "image/jp2",
    JPEG_2000: "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    RLE_LOSSLESS: "image/dicom-rle",
}

# Media types of video streams in their stored form (PS3.18 Table 8.7.4-3): MPEG-2,
# MPEG-4 AVC/H.264 and HEVC/H.265, each kept as one stream across the fragments.
VIDEO_MEDIA_TYPES: dict[str, str] = {
    **dict.fromkeys(("1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.100.1",
                     "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.101.1"), "video/mpeg"),
    **dict.fromkeys((f"1.2.840.10008.1.2.4.{n}{suffix}" for n in range(102, 107)
                     for suffix in ("", ".1")), "video/mp4"),
    **dict.fromkeys(("1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108"), "video/H265"),
}


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a syntactically valid UID of at most 64 characters."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_UID_LENGTH
        and _UID_RE.fullmatch(value) is not None
    )


def from_bytes(raw: bytes) -> str | None:
    """A well-formed UID from its element's bytes as pydicom decodes them
    (Latin-1, trailing NULs and spaces removed, one value); None otherwise."""
    text = raw.decode("latin-1").rstrip("\x00 ")
    return text if "\\" not in text and is_valid_uid(text) else None


def require_uid(value: str, what: str) -> str:
    """Return ``value`` or raise BadRequest naming ``what`` (used for UIDs in URLs)."""
    if not is_valid_uid(value):
        shown = value[:80].encode("ascii", "backslashreplace").decode()
        raise BadRequest(f"{what} is not a valid UID: {shown!r}")
    return value
