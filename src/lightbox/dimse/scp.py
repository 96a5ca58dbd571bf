"""The DICOM SCP: one pynetdicom AE serving the archive on ``dicom_port``.

Every association is admitted (or rejected) by the access policy when it is
requested, logged when it ends, and served by handlers that never let an
exception escape: pynetdicom would turn it into a generic failure, and a bug
in one request must not end the association or the server.

``lightbox serve`` with several workers runs one SCP in each of several
processes, all accepting associations from one listening socket (whichever is
free takes the next one, see ``serve_process``): one Python process runs one
thread at a time, and receiving, parsing and indexing instances is CPU work,
so parallel associations need more than one process to use more than one
core. Each process opens the archive itself; their index writes queue on the
database's write lock.
"""

from __future__ import annotations

import functools
import logging
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from lightbox import logs
from lightbox.archive import Archive
from lightbox.child import start_child
from lightbox.dimse import commitment, contexts, find, retrieve, store, tls, transport
from lightbox.dimse.access import Peer, Service, accept_unknown, admit, principal_for
from lightbox.dimse.session import Session
from lightbox.dimse.status import General, Store, status_dataset
from lightbox.dimse.transport import MIN_PDU_LIMIT, AssociationServer
from lightbox.services.ingest import Status as IngestStatus
from lightbox.settings import Settings

log = logging.getLogger("lightbox.dimse")

# A-ASSOCIATE-RJ fields (PS3.8 9.3.4).
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNIZED = 0x03
NO_REASON = 0x01

# Abstract syntaxes an unknown caller is offered: verification and storage.
# (access.UNKNOWN_CALLER_SERVICES: C-ECHO and C-STORE).
_UNKNOWN_CALLER_SYNTAXES = frozenset({contexts.VERIFICATION, *contexts.STORAGE_SOP_CLASSES})


