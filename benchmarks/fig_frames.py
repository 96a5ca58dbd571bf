"""Figures c and e: WADO-RS frames, against nginx serving the same bytes as static files."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import corpus
import servers
from bench import CONCURRENT_CLIENTS, TARGETS, Bench, log, prepare_series, rotated, upload_series
from ceiling import write_static_frames
from dicomweb_clients import (
    FRAME_ACCEPT,
    BenchHTTPError,
    FetchPlan,
    fetch_concurrently,
    parse_multipart,
)
from results import Row

CLIENT_COUNTS = (1, CONCURRENT_CLIENTS)


@dataclass(frozen=True)
class Endpoint:
    name: str
    port: int
    paths: list[str]
    headers: dict[str, str]


def _frame_paths(bench: Bench, name: str) -> list[str]:
    prefix = bench.servers[name].prefix
    return [
        f"{prefix}/studies/{r.study}/series/{r.series}/instances/{r.sop}/frames/1"
        for r in bench.series_refs
    ]


def _validate_frame(bench: Bench, name: str) -> None:
    """One frame, parsed: exactly the stored pixel data, in one part."""
    conn = bench.conn(name)
    try:
        reply = conn.get(_frame_paths(bench, name)[0], FRAME_ACCEPT).check(f"{name} frame")
    finally:
        conn.close()
    parts = parse_multipart(reply.headers.get("content-type", ""), reply.body)
    expected = corpus.pixel_data(bench.series_files[0])
    if len(parts) != 1 or parts[0][1] != expected:
        raise BenchHTTPError(
            f"{name}: frame 1 is not the stored pixel data "
            f"({len(parts)} parts, {[len(p[1]) for p in parts]} bytes)"
        )
    bench.detail("frames", name).update(
        accept=FRAME_ACCEPT,
        content_type=reply.headers.get("content-type"),
        part_content_type=parts[0][0].get("content-type"),
        response_bytes=len(reply.body),
    )


def _plan(bench: Bench, ep: Endpoint, min_len: int, min_seconds: float) -> FetchPlan:
    return FetchPlan(
        servers.HOST,
        ep.port,
        ep.paths,
        ep.headers,
        min_len,
        min_seconds,
        max_requests=bench.sizes.frame_max_requests,
        deadline_s=600.0,
    )


def _measure(bench: Bench, endpoints: list[Endpoint], min_len: int) -> dict[str, dict[int, float]]:
    """Alternate the endpoints over the rounds; the median round of each counts."""
    samples: dict[str, dict[int, list[float]]] = {
        ep.name: {c: [] for c in CLIENT_COUNTS} for ep in endpoints
    }
    for ep in endpoints:
        fetch_concurrently(_plan(bench, ep, min_len, 0.0), 1)  # warm-up: one pass
    rounds = bench.sizes.frame_rounds
    by_name = {ep.name: ep for ep in endpoints}
    for r in range(rounds):
        for name in rotated([ep.name for ep in endpoints], r):
            bench.check_alive()
            ep = by_name[name]
            for clients in CLIENT_COUNTS:
                res = fetch_concurrently(
                    _plan(bench, ep, min_len, bench.sizes.frame_seconds), clients
                )
                samples[name][clients].append(res.per_second)
                bench.detail("frames", name).setdefault(f"clients_{clients}", []).append(
                    {
                        "round": r + 1,
                        "requests": res.requests,
                        "seconds": res.seconds,
                        "frames_per_s": res.per_second,
                        "mb_per_s": res.bytes / res.seconds / 1e6,
                    }
                )
                log(
                    f"round {r + 1}/{rounds} {name}, {clients} client(s): "
                    f"{res.per_second:.0f} frames/s ({res.requests} requests in "
                    f"{res.seconds:.1f}s, {res.bytes / res.seconds / 1e6:.0f} MB/s)"
                )
    return {
        name: {c: statistics.median(v) for c, v in per.items()} for name, per in samples.items()
    }


def figure_frames(bench: Bench) -> None:
    upload_series(bench)
    prepare_series(bench)
    frame_len = bench.series_refs[0].frame_len
    for name in TARGETS:
        _validate_frame(bench, name)

    root = bench.tmp / "nginx-root"
    static_paths = write_static_frames(root, [corpus.pixel_data(f) for f in bench.series_files])
    nginx = servers.start_nginx(bench.tmp / "nginx", root, static_paths[0])
    log(f"static ceiling: {nginx.info.get('version')} on port {nginx.port}, same frames")
    bench.detail("frames", "nginx").update(version=nginx.info.get("version"), workers=2)
    endpoints = [Endpoint("nginx", nginx.port, static_paths, {})]
    for name in TARGETS:
        srv = bench.servers[name]
        headers = {**srv.auth_headers(), "Accept": FRAME_ACCEPT}
        endpoints.append(Endpoint(name, srv.port, _frame_paths(bench, name), headers))
    log(
        f"WADO-RS frames of the {len(static_paths)}-instance series: "
        f"{bench.sizes.frame_rounds} round(s) of >= {bench.sizes.frame_seconds:.0f}s per "
        f"endpoint and client count"
    )
    try:
        rates = _measure(bench, endpoints, frame_len)
    finally:
        nginx.stop()

    res = bench.results
    for c in CLIENT_COUNTS:
        res.add(
            Row(
                f"frames_{c}",
                f"WADO-RS frames, {c} client{'s' if c > 1 else ''}",
                "frames/s",
                rates["orthanc"][c],
                rates["lightbox"][c],
            )
        )
    for c in CLIENT_COUNTS:
        res.add(
            Row(
                f"static_{c}",
                f"nginx static ceiling, {c} client{'s' if c > 1 else ''}",
                "frames/s",
                rates["nginx"][c],
                rates["nginx"][c],
                target="ceiling",
                ceiling=True,
            )
        )
    for c in CLIENT_COUNTS:
        res.add(
            Row(
                f"frames_vs_static_{c}",
                f"frames vs static, {c} client{'s' if c > 1 else ''}",
                "% of ceiling",
                rates["orthanc"][c] / rates["nginx"][c],
                rates["lightbox"][c] / rates["nginx"][c],
                percent=True,
            )
        )
