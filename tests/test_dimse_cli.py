"""``lightbox node …`` and ``lightbox serve`` with its SCP, as an operator uses them."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE

from lightbox.archive import Archive
from lightbox.cli.main import main
from lightbox.dimse import contexts
from lightbox.dimse.status import Find
from tests.conftest import free_port
from tests.dimse_peers import dcmtk


def _run(archive: Archive, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    settings = archive.settings
    code = main([*argv, "--data", str(settings.data), "--database", settings.database_url])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_node_add_list_remove(archive: Archive, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(archive, capsys, "node", "add", "pacs", "--aet", "PACS", "--host",
                "pacs.example.org", "--port", "104", "--tls")[0] == 0
    assert _run(archive, capsys, "node", "add", "ct", "--aet", "CT01", "--host", "10.0.0.7",
                "--port", "11112")[0] == 0
    code, listed = _run(archive, capsys, "node", "list")
    assert code == 0
    assert listed.splitlines() == ["ct: CT01@10.0.0.7:11112",
                                   "pacs: PACS@pacs.example.org:104 (TLS)"]

    duplicate = _run(archive, capsys, "node", "add", "pacs", "--aet", "X", "--host", "h",
                     "--port", "1")
    assert duplicate[0] == 2 and "already exists" in duplicate[1]
    for bad in (["--aet", "A" * 17, "--host", "h", "--port", "1"],
                ["--aet", "BAD\\AET", "--host", "h", "--port", "1"],
                ["--aet", "OK", "--host", "h", "--port", "70000"]):
        code, message = _run(archive, capsys, "node", "add", "other", *bad)
        assert code == 2 and message.startswith("lightbox: ")

    assert _run(archive, capsys, "node", "remove", "pacs")[0] == 0
    assert _run(archive, capsys, "node", "list")[1].splitlines() == ["ct: CT01@10.0.0.7:11112"]
    code, message = _run(archive, capsys, "node", "remove", "pacs")
    assert code == 2 and "no node named 'pacs'" in message


_ENV = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTBOX_")}
LIGHTBOX = [sys.executable, "-m", "lightbox"]


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "lightbox serve exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


class Served:
    """A ``lightbox serve`` process: its ports, and its log once it has stopped."""

    def __init__(self, data: Path) -> None:
        self.data, self.http_port, self.dicom_port = data, free_port(), free_port()
        self.log_path = data.parent / "serve.log"
        self.code: int | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text()


@contextmanager
def serving(data: Path, *options: str) -> Iterator[Served]:
    """``lightbox serve`` on free ports until the block ends (then SIGTERM)."""
    served = Served(data)
    argv = [*LIGHTBOX, "serve", "--data", str(data), "--http-port", str(served.http_port),
            "--dicom-port", str(served.dicom_port), *options]
    with served.log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_ENV)
        try:
            _wait_port(served.dicom_port, proc)
            _wait_port(served.http_port, proc)
            yield served
        finally:
            proc.send_signal(signal.SIGTERM)
            served.code = proc.wait(timeout=20)


def test_serve_runs_the_scp_next_to_http_and_stops_cleanly(tmp_path: Path) -> None:
    with serving(tmp_path / "data", "--aet", "ARCHIVE1") as served:
        dcmtk("echoscu", "-aec", "ARCHIVE1", "127.0.0.1", str(served.dicom_port))
    output = served.log
    assert served.code == 0, output
    assert "DICOM SCP ARCHIVE1 listening" in output
    assert "from ECHOSCU@127.0.0.1" in output and "released" in output


@pytest.mark.filterwarnings("ignore:.*nonsense:UserWarning", "ignore:.*12.00-13.00:UserWarning")
def test_odd_values_a_peer_sends_are_logged_without_pydicoms_warnings(tmp_path: Path) -> None:
    """pydicom reports a value it cannot read on its logger and again as a
    Python warning (two more lines, its file and source line): the server
    keeps the logger's line, so that a hostile peer fills the log less."""
    data = tmp_path / "data"
    subprocess.run([*LIGHTBOX, "node", "add", "odd", "--aet", "ODDSCU", "--host", "127.0.0.1",
                    "--port", "104", "--data", str(data)], env=_ENV, check=True, timeout=120)
    with serving(data) as served:
        ae = AE(ae_title="ODDSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(contexts.STUDY_ROOT_FIND)
        assoc = ae.associate("127.0.0.1", served.dicom_port, ae_title="LIGHTBOX")
        assert assoc.is_established
        statuses = []
        for charset, uid in (("nonsense", "1.2.3"), ("ISO_IR 100", "12:00-13:00")):
            identifier = Dataset()
            identifier.SpecificCharacterSet = charset
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = uid
            answers = assoc.send_c_find(identifier, contexts.STUDY_ROOT_FIND)
            statuses += [status.Status for status, _ in answers]
        assoc.release()
    output = served.log
    assert statuses == [Find.SUCCESS, Find.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS]
    assert "Unknown encoding 'nonsense'" in output
    assert "Invalid value for VR UI: '12:00-13:00'" in output
    for warned in ("UserWarning", "warn_and_log", "pydicom/"):
        assert warned not in output, output


def _association_request(calling: bytes, items: bytes) -> bytes:
    """An A-ASSOCIATE-RQ PDU with ``items`` as its variable items."""
    body = (b"\x00\x01\x00\x00" + b"LIGHTBOX".ljust(16) + calling.ljust(16) + bytes(32)
            + items)
    return b"\x01\x00" + struct.pack(">L", len(body)) + body


MALFORMED_REQUESTS = {
    # An item whose length runs past the end of the PDU.
    "an item longer than its PDU": _association_request(b"STORESCU", b"\x10\x00\x00\xff1.2"),
    # A calling AE title that is not ASCII.
    "a calling AE title beyond ASCII": _association_request(
        "SCU\u00e9".encode("latin-1"), b"\x10\x00\x00\x15" + b"1.2.840.10008.3.1.1.1"),
}


def test_malformed_requests_are_logged_in_a_line_each_not_a_traceback(tmp_path: Path) -> None:
    """pynetdicom logs the traceback of its own decoding code for every PDU it
    cannot decode; the server keeps the line that says what was wrong."""
    with serving(tmp_path / "data") as served:
        for request in MALFORMED_REQUESTS.values():
            with socket.create_connection(("127.0.0.1", served.dicom_port), timeout=10) as s:
                s.sendall(request)
                answer = s.recv(1)  # an abort or a rejection, or the connection closes
                assert answer in (b"", b"\x03", b"\x07"), answer
        dcmtk("echoscu", "-aec", "LIGHTBOX", "127.0.0.1", str(served.dicom_port))
    output = served.log
    assert "Unable to decode the received PDU data" in output
    assert "AssertionError" in output and "UnicodeDecodeError" in output
    assert "Traceback" not in output and "pynetdicom/" not in output, output


BAD_SCU_ARGUMENTS = [
    (["find", "-k", "StudyDate=2024"], "StudyDate must be YYYYMMDD or a range"),
    (["find", "-k", "Rows=abc"], "Rows must be an integer"),
    (["find", "-k", "SliceThickness=thick"], "SliceThickness: Invalid value for VR DS"),
    (["find", "-k", "PatientID=" + "9" * 65], "exceeds the maximum length of 64"),
    (["find", "-k", "StudyInstanceUID=1.2.x"], "not a valid UID"),
    (["find", "-k", "=1"], "a key needs a keyword or tag"),
    (["find", "-k", "NotAKeyword=1"], "not a DICOM keyword or tag"),
    (["find", "-k", "PatientName=a\tb"], "cannot be a matching value"),
    (["move", "--study", "../../etc"], "not a valid UID"),
    (["move", "--study", "1.2.3", "--to", "A\\B"], "without backslash"),
    (["get", "--study", "1.2.3.x"], "not a valid UID"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_SCU_ARGUMENTS)
def test_bad_scu_arguments_are_refused_before_any_connection(
    archive: Archive, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.2)
        node = f"PEER@127.0.0.1:{listener.getsockname()[1]}"
        code, output = _run(archive, capsys, argv[0], node, *argv[1:])
        with pytest.raises(TimeoutError):
            listener.accept()[0].close()  # nobody connected
    assert code == 2 and output.startswith("lightbox: ") and message in output, output


@pytest.mark.parametrize(("node", "message"), [
    ("A" * 17 + "@127.0.0.1:104", "an AE title needs 1 to 16 characters"),
    ("PEER@127.0.0.1:99999", "a port is between 1 and 65535"),
    ("@127.0.0.1:104", "an AE title needs 1 to 16 characters"),
    ("nosuchnode", "no node named 'nosuchnode'"),
])
def test_a_bad_ad_hoc_node_is_named_in_the_message(
    archive: Archive, capsys: pytest.CaptureFixture[str], node: str, message: str
) -> None:
    code, output = _run(archive, capsys, "echo", node)
    assert code == 2 and message in output and "Traceback" not in output, output


def test_an_unreachable_node_is_one_clear_message(
    archive: Archive, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nothing listens there
    assert _run(archive, capsys, "node", "add", "gone", "--aet", "GONE", "--host",
                "127.0.0.1", "--port", str(port))[0] == 0
    code, output = _run(archive, capsys, "echo", "gone")
    assert code == 2
    assert (f"lightbox: node gone (GONE@127.0.0.1:{port}) could not be associated"
            in output), output
