"""C-MOVE and C-GET SCP: resolve the identifier to stored instances, then send them
with C-STORE sub-operations (to a known destination, or back over the association).

pynetdicom drives the sub-operations and keeps the pending and final counts;
the handlers here yield what it asks for, in its order: for C-MOVE the
destination, then the number of sub-operations, then one dataset per
sub-operation; for C-GET the number, then the datasets.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context

from lightbox.archive import Archive
from lightbox.dicom.attributes import QueryLevel
from lightbox.dicom.query import Query
from lightbox.dicom.transcode import to_explicit_little_endian
from lightbox.dimse import contexts, outgoing, query, reactor, responses, tls
from lightbox.dimse.access import Peer, Service, principal_for
from lightbox.dimse.session import Session
from lightbox.dimse.status import Retrieve, retrieve_failure, status_dataset
from lightbox.errors import Forbidden, LightboxError, NotFound
from lightbox.index.instances import StoredInstance
from lightbox.services import nodes, retrieve, search
from lightbox.services.audit import Event as AuditEvent
from lightbox.services.auth import Principal

log = logging.getLogger("lightbox.dimse")

MAX_SUBOPERATIONS = 65535  # Number of ... Sub-operations are US


def instances_for(
    archive: Archive, principal: Principal, request: query.RetrieveRequest
) -> list[StoredInstance]:
    """The stored instances a retrieve identifier names (none found is not an error).

    Studies the caller may see but not download are left out; when that leaves
    nothing, the request is refused (Forbidden, 0x0124) rather than "done"."""
    studies = list(request.studies)
    if request.level is QueryLevel.PATIENT:
        studies = _studies_of_patient(archive, principal, request.patient_id or "")
    found: list[StoredInstance] = []
    refused: Forbidden | None = None
    for study in studies:
        for series in request.series or (None,):
            try:
                matched = retrieve.download_instances(archive, principal, study, series)
            except NotFound:
                continue
            except Forbidden as exc:
                refused = exc
                continue
            if request.instances:
                wanted = set(request.instances)
                matched = [i for i in matched if i.sop_instance_uid in wanted]
            found.extend(matched)
            if len(found) > MAX_SUBOPERATIONS:
                return found
    if not found and refused is not None:
        raise refused
    return found


def _studies_of_patient(archive: Archive, principal: Principal, patient_id: str) -> list[str]:
    studies: list[str] = []
    page = max(1, archive.settings.qido_max_results)
    while True:
        q = Query(level=QueryLevel.STUDY, limit=page, offset=len(studies))
        q.add("PatientID", patient_id)
        items = search.search(archive, principal, q).items
        studies += [str(i["0020000D"]["Value"][0]) for i in items if i.get("0020000D", {}).get(
            "Value")]
        if len(items) < page:
            return studies


Accepted = Mapping[str, AbstractSet[str]]
"""The transfer syntaxes a peer accepted for each SOP Class (``accepted``)."""


def accepted(contexts: Iterable[PresentationContext]) -> Accepted:
    """What an association's accepted presentation contexts accept."""
    table: dict[str, set[str]] = {}
    for cx in contexts:
        if cx.transfer_syntax:
            table.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    return table


def dataset_to_send(archive: Archive, instance: StoredInstance, table: Accepted) -> Dataset:
    """The stored instance as a Dataset the peer accepted a context for
    (``table``: what it accepted for each SOP Class).

    As stored when its transfer syntax was accepted, sent from its file
    (``outgoing.StoredFile``); decompressed to Explicit VR Little Endian when
    only a native syntax was (pynetdicom converts between the native ones
    itself). An object that cannot be read becomes a stub without File Meta:
    its sub-operation then fails and is counted, with its SOP Instance UID in
    the Failed SOP Instance UID List.
    """
    syntaxes = table.get(instance.sop_class_uid, frozenset())
    stored = instance.transfer_syntax_uid
    if stored in syntaxes:
        return outgoing.StoredFile(archive.blobs.path(instance.blob_key), instance.sop_class_uid,
                                   instance.sop_instance_uid,
                                   lambda: _read(archive, instance, convert=False))
    convert = stored not in contexts.NATIVE_SYNTAXES and any(
        s in contexts.NATIVE_SYNTAXES for s in syntaxes
    )
    return _read(archive, instance, convert=convert)


def _read(archive: Archive, instance: StoredInstance, *, convert: bool) -> Dataset:
    try:
        with archive.blobs.open(instance.blob_key) as fp:
            if convert:
                return dcmread(BytesIO(to_explicit_little_endian(fp)))
            return dcmread(fp)
    except (OSError, LightboxError, ValueError) as exc:
        log.warning("cannot send %s: %s", instance.sop_instance_uid, exc)
        stub = Dataset()
        stub.SOPClassUID = instance.sop_class_uid
        stub.SOPInstanceUID = instance.sop_instance_uid
        return stub


def _resolve(
    archive: Archive, peer: Peer, event: Event
) -> tuple[list[StoredInstance], Dataset | None]:
    """The instances to send, or a failure status to answer with instead."""
    try:
        identifier = query.received_identifier(event)
        request = query.retrieve_request(identifier, str(event.context.abstract_syntax))
        found = instances_for(archive, principal_for(archive, peer), request)
    except LightboxError as exc:
        return [], status_dataset(retrieve_failure(exc), exc.message)
    except Exception:
        log.exception("retrieve request from %s failed", peer)
        return [], status_dataset(Retrieve.UNABLE_TO_PROCESS, "internal error")
    if len(found) > MAX_SUBOPERATIONS:
        return [], status_dataset(Retrieve.OUT_OF_RESOURCES_MATCHES,
                                  f"more than {MAX_SUBOPERATIONS} instances")
    return found, None


