"""Frames of video Pixel Data (MPEG-2, MPEG-4 AVC/H.264, HEVC/H.265).

A video instance's Pixel Data holds one compressed stream, split over
fragments (PS3.5 A.4). To render a frame, or give it decoded, the stream is
read in place from the stored file through a file object over those
fragments, and FFmpeg's libraries (through PyAV) find its format and decode
it. Frames are counted from the first in decoding output order, so frame N
costs decoding the N-1 before it. A decoder is kept open where it stopped
(see ``Cursors``), so frames asked for in order, one request after another
or several in one, cost one decode each.
"""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

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


class _Decoder:
    """A video stream open for decoding, frame after frame: frame N (1-based) as
    8-bit RGB, shape (rows, columns, 3); NotFound when the stream has fewer
    frames, Unavailable when it cannot be decoded."""

    def __init__(self, stream: BinaryIO | io.RawIOBase) -> None:
        # Imported here: FFmpeg's libraries cost some 25 MB in every process
        # that loads them, and most never see a video.
        import av

        self._error: type[Exception] = av.FFmpegError
        self.position = 0  # frames decoded so far
        try:
            self._container: Any = av.open(stream, mode="r")
        except av.FFmpegError as exc:
            raise Unavailable(f"cannot decode the video: {exc}") from exc
        if not self._container.streams.video:
            self.close()
            raise Unavailable("the Pixel Data holds no video stream")
        self._frames: Iterator[Any] = self._container.decode(self._container.streams.video[0])

    def frame(self, number: int) -> npt.NDArray[np.uint8]:
        """Frame ``number``; it must lie after ``position``."""
        assert number > self.position
        try:
            for frame in self._frames:
                if frame.width * frame.height > MAX_PIXELS:
                    raise Unavailable(f"video frames of {frame.width}x{frame.height} are too large")
                self.position += 1
                if self.position == number:
                    return np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)
        except self._error as exc:
            raise Unavailable(f"cannot decode the video: {exc}") from exc
        raise NotFound(f"frame {number} not in the video (it holds {self.position})")

    def close(self) -> None:
        self._container.close()


class _Cursor:
    """A decoder over a stored stream, with the file it reads."""

    def __init__(self, source: BinaryIO, segments: Sequence[tuple[int, int]]) -> None:
        self._source = source
        try:
            self.decoder = _Decoder(FragmentReader(source, segments))
        except BaseException:
            source.close()
            raise
        self.used = time.monotonic()

    def close(self) -> None:
        try:
            self.decoder.close()
        finally:
            self._source.close()


class Cursors:
    """Decoders left open where they stopped, by stream, a few per process.

    Reaching frame N means decoding every frame before it, so a decoder that
    stopped at frame N-1 is kept for the next request. A cursor is taken out
    while it decodes, so two requests never share one (the second opens its
    own). Cursors unused for ``IDLE`` seconds are closed (by a thread that
    runs while any is open); at most ``KEEP`` stay open.
    """

    KEEP = 2
    IDLE = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: OrderedDict[str, _Cursor] = OrderedDict()
        self._sweeping = False  # a thread closes idle cursors
        self.hits = self.misses = 0

    def frame(
        self, key: str, number: int,
        source: Callable[[], tuple[BinaryIO, Sequence[tuple[int, int]]]],
    ) -> npt.NDArray[np.uint8]:
        """Frame ``number`` of the stream named ``key``. ``source`` opens the
        stored file and says where the stream's fragments lie in it."""
        cursor = self._take(key, number)
        if cursor is None:
            cursor = _Cursor(*source())
        try:
            found = cursor.decoder.frame(number)
        except BaseException:
            cursor.close()  # a stream that failed once is opened afresh next time
            raise
        self._give(key, cursor)
        return found

    def _take(self, key: str, number: int) -> _Cursor | None:
        with self._lock:
            cursor = self._open.pop(key, None)
            stale = self._expire()
            if cursor is not None and cursor.decoder.position < number:
                self.hits += 1
            else:
                self.misses += 1
                if cursor is not None:
                    stale.append(cursor)  # past the frame asked for: start again
                    cursor = None
        for old in stale:
            old.close()
        return cursor

    def _give(self, key: str, cursor: _Cursor) -> None:
        cursor.used = time.monotonic()
        with self._lock:
            replaced = self._open.pop(key, None)
            self._open[key] = cursor
            extra = []
            while len(self._open) > self.KEEP:
                extra.append(self._open.popitem(last=False)[1])
            sweep, self._sweeping = not self._sweeping, True
        for old in [*extra, *([replaced] if replaced is not None else [])]:
            old.close()
        if sweep:
            threading.Thread(target=self._sweep, name="video-sweep", daemon=True).start()

    def _sweep(self) -> None:
        """Close cursors as they go idle; end when none is left open."""
        while True:
            time.sleep(self.IDLE / 2)
            with self._lock:
                stale = self._expire()
                self._sweeping = bool(self._open)
            for cursor in stale:
                cursor.close()
            if not self._sweeping:
                return

    def _expire(self) -> list[_Cursor]:
        """Remove and return the idle cursors (under the lock)."""
        limit = time.monotonic() - self.IDLE
        stale = [key for key, cursor in self._open.items() if cursor.used < limit]
        return [self._open.pop(key) for key in stale]

    def close(self) -> None:
        with self._lock:
            cursors, self._open = list(self._open.values()), OrderedDict()
        for cursor in cursors:
            cursor.close()


cursors = Cursors()
