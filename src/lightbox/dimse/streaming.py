"""C-STORE datasets received straight into the blob store's staging folder.

pynetdicom (with chunked receiving) writes an incoming dataset to a file in
the system temp folder, behind File Meta Information of its own; the handler
then had to copy it into staging under ours. Here the DIMSE provider of an
accepted association recognises a C-STORE request as soon as its command set
is complete (the command names the SOP Class and Instance, the presentation
context names the transfer syntax), asks its ``Sink`` for a staging file that
already holds the preamble and our File Meta, and appends every dataset
fragment to it as it arrives. Memory stays flat whatever the dataset's size;
the bytes are written once.

Every other message (C-FIND, C-MOVE, C-GET, N-ACTION, responses) is handed to
pynetdicom's own assembly unchanged.

``receive_p_data`` goes one step further for an established association: it
reads a P-DATA-TF PDU's items straight off the socket, and a dataset
fragment's bytes go from the socket to the file through one reused buffer
(the association's ``Inbox``), without pynetdicom decoding the PDU into
objects (and copying it four times) on the way. The inbox reads whatever has
arrived, up to 256 KiB at a time: a sender's PDUs of 16 KiB (the most common
size) take one read for many of them instead of three reads each (PDU
header, item header, data).

With a ``Handler`` installed too, a streamed C-STORE is answered right there,
in the thread that received it: the handler stores the instance, and the
C-STORE-RSP (a command set of fixed form, PS3.7 9.3.1.2) is encoded by hand
(``responses``) and written to the socket (one P-DATA-TF PDU, or as many as a
peer with a tiny maximum PDU needs). pynetdicom's path for it would hand the
request to the association's thread, look up the service class, encode the
response with pydicom and pass it back to this thread to send: more than a
quarter of the interpreter's time per instance. Anything out of the ordinary
(a request outside its context's SOP Class, a status with more than Status
and Error Comment) takes that path.

Every other message the association sends goes as pynetdicom sends it, but
those whose command sets ``responses`` encodes by hand go that way
(``QuickSend``): C-FIND, C-GET and C-MOVE responses, and C-STORE requests.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass

from lightbox.dimse.commands import C_STORE_RQ_FIELD, NO_DATA_SET, Command
from lightbox.dimse.responses import COMMAND, LAST, QuickSend, lock_writes, pdus, store_response

_STAGED = "_lightbox_staged"
_PDV_HEAD = struct.Struct(">LBB")  # item length, presentation context ID, control header
_CHUNK = 256 * 1024  # bytes per read while streaming a dataset fragment to disk


class MalformedPDU(ValueError):
    """A P-DATA-TF PDU whose items do not add up."""


Reader = Callable[[memoryview], int]
"""``recv_into`` of the association's socket: bytes read, 0 when it closed."""


class Inbox:
    """An association's socket, read in large pieces.

    Each read takes whatever has arrived, up to the buffer's size; headers and
    data are then served from the buffer. ``take`` lends a slice of it
    (valid until the next call), so a dataset fragment goes from the buffer
    to its file without another copy.
    """

    def __init__(self, read: Reader, size: int = _CHUNK) -> None:
        self._read = read
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0

    @property
    def pending(self) -> int:
        """Bytes read from the socket and not yet taken."""
        return self._end - self._start

    def take(self, n: int) -> memoryview:
        """At most ``n`` bytes, at least one; OSError if the connection closed."""
        if self._start == self._end:
            count = self._read(self._view)
            if not count:
                raise OSError("connection closed in the middle of a PDU")
            self._start, self._end = 0, count
        count = min(n, self._end - self._start)
        self._start += count
        return self._view[self._start - count:self._start]

    def exact(self, n: int) -> bytes:
        """``n`` bytes; OSError if the connection closes first."""
        if self._end - self._start >= n:
            self._start += n
            return bytes(self._view[self._start - n:self._start])
        pieces = []
        while n > 0:
            piece = self.take(n)
            pieces.append(bytes(piece))
            n -= len(piece)
        return b"".join(pieces)

    def drain(self) -> bytes:
        """Everything read and not yet taken (for pynetdicom to read next)."""
        rest = bytes(self._view[self._start:self._end])
        self._start = self._end = 0
        return rest


@dataclass(frozen=True)
class StoreRequest:
    """What is known of a C-STORE request when its dataset starts to arrive."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    calling_ae: str


Sink = Callable[[StoreRequest], tuple[int, Path]]
"""Opens the staging file for a request: an open descriptor, positioned after
the preamble and File Meta Information it wrote, and the file's path."""


