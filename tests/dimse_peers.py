"""Shared helpers for the DIMSE tests: our SCP in a thread, real peers in subprocesses
(DCMTK, Orthanc), certificates, corpora. Every wait is bounded."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

from lightbox.archive import Archive
from lightbox.dimse import contexts
from lightbox.dimse.scp import DicomServer
from tests.conftest import free_port

MAKE_CORPUS = Path(__file__).resolve().parents[2] / "shared/corpus/make_corpus.py"
PEER_TIMEOUT = 60  # seconds any one DCMTK command may take


def with_settings(archive: Archive, **changes: Any) -> Archive:
    """The same index, blobs and audit trail under changed settings."""
    changed = Archive(settings=replace(archive.settings, **changes), db=archive.db,
                      blobs=archive.blobs)
    # One flusher, closed with the archive: a second one would outlive the
    # test and retry its last events against a database dropped meanwhile.
    changed.audit = archive.audit
    return changed


@contextmanager
def scp(archive: Archive, port: int | None = None) -> Iterator[DicomServer]:
    """Our SCP on a free loopback port, in this process."""
    server = DicomServer(archive, host="127.0.0.1", port=port or free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def commitment_requester(port: int, on_report: Any) -> tuple[Association, threading.Event]:
    """COMMITSCU associated with our SCP for Storage Commitment, answering each
    N-EVENT-REPORT with ``on_report``; the event is set once an answer to a
    report has been sent (a release requested before that would make
    pynetdicom refuse to send it)."""
    answered = threading.Event()

    def on_sent(event: Any) -> None:
        if type(event.message).__name__ == "N_EVENT_REPORT_RSP":
            answered.set()

    ae = AE(ae_title="COMMITSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(contexts.STORAGE_COMMITMENT)
    assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX",
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report),
                                       (evt.EVT_DIMSE_SENT, on_sent)])
    assert assoc.is_established
    return assoc, answered


def dcmtk(
    *argv: str, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool; its output is kept for the assertion message."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=PEER_TIMEOUT,
                          cwd=cwd, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv[0]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def make_corpus(out: Path, *args: str) -> list[Path]:
    subprocess.run([sys.executable, str(MAKE_CORPUS), str(out), *args], check=True,
                   capture_output=True, timeout=120)
    return sorted(out.rglob("*.dcm"))


@contextmanager
def storescp(folder: Path, ae_title: str = "STORESCP") -> Iterator[int]:
    """DCMTK storescp accepting every transfer syntax, writing into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", ae_title, "+xa", "-od", str(folder), "--fork", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc)
        yield port
    finally:
        _stop(proc)


def _wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"peer exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@dataclass
class Orthanc:
    """A running Orthanc: its DICOM port and AE title, and its REST root."""

    aet: str
    dicom_port: int
    http_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: Any, timeout: float = 60) -> Any:
        """POST ``body`` (JSON, or a string as it is) to the REST API."""
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")

    def file(self, sop_instance_uid: str) -> bytes:
        """The stored file of an instance, found by its SOP Instance UID."""
        [found] = self.post("/tools/lookup", sop_instance_uid)
        with urllib.request.urlopen(f"{self.url}/instances/{found['ID']}/file",
                                    timeout=10) as resp:
            return bytes(resp.read())


@contextmanager
def orthanc(workdir: Path, modalities: dict[str, tuple[str, int]],
            **extra: Any) -> Iterator[Orthanc]:
    """Orthanc from a generated config in ``workdir``; ``modalities`` maps a name to
    (AE title, port) of peers on 127.0.0.1 it may move to and accept queries from."""
    if shutil.which("Orthanc") is None:
        raise RuntimeError("Orthanc is not installed (scripts/system-deps.sh)")
    workdir.mkdir(parents=True, exist_ok=True)
    peer = Orthanc("ORTHANC", free_port(), free_port())
    config = {
        "Name": "lightbox-test",
        "DicomAet": peer.aet,
        "DicomPort": peer.dicom_port,
        "HttpPort": peer.http_port,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomModalities": {
            name: {"AET": aet, "Host": "127.0.0.1", "Port": port}
            for name, (aet, port) in modalities.items()
        },
        "DicomScpTimeout": 30,
        "SaveJobs": False,
        **extra,
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log = (workdir / "orthanc.log").open("wb")
    proc = subprocess.Popen(["Orthanc", str(workdir / "orthanc.json")], cwd=workdir,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_http(peer, proc)
        yield peer
    finally:
        _stop(proc)
        log.close()


def _wait_http(peer: Orthanc, proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode}")
        try:
            peer.get("/system")
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("Orthanc did not start")


def association_request(called: str, syntax: str) -> bytes:
    """The A-ASSOCIATE-RQ PDU pynetdicom sends for ``syntax``, caught by a socket
    that then hangs up (the association attempt fails; its bytes are what we want)."""
    listener = socket.create_server(("127.0.0.1", 0))
    caught: list[bytes] = []

    def catch() -> None:
        conn, _ = listener.accept()
        with conn:
            caught.append(read_pdu(conn))

    catcher = threading.Thread(target=catch)
    catcher.start()
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.network_timeout = 5
    ae.associate("127.0.0.1", listener.getsockname()[1],
                 contexts=[build_context(syntax, [ExplicitVRLittleEndian])], ae_title=called)
    catcher.join(10)
    listener.close()
    return caught[0]


def read_pdu(sock: socket.socket) -> bytes:
    """The next whole PDU from ``sock``, header included."""
    head = sock.recv(6, socket.MSG_WAITALL)
    assert len(head) == 6, "the peer closed the connection"
    return head + sock.recv(int.from_bytes(head[2:6], "big"), socket.MSG_WAITALL)
