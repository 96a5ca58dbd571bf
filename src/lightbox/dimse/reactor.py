"""The loops of an association, without pynetdicom's polling.

pynetdicom's two loops per association poll: the DUL thread sleeps 1 ms
whenever the socket was quiet, the association thread sleeps 1 ms before
every look at its message queue, and a PDU is read 4 KiB at a time. A
C-STORE crossed both loops twice (request in, response out), so most of an
instance's time on one association was spent asleep. Here both loops block
until there is something to do (the socket is readable, a primitive is queued
to send, a message is complete) and a PDU is read with a few large reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import threading
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.utils import make_target

from lightbox.dimse import streaming

log = logging.getLogger("lightbox.dimse")


def quick_ack(sock: socket.socket) -> None:
    """Acknowledge received segments at once rather than after the delayed-ACK
    timer. A sender with Nagle's algorithm on (storescu by default) holds the
    tail of each PDU until its previous segments are acknowledged; Linux turns
    quick ACKs off again by itself, so this is renewed after every read."""
    with contextlib.suppress(OSError, AttributeError):  # not TCP, or not Linux
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


_IDLE_WAIT = 0.05  # seconds between looks at timers (ARTIM, idle) while nothing happens
P_DATA_TF_TYPE = 0x04


def _reader(raw: socket.socket) -> streaming.Reader:
    """``recv_into`` that acknowledges at once (see ``quick_ack``)."""

    def read(view: memoryview) -> int:
        count = raw.recv_into(view)
        quick_ack(raw)
        return count

    return read


class _WakingQueue(queue.Queue[Any]):
    """A queue that sets ``wake`` whenever something is put on it."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self.wake = wake

    def _put(self, item: Any) -> None:
        super()._put(item)
        self.wake.set()


class UnpolledDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, waiting in ``select`` instead of sleeping.

    It wakes when the socket is readable or when the association queues a
    primitive to send (``send_pdu`` writes a byte to a pipe). Once the
    association is established, P-DATA-TF PDUs go straight to the streaming
    DIMSE provider (``StreamingDIMSE.receive_p_data``).
    """

    _wake_r: int
    _wake_w: int
    pdu_limit: int
    pushback: bytes = b""  # bytes read ahead that pynetdicom's reads get first
    inbox: streaming.Inbox | None = None

    def _buffered(self) -> bool:
        """Whether bytes already read wait to be handled."""
        return bool(self.pushback) or (self.inbox is not None and self.inbox.pending > 0)

    def _is_transport_event(self) -> bool:
        if self._buffered():  # the socket need not be readable: they were read already
            self._read_pdu_data()
            return True
        return bool(super()._is_transport_event())

    def _to_pynetdicom(self, read: bytes = b"") -> None:
        """pynetdicom reads the next PDU: from the bytes pushed back, then
        ``read``, then what the inbox holds, then the socket."""
        if self.inbox is not None:
            read += self.inbox.drain()
        self.pushback += read
        super()._read_pdu_data()

    def _read_pdu_data(self) -> None:
        dimse = self.assoc.dimse
        raw = getattr(self.socket, "socket", None)
        if (self.state_machine.current_state != "Sta6" or raw is None or self.pushback
                or not isinstance(dimse, streaming.StreamingDIMSE)):
            self._to_pynetdicom()
            return
        if self.inbox is None:
            self.inbox = streaming.Inbox(_reader(raw))
        inbox = self.inbox
        try:
            while True:
                header = inbox.exact(6)
                if header[0] != P_DATA_TF_TYPE:
                    self._to_pynetdicom(header)  # it decodes every other PDU
                    return
                length = int.from_bytes(header[2:6], "big")
                if length > self.pdu_limit:
                    raise OSError(f"peer announced a PDU of {length} bytes "
                                  f"(limit {self.pdu_limit})")
                dimse.receive_p_data(inbox, length)
                # The next PDUs were read already: on with them, unless the
                # reactor has something else to do first.
                if (not inbox.pending or self._kill_thread or not self.event_queue.empty()
                        or self.to_provider_queue.qsize()):
                    return
        except OSError:
            dimse.discard_incoming()
            self.event_queue.put("Evt17")  # connection closed
        except Exception as exc:  # whatever the peer sent, the association ends here
            # MalformedPDU, or a command set pynetdicom cannot decode (it raises
            # AttributeError, ValueError and more for one that lacks elements
            # or holds garbage): an invalid PDU, not an error of ours.
            log.warning("dicom association with %s: unreadable P-DATA (%s: %s); aborting",
                        self.assoc.requestor.ae_title, type(exc).__name__, exc)
            dimse.discard_incoming()
            self.event_queue.put("Evt19")  # invalid PDU: A-ABORT

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._poke()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(OSError):  # full (already awake) or closed (ended)
            os.write(self._wake_w, b"\0")

    def run_reactor(self) -> None:
        try:
            self._react()
        finally:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            cast(UnpolledAssociation, self.assoc)._lightbox_wake.set()  # DUL is gone

    def _react(self) -> None:
        # pynetdicom's DULServiceProvider.run_reactor, with the sleep replaced.
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if idle:
                self._wait()
            if self._kill_thread:
                return
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception:
                log.exception("dicom DUL failed; aborting the association")
                self._abort()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            if event in ("Evt17", "Evt18"):  # connection closed, or ARTIM expired
                self._closed_before_request()
            idle = False

    def _closed_before_request(self) -> None:
        """A connection that closed before any A-ASSOCIATE-RQ (a port probe):
        the acceptor, waiting for that request, stops now instead of after the
        ACSE timeout, and its thread and load count with it."""
        assoc = self.assoc
        if (self.state_machine.current_state == "Sta1" and assoc.requestor.primitive is None
                and self.to_user_queue.empty()):
            cast(Any, self.to_user_queue).put(None)  # wakes the acceptor: nothing came

    def _wait(self) -> None:
        """Until the socket is readable, a primitive is queued, or _IDLE_WAIT passed."""
        if self.to_provider_queue.qsize() or self._buffered():
            return
        watched = [self._wake_r]
        raw = getattr(self.socket, "socket", None)
        if raw is not None and raw.fileno() >= 0:
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return  # decrypted bytes wait in the TLS layer, invisible to select
            watched.append(raw)
        try:
            readable, _, _ = select.select(watched, [], [], _IDLE_WAIT)
        except (OSError, ValueError):
            return
        if self._wake_r in readable:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)

    def _abort(self) -> None:
        from pynetdicom.pdu import A_ABORT_RQ

        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        if self.socket is not None:
            with contextlib.suppress(Exception):
                self.socket.send(abort_pdu.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class UnpolledAssociation(Association):
    """pynetdicom's acceptor reactor, waiting on an event instead of sleeping 1 ms."""

    _lightbox_wake: threading.Event
    ended: Any = None  # called once the association's thread is done

    def run(self) -> None:
        try:
            super().run()
        finally:
            with contextlib.suppress(Exception):
                if self.ended is not None:
                    self.ended()

    def kill(self) -> None:
        self._lightbox_wake.set()
        super().kill()

    def _run_reactor(self) -> None:
        # pynetdicom's Association._run_reactor, with the sleep replaced: the
        # event is cleared before looking, so a message queued meanwhile wakes it.
        self._is_paused = False
        wake = self._lightbox_wake
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            wake.clear()
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                continue
            if self._ended():
                return
            wake.wait(_IDLE_WAIT)

    def _ended(self) -> bool:
        if self.is_established and self.acse.is_release_requested():
            # Released before the answer goes out: the peer closes the connection
            # as soon as it has the answer, and that close must read as a release.
            self.is_released = True
            self.acse.send_release(is_response=True)
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return True
        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return True
        if not self.dul.is_alive():
            self.kill()
            return True
        if self.dul.idle_timer_expired():
            log.warning("dicom association with %s: network timeout", self.requestor.ae_title)
            self.abort()
            self.kill()
            return True
        return False


