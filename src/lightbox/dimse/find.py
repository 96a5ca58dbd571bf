"""C-FIND SCP: the identifier becomes the shared Query and runs through the same
search service as QIDO-RS; each match goes back as a Pending response."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from pydicom.dataset import Dataset
from pynetdicom.events import Event

from lightbox.archive import Archive
from lightbox.dimse import matches, query
from lightbox.dimse.access import Peer, Service, principal_for
from lightbox.dimse.session import Session
from lightbox.dimse.status import Find, find_failure, status_dataset
from lightbox.errors import LightboxError
from lightbox.services import search
from lightbox.services.audit import Event as AuditEvent
from lightbox.services.auth import Principal

log = logging.getLogger("lightbox.dimse")

FindYield = tuple[int | Dataset, Dataset | None]


def find(archive: Archive, peer: Peer, session: Session, event: Event) -> Iterator[FindYield]:
    """The EVT_C_FIND handler: Pending matches, then pynetdicom adds the final Success.

    Results are fetched a page at a time (memory stays flat), up to
    ``dicom_find_max_results``; a C-CANCEL stops between matches.
    """
    session.note("C-FIND")
    if not peer.may(Service.FIND):
        yield status_dataset(Find.NOT_AUTHORIZED, "not a known node"), None
        return
    try:
        identifier = query.received_identifier(event)
        request = query.find_request(identifier, str(event.context.abstract_syntax))
    except LightboxError as exc:
        yield status_dataset(find_failure(exc), exc.message), None
        return
    archive.audit.record(AuditEvent(
        "query", f"dicom:{peer.ae_title}", source=peer.address,
        detail={"service": "C-FIND", "identifier": _keys(identifier)},
    ))
    if request.unmatched:
        log.info("C-FIND from %s: keys not supported for matching: %s", peer,
                 ", ".join(request.unmatched))
    yield from _matches(archive, peer, session, event, request)


def _keys(identifier: Dataset) -> str:
    """The identifier's non-empty keys, for the audit trail."""
    try:
        return "&".join(f"{e.keyword or e.tag}={e.value}" for e in identifier
                        if e.value not in (None, "") and e.VR != "SQ")[:500]
    except Exception:
        return "(unreadable)"


def _matches(
    archive: Archive, peer: Peer, session: Session, event: Event, request: query.FindRequest
) -> Iterator[FindYield]:
    settings = archive.settings
    principal = principal_for(archive, peer)
    page = max(1, settings.qido_max_results)
    pending = Find.PENDING_WARNING if request.unmatched else Find.PENDING
    explicit = matches.EXPLICIT_SYNTAXES.get(str(event.context.transfer_syntax))
    sent = 0
    while sent < settings.dicom_find_max_results:
        request.query.limit = min(page, settings.dicom_find_max_results - sent)
        request.query.offset = sent
        try:
            items = search.search(archive, principal, request.query).items
            responses = [query.response(i, request, settings.aet, explicit) for i in items]
        except LightboxError as exc:
            yield status_dataset(find_failure(exc), exc.message), None
            return
        except Exception:
            log.exception("C-FIND from %s failed", peer)
            yield status_dataset(Find.UNABLE_TO_PROCESS, "internal error while searching"), None
            return
        for ds in responses:
            if event.is_cancelled:
                yield Find.CANCEL, None
                return
            yield pending, ds
        sent += len(responses)
        session.note("C-FIND matches", len(responses))
        if len(responses) < request.query.limit:
            return
    if _more_than(archive, principal, request, sent):
        # Success would say every match was sent (PS3.4 C.4.1.3.1.1): refuse the rest.
        log.warning("C-FIND from %s stopped at %d matches (dicom_find_max_results)", peer, sent)
        yield status_dataset(Find.OUT_OF_RESOURCES,
                             f"more than {sent} matches: narrow the query"), None


def _more_than(archive: Archive, principal: Principal, request: query.FindRequest,
               sent: int) -> bool:
    request.query.limit, request.query.offset = 1, sent
    return bool(search.search(archive, principal, request.query).items)