class _SubAssociation:
    """Captures the association pynetdicom opens to the move destination, to see
    which presentation contexts it accepted, and names the C-MOVE's requester as
    the Move Originator of each C-STORE on it (PS3.7 9.3.1.1: the AE that
    invoked the C-MOVE; pynetdicom would send our own AE title)."""

    def __init__(self, originator: str) -> None:
        self.accepted: list[PresentationContext] = []
        self.originator = originator

    def established(self, event: Event) -> None:
        assoc: Association = event.assoc
        self.accepted = list(assoc.accepted_contexts)
        reactor.guard_reactor(assoc)
        responses.quick_send(assoc)
        send = assoc.send_c_store

        def send_c_store(dataset: str | Path | Dataset, msg_id: int = 1, priority: int = 2,
                         originator_aet: str | None = None,
                         originator_id: int | None = None) -> Dataset:
            return send(dataset, msg_id, priority, self.originator, originator_id)

        assoc.send_c_store = send_c_store  # type: ignore[method-assign]


def move(archive: Archive, peer: Peer, session: Session, event: Event) -> Iterator[Any]:
    """The EVT_C_MOVE handler. An unknown destination is refused (Move Destination
    Unknown) without any connection attempt."""
    session.note("C-MOVE")
    destination = str(event.move_destination or "").strip()
    node = _destination(archive, destination) if peer.may(Service.MOVE) else None
    if node is None:
        why = "not a known node" if peer.may(Service.MOVE) else f"caller {peer} may not move"
        log.warning("C-MOVE from %s to %r refused: %s", peer, destination, why)
        yield None, None  # pynetdicom answers 0xA801 Move Destination Unknown
        return
    found, failure = _resolve(archive, peer, event)
    link = _SubAssociation(peer.ae_title)
    proposals = contexts.storage_proposals(
        (i.sop_class_uid, i.transfer_syntax_uid) for i in found
    ) or [build_context(contexts.VERIFICATION)]
    options: dict[str, Any] = {
        "ae_title": node.ae_title,
        "contexts": proposals,
        "evt_handlers": [(evt.EVT_ESTABLISHED, link.established)],
    }
    if node.tls:
        options["tls_args"] = (tls.client_context(archive.settings), node.host)
    yield node.host, node.port, options
    if failure is not None:
        # pynetdicom wants at least one sub-operation before it relays a failure.
        yield 1
        yield failure, None
        return
    log.info("C-MOVE from %s: %d instances to %s", peer, len(found), node)
    session.note("C-MOVE instances", len(found))
    _audit(archive, "export", peer, found, {"destination": node.ae_title})
    yield len(found)
    yield from _send_all(archive, event, found, lambda: accepted(link.accepted))


def get(archive: Archive, peer: Peer, session: Session, event: Event) -> Iterator[Any]:
    """The EVT_C_GET handler: C-STOREs back over the requesting association."""
    session.note("C-GET")
    if not peer.may(Service.GET):
        yield 1
        yield status_dataset(Retrieve.NOT_AUTHORIZED, "not a known node"), None
        return
    found, failure = _resolve(archive, peer, event)
    if failure is not None:
        yield 1
        yield failure, None
        return
    session.note("C-GET instances", len(found))
    _audit(archive, "retrieve", peer, found, {"service": "C-GET"})
    yield len(found)
    assoc: Association = event.assoc
    yield from _send_all(archive, event, found, lambda: accepted(assoc.accepted_contexts))


def _audit(archive: Archive, action: str, peer: Peer, found: list[StoredInstance],
           detail: dict[str, Any]) -> None:
    per_study = Counter(i.study_instance_uid for i in found)
    for study, n in per_study.items():
        archive.audit.record(AuditEvent(action, f"dicom:{peer.ae_title}", study_uid=study,
                                        source=peer.address,
                                        detail={**detail, "instances": n}))


def _send_all(
    archive: Archive,
    event: Event,
    found: list[StoredInstance],
    peer_accepts: Callable[[], Accepted],
) -> Iterator[Any]:
    """The C-STOREs of a C-GET or C-MOVE. ``peer_accepts`` is asked once, as
    the first is sent: a C-MOVE's association to its destination is open by
    then."""
    table: Accepted | None = None
    for instance in found:
        if event.is_cancelled:
            # pynetdicom lists the sub-operations that failed; the ones not
            # started are counted as remaining (PS3.4 C.4.2.3.1), not failed.
            yield Retrieve.CANCEL, None
            return
        if table is None:
            table = peer_accepts()
        yield Retrieve.PENDING, dataset_to_send(archive, instance, table)


def _destination(archive: Archive, ae_title: str) -> nodes.Node | None:
    if not ae_title:
        return None
    found = nodes.nodes_with_ae_title(archive, ae_title)
    if len(found) > 1:
        log.warning("AE title %s names %d nodes; moving to %s", ae_title, len(found),
                    found[0].name)
    return found[0] if found else None
