"""Frames of video Pixel Data (MPEG-2, MPEG-4 AVC/H.264, HEVC/H.265).

A video instance's Pixel Data holds one compressed stream, split over
fragments (PS3.5 A.4). To render a frame, or give it decoded, the stream is
read in place from the stored file through a file object over those
fragments, and FFmpeg's libraries (through PyAV) find its format and decode
it. Frames are counted from the first in decoding output order, so frame N
costs decoding the N-1 before it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from lightbox.dicom.frames import cut
from lightbox.errors import NotFound, Unavailable

# Decoded frames larger than this are refused rather than held in memory (8K UHD).
MAX_PIXELS = 7680 * 4320


class FragmentReader(io.RawIOBase):
    """A read-only, seekable file over byte ranges of another file: the stream
    that is the concatenation of ``segments`` (offset, length) of ``source``."""

    def __init__(self, source: BinaryIO, segments: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        self._source = source
        self._segments = segments
        self._size = sum(length for _offset, length in segments)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        done = 0
        for offset, length in cut(self._segments, self._position, len(view)):
            self._source.seek(offset)
            got = self._source.readinto(view[done : done + length])  # type: ignore[attr-defined]
            done += got or 0
            if got != length:
                break  # the file ends early
        self._position += done
        return done


def decode_frame(stream: BinaryIO | io.RawIOBase, number: int) -> npt.NDArray[np.uint8]:
    """Frame ``number`` (1-based) of the video ``stream`` as 8-bit RGB, shape
    (rows, columns, 3). NotFound when the stream has fewer frames, Unavailable
    when it cannot be decoded."""
    # Imported here: FFmpeg's libraries cost some 25 MB in every process that
    # loads them, and most never see a video.
    import av

    count = 0
    try:
        with av.open(stream, mode="r") as container:
            if not container.streams.video:
                raise Unavailable("the Pixel Data holds no video stream")
            video = container.streams.video[0]
            for frame in container.decode(video):
                if frame.width * frame.height > MAX_PIXELS:
                    raise Unavailable(f"video frames of {frame.width}x{frame.height} are too large")
                count += 1
                if count == number:
                    return np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)
    except av.FFmpegError as exc:
        raise Unavailable(f"cannot decode the video: {exc}") from exc
    raise NotFound(f"frame {number} not in the video (it holds {count})")