def guard_reactor(assoc: Association) -> None:
    """Keep the association's reactor from taking the answer to a request sent
    from another thread.

    A ``send_*()`` clears the reactor's checkpoint, waits until the reactor
    says it is paused, sends, and then reads the answer off the message queue.
    But the reactor says "paused" just before it waits at the checkpoint and
    "running" just after: a send that clears the checkpoint in between sees
    "paused" while the reactor goes on, and once the reactor gets the
    processor back it looks at the queue, finds the answer and drops it as an
    unexpected message. The send then waits out its DIMSE timeout. Under load
    (threads of a busy process taking turns) that window is hit. Here the
    reactor's look at the queue, the only one that does not block, finds
    nothing while the checkpoint is cleared: a send is then under way, and
    what arrives is its answer. Found in pynetdicom 3.0.
    """
    take = assoc.dimse.get_msg

    def get_msg(block: bool = False) -> tuple[int | None, Any]:
        if not block and not assoc._reactor_checkpoint.is_set():
            return None, None
        return cast(tuple[int | None, Any], take(block))

    assoc.dimse.get_msg = get_msg  # type: ignore[method-assign,assignment]


def unpolled(acceptor: Association, limit: int) -> None:
    """Swap in the loops above on an association that has not started yet."""
    wake = threading.Event()
    acceptor.__class__ = UnpolledAssociation
    assoc = cast(UnpolledAssociation, acceptor)
    assoc._lightbox_wake = wake
    assoc.dul.__class__ = UnpolledDUL
    dul = cast(UnpolledDUL, assoc.dul)
    dul._target = make_target(dul.run_reactor)  # type: ignore[attr-defined]  # bound at init
    dul._wake_r, dul._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    dul.pdu_limit = limit
    dul.to_user_queue = _WakingQueue(wake)
    assoc.dimse.msg_queue = _WakingQueue(wake)
    guard_reactor(assoc)