class DicomServer:
    """The SCP for one archive. ``start`` binds and serves in a background thread."""

    def __init__(self, archive: Archive, *, host: str | None = None,
                 port: int | None = None,
                 listener: socket.socket | None = None, loads: Any = None,
                 slot: int = 0) -> None:
        self.archive = archive
        self.host = host or archive.settings.host
        self.port = archive.settings.dicom_port if port is None else port
        self.listener = listener  # a listening socket shared with other processes
        # Connections each process serves (a shared Array), and this one's index.
        self.loads = loads
        self.slot = slot
        self._ae: AE | None = None
        self._server: AssociationServer | None = None
        self._sessions: weakref.WeakKeyDictionary[Association, Session] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def start(self) -> None:
        settings = self.archive.settings
        accept_unknown(settings.dicom_accept_unknown)  # a typo fails here, not per caller
        tls_context = tls.server_context(settings)
        ae = contexts.make_ae(settings)
        ae.maximum_pdu_size = settings.dicom_max_pdu
        ae.maximum_associations = settings.dicom_max_associations
        # Given to the server, not to ae.supported_contexts, whose setter drops the roles.
        server = ae.make_server(
            (self.host, self.port), contexts=contexts.scp_contexts(),
            evt_handlers=self._handlers(),
            server_class=(AssociationServer if self.listener is None
                          else transport.adopting(self.listener)),
        )
        assert isinstance(server, AssociationServer)
        server.tls_context = tls_context
        server.sink = functools.partial(store.open_staged, self.archive)
        server.store_handler = self._on_store
        server.handshake_timeout = float(settings.dicom_acse_timeout)
        server.socket_timeout = float(settings.dicom_network_timeout) or None
        if settings.dicom_max_pdu > 0:
            server.pdu_limit = max(settings.dicom_max_pdu, MIN_PDU_LIMIT)
        else:
            server.pdu_limit = 2**32
        server.loads, server.slot = self.loads, self.slot
        # pynetdicom's shutdown() removes the server from this list.
        ae._servers.append(server)
        self.port = int(server.server_address[1])
        threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True).start()
        self._ae, self._server = ae, server
        log.info("DICOM SCP %s listening on %s:%d (%s)", settings.aet, self.host, self.port,
                 tls.describe(settings))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, then abort the associations still open (waiting at most
        ``timeout`` seconds for them: a stuck peer must not hold the process)."""
        ae, server = self._ae, self._server
        self._ae = self._server = None
        if ae is None or server is None:
            return
        server.shutdown()
        aborting = [threading.Thread(target=a.abort, daemon=True) for a in ae.active_associations]
        for thread in aborting:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in aborting:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, lambda e: self._on_end(e, "released")),
            (evt.EVT_ABORTED, lambda e: self._on_end(e, "aborted")),
            (evt.EVT_CONN_CLOSE, lambda e: self._on_end(e, "closed")),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._served(find.find)),
            (evt.EVT_C_MOVE, self._served(retrieve.move)),
            (evt.EVT_C_GET, self._served(retrieve.get)),
            (evt.EVT_N_ACTION, self._on_action),
        ]

    # ------------------------------------------------------------------ association

    def _on_requested(self, event: Event) -> None:
        assoc: Association = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title if primitive else "").strip()
        address, port = str(assoc.requestor.address), int(assoc.requestor.port or 0)
        try:
            peer = admit(self.archive, calling, address, port)
        except Exception:
            log.exception("dicom association from %s@%s: cannot check the caller", calling,
                          address)
            assoc.acse.send_reject(REJECTED_TRANSIENT, SOURCE_SERVICE_USER, NO_REASON)
            assoc.kill()
            return
        if peer is None:
            log.warning("dicom association from %s@%s:%d rejected: calling AE title and "
                        "address are not a known node", calling, address, port)
            assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER,
                                   CALLING_AE_NOT_RECOGNIZED)
            assoc.kill()
            return
        if not peer.known:
            # Offer unknown callers nothing else: other SOP classes are refused at
            # negotiation, so a query from them never reaches a handler.
            assoc.acceptor.supported_contexts = [
                cx for cx in assoc.acceptor.supported_contexts
                if cx.abstract_syntax in _UNKNOWN_CALLER_SYNTAXES
            ]
        with self._lock:
            self._sessions[assoc] = Session(peer)

    def _session(self, assoc: Association) -> Session:
        with self._lock:
            found = self._sessions.get(assoc)
        if found is None:  # cannot happen: every accepted association was requested
            raise RuntimeError("association without a session")
        return found

    def _on_established(self, event: Event) -> None:
        with self._lock:
            session = self._sessions.get(event.assoc)
        if session is not None:
            session.accepted(len(event.assoc.accepted_contexts))

    def _on_end(self, event: Event, how: str) -> None:
        if how == "closed" and event.assoc.is_released:
            how = "released"  # the peer closed after our release answer, before its event
        if how != "released":
            transport.discard_received_files(event.assoc)
        with self._lock:
            session = self._sessions.pop(event.assoc, None)
        if session is not None:
            session.end(how)

    # ------------------------------------------------------------------ services

    def _on_echo(self, event: Event) -> int:
        try:
            self._session(event.assoc).note("C-ECHO")
        except RuntimeError:
            return General.PROCESSING_FAILURE
        return General.SUCCESS

    def _on_store(self, event: Event) -> Dataset:
        try:
            session = self._session(event.assoc)
            peer = session.peer
            if not peer.may(Service.STORE):
                return status_dataset(Store.NOT_AUTHORIZED, "not a known node")
            # A node acting as a member stores under that member's rules.
            acting = principal_for(self.archive, peer) if (
                peer.node is not None and peer.node.acts_as) else None
            status, outcome = store.receive(
                self.archive, event, calling_ae=peer.ae_title, source=f"C-STORE from {peer}",
                principal=acting,
            )
            session.note(f"C-STORE {outcome.status.value}" if outcome else "C-STORE failed")
            if outcome is not None and outcome.status is IngestStatus.STORED:
                self.archive.audit.count("upload", f"dicom:{peer.ae_title}",
                                         outcome.study_instance_uid, source=peer.address)
            return status
        except Exception:
            log.exception("C-STORE handler failed")
            return status_dataset(Store.PROCESSING_FAILURE, "internal error")

    def _on_action(self, event: Event) -> tuple[Dataset, Dataset | None]:
        try:
            session = self._session(event.assoc)
            return commitment.request(self.archive, session.peer, session, event)
        except Exception:
            log.exception("N-ACTION handler failed")
            return status_dataset(General.PROCESSING_FAILURE, "internal error"), None

    def _served(
        self, handler: Callable[[Archive, Peer, Session, Event], Iterator[Any]]
    ) -> Callable[[Event], Iterator[Any]]:
        """A generator handler bound to this archive and the association's session."""

        def bound(event: Event) -> Iterator[Any]:
            session = self._session(event.assoc)
            return handler(self.archive, session.peer, session, event)

        return bound


def serve_process(settings: Settings, listener: socket.socket, loads: Any, slot: int,
                  parent: int | None = None) -> None:
    """One of the processes serving a shared listening socket (non-blocking:
    every process polls it and tries to accept; the one that gets the connection
    serves it, the others find nothing and poll again), until SIGTERM or until
    the process that started it dies. ``loads`` is a shared array of the
    associations each process serves; ``slot`` is this one's index in it."""
    start_child(f"lightbox-dicom{slot + 1}", parent)
    logs.configure(settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    archive = Archive.open(settings, migrate=False)
    host, port = listener.getsockname()[:2]
    server = DicomServer(archive, host=host, port=port, listener=listener, loads=loads,
                         slot=slot)
    try:
        server.start()
        stop.wait()
    finally:
        server.stop()
        archive.close()
