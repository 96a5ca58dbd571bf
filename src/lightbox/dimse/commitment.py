"""Storage Commitment Push Model SCP (PS3.4 Annex J).

The N-ACTION is answered at once; the result follows as an N-EVENT-REPORT:
on the same association when the requester keeps it open, otherwise on a new
association to the requester, which must then be a known node.
"""

from __future__ import annotations

import logging
import threading
import time

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_RELEASE

from lightbox.archive import Archive
from lightbox.dicom import uids
from lightbox.dimse import scu
from lightbox.dimse.access import Peer, Service, principal_for
from lightbox.dimse.contexts import STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
from lightbox.dimse.session import Session
from lightbox.dimse.status import Action, CommitmentFailure, EventType, status_dataset
from lightbox.errors import LightboxError
from lightbox.services import commitment
from lightbox.services.commitment import Commitment, Problem, Reference

log = logging.getLogger("lightbox.dimse")

REQUEST_STORAGE_COMMITMENT = 1  # Action Type ID (PS3.4 J.3.2.1)
MAX_REFERENCES = 65_535
RELEASE_GRACE_SECONDS = 0.2

FAILURE_REASONS = {
    Problem.NOT_STORED: CommitmentFailure.NO_SUCH_OBJECT_INSTANCE,
    Problem.CLASS_MISMATCH: CommitmentFailure.CLASS_INSTANCE_CONFLICT,
    Problem.INVALID: CommitmentFailure.PROCESSING_FAILURE,
    Problem.DAMAGED: CommitmentFailure.PROCESSING_FAILURE,
}


class _Invalid(Exception):
    def __init__(self, status: Action, message: str) -> None:
        super().__init__(message)
        self.status = status


def _references(event: Event) -> tuple[str, list[Reference]]:
    """The request's Transaction UID and references; _Invalid says what is wrong."""
    try:
        return _read_references(event.action_information)  # empty when none came
    except _Invalid:
        raise
    except Exception as exc:  # decoded on first access: bytes that are no dataset
        raise _Invalid(Action.INVALID_ARGUMENT_VALUE,
                       f"unreadable Action Information: {exc}") from exc


def _read_references(info: Dataset) -> tuple[str, list[Reference]]:
    transaction = str(info.get("TransactionUID", "") or "")
    if not transaction:
        raise _Invalid(Action.MISSING_ATTRIBUTE, "Transaction UID is missing")
    if not uids.is_valid_uid(transaction):
        raise _Invalid(Action.INVALID_ARGUMENT_VALUE, "Transaction UID is not a valid UID")
    items = info.get("ReferencedSOPSequence")
    if not items:
        raise _Invalid(Action.MISSING_ATTRIBUTE, "Referenced SOP Sequence is missing or empty")
    if len(items) > MAX_REFERENCES:
        raise _Invalid(Action.INVALID_ARGUMENT_VALUE, f"more than {MAX_REFERENCES} references")
    refs = [
        Reference(str(i.get("ReferencedSOPClassUID", "") or ""),
                  str(i.get("ReferencedSOPInstanceUID", "") or ""))
        for i in items
    ]
    return transaction, refs


def request(archive: Archive, peer: Peer, session: Session, event: Event) -> tuple[
    Dataset, Dataset | None
]:
    """The EVT_N_ACTION handler: check the request, answer, report in the background."""
    session.note("storage commitment")
    if not peer.may(Service.COMMIT):
        return status_dataset(Action.NOT_AUTHORIZED, "not a known node"), None
    if event.action_type != REQUEST_STORAGE_COMMITMENT:
        return status_dataset(Action.NO_SUCH_ACTION_TYPE, "unknown Action Type ID"), None
    try:
        transaction, refs = _references(event)
        result = commitment.commit(archive, principal_for(archive, peer), transaction, refs)
    except _Invalid as exc:
        return status_dataset(exc.status, str(exc)), None
    except LightboxError as exc:
        return status_dataset(Action.PROCESSING_FAILURE, exc.message), None
    except Exception:
        log.exception("storage commitment request from %s failed", peer)
        return status_dataset(Action.PROCESSING_FAILURE, "internal error"), None
    log.info("storage commitment %s from %s: %d committed, %d failed", transaction, peer,
             len(result.committed), len(result.failed))
    # pynetdicom pauses this association's reactor for the report, which therefore
    # goes out after the N-ACTION response this handler returns.
    threading.Thread(
        target=_deliver, args=(archive, peer, event.assoc, result),
        name="storage-commitment-report", daemon=True,
    ).start()
    return status_dataset(Action.SUCCESS), None


def event_report(result: Commitment) -> tuple[Dataset, EventType]:
    """The N-EVENT-REPORT Event Information and Event Type ID for a result."""
    info = Dataset()
    info.TransactionUID = result.transaction_uid
    if result.committed:
        info.ReferencedSOPSequence = [_item(ref) for ref in result.committed]
    if result.failed:
        failed = []
        for ref, problem in result.failed:
            item = _item(ref)
            item.FailureReason = int(FAILURE_REASONS[problem])
            failed.append(item)
        info.FailedSOPSequence = failed
    kind = EventType.FAILURES_EXIST if result.failed else EventType.ALL_COMMITTED
    return info, kind


def _item(ref: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    return item


def _deliver(archive: Archive, peer: Peer, assoc: Association, result: Commitment) -> None:
    info, kind = event_report(result)
    # A requester that does not wait for the report releases right after the
    # N-ACTION response; give its release request time to arrive, since a report
    # sent into a releasing association cannot be answered.
    time.sleep(RELEASE_GRACE_SECONDS)
    if assoc.is_established and not isinstance(assoc.dul.peek_next_pdu(), A_RELEASE):
        try:
            status, _reply = assoc.send_n_event_report(
                info, kind, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
            )
            if "Status" in status:
                log.info("storage commitment %s reported to %s: status 0x%04X",
                         result.transaction_uid, peer, int(status.Status))
                return
            log.info("storage commitment %s: no answer from %s on its association",
                     result.transaction_uid, peer)
        except (RuntimeError, ValueError) as exc:
            # Released in between: fall back to a new association below.
            log.info("storage commitment %s: %s", result.transaction_uid, exc)
    if peer.node is None:
        log.warning("storage commitment %s: %s released the association and is not a known "
                    "node; the result cannot be delivered", result.transaction_uid, peer)
        return
    try:
        code = scu.report_commitment(archive, peer.node, info, kind)
        log.info("storage commitment %s reported to %s: status 0x%04X",
                 result.transaction_uid, peer.node, code)
    except Exception as exc:
        log.warning("storage commitment %s: cannot report to %s: %s",
                    result.transaction_uid, peer.node, exc)
