"""An association's answer goes to the request that waits for it, even when the
association's reactor thread is late.

pynetdicom's ``send_*()`` pauses the reactor before it sends; the reactor says
"paused" just before it waits at its checkpoint and "running" just after. A
reactor that is late getting the processor back after that wait (threads of a
busy process taking turns) looks at the message queue while the send is under
way and drops the answer as unexpected; the send then waits out its DIMSE
timeout. The tests below make that interleaving happen every time: the
reactor, let through its checkpoint, waits there until an answer is queued,
and the waiting send takes its answer off the queue a little later.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import build_context
from pynetdicom.association import Association

from lightbox.archive import Archive
from lightbox.dimse import contexts, scu
from lightbox.services import nodes
from tests.dimse_peers import commitment_requester, scp, storescp
from tests.factories import ROOT, ct_dataset

ANSWER_DELAY = 0.05  # how much later than the reactor the send takes its answer
DIMSE_TIMEOUT = 3


class _LateCheckpoint(threading.Event):
    """Once through, the reactor stays here until something is queued for it."""

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self.set()
        self.assoc = assoc

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        deadline = time.monotonic() + 0.5
        while self.assoc.dimse.msg_queue.empty() and time.monotonic() < deadline:
            time.sleep(0.001)
        return passed


class _SlowTaker(queue.Queue[Any]):
    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            time.sleep(ANSWER_DELAY)
        return super().get(block, timeout)


def _make_reactor_late(assoc: Association) -> None:
    assoc.dimse_timeout = DIMSE_TIMEOUT
    taker = assoc.dimse.msg_queue
    taker.__class__ = type("SlowTaker", (_SlowTaker, type(taker)), {})
    assoc._reactor_checkpoint = _LateCheckpoint(assoc)


def test_answers_on_our_associations_reach_the_request(archive: Archive, tmp_path: Path) -> None:
    """Lightbox as SCU (C-ECHO, C-STORE) to DCMTK's storescp."""
    sent = [ct_dataset(size=16, instance_number=i) for i in range(1, 4)]
    with storescp(tmp_path / "received") as port:
        node = nodes.Node("peer", "STORESCP", "127.0.0.1", port)
        proposed = [build_context(contexts.VERIFICATION),
                    build_context(CTImageStorage, ExplicitVRLittleEndian)]
        with scu.association(archive, node, proposed) as assoc:
            _make_reactor_late(assoc)
            started = time.monotonic()
            echoes = [assoc.send_c_echo().get("Status") for _ in range(3)]
            stores = [assoc.send_c_store(ds).get("Status") for ds in sent]
            took = time.monotonic() - started
    assert echoes == [0, 0, 0]
    assert stores == [0, 0, 0]
    assert took < DIMSE_TIMEOUT
    assert len(list((tmp_path / "received").iterdir())) == 3


@pytest.fixture
def committed(archive: Archive) -> Archive:
    nodes.add_node(archive, name="commitscu", ae_title="COMMITSCU", host="127.0.0.1", port=1)
    return archive


def test_the_answer_to_a_commitment_report_reaches_our_scp(
    committed: Archive, caplog: pytest.LogCaptureFixture
) -> None:
    """Lightbox as SCP sends an N-EVENT-REPORT from another thread on the
    requester's association; the requester's answer must reach that thread."""
    archive = committed
    info = _request_for_unknown_instance()
    with caplog.at_level(logging.INFO, logger="lightbox"), scp(archive) as server:
        assoc, answered = commitment_requester(server.port, lambda e: (0, None))
        try:
            [ours] = server._ae.active_associations if server._ae else []
            _make_reactor_late(ours)
            status, _reply = assoc.send_n_action(
                info, 1, contexts.STORAGE_COMMITMENT, contexts.STORAGE_COMMITMENT_INSTANCE)
            assert status.Status == 0
            assert answered.wait(10)
            deadline = time.monotonic() + DIMSE_TIMEOUT + 2
            while time.monotonic() < deadline and not _report_outcome(caplog):
                time.sleep(0.01)
        finally:
            assoc.release()
    assert _report_outcome(caplog) == "reported"


def _request_for_unknown_instance() -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = generate_uid(prefix=ROOT)
    info = Dataset()
    info.TransactionUID = generate_uid(prefix=ROOT)
    info.ReferencedSOPSequence = [item]
    return info


def _report_outcome(caplog: pytest.LogCaptureFixture) -> str | None:
    for record in caplog.records:
        message = record.getMessage()
        if "storage commitment" in message and " reported to " in message:
            return "reported"
        if "storage commitment" in message and "no answer from" in message:
            return "no answer"
    return None
