"""State shared by the figures of one run: sizes, servers, the CT series, logging."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import corpus
import servers
from dicomweb_clients import Conn, stow_requests
from results import Results

T = TypeVar("T")
STOW_BATCH = 10
CONCURRENT_CLIENTS = 6
TARGETS = ("orthanc", "lightbox")


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does (full and --quick runs)."""

    stow_instances: int
    stow_rounds: int  # STOW and the write ceiling alternate in this many rounds
    frame_seconds: float  # each frames measurement: at least one pass and this long
    frame_rounds: int  # nginx, Orthanc and Lightbox alternate; the median round counts
    frame_max_requests: int
    metadata_requests: int
    qido_requests: int
    memory_instances: int
    series_slices: int = 200

    @classmethod
    def pick(cls, quick: bool) -> Sizes:
        if quick:
            return cls(
                stow_instances=100,
                stow_rounds=2,
                frame_seconds=2.0,
                frame_rounds=1,
                frame_max_requests=8000,
                metadata_requests=10,
                qido_requests=20,
                memory_instances=400,
            )
        return cls(
            stow_instances=1500,
            stow_rounds=5,
            frame_seconds=4.0,
            frame_rounds=3,
            frame_max_requests=40000,
            metadata_requests=20,
            qido_requests=50,
            memory_instances=2000,
        )


@dataclass
class Bench:
    """Shared state of one run."""

    tmp: Path
    sizes: Sizes
    corpus_script: Path
    servers: dict[str, servers.Server]  # "orthanc" and "lightbox"
    results: Results
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    series_files: list[Path] = field(default_factory=list)
    series_instances: list[bytes] = field(default_factory=list)  # relabelled for this run
    series_refs: list[corpus.InstanceRef] = field(default_factory=list)
    uploaded: set[str] = field(default_factory=set)

    def conn(self, name: str, timeout_s: float = 120.0) -> Conn:
        srv = self.servers[name]
        return Conn(servers.HOST, srv.port, srv.auth_headers(), timeout_s=timeout_s)

    def detail(self, *keys: str) -> dict[str, Any]:
        node = self.results.details
        for key in keys:
            node = node.setdefault(key, {})
        return node

    def check_alive(self) -> None:
        for name, srv in self.servers.items():
            if not srv.alive():
                raise servers.ServerError(
                    f"{name} died (exit {srv.proc.returncode}); log: {srv.log_path}"
                )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rotated(items: Sequence[T], k: int) -> list[T]:
    """``items`` starting at position ``k``: alternating rounds share out any order bias."""
    k %= len(items)
    return [*items[k:], *items[:k]]


def stow_bodies(instances: list[bytes], tag: str) -> list[tuple[str, bytes, int]]:
    """multipart/related STOW-RS bodies of STOW_BATCH instances: (boundary, body, count)."""
    bodies = []
    for i in range(0, len(instances), STOW_BATCH):
        batch = instances[i : i + STOW_BATCH]
        boundary = corpus.new_boundary(f"{tag}{i}")
        bodies.append((boundary, corpus.multipart_body(batch, boundary), len(batch)))
    return bodies


def prepare_series(bench: Bench) -> None:
    """Generate the 200-slice CT series (frames, metadata, QIDO, memory templates)."""
    if bench.series_files:
        return
    log(f"generating the {bench.sizes.series_slices}-slice 512x512 CT series")
    bench.series_files = corpus.generate(
        bench.corpus_script,
        bench.tmp / "corpus-series",
        patients=1,
        slices=bench.sizes.series_slices,
        seed=11,
    )
    bench.series_instances = corpus.relabelled(
        bench.series_files, f"series-{bench.run_id}", patient_prefix=f"S{bench.run_id}"
    )
    bench.series_refs = [corpus.read_ref(b) for b in bench.series_instances]


def upload_series(bench: Bench) -> None:
    """Store the series on both servers (untimed), once."""
    prepare_series(bench)
    for name in TARGETS:
        if name in bench.uploaded:
            continue
        bench.check_alive()
        log(f"{name}: storing the series ({len(bench.series_instances)} instances, untimed)")
        bodies = stow_bodies(bench.series_instances, f"series-{name}")
        conn = bench.conn(name)
        try:
            path = f"{bench.servers[name].prefix}/studies"
            seconds = stow_requests(conn, path, bodies, 600.0)
        finally:
            conn.close()
        bench.uploaded.add(name)
        log(f"{name}: series stored in {seconds:.1f}s")
