"""Machine ceilings that the servers are measured against."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


class DurableWriter:
    """Writes files the durable way: write, fsync, atomic rename, fsync of the directory.

    This is the least a server must do per stored instance to survive a power cut, so the
    rate it reaches is the ceiling for STOW-RS ingest on this filesystem. ``directory`` must
    be on the filesystem where the servers keep their data.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.files = 0
        self.bytes = 0
        self.seconds = 0.0

    @property
    def per_second(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else 0.0

    @property
    def file_size(self) -> int:
        return self.bytes // max(self.files, 1)

    def write(self, payloads: list[bytes], deadline_s: float = 300.0) -> float:
        """Write one file per payload; return (and add up) the elapsed seconds."""
        end = time.monotonic() + deadline_s
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            t0 = time.perf_counter()
            for data in payloads:
                if time.monotonic() > end:
                    raise TimeoutError(f"durable writes took over {deadline_s:.0f}s")
                name = f"{self.files:06d}"
                tmp = self.directory / f".{name}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, self.directory / f"{name}.dcm")
                os.fsync(dir_fd)
                self.files += 1
                self.bytes += len(data)
            seconds = time.perf_counter() - t0
        finally:
            os.close(dir_fd)
        self.seconds += seconds
        return seconds

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def write_static_frames(root: Path, frames: list[bytes]) -> list[str]:
    """Write raw frame bytes as static files under ``root``; return their URL paths."""
    (root / "frames").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(frames):
        (root / "frames" / f"{i:04d}.raw").write_bytes(data)
        paths.append(f"/frames/{i:04d}.raw")
    return paths
