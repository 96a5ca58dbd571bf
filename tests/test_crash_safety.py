"""kill -9 during STOW-RS and C-STORE: every acknowledged instance survives,
the index stays whole.

A real ``lightbox serve`` process takes single-instance STOW-RS requests (or
C-STOREs) from several client threads; once about a hundred are acknowledged
it gets SIGKILL while requests are in flight. After a restart on the same
data folder, every acknowledged instance must be there (STOW-RS: byte for
byte), and the index must agree with itself and with the blob store
(``lightbox check``).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import httpx
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import func, select

from lightbox.archive import Archive
from lightbox.index.schema import instances, series, studies
from lightbox.web.multipart import encode_parts, parse_content_type
from tests.conftest import database_url, free_port, make_settings
from tests.factories import ROOT, ct_dataset, to_bytes

TOTAL = 300
KILL_AFTER = 100
CLIENTS = 4
BOUNDARY = "crash-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
ALL_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def lightbox(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightbox", *args]


@contextmanager
def running_server(
    data: Path, url: str, log: Path, dicom_port: int | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``lightbox serve`` on a free port; yields the process and its base URL."""
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            lightbox(
                "serve", "--data", str(data), "--database", url, "--host", "127.0.0.1",
                "--http-port", str(port), "--dicom-port", str(dicom_port or free_port()),
            ),
            stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"server exited: {log.read_text()[-2000:]}"
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start in 30 s"
            time.sleep(0.05)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@dataclass(frozen=True)
class Prepared:
    sop: str
    study: str
    series: str
    data: bytes


