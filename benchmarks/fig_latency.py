"""Figure d: series /metadata and QIDO study search latency (median ms)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from bench import TARGETS, Bench, log, upload_series
from dicomweb_clients import (
    JSON_ACCEPT,
    STUDY_INSTANCE_UID,
    BenchHTTPError,
    Conn,
    Reply,
    interleaved_latencies,
)
from results import Row

Validator = Callable[[Reply], None]


def _run(
    bench: Bench, key: str, paths: dict[str, str], validate: Validator, count: int, warmup: int
) -> dict[str, float]:
    conns = {name: bench.conn(name) for name in TARGETS}
    try:
        targets: dict[str, tuple[Conn, str, Validator | None]] = {
            name: (conns[name], paths[name], validate) for name in TARGETS
        }
        samples = interleaved_latencies(targets, JSON_ACCEPT, count, warmup, 600.0)
    finally:
        for conn in conns.values():
            conn.close()
    medians = {name: statistics.median(v) for name, v in samples.items()}
    for name in TARGETS:
        bench.detail(key, name).update(
            path=paths[name], median_ms=medians[name], samples_ms=samples[name]
        )
    log(f"{key}: " + ", ".join(f"{n} median {m:.2f} ms" for n, m in medians.items()))
    return medians


def figure_metadata(bench: Bench) -> None:
    upload_series(bench)
    count = len(bench.series_refs)
    ref = bench.series_refs[0]

    def validate(reply: Reply) -> None:
        doc = reply.json()
        if not isinstance(doc, list) or len(doc) != count:
            raise BenchHTTPError(f"series metadata: {len(doc or [])} instances, not {count}")

    paths = {
        name: f"{bench.servers[name].prefix}/studies/{ref.study}/series/{ref.series}/metadata"
        for name in TARGETS
    }
    n = bench.sizes.metadata_requests
    log(f"series /metadata ({count} instances): {n} requests per server, interleaved")
    medians = _run(bench, "metadata", paths, validate, n, warmup=3)
    bench.results.add(
        Row(
            "metadata_ms",
            f"series /metadata, {count} instances, median",
            "ms",
            medians["orthanc"],
            medians["lightbox"],
            better="lower",
        )
    )


def figure_qido(bench: Bench) -> None:
    upload_series(bench)
    ref = bench.series_refs[0]

    def validate(reply: Reply) -> None:
        doc = reply.json()
        found = [d.get(STUDY_INSTANCE_UID, {}).get("Value", [None])[0] for d in doc or []]
        if ref.study not in found:
            raise BenchHTTPError(f"QIDO by PatientID did not find the study: {found}")

    paths = {
        name: f"{bench.servers[name].prefix}/studies?PatientID={ref.patient_id}" for name in TARGETS
    }
    n = bench.sizes.qido_requests
    log(f"QIDO-RS studies?PatientID={ref.patient_id}: {n} requests per server, interleaved")
    medians = _run(bench, "qido", paths, validate, n, warmup=5)
    bench.results.add(
        Row(
            "qido_ms",
            "QIDO study search by PatientID, median",
            "ms",
            medians["orthanc"],
            medians["lightbox"],
            better="lower",
        )
    )
