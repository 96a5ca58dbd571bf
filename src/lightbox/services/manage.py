"""Deleting studies, series and instances (administrators only)."""

from __future__ import annotations

import logging

from lightbox.archive import Archive
from lightbox.index import instances as index
from lightbox.services.auth import Principal
from lightbox.services.retrieve import InstanceCache

log = logging.getLogger(__name__)


def delete(
    archive: Archive,
    cache: InstanceCache,
    principal: Principal,
    study: str,
    series: str | None = None,
    sop: str | None = None,
) -> int:
    """Remove the rows in scope, then their blobs; return how many instances went."""
    principal.require_admin()
    principal.require_read(study)
    with archive.db.write() as conn:
        keys = index.remove(conn, study, series, sop)
    cache.clear()
    for key in keys:
        archive.blobs.delete(key)
    log.info("deleted %d instance(s) of study %s by %s", len(keys), study, principal.user)
    return len(keys)
