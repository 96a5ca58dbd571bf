"""Minimal DICOMweb clients on raw ``http.client`` keep-alive connections.

The same code fetches frames from the DICOMweb servers and from the nginx static ceiling,
so the ceiling measures exactly the client overhead that the servers' figures include.
No Accept-Encoding is ever sent: responses come back uncompressed.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
STUDY_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
JSON_ACCEPT = "application/dicom+json"
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary={boundary}'

# Tags in DICOM JSON responses.
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
STUDY_INSTANCE_UID = "0020000D"


class BenchHTTPError(RuntimeError):
    """An unexpected status or body from a server under test."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def check(self, what: str, ok: Iterable[int] = (200,)) -> Reply:
        if self.status not in tuple(ok):
            raise BenchHTTPError(f"{what}: HTTP {self.status}: {self.body[:500]!r}")
        return self


class Conn:
    """One persistent HTTP/1.1 connection to a loopback server."""

    IDLE_RECONNECT_S = 0.5  # Orthanc closes idle keep-alive connections after 1 s

    def __init__(
        self, host: str, port: int, headers: dict[str, str] | None = None, timeout_s: float = 120.0
    ) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.headers = dict(headers or {})
        self._conn: http.client.HTTPConnection | None = None
        self._last = 0.0

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is not None and time.monotonic() - self._last > self.IDLE_RECONNECT_S:
            self.close()
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _send(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None,
        headers: dict[str, str] | None,
    ) -> http.client.HTTPResponse:
        conn = self._connection()
        conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
        return conn.getresponse()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """A request whose whole response is read; GETs are retried once on a dropped link."""
        for attempt in (1, 2):
            try:
                resp = self._send(method, path, body, headers)
                data = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt == 2 or method != "GET":
                    raise
                continue
            if resp.will_close:
                self.close()
            self._last = time.monotonic()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        raise AssertionError("unreachable")

    def get(self, path: str, accept: str) -> Reply:
        return self.request("GET", path, headers={"Accept": accept})

    def stream_get(
        self,
        path: str,
        accept: str,
        chunk: int = 1 << 20,
        max_bytes: int = 1 << 40,
        deadline_s: float = 1800.0,
    ) -> tuple[int, dict[str, str], int, bytes]:
        """GET and discard the body while counting it: (status, headers, bytes, head)."""
        self.close()  # a fresh connection: the body may be close-delimited
        resp = self._send("GET", path, None, {"Accept": accept})
        headers = {k.lower(): v for k, v in resp.getheaders()}
        total, head = 0, b""
        end = time.monotonic() + deadline_s
        while total < max_bytes and time.monotonic() < end:
            data = resp.read(chunk)
            if not data:
                break
            if len(head) < 4096:
                head += data[: 4096 - len(head)]
            total += len(data)
        self.close()
        return resp.status, headers, total, head

    def stream_post(
        self, path: str, chunks: Iterator[bytes], content_length: int, content_type: str
    ) -> Reply:
        """POST a body produced by ``chunks`` with an exact Content-Length (not chunked)."""
        self.close()
        headers = {
            "Content-Type": content_type,
            "Content-Length": str(content_length),
            "Accept": JSON_ACCEPT,
        }
        resp = self._send("POST", path, chunks, headers)
        data = resp.read()
        self.close()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)


# --------------------------------------------------------------------------- multipart

_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


