"""Lightbox as SCU: verify, query, retrieve from and send to known nodes.

Instances received by C-GET go through the same receive function as the
SCP's C-STORE, and so through the one ingest path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context, build_role

from lightbox.archive import Archive
from lightbox.dicom.attributes import QueryLevel
from lightbox.dicom.node import require_ae_title, require_host, require_port
from lightbox.dimse import contexts, query, reactor, responses, store, tls, transport
from lightbox.dimse.access import operator_principal
from lightbox.dimse.retrieve import Accepted, accepted, dataset_to_send
from lightbox.dimse.status import General, Retrieve
from lightbox.errors import BadRequest, LightboxError, NotFound, Unavailable
from lightbox.index.instances import StoredInstance
from lightbox.services import nodes, retrieve
from lightbox.services.nodes import Node

log = logging.getLogger("lightbox.dimse")

_AD_HOC = re.compile(r"(?P<aet>[^@]*)@(?P<host>[^:@]+|\[[0-9a-fA-F:]+\]):(?P<port>\d+)")
_PENDING = {0xFF00, 0xFF01}


class DimseFailure(LightboxError):
    """A peer answered with a failure status, or could not be reached."""


def resolve_node(archive: Archive, text: str) -> Node:
    """A node by name, or an ad-hoc ``AET@host:port`` (plain TCP)."""
    try:
        return nodes.get_node(archive, text)
    except NotFound:
        found = _AD_HOC.fullmatch(text)
        if found is None:
            raise
        host = found["host"].strip("[]")
        try:
            fields = (require_ae_title(found["aet"]), require_host(host),
                      require_port(int(found["port"])))
        except BadRequest as exc:
            raise BadRequest(f"{text}: {exc.message}") from exc
        return Node(text, *fields)  # named as given: a registered name has no '@'


def new_ae(archive: Archive) -> AE:
    """An AE titled like our SCP, with the configured timeouts."""
    return contexts.make_ae(archive.settings)


@contextmanager
def association(
    archive: Archive,
    node: Node,
    proposed: Sequence[PresentationContext],
    *,
    ext_neg: list[Any] | None = None,
    evt_handlers: list[Any] | None = None,
) -> Iterator[Association]:
    """An established association with ``node`` (TLS when the node says so), released after."""
    ae = new_ae(archive)
    tls_args = (tls.client_context(archive.settings), node.host) if node.tls else None
    assoc = ae.associate(
        node.host, node.port, contexts=list(proposed), ae_title=node.ae_title,
        max_pdu=archive.settings.dicom_max_pdu, ext_neg=ext_neg, tls_args=tls_args,
        evt_handlers=evt_handlers,
    )
    if not assoc.is_established:
        where = node.name if "@" in node.name else (
            f"node {node.name} ({node.ae_title}@{node.host}:{node.port})")
        how = "rejected the association" if assoc.is_rejected else (
            "could not be associated (no connection, or no answer in time)")
        raise DimseFailure(f"{where} {how}")
    if assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
        transport.no_delay(assoc.dul.socket.socket)
    reactor.guard_reactor(assoc)
    responses.quick_send(assoc)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _code(status: Dataset) -> int:
    if "Status" not in status:
        raise DimseFailure("the peer did not answer (timeout or aborted association)")
    return int(status.Status)


def _failure(what: str, status: Dataset) -> DimseFailure:
    comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
    return DimseFailure(f"{what} failed with status 0x{int(status.Status):04X}{comment}")


def echo(archive: Archive, node: Node) -> int:
    """C-ECHO; the status the node answered (0 is Success)."""
    with association(archive, node, [build_context(contexts.VERIFICATION)]) as assoc:
        return _code(assoc.send_c_echo())


def find(archive: Archive, node: Node, level: QueryLevel,
         keys: Sequence[tuple[int, str]]) -> list[Dataset]:
    """C-FIND at ``level`` (Study Root; Patient Root for PATIENT); the matches."""
    model = contexts.PATIENT_ROOT_FIND if level is QueryLevel.PATIENT else (
        contexts.STUDY_ROOT_FIND
    )
    identifier = query.identifier(level, keys)
    matches: list[Dataset] = []
    with association(archive, node, [build_context(model)]) as assoc:
        for status, found in assoc.send_c_find(identifier, model):
            code = _code(status)
            if code in _PENDING and found is not None:
                matches.append(found)
            elif code != General.SUCCESS:
                raise _failure("C-FIND", status)
    return matches


@dataclass
class RetrieveResult:
    """Final counts of a C-MOVE, C-GET or send."""

    status: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_instances: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"completed {self.completed}, failed {self.failed}, warning {self.warning} "
                f"(status 0x{self.status:04X})")


def _final(result: RetrieveResult, status: Dataset, found: Dataset | None) -> None:
    result.status = _code(status)
    result.completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
    result.failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
    result.warning = int(status.get("NumberOfWarningSuboperations", 0) or 0)
    if found is not None and "FailedSOPInstanceUIDList" in found:
        value = found.FailedSOPInstanceUIDList
        result.failed_instances = [str(v) for v in (value if isinstance(value, list) else
                                                    [value]) if v]


def _study_identifier(study_uid: str) -> Dataset:
    return query.identifier(QueryLevel.STUDY, [(0x0020000D, study_uid)])


def move(archive: Archive, node: Node, study_uid: str, destination: str) -> RetrieveResult:
    """C-MOVE a study from ``node`` to the AE ``destination`` (the node must know it)."""
    identifier = _study_identifier(study_uid)  # BadRequest before any association
    destination = require_ae_title(destination)
    result = RetrieveResult()
    model = contexts.STUDY_ROOT_MOVE
    with association(archive, node, [build_context(model)]) as assoc:
        for status, found in assoc.send_c_move(identifier, destination, model):
            if _code(status) in _PENDING:
                continue
            _final(result, status, found)
    if result.status not in (Retrieve.SUCCESS, Retrieve.WARNING_SUBOPERATIONS_FAILED):
        raise DimseFailure(f"C-MOVE failed: {result}")
    return result


def _classes_in_study(archive: Archive, node: Node, study_uid: str) -> list[str]:
    """The SOP Classes a study holds on ``node`` (to propose them for C-GET)."""
    keys = [(0x0020000D, study_uid), (0x00080016, "")]
    try:
        matches = find(archive, node, QueryLevel.INSTANCE, keys)
    except LightboxError as exc:
        log.info("cannot list SOP classes of %s on %s (%s); proposing common ones",
                 study_uid, node.name, exc.message)
        return []
    return [str(m.SOPClassUID) for m in matches if m.get("SOPClassUID")]


def get(archive: Archive, node: Node, study_uid: str) -> RetrieveResult:
    """C-GET a study from ``node``; received instances are stored as by our SCP."""
    identifier = _study_identifier(study_uid)  # BadRequest before any association
    model = contexts.STUDY_ROOT_GET
    classes = _classes_in_study(archive, node, study_uid) or list(
        contexts.COMMON_STORAGE_SOP_CLASSES)
    proposed = [build_context(model), *contexts.receiving_proposals(classes, reserved=1)]
    # One role selection item per SOP class (PS3.7 D.3.3.4), however many contexts.
    classes_proposed = dict.fromkeys(str(cx.abstract_syntax) for cx in proposed[1:])
    roles = [build_role(sop_class, scp_role=True) for sop_class in classes_proposed]
    source = f"C-GET from {node.name}"

    def on_store(event: Event) -> Dataset:
        status, _outcome = store.receive(archive, event, calling_ae=node.ae_title, source=source)
        return status

    result = RetrieveResult()
    handlers = [(evt.EVT_C_STORE, on_store)]
    with association(archive, node, proposed, ext_neg=roles, evt_handlers=handlers) as assoc:
        for status, found in assoc.send_c_get(identifier, model):
            if _code(status) in _PENDING:
                continue
            _final(result, status, found)
    if result.status not in (Retrieve.SUCCESS, Retrieve.WARNING_SUBOPERATIONS_FAILED):
        raise DimseFailure(f"C-GET failed: {result}")
    return result


def send(archive: Archive, node: Node, study_uid: str) -> RetrieveResult:
    """C-STORE every stored instance of a study to ``node``."""
    found = retrieve.find_instances(archive, operator_principal(), study_uid)
    proposed = contexts.storage_proposals((i.sop_class_uid, i.transfer_syntax_uid) for i in found)
    result = RetrieveResult()
    with association(archive, node, proposed) as assoc:
        syntaxes = accepted(assoc.accepted_contexts)
        for instance in found:
            code = _store_one(archive, assoc, instance, syntaxes)
            if code == General.SUCCESS:
                result.completed += 1
            elif 0xB000 <= code <= 0xBFFF:
                result.warning += 1
            else:
                result.failed += 1
                result.failed_instances.append(instance.sop_instance_uid)
    result.status = Retrieve.WARNING_SUBOPERATIONS_FAILED if (
        result.failed or result.warning) else Retrieve.SUCCESS
    return result


def _store_one(archive: Archive, assoc: Association, instance: StoredInstance,
               syntaxes: Accepted) -> int:
    try:
        # From the stored file as it is when its transfer syntax was accepted.
        status = assoc.send_c_store(dataset_to_send(archive, instance, syntaxes))
    except (ValueError, AttributeError, OSError) as exc:
        log.warning("cannot send %s to %s: %s", instance.sop_instance_uid, assoc.acceptor.ae_title,
                    exc)
        return Retrieve.UNABLE_TO_PROCESS
    if "Status" not in status:
        raise Unavailable("the peer stopped answering C-STORE requests")
    return int(status.Status)


def report_commitment(archive: Archive, node: Node, info: Dataset, event_type: int) -> int:
    """Deliver a Storage Commitment N-EVENT-REPORT on a new association, where
    Lightbox requests the association but keeps the SCP role of the SOP class."""
    proposed = [build_context(contexts.STORAGE_COMMITMENT)]
    roles = [build_role(contexts.STORAGE_COMMITMENT, scp_role=True)]
    with association(archive, node, proposed, ext_neg=roles) as assoc:
        status, _reply = assoc.send_n_event_report(
            info, event_type, contexts.STORAGE_COMMITMENT, contexts.STORAGE_COMMITMENT_INSTANCE
        )
        return _code(status)
