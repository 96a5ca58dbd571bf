"""Series thumbnails for the study browser: rendered once, then served from a cache.

A thumbnail is the middle image of the series (middle frame of a multi-frame
image), rendered by the pixels service. It is kept under the data folder in
``cache/thumbnails/<hash of the series UID>/<version>.jpg``; the version is the
series' instance count and newest instance row, so adding, replacing or
deleting an instance makes a new thumbnail and the stale one is removed.
Series without a renderable image get a placeholder (remembered as well, so
an SR series is not opened again on every page view).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lightbox.archive import Archive
from lightbox.dicom.render import JPEG, RenderOptions
from lightbox.errors import LightboxError, NotFound
from lightbox.index import browse as index
from lightbox.index.browse import InstanceRef, SeriesRow
from lightbox.services import pixels, retrieve
from lightbox.services.auth import Principal

log = logging.getLogger(__name__)

OPTIONS = RenderOptions(media_type=JPEG, viewport=(160, 160), quality=85)
SVG = "image/svg+xml"
# Shown for series with nothing to render (reports, key objects, broken images).
PLACEHOLDER = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="160" height="160" viewBox="0 0 160 160">'
    b'<rect width="160" height="160" fill="#20262d"/>'
    b'<path d="M52 44h42l14 14v58H52z" fill="none" stroke="#8b949e" stroke-width="4"/>'
    b'<path d="M62 76h36M62 88h36M62 100h24" stroke="#8b949e" stroke-width="4"/></svg>'
)
_NONE = b""  # cached marker: this version has no image


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    media_type: str
    etag: str


def _folder(archive: Archive, series_uid: str) -> Path:
    # Hashed: a path is never built from a UID itself.
    digest = hashlib.sha256(f"series|{series_uid}".encode()).hexdigest()
    return Path(archive.settings.data) / "cache" / "thumbnails" / digest[:2] / digest


def series_thumbnail(
    archive: Archive, principal: Principal, study_uid: str, series_uid: str
) -> Thumbnail:
    """The thumbnail of one series; NotFound when the caller may not see it."""
    principal.require_read(study_uid)
    with archive.db.read() as conn:
        found = index.series_in_study(conn, study_uid, series_uid)
        if found is None:
            raise NotFound(f"series {series_uid} not found")
        version = f"{found.number_of_instances}-{index.last_instance_pk(conn, found.pk)}"
    folder = _folder(archive, series_uid)
    cached = folder / f"{version}.jpg"
    etag = f'"{folder.name[:16]}-{version}"'
    try:
        data = cached.read_bytes()
    except FileNotFoundError:
        data = _render(archive, principal, study_uid, found)
        _keep(folder, cached, data)
    if data == _NONE:
        return Thumbnail(PLACEHOLDER, SVG, etag)
    return Thumbnail(data, JPEG, etag)


def _representative(archive: Archive, found: SeriesRow) -> InstanceRef | None:
    """The middle image of the series."""
    with archive.db.read() as conn:
        refs = index.instances_of_series(conn, found.pk, limit=10_000)
    images = [r for r in refs if r.has_pixels] or refs
    if not images:
        return None
    return images[len(images) // 2]


def _render(archive: Archive, principal: Principal, study_uid: str, found: SeriesRow) -> bytes:
    ref = _representative(archive, found)
    if ref is None:
        return _NONE
    try:
        stored = retrieve.find_instances(
            archive, principal, study_uid, found.series_instance_uid, ref.sop_instance_uid
        )[0]
        return pixels.rendered(archive, stored, pixels.representative_frame(stored), OPTIONS)
    except LightboxError as exc:  # no pixel data, no codec installed
        log.info("no thumbnail for series %s: %s", found.series_instance_uid, exc.message)
    except Exception:  # a damaged image must not break the study page
        log.exception("thumbnail of series %s failed", found.series_instance_uid)
    return _NONE


def _keep(folder: Path, cached: Path, data: bytes) -> None:
    """Write the new version and drop older ones (a cache: no fsync needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, cached)
    for old in folder.glob("*.jpg"):
        if old != cached:
            old.unlink(missing_ok=True)


def forget(archive: Archive, series_uids: Iterable[str]) -> None:
    """Remove the cached thumbnails of these series (after they were deleted)."""
    for uid in series_uids:
        shutil.rmtree(_folder(archive, uid), ignore_errors=True)
