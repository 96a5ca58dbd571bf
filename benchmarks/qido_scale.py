"""QIDO-RS study search by PatientID over an index of 1,000,000 instances.

    .venv/bin/python benchmarks/qido_scale.py [--instances 1000000] [--database URL]

Fills a fresh index with generated rows (patients → studies → series →
instances, realistic fan-out), starts ``lightbox serve`` on it, and times
``GET /dicom-web/studies?PatientID=…`` over HTTP for random existing patients.
Prints the median and 95th percentile. Runs on SQLite by default; pass a
PostgreSQL URL (an empty database) to measure PostgreSQL.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert, text

from lightbox.archive import Archive
from lightbox.index.schema import instances, patients, series, studies
from lightbox.settings import Settings

REPO = Path(__file__).resolve().parents[1]
STUDIES_PER_PATIENT = 3
SERIES_PER_STUDY = 4
CHUNK = 20_000


def fill(archive: Archive, total: int) -> list[str]:
    """Insert ``total`` instance rows with their parents; return the patient IDs."""
    per_series = max(total // (STUDIES_PER_PATIENT * SERIES_PER_STUDY * 1000), 1)
    per_patient = STUDIES_PER_PATIENT * SERIES_PER_STUDY * per_series
    n_patients = max(total // per_patient, 1)
    now = datetime.now(UTC)
    ids = [f"PID{p:07d}" for p in range(n_patients)]
    rows_p, rows_st, rows_se, rows_in = [], [], [], []
    st_pk = se_pk = in_pk = 0
    for p, pid in enumerate(ids, start=1):
        rows_p.append(
            {"pk": p, "identity": f"|{pid}", "patient_id": pid, "patient_name": f"NAME{p}^GIVEN"}
        )
        for s in range(STUDIES_PER_PATIENT):
            st_pk += 1
            rows_st.append(
                {
                    "pk": st_pk,
                    "patient_pk": p,
                    "patient_id": pid,
                    "patient_name": f"NAME{p}^GIVEN",
                    "study_instance_uid": f"1.2.999.{p}.{s}",
                    "study_date": f"2024{1 + s:02d}15",
                    "modalities_in_study": "\\CT\\",
                    "number_of_series": SERIES_PER_STUDY,
                    "number_of_instances": SERIES_PER_STUDY * per_series,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            for r in range(SERIES_PER_STUDY):
                se_pk += 1
                rows_se.append(
                    {
                        "pk": se_pk,
                        "study_pk": st_pk,
                        "modality": "CT",
                        "series_instance_uid": f"1.2.999.{p}.{s}.{r}",
                        "series_number": r + 1,
                        "number_of_instances": per_series,
                    }
                )
                for i in range(per_series):
                    in_pk += 1
                    rows_in.append(
                        {
                            "pk": in_pk,
                            "series_pk": se_pk,
                            "study_pk": st_pk,
                            "sop_instance_uid": f"1.2.999.{p}.{s}.{r}.{i}",
                            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                            "instance_number": i + 1,
                            "blob_key": "0" * 32,
                            "size": 0,
                            "dicom_json": b"{}",
                            "created_at": now,
                        }
                    )
                    if len(rows_in) >= CHUNK:
                        _flush(archive, rows_p, rows_st, rows_se, rows_in)
        if p % 1000 == 0:
            print(f"  {in_pk} instances", flush=True)
    _flush(archive, rows_p, rows_st, rows_se, rows_in)
    _advance_keys(archive)
    return ids


def _advance_keys(archive: Archive) -> None:
    """PostgreSQL: move each table's key sequence past the keys given here,
    so that instances stored later (the DIMSE benchmark's) get fresh ones."""
    if archive.db.is_sqlite:
        return  # SQLite takes the next rowid after the largest
    with archive.db.write() as conn:
        for table in (patients, studies, series, instances):
            conn.execute(text(
                f"SELECT setval(pg_get_serial_sequence('{table.name}', 'pk'), "
                f"(SELECT max(pk) FROM {table.name}))"
            ))


def _flush(archive: Archive, *batches: list[dict[str, object]]) -> None:
    with archive.db.write() as conn:
        for table, rows in zip((patients, studies, series, instances), batches, strict=True):
            if rows:
                conn.execute(insert(table), rows)
                rows.clear()


def measure(port: int, token: str, ids: list[str], count: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Authorization": f"Bearer {token}"}
    rng = random.Random(7)
    times = []
    for n in range(count + 20):
        pid = rng.choice(ids)
        started = time.perf_counter()
        conn.request("GET", f"/dicom-web/studies?PatientID={pid}", headers=headers)
        response = conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200 or pid.encode() not in body:
            raise RuntimeError(f"unexpected answer for {pid}: {response.status}")
        if n >= 20:  # the first requests warm caches
            times.append(elapsed * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--database", default="")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lb-qido-") as tmp:
        data = Path(tmp)
        archive = Archive.open(Settings(data=data, database=args.database))
        started = time.monotonic()
        ids = fill(archive, args.instances)
        print(f"filled {args.instances} instances in {time.monotonic() - started:.0f} s")
        archive.close()
        env = {**os.environ, "LIGHTBOX_DATA": str(data), "LIGHTBOX_DATABASE": args.database}
        lightbox = [sys.executable, "-m", "lightbox"]
        token = subprocess.run(
            [*lightbox, "token", "create"], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()
        port = _free_port()
        server = subprocess.Popen(
            [*lightbox, "serve", "--http-port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(port)
            times = measure(port, token, ids, args.requests)
        finally:
            server.terminate()
            server.wait(timeout=30)
    backend = "postgresql" if args.database else "sqlite"
    q95 = statistics.quantiles(times, n=20)[-1]
    print(
        f"QIDO /studies?PatientID over {args.instances} instances ({backend}): "
        f"median {statistics.median(times):.2f} ms, p95 {q95:.2f} ms"
    )
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("lightbox did not start")


if __name__ == "__main__":
    sys.exit(main())
