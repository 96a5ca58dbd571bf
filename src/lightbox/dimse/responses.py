"""DIMSE command sets encoded by hand, and messages sent without pydicom.

A command set has a fixed form (PS3.7 9.3): a few elements in tag order,
implicit VR little endian (PS3.7 6.3.1). pynetdicom builds each one as a
pydicom Dataset and encodes it, which cost more than a quarter of the
interpreter's time per C-STORE received, about 0.6 ms of processor time per
C-FIND response (a study-level query with six matches took 8.4 ms of the
SCP's processor time with pydicom's command sets, 3.9 ms with these), and as
much again per instance sent by C-GET or C-MOVE (a C-STORE request and a
Pending response each). Here the bytes are written directly for C-STORE
requests and C-STORE, C-FIND, C-GET and C-MOVE responses; a status naming an
Offending Element, or any other message, is left to pynetdicom (None).

``QuickSend`` is pynetdicom's DIMSE provider with such messages sent this
way, as P-DATA-TF PDUs encoded here, a data set read from a file going out
as it is read: written by the thread that sends the message when nothing is
queued before it, else by the DUL thread as they are (``install``).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import evt, fsm
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA

from lightbox.dimse import commands
from lightbox.dimse.commands import C_STORE_RQ_FIELD, C_STORE_RSP_FIELD, NO_DATA_SET

DATA_SET = 0x0001  # any other value says a data set follows; pynetdicom's
_RESPONSE_FIELDS: dict[type[Any], int] = {  # Command Field of each response
    C_STORE: C_STORE_RSP_FIELD, C_FIND: 0x8020, C_GET: 0x8010, C_MOVE: 0x8021,
}
_SUBOPERATIONS = (  # (0000,1020-1023), C-GET and C-MOVE responses
    "NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations",
    "NumberOfFailedSuboperations", "NumberOfWarningSuboperations",
)
_UNENCODABLE = (UnicodeEncodeError, struct.error, TypeError, ValueError)
_STATUS_ONLY = {0x00000900, 0x00000902}  # Status, Error Comment
# Message Control Header bits (PS3.8 E.2).
COMMAND = 0x01
LAST = 0x02
_FILE_FRAGMENT = 4 * 1024 * 1024  # bytes per fragment of a file when the peer sets no maximum
_GROUP = 1024 * 1024  # bytes of a file's PDUs handed to the DUL thread at once
_IOV_MAX = 1024  # buffers one preadv may fill (Linux's limit)
P_DATA_TF = 0x04
_PDU_HEAD = struct.Struct(">BxLLBB")  # PDU type, length; item length, context ID, control


def store_response(request: C_STORE, status: Dataset) -> bytes | None:
    """The C-STORE-RSP command set answering ``request`` with ``status``; None
    when the status holds more than Status and Error Comment."""
    if "Status" not in status or not {int(elem.tag) for elem in status} <= _STATUS_ONLY:
        return None
    try:
        return _response(C_STORE, request.AffectedSOPClassUID, request.MessageID,
                         int(status.Status), str(status.get("ErrorComment", "") or ""),
                         has_data=False, sop_instance=request.AffectedSOPInstanceUID)
    except _UNENCODABLE:
        return None


def command_set(primitive: Any) -> bytes | None:
    """The command set of a C-STORE request or a C-STORE, C-FIND, C-GET or
    C-MOVE response primitive, in tag order (PS3.7 Annex E); None for any
    other message, a response naming an Offending Element, or a value that
    does not fit its element (a UID beyond ASCII, a count beyond 65535)."""
    try:
        return _command_set(primitive)
    except _UNENCODABLE:
        return None


def _command_set(primitive: Any) -> bytes | None:
    kind = type(primitive)
    if kind not in _RESPONSE_FIELDS:
        return None
    if primitive.MessageIDBeingRespondedTo is None:
        return _store_request(primitive) if kind is C_STORE else None
    if primitive.Status is None or getattr(primitive, "OffendingElement", None) is not None:
        return None
    counts = [] if kind in (C_STORE, C_FIND) else [getattr(primitive, n) for n in _SUBOPERATIONS]
    return _response(kind, primitive.AffectedSOPClassUID, primitive.MessageIDBeingRespondedTo,
                     int(primitive.Status), str(primitive.ErrorComment or ""),
                     has_data=kind is not C_STORE and primitive.Identifier is not None,
                     sop_instance=primitive.AffectedSOPInstanceUID if kind is C_STORE else None,
                     counts=counts)


def _response(kind: type[Any], sop_class: Any, message_id: Any, status: int, comment: str, *,
              has_data: bool, sop_instance: Any = None, counts: list[int | None] | None = None,
              ) -> bytes:
    elements = [
        _uid(0x0002, sop_class),
        _us(0x0100, _RESPONSE_FIELDS[kind]),
        _us(0x0120, message_id or 0),
        _us(0x0800, DATA_SET if has_data else NO_DATA_SET),
        _us(0x0900, status),
    ]
    if comment:
        raw = comment.encode("ascii", "replace")[:64]
        elements.append(_element(0x0902, raw + b" " * (len(raw) % 2)))
    if sop_instance is not None:
        elements.append(_uid(0x1000, sop_instance))
    elements += [_us(0x1020 + n, count) for n, count in enumerate(counts or ())
                 if count is not None]
    return _with_length(elements)


def _store_request(request: C_STORE) -> bytes | None:
    if request.MessageID is None or request.Priority is None:
        return None
    has_data = request.DataSet is not None or getattr(request, "_dataset_path", None)
    elements = [
        _uid(0x0002, request.AffectedSOPClassUID),
        _us(0x0100, C_STORE_RQ_FIELD),
        _us(0x0110, request.MessageID),
        _us(0x0700, request.Priority),
        _us(0x0800, DATA_SET if has_data else NO_DATA_SET),
        _uid(0x1000, request.AffectedSOPInstanceUID),
    ]
    originator = request.MoveOriginatorApplicationEntityTitle
    if originator is not None:
        raw = str(originator).encode("ascii")
        elements.append(_element(0x1030, raw + b" " * (len(raw) % 2)))
    if request.MoveOriginatorMessageID is not None:
        elements.append(_us(0x1031, request.MoveOriginatorMessageID))
    return _with_length(elements)


def pdus(context_id: int, command: bytes, data_set: bytes, max_pdu: int) -> bytes:
    """A message as the P-DATA-TF PDUs that carry it: the command, then the
    data set, each in fragments that fit the peer's maximum PDU, one
    fragment per PDU, as pynetdicom sends them (PS3.8 9.3.5, E.2; 0: no
    maximum)."""
    size = max_pdu - 6 if max_pdu else max(len(command), len(data_set), 1)
    return _fragments(context_id, COMMAND, command, size) + _fragments(
        context_id, 0, data_set, size)


def file_pdus(context_id: int, command: bytes, path: Path, offset: int,
              max_pdu: int) -> Iterator[bytes | bytearray]:
    """The same, with the data set read from ``path`` past ``offset`` as it
    is sent: the PDUs in pieces of about ``_GROUP`` bytes. Each piece is one
    buffer: the PDU headers are written into it, and one ``preadv`` reads
    every fragment's bytes from the file into its place between them."""
    size = max_pdu - 6 if max_pdu else _FILE_FRAGMENT
    per_group = max(1, min(_GROUP // size, _IOV_MAX))
    yield _fragments(context_id, COMMAND, command, size)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        position = offset
        left = os.fstat(fd).st_size - offset
        while left > 0:
            count = min(per_group, -(-left // size))  # fragments in this piece
            lengths = [size] * (count - 1) + [min(size, left - size * (count - 1))]
            left -= sum(lengths)
            group = bytearray(sum(lengths) + _PDU_HEAD.size * len(lengths))
            view = memoryview(group)
            slots = []
            at = 0
            for i, length in enumerate(lengths):
                final = left <= 0 and i == len(lengths) - 1
                _PDU_HEAD.pack_into(group, at, P_DATA_TF, length + 6, length + 2, context_id,
                                    LAST if final else 0)
                at += _PDU_HEAD.size
                slots.append(view[at:at + length])
                at += length
            position += _read_into(fd, slots, position, path)
            yield group  # a bytearray: sent as it is, never kept
    finally:
        os.close(fd)


def _read_into(fd: int, slots: list[memoryview], position: int, path: Path) -> int:
    """Fill ``slots`` from ``fd`` at ``position`` (a short read goes on where
    it stopped); the bytes read. OSError if the file ends first."""
    done = 0
    while slots:
        got = os.preadv(fd, slots, position + done)
        if got == 0:
            raise OSError(f"{path} ended {sum(len(s) for s in slots)} bytes early")
        done += got
        while slots and got >= len(slots[0]):
            got -= len(slots[0])
            slots = slots[1:]
        if slots and got:
            slots[0] = slots[0][got:]
    return done


class EncodedPData(P_DATA):
    """P-DATA-TF PDUs encoded already, sent as they are (``install``)."""

    def __init__(self, encoded: bytes | bytearray) -> None:
        super().__init__()
        self.encoded = encoded


class QuickSend(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, sending the messages ``command_set``
    knows as PDUs encoded here, in one write rather than one PDU at a time
    through its state machine (``_write``). A C-STORE
    response received in one piece is read by ``commands`` rather than
    decoded by pydicom (unless something listens for received messages:
    they are handed pynetdicom's message)."""

    def receive_primitive(self, primitive: P_DATA) -> None:
        items = primitive.presentation_data_value_list
        if self.message is None and len(items) == 1:
            context_id, data = items[0]
            if data[:1] and data[0] & (COMMAND | LAST) == COMMAND | LAST:
                response = commands.store_response(data[1:], context_id)
                if response is not None and not self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
                    self.msg_queue.put((context_id, response))
                    return
        super().receive_primitive(primitive)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = command_set(primitive)
        if command is None:
            super().send_msg(primitive, context_id)
            return
        limit = self.maximum_pdu_size
        stored = getattr(primitive, "_dataset_path", None)
        if stored is not None:
            path, offset = stored
            groups: Iterable[bytes | bytearray] = file_pdus(context_id, command, path, offset,
                                                            limit)
        else:
            data = primitive.DataSet if isinstance(primitive, C_STORE) else primitive.Identifier
            groups = [pdus(context_id, command, data.getvalue() if data else b"", limit)]
        if not self._write(groups):
            for group in groups:
                self.dul.send_pdu(EncodedPData(group))

    def _write(self, groups: Iterable[bytes | bytearray]) -> bool:
        """Write a message's PDUs to the socket from this thread, when the
        network thread has nothing queued before them and the association is
        established (its state machine would only send them, action DT-1):
        handing them over costs that thread's waking up and the interpreter
        lock passing between the two. False to hand them over after all."""
        dul = self.dul
        sock = dul.socket
        lock = getattr(sock, _LOCK, None)
        if lock is None:
            return False
        with lock:  # whole messages: no PDU of another one in between
            if dul.state_machine.current_state != "Sta6" or not dul.to_provider_queue.empty():
                return False
            for group in groups:
                cast(Any, sock).send(memoryview(group))  # closed: Evt17, as for the DUL
        return True


_LOCK = "_lightbox_write_lock"


def quick_send(assoc: Any) -> None:
    """Make an association's DIMSE provider a ``QuickSend`` (one of ours, or
    pynetdicom's own, already a subclass, is left as it is), before it sends
    anything (``lock_writes``)."""
    if not isinstance(assoc.dimse, QuickSend):
        assoc.dimse.__class__ = QuickSend
    lock_writes(assoc)


def lock_writes(assoc: Any) -> None:
    """Have every write to the association's socket take one lock, so that
    ``QuickSend`` may write whole messages from the thread that sends them
    while the network thread writes its own. To be called while nothing is
    being sent: before the association starts, or once it is established and
    before any message."""
    sock = assoc.dul.socket
    if sock is None or getattr(sock, _LOCK, None) is not None:
        return
    lock = threading.RLock()
    send = sock.send

    def locked_send(data: Any) -> None:
        with lock:
            send(data)

    sock.send = locked_send
    setattr(sock, _LOCK, lock)


def install() -> None:
    """Make pynetdicom's DUL send an ``EncodedPData`` as it is, in both of its
    actions that send a P-DATA request: DT-1 (established) and AR-7 (the
    peer asked to release, our answers still going out; PS3.8 9.2)."""
    actions = cast(dict[str, Any], fsm.ACTIONS)
    for action, state in (("DT-1", "Sta6"), ("AR-7", "Sta8")):
        description, send_p_data, states = actions[action]
        if not getattr(send_p_data, "lightbox", False):
            actions[action] = (description, _sending_encoded(send_p_data, state), states)


_Action = Callable[[DULServiceProvider], str]


def _sending_encoded(send_p_data: _Action, state: str) -> _Action:
    def send(dul: DULServiceProvider) -> str:
        primitive = dul.to_provider_queue.queue[0]
        if not isinstance(primitive, EncodedPData):
            return send_p_data(dul)
        dul.to_provider_queue.get(False)
        if dul.socket is not None:  # memoryview: a partial send is not copied again
            cast(Any, dul.socket).send(memoryview(primitive.encoded))  # closed: Evt17
        return state

    send.lightbox = True  # type: ignore[attr-defined]
    return send


def _fragments(context_id: int, control: int, payload: bytes, size: int) -> bytes:
    return b"".join(
        _pdu(context_id, control | (LAST if start + size >= len(payload) else 0),
             payload[start:start + size])
        for start in range(0, len(payload), size))


def _pdu(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU of one presentation data value item (PS3.8 9.3.5.1)."""
    return _PDU_HEAD.pack(P_DATA_TF, len(data) + 6, len(data) + 2, context_id, control) + data


def _with_length(elements: list[bytes]) -> bytes:
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def _us(element: int, value: Any) -> bytes:
    return _element(element, struct.pack("<H", int(value)))


def _uid(element: int, value: Any) -> bytes:
    raw = str(value or "").encode("ascii")
    return _element(element, raw + b"\x00" * (len(raw) % 2))


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value
