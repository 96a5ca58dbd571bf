"""Storage commitment: which of a list of SOP instances the archive holds safely.

An instance is committed when the index has it with the same SOP Class and
its file is there, of the size indexed. Ingest acknowledges nothing before
the blob and its index row are durable; the file is looked at too, so that
a file lost since (a disk replaced, a hand in the data folder) is reported
as a failure and the sender keeps its copy.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from lightbox.archive import Archive
from lightbox.dicom import uids
from lightbox.dicom.attributes import QueryLevel
from lightbox.dicom.query import Query
from lightbox.services import integrity, search
from lightbox.services.auth import Principal

log = logging.getLogger(__name__)

_SOP_CLASS = "00080016"
_SOP_INSTANCE = "00080018"
_CHUNK = 500


class Problem(enum.Enum):
    NOT_STORED = "no such instance"
    CLASS_MISMATCH = "stored with another SOP Class"
    INVALID = "not a valid reference"
    DAMAGED = "stored, but its file is missing or damaged"


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Commitment:
    """The answer to one commitment request (one Transaction UID)."""

    transaction_uid: str
    committed: list[Reference]
    failed: list[tuple[Reference, Problem]]


def commit(
    archive: Archive, principal: Principal, transaction_uid: str, references: Sequence[Reference]
) -> Commitment:
    """Check each reference against the index, in the caller's scope."""
    valid = [r for r in references
             if uids.is_valid_uid(r.sop_instance_uid) and uids.is_valid_uid(r.sop_class_uid)]
    held = _stored_classes(archive, principal, [r.sop_instance_uid for r in valid])
    lost = {d.sop_instance_uid for d in integrity.damaged(archive, list(held))}
    for uid in sorted(lost):
        log.error("storage commitment: instance %s is indexed but its file is missing or "
                  "damaged (run 'lightbox check')", uid)
    committed: list[Reference] = []
    failed: list[tuple[Reference, Problem]] = []
    for ref in references:
        stored = held.get(ref.sop_instance_uid)
        if ref not in valid:
            failed.append((ref, Problem.INVALID))
        elif stored is None:
            failed.append((ref, Problem.NOT_STORED))
        elif stored != ref.sop_class_uid:
            failed.append((ref, Problem.CLASS_MISMATCH))
        elif ref.sop_instance_uid in lost:
            failed.append((ref, Problem.DAMAGED))
        else:
            committed.append(ref)
    return Commitment(transaction_uid, committed, failed)


def _stored_classes(archive: Archive, principal: Principal, sop_uids: list[str]) -> dict[str, str]:
    """SOP Class UID by SOP Instance UID of those of ``sop_uids`` the index holds."""
    held: dict[str, str] = {}
    chunk = max(1, min(_CHUNK, archive.settings.qido_max_results))
    unique = list(dict.fromkeys(sop_uids))
    for start in range(0, len(unique), chunk):
        part = unique[start:start + chunk]
        query = Query(level=QueryLevel.INSTANCE, limit=len(part))
        query.add("SOPInstanceUID", "\\".join(part))
        for item in search.search(archive, principal, query).items:
            sop = item.get(_SOP_INSTANCE, {}).get("Value", [None])[0]
            sop_class = item.get(_SOP_CLASS, {}).get("Value", [None])[0]
            if sop and sop_class:
                held[str(sop)] = str(sop_class)
    return held