def parse_multipart(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart/related body into (part headers, part content)."""
    found = _BOUNDARY.search(content_type)
    if not content_type.lower().startswith("multipart/") or not found:
        raise BenchHTTPError(f"not a multipart response: {content_type!r}")
    delimiter = b"--" + (found.group(1) or found.group(2)).encode()
    parts: list[tuple[dict[str, str], bytes]] = []
    for raw in body.split(delimiter)[1:]:
        if raw.startswith(b"--"):
            break
        raw = raw.removeprefix(b"\r\n")
        head, sep, content = raw.partition(b"\r\n\r\n")
        if not sep:
            raise BenchHTTPError("multipart part without a header block")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content.removesuffix(b"\r\n")))
    return parts


# --------------------------------------------------------------------------- STOW-RS


def check_stow_reply(reply: Reply, expected: int, what: str) -> None:
    reply.check(what)
    doc = reply.json()
    if not isinstance(doc, dict):
        raise BenchHTTPError(f"{what}: STOW response is not a DICOM JSON object")
    failed = doc.get(FAILED_SOP_SEQUENCE, {}).get("Value") or []
    stored = doc.get(REFERENCED_SOP_SEQUENCE, {}).get("Value") or []
    if failed or len(stored) != expected:
        raise BenchHTTPError(f"{what}: stored {len(stored)}/{expected}, failed {len(failed)}")


def stow_requests(
    conn: Conn, path: str, bodies: list[tuple[str, bytes, int]], deadline_s: float
) -> float:
    """POST each (boundary, body, instance count) in turn; return the elapsed seconds."""
    end = time.monotonic() + deadline_s
    t0 = time.perf_counter()
    for i, (boundary, body, count) in enumerate(bodies):
        if time.monotonic() > end:
            raise BenchHTTPError(f"STOW did not finish within {deadline_s:.0f}s")
        reply = conn.request(
            "POST",
            path,
            body,
            {"Content-Type": STOW_TYPE.format(boundary=boundary), "Accept": JSON_ACCEPT},
        )
        check_stow_reply(reply, count, f"STOW request {i + 1}")
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- frames


@dataclass
class FetchResult:
    requests: int
    seconds: float
    bytes: int
    clients: int

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class FetchPlan:
    """Fetch ``paths`` round-robin until at least one full pass and ``min_seconds`` are done,
    or ``max_requests`` were sent; give up at ``deadline_s``."""

    host: str
    port: int
    paths: list[str]
    headers: dict[str, str]
    min_len: int
    min_seconds: float
    max_requests: int
    deadline_s: float


def _fetch_worker(plan: FetchPlan, cursor: Any, barrier: Any, out: Any) -> None:
    """One client process: one keep-alive connection, requests one after the other."""
    conn = Conn(plan.host, plan.port, plan.headers, timeout_s=60.0)
    n = nbytes = 0
    error = None
    try:
        barrier.wait(timeout=60)
        t0 = time.monotonic()
        while True:
            with cursor.get_lock():
                i = cursor.value
                cursor.value += 1
            now = time.monotonic()
            done_pass = i >= len(plan.paths)
            if i >= plan.max_requests or (done_pass and now - t0 >= plan.min_seconds):
                break
            if now - t0 > plan.deadline_s:
                raise BenchHTTPError(f"no complete pass within {plan.deadline_s:.0f}s")
            path = plan.paths[i % len(plan.paths)]
            reply = conn.request("GET", path)
            if reply.status != 200 or len(reply.body) < plan.min_len:
                raise BenchHTTPError(
                    f"GET {path}: HTTP {reply.status}, {len(reply.body)} bytes: "
                    f"{reply.body[:300]!r}"
                )
            n += 1
            nbytes += len(reply.body)
    except Exception as exc:  # reported to the parent
        error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
        out.put((n, nbytes, time.perf_counter(), error))


def fetch_concurrently(plan: FetchPlan, clients: int) -> FetchResult:
    """Run ``clients`` client processes (no shared GIL) sharing one request cursor.

    perf_counter is CLOCK_MONOTONIC, comparable across processes: the time is taken from
    the common start to the last client's last response.
    """
    ctx = mp.get_context("fork")
    cursor = ctx.Value("q", 0)
    barrier = ctx.Barrier(clients + 1)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_fetch_worker, args=(plan, cursor, barrier, out), daemon=True)
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    reports = []
    try:
        barrier.wait(timeout=60)
        t0 = time.perf_counter()
        for _ in procs:
            reports.append(out.get(timeout=plan.deadline_s + 120))
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
    errors = [r[3] for r in reports if r[3]]
    if errors:
        raise BenchHTTPError(errors[0])
    total = sum(r[0] for r in reports)
    if total < len(plan.paths):
        raise BenchHTTPError(f"only {total}/{len(plan.paths)} requests done")
    elapsed = max(r[2] for r in reports) - t0
    return FetchResult(total, elapsed, sum(r[1] for r in reports), clients)


# --------------------------------------------------------------------------- latency


def interleaved_latencies(
    targets: dict[str, tuple[Conn, str, Callable[[Reply], None] | None]],
    accept: str,
    count: int,
    warmup: int,
    deadline_s: float,
) -> dict[str, list[float]]:
    """Wall times (ms) of ``count`` GETs per target after ``warmup`` untimed ones.

    The targets take turns request by request, so drift on a shared machine hits them alike.
    Each target is (connection, path, validator of the first reply).
    """
    end = time.monotonic() + deadline_s
    samples: dict[str, list[float]] = {name: [] for name in targets}
    for i in range(warmup + count):
        if time.monotonic() > end:
            break
        for name, (conn, path, validate) in targets.items():
            t0 = time.perf_counter()
            reply = conn.get(path, accept)
            ms = (time.perf_counter() - t0) * 1000
            reply.check(f"{name}: GET {path}")
            if i == 0 and validate is not None:
                validate(reply)
            if i >= warmup:
                samples[name].append(ms)
    if any(not v for v in samples.values()):
        raise BenchHTTPError(f"not every target answered within {deadline_s:.0f}s")
    return samples
