"""One unpacked OHIF build made ready to serve under ``/viewer/``: files found
safely inside it, ``index.html``, bundles and stylesheets rewritten from
``/`` to ``/viewer/`` in memory (the files on disk never change), and text
files compressed once, into a cache on disk shared by every process."""

from __future__ import annotations

import gzip
import hashlib
import logging
import mimetypes
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("lightbox.web.viewer")

MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".xml": "application/xml",
    ".webapp": "application/x-web-app-manifest+json",
}
# Worth compressing once and keeping compressed in memory.
TEXT_SUFFIXES = frozenset({".js", ".mjs", ".css", ".html", ".json", ".svg", ".map", ".xml"})
# Compressed copies of unchanged files kept per process; beyond it, files are
# sent from disk as they are.
MEMORY_BUDGET = 96 * 1024 * 1024
# The webpack runtime's public path, and the one other absolute path in the bundle.
WEBPACK_PUBLIC_PATH = re.compile(rb'(__webpack_require__\.p\s*=\s*)"/"')
ABSOLUTE_LITERALS = ((b"'/dicom-microscopy-viewer/", b"'/viewer/dicom-microscopy-viewer/"),)

@dataclass(frozen=True)
class Asset:
    """A file's bytes as served, with a gzip copy when that is smaller."""

    body: bytes | None  # None: unchanged on disk, sent from there uncompressed
    gzipped: bytes | None
    etag: str
    media_type: str

    @property
    def size(self) -> int:
        return len(self.body or b"") + len(self.gzipped or b"")


def media_type(path: Path) -> str:
    known = MEDIA_TYPES.get(path.suffix.lower())
    return known or mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def rewrite_index(page: bytes) -> bytes:
    """index.html with its absolute ``/`` paths moved under ``/viewer/``."""
    page = page.replace(b'window.PUBLIC_URL="/"', b'window.PUBLIC_URL="/viewer/"')
    return re.sub(rb'((?:href|src)=")/(?!/)', rb"\1/viewer/", page)


def rewrite_script(script: bytes) -> bytes:
    """A bundle with webpack's public path (where it loads chunks, workers and
    wasm from) moved under ``/viewer/``."""
    script = WEBPACK_PUBLIC_PATH.sub(rb'\1"/viewer/"', script)
    for old, new in ABSOLUTE_LITERALS:
        script = script.replace(old, new)
    return script


def rewrite_stylesheet(sheet: bytes) -> bytes:
    """A stylesheet with its absolute ``url(/…)`` (fonts) moved under ``/viewer/``."""
    return re.sub(rb"url\((['\"]?)/(?!/)", rb"url(\1/viewer/", sheet)


REWRITES = {".js": rewrite_script, ".css": rewrite_stylesheet}


def _gzip_size_matches(packed: bytes, size: int) -> bool:
    """A gzip member ends with its uncompressed size (mod 2**32): a cut-off
    or foreign file in the cache fails this and is compressed again."""
    return len(packed) >= 18 and int.from_bytes(packed[-4:], "little") == size & 0xFFFFFFFF


class PackedCache:
    """Compressed copies of the build's files on disk, shared by every worker
    process and kept across restarts (``make install`` fills it), so no
    process compresses the viewer's bundles while a user waits for them.

    Named by the SHA-256 of what they compress; a folder that cannot be
    written to only means compressing in memory, as without a cache.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def get(self, digest: str, size: int) -> bytes | None:
        if self.folder is None:
            return None
        try:
            packed = (self.folder / f"{digest}.gz").read_bytes()
        except OSError:
            return None
        return packed if _gzip_size_matches(packed, size) else None

    def put(self, digest: str, packed: bytes) -> None:
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.folder, prefix=".in-")
            with os.fdopen(fd, "wb") as out:
                out.write(packed)
            os.replace(name, self.folder / f"{digest}.gz")
        except OSError as exc:
            log.debug("viewer asset cache not written (%s): compressing in memory", exc)
            self.folder = None

    def compressed(self, body: bytes, digest: str) -> bytes:
        packed = self.get(digest, len(body))
        if packed is None:
            packed = gzip.compress(body, 6)
            self.put(digest, packed)
        return packed


def _pack(body: bytes, original: bytes, kind: str, cache: PackedCache) -> Asset:
    digest = hashlib.sha256(body).hexdigest()
    packed = cache.compressed(body, digest)
    changed = body != original
    return Asset(
        body=body if changed else None,
        gzipped=packed if len(packed) < len(body) else None,
        etag='"' + digest[:32] + '"',
        media_type=kind,
    )


def packed_folder(root: Path) -> Path:
    """Where the compressed copies of the build at ``root`` are kept."""
    return root.parent / f"{root.name}.gz"


class ViewerBuild:
    """One unpacked OHIF build: finds files safely and keeps rewritten copies."""

    def __init__(self, root: Path, budget: int = MEMORY_BUDGET) -> None:
        self.root = root.resolve()
        self.budget = budget
        self.packed = PackedCache(packed_folder(self.root))
        self._assets: dict[Path, Asset] = {}
        self._from_disk: set[Path] = set()
        self._used = 0
        self._lock = threading.Lock()

    def available(self) -> bool:
        return (self.root / "index.html").is_file()

    def locate(self, relative: str) -> Path | None:
        """The regular file at ``relative`` inside the build, or None.

        Raises ValueError for a path that tries to leave the folder or names a
        hidden file (``..``, ``.``, a leading dot, a backslash, NUL).
        """
        parts = [p for p in relative.split("/") if p]
        for part in parts:
            if part.startswith(".") or "\\" in part or "\x00" in part:
                raise ValueError(relative)
        if not parts:
            return None
        found = self.root.joinpath(*parts).resolve()
        if not found.is_relative_to(self.root):  # a symlink pointing elsewhere
            raise ValueError(relative)
        return found if found.is_file() else None

    def index(self) -> Asset:
        return self._load(self.root / "index.html", rewrite_index, always=True)

    def prepare(self) -> int:
        """Compress every text file of the build into the disk cache (at
        install time); returns how many files it holds."""
        count = 0
        for path in sorted(self.root.rglob("*")):
            relative = path.relative_to(self.root).parts
            if path.suffix.lower() not in TEXT_SUFFIXES or not path.is_file() or any(
                part.startswith(".") for part in relative
            ):
                continue
            original = path.read_bytes()
            body = self._rewrite(path)(original)
            self.packed.compressed(body, hashlib.sha256(body).hexdigest())
            count += 1
        return count

    def _rewrite(self, path: Path) -> Any:
        if path == self.root / "index.html":
            return rewrite_index
        return REWRITES.get(path.suffix, bytes)

    def text(self, path: Path) -> Asset | None:
        """A text file from memory (rewritten, compressed), or None: send from disk."""
        if path in self._from_disk:
            return None
        asset = self._load(path, self._rewrite(path))
        if asset.body is None and asset.gzipped is None:
            with self._lock:
                self._from_disk.add(path)
            return None
        return asset

    def _load(self, path: Path, rewrite: Any, always: bool = False) -> Asset:
        with self._lock:
            cached = self._assets.get(path)
        if cached is not None:
            return cached
        original = path.read_bytes()
        asset = _pack(rewrite(original), original, media_type(path), self.packed)
        with self._lock:
            # A rewritten file must come from memory; others only within the budget.
            keep = always or asset.body is not None or self._used + asset.size <= self.budget
            if not keep:
                return Asset(None, None, asset.etag, asset.media_type)
            self._used += asset.size
            self._assets.setdefault(path, asset)
            return self._assets[path]
