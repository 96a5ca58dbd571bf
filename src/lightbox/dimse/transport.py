"""pynetdicom's association server, hardened against peers that stall or lie.

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
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from typing import Any

from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

log = logging.getLogger("lightbox.dimse")

MIN_PDU_LIMIT = 1024 * 1024  # room for an A-ASSOCIATE-RQ with 128 contexts and more


class _BoundedRequestHandler(RequestHandler):
    server: AssociationServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        limit = self.server.pdu_limit
        sock = assoc.dul.socket
        if sock is not None:
            unbounded = sock.recv

            def recv(nr_bytes: int) -> bytearray:
                # The DUL asks for a PDU's whole announced length in one call.
                if nr_bytes > limit:
                    raise OSError(f"peer announced a PDU of {nr_bytes} bytes (limit {limit})")
                return unbounded(nr_bytes)

            setattr(sock, "recv", recv)  # noqa: B010 (an instance override, on purpose)
        return assoc


class AssociationServer(ThreadedAssociationServer):
    """The SCP's server: TLS per connection, timeouts on sockets, bounded PDUs."""

    daemon_threads = True
    tls_context: ssl.SSLContext | None = None
    handshake_timeout: float = 30.0
    socket_timeout: float | None = 120.0
    pdu_limit: int = MIN_PDU_LIMIT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["request_handler"] = _BoundedRequestHandler
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        return self.socket.accept()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
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
    pending: list[Any] = [getattr(assoc.dimse, "message", None)]
    queue = getattr(assoc.dimse, "msg_queue", None)
    if queue is not None:
        pending += [item[1] for item in list(queue.queue) if isinstance(item, tuple)]
    for message in pending:
        file = getattr(message, "_data_set_file", None) or getattr(message, "_dataset_file", None)
        if file is None:
            continue
        try:
            file.close()
            os.unlink(file.name)
        except OSError:
            pass
