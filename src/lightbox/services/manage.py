"""Deleting studies, series and instances (administrators only)."""

from __future__ import annotations

import logging

from lightbox.archive import Archive
from lightbox.index import instances as index
from lightbox.services.audit import Caller, Event
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
    caller: Caller | None = None,
) -> int:
    """Remove the rows in scope, then their blobs; return how many instances went.

    The deletion is in the audit trail before this returns.
    """
    principal.require_admin()
    principal.require_read(study)
    # Pending events about the study get its Patient ID while it still exists.
    archive.audit.flush()
    patient = archive.audit.patient_of(study)
    with archive.db.write() as conn:
        keys = index.remove(conn, study, series, sop)
    caller = caller or Caller()
    archive.audit.record(
        Event("delete", principal.user, study_uid=study, series_uid=series, patient_id=patient,
              source=caller.source, user_agent=caller.user_agent,
              detail={"instances": len(keys), **({"sop": sop} if sop else {})}),
        now=True,
    )
    cache.clear()
    for key in keys:
        archive.blobs.delete(key)
    log.info("deleted %d instance(s) of study %s by %s", len(keys), study, principal.user)
    return len(keys)