Handler = Callable[[Event], Dataset]
"""Answers an EVT_C_STORE event with its status (Status, optional Error Comment)."""


@dataclass(frozen=True)
class Staged:
    """Where a streamed C-STORE dataset went: ``path``, or the ``error`` that
    kept it from being written (the rest of the dataset was read and dropped)."""

    path: Path | None
    error: OSError | None = None


def staged(request: Any) -> Staged | None:
    """How a C-STORE request's dataset was streamed; ``None`` when pynetdicom
    received it (e.g. on a C-GET requestor's side). The receiver owns the
    file: nothing else deletes it once the request is handled."""
    found = getattr(request, _STAGED, None)
    return found if isinstance(found, Staged) else None


@dataclass
class _Incoming:
    """A C-STORE dataset being received."""

    context_id: int
    command: Command
    fd: int = -1
    path: Path | None = None
    error: OSError | None = None

    def write(self, data: bytes | memoryview) -> None:
        """Append a fragment's bytes (without its control header byte)."""
        if self.fd < 0:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:  # a full disk: drop the rest, answer a failure
            self.error = exc
            self.close(remove=True)

    def copy(self, inbox: Inbox, n: int) -> None:
        """Append the next ``n`` bytes of the association's socket."""
        while n > 0:
            piece = inbox.take(n)
            self.write(piece)
            n -= len(piece)

    def close(self, *, remove: bool) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if remove and self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class StreamingDIMSE(QuickSend):
    """pynetdicom's DIMSE provider, with C-STORE datasets streamed to a ``Sink``.

    Installed on an association before it starts (``install``); runs in the
    association's DUL thread, like the method it overrides.
    """

    _sink: Sink
    _handler: Handler | None
    _command: BytesIO | None
    _delegating: bool
    _incoming: _Incoming | None

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, data in primitive.presentation_data_value_list:
            self._receive_fragment(context_id, data)

    def _receive_fragment(self, context_id: int, data: bytes) -> None:
        header = data[0]
        if self._delegating:
            # The rest of a message pynetdicom assembles.
            self._delegate(context_id, data)
            self._delegating = self.message is not None  # pynetdicom resets it when done
            return
        incoming = self._incoming
        if incoming is not None and not header & COMMAND:
            incoming.write(memoryview(data)[1:])
            if header & LAST:
                self._incoming = None
                self._complete(incoming)
            return
        if incoming is not None:
            # A new command before the dataset ended (against PS3.7 9.3.1): drop it.
            self._incoming = None
            incoming.close(remove=True)
        self._receive_command(context_id, data)

    def _receive_command(self, context_id: int, data: bytes) -> None:
        header = data[0]
        if not header & COMMAND:  # dataset fragment without a command: pynetdicom decides
            self._delegate(context_id, data)
            return
        if self._command is None:
            self._command = BytesIO()
        self._command.write(data[1:])
        if not header & LAST:
            return
        encoded, self._command = self._command.getvalue(), None
        command = Command.read(encoded)
        if (
            command is not None
            and command.number(0x0100) == C_STORE_RQ_FIELD
            and command.number(0x0800) not in (None, NO_DATA_SET)
            and context_id in self.assoc._accepted_cx
            and command.text(0x0002).isascii() and command.text(0x1000).isascii()
        ):
            self._incoming = self._open(context_id, command)
            return
        # Anything else, pynetdicom decodes and handles as it always does.
        self._delegate(context_id, bytes([header]) + encoded)
        self._delegating = self.message is not None  # None: complete, it has no dataset

    def receive_p_data(self, inbox: Inbox, length: int) -> None:
        """Consume the items of one P-DATA-TF PDU (``length`` bytes after its
        header) from the association's socket. In state Sta6 this is all that
        receiving the PDU does (DT-2: hand it to DIMSE; the state stays the same).

        Raises OSError when the connection closes, MalformedPDU for items that
        overrun the PDU (pynetdicom's Evt17 and Evt19).
        """
        while length > 0:
            if length < _PDV_HEAD.size:
                raise MalformedPDU("P-DATA-TF PDU ends inside an item header")
            item_length, context_id, header = _PDV_HEAD.unpack(inbox.exact(_PDV_HEAD.size))
            if item_length < 2 or item_length + 4 > length:
                raise MalformedPDU(f"PDV item of {item_length} bytes in a PDU of {length}")
            length -= item_length + 4
            size = item_length - 2
            incoming = self._incoming
            if incoming is not None and not self._delegating and not header & COMMAND:
                incoming.copy(inbox, size)
                if header & LAST:
                    self._incoming = None
                    self._complete(incoming)
            else:
                self._receive_fragment(context_id, bytes([header]) + inbox.exact(size))

    def _open(self, context_id: int, command: Command) -> _Incoming:
        incoming = _Incoming(context_id, command)
        context = self.assoc._accepted_cx[context_id]
        request = StoreRequest(
            sop_class_uid=command.text(0x0002),
            sop_instance_uid=command.text(0x1000),
            transfer_syntax=str(context.transfer_syntax[0]),
            calling_ae=str(self.assoc.requestor.ae_title or "").strip(),
        )
        try:
            incoming.fd, incoming.path = self._sink(request)
        except OSError as exc:
            incoming.error = exc
        return incoming

    def _complete(self, incoming: _Incoming) -> None:
        incoming.close(remove=False)
        request = self._request(incoming)
        setattr(request, _STAGED, Staged(incoming.path, incoming.error))
        if not self._answer(incoming.context_id, request):
            self.msg_queue.put((incoming.context_id, request))

    def _request(self, incoming: _Incoming) -> C_STORE:
        """The request primitive of a received C-STORE, made straight from
        its command set; through pynetdicom's message when something listens
        for received messages (it is handed to them) or the command set's
        values do not pass the primitive's checks."""
        if not self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            try:
                return incoming.command.request(incoming.context_id)
            except (TypeError, ValueError):
                pass
        message = C_STORE_RQ()
        message.command_set = incoming.command.dataset()
        message.context_id = incoming.context_id
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
        return cast(C_STORE, message.message_to_primitive())

    def _answer(self, context_id: int, request: C_STORE) -> bool:
        """Store and answer ``request`` in this thread; False to leave it to
        the association's thread (pynetdicom's path)."""
        assoc = self.assoc
        context = assoc._accepted_cx.get(context_id)
        if (self._handler is None or context is None or not assoc.is_established
                or assoc._sent_release
                or str(request.AffectedSOPClassUID or "") != context.abstract_syntax):
            return False
        status = self._handler(Event(assoc, evt.EVT_C_STORE, {
            "request": request, "context": context.as_tuple}))
        command = store_response(request, status)
        sock = assoc.dul.socket
        if command is None or sock is None:
            self.send_msg(_response(assoc, request, status), context_id)  # queued to this thread
            return True
        # In as many PDUs as the peer's maximum needs (one, but for a tiny one).
        sock.send(pdus(context_id, command, b"", self.maximum_pdu_size))  # this thread writes
        return True

    def _delegate(self, context_id: int, data: bytes) -> None:
        single = P_DATA()
        single.presentation_data_value_list.append((context_id, data))
        super().receive_primitive(single)

    def discard_incoming(self) -> None:
        """Remove the staging file of a dataset cut off mid-transfer."""
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            incoming.close(remove=True)

    def discard(self) -> None:
        """Remove the staging files of datasets that will never be handled: one
        cut off mid-transfer, and those received but still queued (called when
        the association ends)."""
        self.discard_incoming()
        for item in list(self.msg_queue.queue):
            found = staged(item[1]) if isinstance(item, tuple) else None
            if found is not None and found.path is not None:
                found.path.unlink(missing_ok=True)


def install(assoc: Any, sink: Sink, handler: Handler | None = None) -> None:
    """Make an (acceptor) association, not yet started, stream C-STORE datasets
    to ``sink``, and with a ``handler``, answer them in the receiving thread."""
    dimse = assoc.dimse
    dimse.__class__ = StreamingDIMSE
    lock_writes(assoc)
    dimse._sink = sink
    dimse._handler = handler
    dimse._command = None
    dimse._delegating = False
    dimse._incoming = None


# ---------------------------------------------------------------- C-STORE-RSP

def _response(assoc: Any, request: C_STORE, status: Dataset) -> C_STORE:
    """The response primitive, filled from ``status`` the way pynetdicom's
    Storage SCP fills it, for pynetdicom to encode (and split) itself."""
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = request.MessageID
    rsp.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
    rsp.AffectedSOPClassUID = request.AffectedSOPClassUID
    return StorageServiceClass(assoc).validate_status(status, rsp)
