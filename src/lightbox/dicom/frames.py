"""Where each frame's bytes lie in a stored file.

Recorded once at ingest so that a WADO-RS frame request becomes one or a few
ranged reads of the stored object, with no DICOM parsing on the hot path.

Native pixel data: one byte range per frame. Encapsulated pixel data (PS3.5
§A.4): one range per fragment, grouped into frames using, in order, one
fragment per frame, the Basic Offset Table, or the start-of-codestream
markers of the JPEG family.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, overload

from lightbox.errors import InvalidInstance

ITEM = 0xFFFEE000
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT"}
# A codestream starts with SOI (JPEG, JPEG-LS) or SOC+SIZ (JPEG 2000, HTJ2K).
_FRAME_STARTS = (b"\xff\xd8", b"\xff\x4f\xff\x51")
MAX_FRAGMENTS = 1_000_000


Ranges = tuple[tuple[int, int], ...]


def cut(ranges: Sequence[tuple[int, int]], start: int, length: int) -> list[tuple[int, int]]:
    """The (offset, length) pieces of a file that hold bytes ``start`` to
    ``start + length - 1`` of the stream made of ``ranges`` read one after the
    other (a frame's or a video's fragments)."""
    pieces: list[tuple[int, int]] = []
    position = 0
    for offset, size in ranges:
        low, high = max(start, position), min(start + length, position + size)
        if low < high:
            pieces.append((offset + low - position, high - low))
        position += size
    return pieces


class UniformFrames(Sequence[Ranges]):
    """Native frames: frame i is the one range (offset + i * size, size).

    Computed on access, so a file of a million one-byte frames costs three
    integers, not a million tuples (in memory and in the index).
    """

    __slots__ = ("offset", "size", "total")

    def __init__(self, offset: int, size: int, total: int) -> None:
        self.offset, self.size, self.total = offset, size, total

    def __len__(self) -> int:
        return self.total

    @overload
    def __getitem__(self, index: int) -> Ranges: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Ranges, ...]: ...

    def __getitem__(self, index: int | slice) -> Ranges | tuple[Ranges, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(self.total)))
        if index < 0:
            index += self.total
        if not 0 <= index < self.total:
            raise IndexError("frame index out of range")
        return ((self.offset + index * self.size, self.size),)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, UniformFrames):
            return (self.offset, self.size, self.total) == (other.offset, other.size, other.total)
        if isinstance(other, Sequence):
            if len(other) != self.total:
                return False
            return all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.offset, self.size, self.total))

    def __repr__(self) -> str:
        return f"UniformFrames(offset={self.offset}, size={self.size}, total={self.total})"


# First byte of the index encoding.
_NATIVE, _ENCAPSULATED, _UNIFORM = 0, 1, 2


@dataclass(frozen=True)
class PixelLayout:
    """Byte ranges of Pixel Data in a stored file.

    ``value`` is the (offset, length) of the whole Pixel Data value (length is
    -1 when undefined); ``frames[i]`` lists the (offset, length) ranges whose
    concatenation is frame i+1 (one range for native data).
    """

    encapsulated: bool
    value: tuple[int, int]
    frames: Sequence[Ranges]

    def to_bytes(self) -> bytes:
        """Compact encoding for the index: header then int64 pairs."""
        if isinstance(self.frames, UniformFrames):
            f = self.frames
            return struct.pack("<BqqIqq", _UNIFORM, *self.value, f.total, f.offset, f.size)
        counts = [len(f) for f in self.frames]
        kind = _ENCAPSULATED if self.encapsulated else _NATIVE
        head = struct.pack("<BqqI", kind, *self.value, len(self.frames))
        body = struct.pack(f"<{len(counts)}I", *counts)
        flat = [n for frame in self.frames for rng in frame for n in rng]
        return head + body + struct.pack(f"<{len(flat)}q", *flat)

    @classmethod
    def from_bytes(cls, data: bytes) -> PixelLayout:
        kind, v_off, v_len, n = struct.unpack_from("<BqqI", data)
        pos = struct.calcsize("<BqqI")
        if kind == _UNIFORM:
            offset, size = struct.unpack_from("<qq", data, pos)
            return cls(False, (v_off, v_len), UniformFrames(offset, size, n))
        counts = struct.unpack_from(f"<{n}I", data, pos)
        pos += 4 * n
        flat = struct.unpack_from(f"<{2 * sum(counts)}q", data, pos)
        frames: list[Ranges] = []
        i = 0
        for c in counts:
            frames.append(tuple((flat[i + 2 * k], flat[i + 2 * k + 1]) for k in range(c)))
            i += 2 * c
        return cls(kind == _ENCAPSULATED, (v_off, v_len), tuple(frames))


@dataclass(frozen=True)
class ImageGeometry:
    """What is needed to cut native pixel data into frames."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    number_of_frames: int

    @property
    def frame_bits(self) -> int:
        return self.rows * self.columns * self.samples_per_pixel * self.bits_allocated


