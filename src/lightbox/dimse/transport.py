"""pynetdicom's association server, hardened against peers that stall or lie,
and without the polling that made it slow.

Four gaps are closed here, each with a pynetdicom extension point:

- pynetdicom does the TLS handshake in the thread that accepts connections,
  so one client that connects and never shakes hands would stall every later
  connection. The handshake moves to the connection's own thread, bounded.
- Accepted sockets have no timeout, so a peer that announces a PDU and stops
  sending holds its thread (and blocks shutdown) for ever. They get the
  network timeout.
- Nagle's algorithm would hold small responses back for ~40 ms; it is off.
- pynetdicom reads a whole PDU of whatever length the peer announces into
  memory. A PDU longer than we can have asked for closes the connection.

And the temporary files of datasets cut off mid-transfer are removed.

The association's two loops are replaced too (see ``reactor``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from typing import Any, cast

from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from lightbox.dimse import reactor, streaming

log = logging.getLogger("lightbox.dimse")

MIN_PDU_LIMIT = 1024 * 1024  # room for an A-ASSOCIATE-RQ with 128 contexts and more
# Seconds a shared listener waits per association it is ahead: longer than a less
# busy process may take to get round to accepting. Setting up an association
# holds a process's interpreter for some 20 ms, and a process receiving a
# dataset lets its accepting thread run only every few milliseconds: at 25 ms,
# four storescu started at once were split 3 + 1.
_BUSY_DEFERRAL = 0.1


class _BoundedRequestHandler(RequestHandler):
    server: AssociationServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        if sock is not None:
            setattr(sock, "recv", _bounded_recv(sock, self.server.pdu_limit))  # noqa: B010
        reactor.unpolled(assoc, self.server.pdu_limit)
        self.server._handover.assoc = assoc
        cast(reactor.UnpolledAssociation, assoc).ended = self.server.association_ended
        if self.server.sink is not None:
            streaming.install(assoc, self.server.sink, self.server.store_handler)
        return assoc


def _bounded_recv(sock: Any, limit: int) -> Any:
    """``AssociationSocket.recv`` that refuses oversized PDUs and reads with
    ``recv_into`` in large pieces (pynetdicom's reads 4 KiB at a time). Bytes
    the DUL read ahead (``reactor.UnpolledDUL.pushback``) come first."""

    def recv(nr_bytes: int) -> bytearray:
        # The DUL asks for a PDU's whole announced length in one call.
        if nr_bytes > limit:
            raise OSError(f"peer announced a PDU of {nr_bytes} bytes (limit {limit})")
        dul = sock.assoc.dul
        ahead = getattr(dul, "pushback", b"")[:nr_bytes]
        if ahead:
            dul.pushback = dul.pushback[len(ahead):]
            if len(ahead) == nr_bytes:
                return bytearray(ahead)
        raw = sock.socket
        buffer = bytearray(nr_bytes)
        buffer[:len(ahead)] = ahead
        got = len(ahead)
        with memoryview(buffer) as view:
            while got < nr_bytes:
                n = raw.recv_into(view[got:])
                if not n:  # closed: pynetdicom checks the length it got
                    break
                got += n
                reactor.quick_ack(raw)
        if got < nr_bytes:
            del buffer[got:]
        return buffer

    return recv


class AssociationServer(ThreadedAssociationServer):
    """The SCP's server: TLS per connection, timeouts on sockets, bounded PDUs."""

    daemon_threads = True
    tls_context: ssl.SSLContext | None = None
    handshake_timeout: float = 30.0
    socket_timeout: float | None = 120.0
    pdu_limit: int = MIN_PDU_LIMIT
    sink: streaming.Sink | None = None  # where C-STORE datasets go (None: pynetdicom's temp files)
    store_handler: streaming.Handler | None = None  # answers streamed C-STOREs where they arrive
    adopted: socket.socket | None = None  # a listening socket to serve instead of binding one
    # When processes share the listening socket: connections each one serves, by slot.
    loads: Any = None  # a multiprocessing Array of int
    slot: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["request_handler"] = _BoundedRequestHandler
        self.serving = 0  # connections accepted and not yet ended
        self._count_lock = threading.Lock()
        self._handover = threading.local()  # the association a connection became
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.adopted is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()
        self.socket = self.adopted
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.adopted is None:  # an adopted socket listens already
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        loads = self.loads
        if loads is not None:
            # Other processes poll the same socket: one busier than the least busy
            # waits a little before it tries, so that one takes the association.
            ahead = loads[self.slot] - min(loads)
            if ahead > 0:
                time.sleep(min(ahead, 8) * _BUSY_DEFERRAL)
        accepted = self.socket.accept()  # BlockingIOError if another process took it
        self._count(+1)
        return accepted

    def _count(self, change: int) -> None:
        with self._count_lock:
            self.serving += change
            if self.loads is not None:
                self.loads[self.slot] = self.serving

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        self._handover.assoc = None
        try:
            self._serve_connection(request, client_address)
        finally:
            if self._handover.assoc is None:  # refused before it became an association
                self.association_ended()

    def association_ended(self) -> None:
        self._count(-1)

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            no_delay(request)
            if self.tls_context is not None:
                request.settimeout(self.handshake_timeout)
                request = self.tls_context.wrap_socket(request, server_side=True)
            request.settimeout(self.socket_timeout)
        except (OSError, ValueError) as exc:
            log.warning("dicom TLS handshake with %s failed: %s", client_address[0], exc)
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


def adopting(listener: socket.socket) -> type[AssociationServer]:
    """An AssociationServer class that serves ``listener`` (a listening socket
    shared with other processes) instead of binding a socket of its own."""
    return type("AdoptingServer", (AssociationServer,), {"adopted": listener})


def no_delay(sock: socket.socket) -> None:
    """Send small PDUs at once. A C-FIND response or C-ECHO is a few small writes;
    with Nagle's algorithm each waits for the peer's delayed ACK (~40 ms)."""
    with contextlib.suppress(OSError):  # not TCP (a test's socketpair): nothing to do
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def discard_received_files(assoc: Association) -> None:
    """Delete the temporary files of C-STORE datasets an ended association left behind.

    With chunked receiving, pynetdicom writes each incoming dataset to a
    temporary file and deletes it after the C-STORE handler ran. A dataset cut
    off by an abort or a dropped connection (or received but never handled)
    never reaches the handler, and its file would stay in the temp folder.
    """
    if isinstance(assoc.dimse, streaming.StreamingDIMSE):
        assoc.dimse.discard()
    pending: list[Any] = [getattr(assoc.dimse, "message", None)]
    queued = getattr(assoc.dimse, "msg_queue", None)
    if queued is not None:
        pending += [item[1] for item in list(queued.queue) if isinstance(item, tuple)]
    for message in pending:
        file = getattr(message, "_data_set_file", None) or getattr(message, "_dataset_file", None)
        if file is None:
            continue
        try:
            file.close()
            os.unlink(file.name)
        except OSError:
            pass
