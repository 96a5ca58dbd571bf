"""``lightbox serve`` with several workers: one parent forks the HTTP workers,
the DIMSE processes and each HTTP worker's header helper, keeps them running,
and stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from sqlalchemy import func, select

from lightbox.archive import Archive
from lightbox.index.schema import instances
from lightbox.settings import Settings
from tests.conftest import free_port
from tests.dimse_peers import dcmtk
from tests.factories import ct_dataset, write


def _children(pid: int) -> dict[int, str]:
    """pid → process name of ``pid``'s children."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid:
            found[int(entry.name)] = name
    return found


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has ended


def _named(pid: int, name: str) -> list[int]:
    return sorted(p for p, n in _children(pid).items() if n.startswith(name))


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.1)


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], http: int, dicom: int, log: Path) -> None:
        self.proc, self.http, self.dicom, self.log = proc, http, dicom, log

    def healthy(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            return httpx.get(f"http://127.0.0.1:{self.http}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def tree_complete(self) -> bool:
        pid = self.proc.pid
        http, dicom = _named(pid, "lightbox-http"), _named(pid, "lightbox-dicom")
        helpers = [h for w in http for h in _named(w, "lightbox-header")]
        return len(http) == 2 and len(dicom) == 2 and len(helpers) == 2


@contextmanager
def served(data: Path, tmp_path: Path) -> Iterator[Served]:
    http, dicom = free_port(), free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTBOX_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lightbox", "serve", "--data", str(data), "--workers", "2",
             "--host", "127.0.0.1", "--http-port", str(http), "--dicom-port", str(dicom)],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Served(proc, http, dicom, log)
    try:
        _wait_for("the server answers", server.healthy)
        _wait_for("two HTTP workers, two DIMSE processes, two helpers", server.tree_complete)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_workers_are_forked_replaced_and_stopped(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with served(data, tmp_path) as server:
        pid = server.proc.pid
        before = _children(pid)
        helpers = [h for w in _named(pid, "lightbox-http") for h in _named(w, "lightbox-header")]

        # Four associations at once, so that both DIMSE processes have work:
        # every instance lands.
        folders = []
        for n in range(4):
            folder = tmp_path / f"part{n}"
            folder.mkdir()
            for i in range(5):
                write(ct_dataset(instance_number=i + 1), folder / f"{i}.dcm")
            folders.append(folder)
        storescu = [subprocess.Popen(["storescu", "-aec", "LIGHTBOX", "+sd", "127.0.0.1",
                                      str(server.dicom), str(folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for folder in folders]
        assert [p.wait(timeout=120) for p in storescu] == [0, 0, 0, 0]

        # A worker killed outright is replaced; so is a DIMSE process. The
        # killed worker's helper ends with it (its input closes).
        killed_http = _named(pid, "lightbox-http")[0]
        killed_dicom = _named(pid, "lightbox-dicom")[0]
        os.kill(killed_http, signal.SIGKILL)
        os.kill(killed_dicom, signal.SIGKILL)
        _wait_for("replacements", lambda: server.tree_complete() and killed_http not in
                  _children(pid) and killed_dicom not in _children(pid))
        assert len(set(_children(pid)) - set(before)) == 2
        _wait_for("the killed worker's helper ends",
                  lambda: not _running(helpers[0]) or not _running(helpers[1]))
        _wait_for("the server answers", server.healthy)
        for _ in range(4):  # every DIMSE process answers (the port is polled by both)
            dcmtk("echoscu", "-aec", "LIGHTBOX", "127.0.0.1", str(server.dicom))
        everyone = [*_children(pid), *(h for w in _named(pid, "lightbox-http")
                                       for h in _named(w, "lightbox-header"))]

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        _wait_for("every process ended", lambda: not any(map(_running, everyone)), 10)
    output = server.log.read_text()
    assert "HTTP worker 1 (pid" in output and "ended with status -9; starting another" in output
    assert "DIMSE process 1 (pid" in output

    archive = Archive.open(Settings(data=data))
    try:
        with archive.db.read() as conn:
            assert conn.execute(select(func.count()).select_from(instances)).scalar_one() == 20
    finally:
        archive.close()


def test_a_child_that_fails_at_start_stops_the_server(tmp_path: Path) -> None:
    # The supervisor in a process of its own: it forks, which a test process
    # with threads must not.
    script = (
        "import sys, time\n"
        "from lightbox.supervisor import Child, ChildFailed, Supervisor\n"
        "def fails(): sys.exit(3)\n"
        "def serves(): time.sleep(60)\n"
        "try:\n"
        "    Supervisor([Child('steady', serves), Child('broken', fails)]).run()\n"
        "except ChildFailed as exc:\n"
        "    print('failed:', exc.message)\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "failed: broken ended while starting (status 3)"
    assert time.monotonic() - started < 20  # the steady child was stopped, not waited for


def test_sigterm_to_every_process_at_once_stops_them_cleanly(tmp_path: Path) -> None:
    # A service manager stopping the server signals every process of its group.
    with served(tmp_path / "data", tmp_path) as server:
        pid = server.proc.pid
        everyone = [pid, *_children(pid), *(h for w in _named(pid, "lightbox-http")
                                            for h in _named(w, "lightbox-header"))]
        for each in everyone:
            os.kill(each, signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        _wait_for("every process ended", lambda: not any(map(_running, everyone)), 10)
    output = server.log.read_text()
    assert "Traceback" not in output and "failed" not in output, output


def test_one_process_server_stops_on_sigterm_with_status_0(tmp_path: Path) -> None:
    http, dicom = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTBOX_")}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lightbox", "serve", "--data", str(tmp_path / "data"),
             "--workers", "1", "--http-port", str(http), "--dicom-port", str(dicom)],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Served(proc, http, dicom, log)
    try:
        _wait_for("the server answers", server.healthy)
        dcmtk("echoscu", "-aec", "LIGHTBOX", "127.0.0.1", str(dicom))
    finally:
        proc.send_signal(signal.SIGTERM)
    # uvicorn raises the signal again once it has shut down; the SCP and the
    # archive are then closed in order, not cut off by it.
    assert proc.wait(timeout=30) == 0, log.read_text()
    assert "Traceback" not in log.read_text()