def read_pixel_layout(
    fp: BinaryIO, *, implicit_vr: bool, geometry: ImageGeometry, file_size: int
) -> PixelLayout:
    """Read the Pixel Data element header at ``fp``'s position and map the frames.

    ``fp`` must be positioned at the start of the (7FE0,0010) element of a
    little-endian dataset. Raises InvalidInstance when lengths are inconsistent
    with the file or the image geometry.
    """
    start = fp.tell()
    header = fp.read(12)
    if len(header) < 8:
        raise InvalidInstance("Pixel Data element is truncated")
    if implicit_vr:
        (length,) = struct.unpack_from("<I", header, 4)
        value_offset = start + 8
    elif header[4:6] in _LONG_VRS:
        (length,) = struct.unpack_from("<I", header, 8)
        value_offset = start + 12
    else:
        (length,) = struct.unpack_from("<H", header, 6)
        value_offset = start + 8
    if length == UNDEFINED_LENGTH:
        fp.seek(value_offset)
        return _encapsulated_layout(fp, value_offset, geometry.number_of_frames, file_size)
    if value_offset + length > file_size:
        raise InvalidInstance(
            f"Pixel Data length {length} runs past the end of the file ({file_size} bytes)"
        )
    return _native_layout(value_offset, length, geometry)


def _native_layout(offset: int, length: int, geometry: ImageGeometry) -> PixelLayout:
    bits = geometry.frame_bits
    frames_needed = geometry.number_of_frames
    if bits <= 0 or frames_needed <= 0:
        raise InvalidInstance("image has Pixel Data but no valid Rows/Columns/Bits Allocated")
    if (bits * frames_needed + 7) // 8 > length:
        raise InvalidInstance(
            f"Pixel Data holds {length} bytes, fewer than {frames_needed} frame(s) of "
            f"{geometry.rows}x{geometry.columns}x{geometry.samples_per_pixel} "
            f"at {geometry.bits_allocated} bits need"
        )
    if bits % 8:
        # Bit-packed frames (Bits Allocated 1) need not start on a byte boundary:
        # no direct ranges, the retrieve path decodes such frames instead.
        return PixelLayout(False, (offset, length), ())
    return PixelLayout(False, (offset, length), UniformFrames(offset, bits // 8, frames_needed))


def _read_item(fp: BinaryIO, file_size: int) -> tuple[int, int, int]:
    raw = fp.read(8)
    if len(raw) < 8:
        raise InvalidInstance("encapsulated Pixel Data is truncated (no sequence delimiter)")
    group, elem, length = struct.unpack("<HHI", raw)
    tag = group << 16 | elem
    pos = fp.tell()
    if tag == ITEM and (length == UNDEFINED_LENGTH or pos + length > file_size):
        raise InvalidInstance(f"encapsulated Pixel Data item of length {length} is invalid")
    return tag, pos, length


def _encapsulated_layout(
    fp: BinaryIO, value_offset: int, frame_count: int, file_size: int
) -> PixelLayout:
    tag, bot_pos, bot_len = _read_item(fp, file_size)
    if tag != ITEM:
        raise InvalidInstance("encapsulated Pixel Data does not start with an offset table item")
    bot = fp.read(bot_len)
    fragments: list[tuple[int, int]] = []
    while True:
        tag, pos, length = _read_item(fp, file_size)
        if tag == SEQUENCE_DELIMITER:
            break
        if tag != ITEM:
            raise InvalidInstance(f"unexpected tag {tag:08X} inside encapsulated Pixel Data")
        if len(fragments) >= MAX_FRAGMENTS:
            raise InvalidInstance("encapsulated Pixel Data has too many fragments")
        fragments.append((pos, length))
        fp.seek(pos + length)
    total = fp.tell() - value_offset
    frames = _group_fragments(fp, fragments, bot, bot_pos + bot_len, max(frame_count, 1))
    return PixelLayout(True, (value_offset, total), frames)


def _group_fragments(
    fp: BinaryIO,
    fragments: list[tuple[int, int]],
    bot: bytes,
    first_item_pos: int,
    frame_count: int,
) -> tuple[Ranges, ...]:
    if not fragments:
        raise InvalidInstance("encapsulated Pixel Data holds no fragments")
    if frame_count == 1:
        return (tuple(fragments),)
    if len(fragments) == frame_count:
        return tuple((f,) for f in fragments)
    if len(bot) >= 4 * frame_count:
        # Offsets count from the first byte of the first fragment's item tag.
        offsets = struct.unpack_from(f"<{frame_count}I", bot)
        return _split_at(fragments, [first_item_pos + s + 8 for s in offsets])
    starts: list[int] = []
    for pos, _length in fragments:
        fp.seek(pos)
        if fp.read(4).startswith(_FRAME_STARTS):
            starts.append(pos)
    if len(starts) != frame_count:
        raise InvalidInstance(
            f"cannot tell {frame_count} frames apart in {len(fragments)} fragments"
        )
    return _split_at(fragments, starts)


def _split_at(
    fragments: list[tuple[int, int]], starts: list[int]
) -> tuple[Ranges, ...]:
    index = {pos: i for i, (pos, _) in enumerate(fragments)}
    # Strictly increasing: a repeated offset would make an empty frame.
    increasing = all(a < b for a, b in itertools.pairwise(starts))
    if any(s not in index for s in starts) or not increasing or starts[0] != fragments[0][0]:
        raise InvalidInstance("the Basic Offset Table does not match the fragments")
    bounds = [index[s] for s in starts] + [len(fragments)]
    return tuple(tuple(fragments[bounds[i] : bounds[i + 1]]) for i in range(len(starts)))