def make_instances() -> list[Prepared]:
    """TOTAL instances of 64x64 in 3 studies x 2 series, in an interleaved order
    so that concurrent requests update the same study and series rows."""
    layout = [(generate_uid(prefix=ROOT), [generate_uid(prefix=ROOT) for _ in range(2)])
              for _ in range(3)]
    made = []
    for n in range(TOTAL):
        study, series_uids = layout[n % 3]
        ds = ct_dataset(
            study=study, series=series_uids[(n // 3) % 2], size=64, instance_number=n + 1,
            patient_id=f"CRASH-{n % 3}",
        )
        made.append(Prepared(ds.SOPInstanceUID, study, ds.SeriesInstanceUID, to_bytes(ds)))
    return made


def send_until_killed(
    base: str, token: str, work: queue.Queue[Prepared], acked: dict[str, bytes],
    lock: threading.Lock,
) -> None:
    """One client: POST one instance per request until the queue or the server is gone."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": STOW_TYPE}
    with httpx.Client(timeout=20) as client:
        while True:
            try:
                item = work.get_nowait()
            except queue.Empty:
                return
            body = encode_parts([("application/dicom", item.data)], BOUNDARY)
            try:
                response = client.post(base + "/dicom-web/studies", content=body,
                                       headers=headers)
            except httpx.TransportError:
                return  # the server is gone
            if response.status_code != 200:
                continue
            stored = response.json().get("00081199", {}).get("Value", [])
            if any(ref["00081155"]["Value"] == [item.sop] for ref in stored):
                with lock:
                    acked[item.sop] = item.data


def kill_after_acknowledged(proc: subprocess.Popen[bytes], acked: dict[str, bytes],
                            lock: threading.Lock, threads: list[threading.Thread]) -> int:
    """SIGKILL the server once KILL_AFTER instances are acknowledged; return that count."""
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        with lock:
            count = len(acked)
        if count >= KILL_AFTER:
            break
        assert any(t.is_alive() for t in threads), f"clients stopped after {count} acks"
        time.sleep(0.002)
    else:
        raise AssertionError(f"only {len(acked)} instances acknowledged in 40 s")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    return count


def clients_until_killed(proc: subprocess.Popen[bytes], client: Callable[[], None],
                         acked: dict[str, bytes], lock: threading.Lock) -> None:
    """CLIENTS threads running ``client``; the server killed once KILL_AFTER
    instances are acknowledged, in the middle of the work."""
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        kill_after_acknowledged(proc, acked, lock, threads)
    finally:
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert KILL_AFTER <= len(acked) < TOTAL, "the kill must land mid-way"


def dicom_parts(response: httpx.Response) -> list[bytes]:
    """The bodies of a multipart/related response."""
    _, params = parse_content_type(response.headers["content-type"])
    delimiter = b"--" + params["boundary"].encode()
    parts = []
    for chunk in response.content.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, body = chunk.partition(b"\r\n\r\n")
        assert body.endswith(b"\r\n")
        parts.append(body[:-2])
    return parts


def check_index(data: Path, url: str) -> tuple[int, int]:
    """The index agrees with itself and with the blobs; returns (rows, orphan blobs)."""
    archive = Archive.open(make_settings(data, url), migrate=False)
    try:
        with archive.db.read() as conn:
            rows = conn.execute(
                select(instances.c.sop_instance_uid, instances.c.blob_key, instances.c.size)
            ).all()
            for sop, key, size in rows:
                path = archive.blobs.path(key)
                assert path.is_file(), f"instance {sop}: blob {key} is missing"
                assert path.stat().st_size == size, f"instance {sop}: blob size differs"
            per_series = dict(conn.execute(
                select(instances.c.series_pk, func.count()).group_by(instances.c.series_pk)
            ).all())
            for pk, counter in conn.execute(select(series.c.pk, series.c.number_of_instances)):
                assert per_series.get(pk, 0) > 0, f"series {pk} has no instances"
                assert counter == per_series[pk], f"series {pk}: counter {counter}"
            series_per_study = dict(conn.execute(
                select(series.c.study_pk, func.count()).group_by(series.c.study_pk)
            ).all())
            instances_per_study = dict(conn.execute(
                select(instances.c.study_pk, func.count()).group_by(instances.c.study_pk)
            ).all())
            for pk, n_series, n_instances in conn.execute(
                select(studies.c.pk, studies.c.number_of_series, studies.c.number_of_instances)
            ):
                assert series_per_study.get(pk, 0) > 0, f"study {pk} has no series"
                assert (n_series, n_instances) == (
                    series_per_study[pk], instances_per_study.get(pk, 0)
                ), f"study {pk}: counters differ from the rows"
        root = archive.settings.blob_root
        on_disk = {
            p.name for p in root.rglob("*")
            if p.is_file() and not p.relative_to(root).parts[0].startswith(".")
        }
        referenced = {key for _, key, _ in rows}
        assert referenced <= on_disk
        return len(rows), len(on_disk - referenced)
    finally:
        archive.close()


def test_acknowledged_instances_survive_kill_9(backend: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    log = tmp_path / "server.log"
    prepared = make_instances()
    with database_url(backend, data) as url:
        token = subprocess.run(
            lightbox("token", "create", "--data", str(data), "--database", url),
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
        assert token

        work: queue.Queue[Prepared] = queue.Queue()
        for item in prepared:
            work.put(item)
        acked: dict[str, bytes] = {}
        lock = threading.Lock()
        with running_server(data, url, log) as (proc, base):
            clients_until_killed(proc, lambda: send_until_killed(base, token, work, acked, lock),
                                 acked, lock)

        rows, orphans = check_index(data, url)
        assert rows >= len(acked)
        # A blob without a row can only come from a request in flight at the kill.
        assert orphans <= CLIENTS

        with running_server(data, url, log) as (_proc, base):
            headers = {"Authorization": f"Bearer {token}", "Accept": ALL_DICOM}
            with httpx.Client(timeout=20, headers=headers) as client:
                for item in prepared:
                    if item.sop not in acked:
                        continue
                    response = client.get(
                        f"{base}/dicom-web/studies/{item.study}/series/{item.series}"
                        f"/instances/{item.sop}"
                    )
                    assert response.status_code == 200, (item.sop, response.text[:300])
                    assert dicom_parts(response) == [item.data], f"{item.sop} differs"
                # The archive takes new work after the restart.
                fresh = ct_dataset(size=64)
                body = encode_parts([("application/dicom", to_bytes(fresh))], BOUNDARY)
                stored = client.post(base + "/dicom-web/studies", content=body,
                                     headers={"Content-Type": STOW_TYPE})
                assert stored.status_code == 200, stored.text[:300]
        check_index(data, url)



def store_until_killed(port: int, work: queue.Queue[Prepared], acked: dict[str, bytes],
                       lock: threading.Lock) -> None:
    """One DICOM client: C-STORE one instance after the other over one
    association, until the queue or the server is gone."""
    ae = AE(ae_title="CRASHSCU")
    # Short: after the kill pynetdicom waits out the DIMSE timeout, not noticing the close.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="LIGHTBOX")
    if not assoc.is_established:
        return
    try:
        while assoc.is_established:
            try:
                item = work.get_nowait()
            except queue.Empty:
                return
            ds = dcmread(BytesIO(item.data))
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:  # the kill ended the association just now
                return
            if status and status.Status == 0:
                with lock:
                    acked[item.sop] = item.data
    finally:
        if assoc.is_established:
            assoc.release()
        sock = assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.close()  # an association the kill cut off leaves its socket open


def test_acknowledged_c_stores_survive_kill_9(backend: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    log = tmp_path / "server.log"
    prepared = make_instances()
    port = free_port()
    with database_url(backend, data) as url:
        work: queue.Queue[Prepared] = queue.Queue()
        for item in prepared:
            work.put(item)
        acked: dict[str, bytes] = {}
        lock = threading.Lock()
        with running_server(data, url, log, dicom_port=port) as (proc, _base):
            _wait_listening(port)
            clients_until_killed(proc, lambda: store_until_killed(port, work, acked, lock),
                                 acked, lock)

        rows, orphans = check_index(data, url)
        assert rows >= len(acked) and orphans <= CLIENTS
        archive = Archive.open(make_settings(data, url), migrate=False)
        try:
            with archive.db.read() as conn:
                indexed = set(conn.execute(select(instances.c.sop_instance_uid)).scalars())
        finally:
            archive.close()
        assert set(acked) <= indexed
        checked = subprocess.run(
            lightbox("check", "--data", str(data), "--database", url, "--quiet",
                     "--remove-orphans", "--older-than", "1s"),
            capture_output=True, text=True, timeout=120)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.splitlines()[-1] == "ok"
        assert check_index(data, url) == (rows, 0)


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "the DICOM port did not open in 30 s"
            time.sleep(0.05)
