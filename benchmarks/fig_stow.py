"""Figures a and b: STOW-RS ingest, against the machine's durable-write ceiling."""

from __future__ import annotations

import os
from pathlib import Path

import corpus
from bench import STOW_BATCH, TARGETS, Bench, log, rotated, stow_bodies
from ceiling import DurableWriter
from dicomweb_clients import stow_requests
from results import Row

STOW_TARGET = 0.75  # Lightbox STOW as a fraction of the durable-write ceiling


def _rounds(n: int, rounds: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into about ``rounds`` runs of whole STOW batches."""
    step = max(STOW_BATCH, -(-n // max(rounds, 1) // STOW_BATCH) * STOW_BATCH)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _warm_up(bench: Bench, files: list[Path]) -> None:
    """One untimed request per server, of instances labelled apart from the
    timed ones: what a server does once, on its first upload (Lightbox's
    worker starts making spare staging files, say), is not counted as ingest."""
    for name in TARGETS:
        warm = corpus.relabelled(files, f"warm-{name}-{bench.run_id}",
                                 patient_prefix=f"W{bench.run_id}")
        conn = bench.conn(name)
        try:
            stow_requests(conn, f"{bench.servers[name].prefix}/studies",
                          stow_bodies(warm, f"warm-{name}"), 300.0)
        finally:
            conn.close()


def figure_stow(bench: Bench) -> None:
    n = bench.sizes.stow_instances
    patients = max(1, -(-n // 100))
    log(f"STOW: generating {n} CT instances ({patients} patient(s) x up to 100 slices)")
    files = corpus.generate(
        bench.corpus_script,
        bench.tmp / "corpus-stow",
        patients=patients,
        slices=min(n, 100),
        seed=21,
    )[:n]
    # Each server gets its own SOP Instance UIDs and PatientIDs (unique to this run too),
    # rewritten in memory before timing.
    instances = {
        name: corpus.relabelled(
            files, f"stow-{name}-{bench.run_id}", patient_prefix=f"{name[0].upper()}{bench.run_id}"
        )
        for name in TARGETS
    }
    _warm_up(bench, files[:STOW_BATCH])
    writer = DurableWriter(bench.tmp / "write-ceiling")
    seconds = dict.fromkeys(TARGETS, 0.0)
    rounds = _rounds(n, bench.sizes.stow_rounds)
    log(
        f"STOW-RS: {n} instances per server, {STOW_BATCH} per request, one client, "
        f"in {len(rounds)} round(s) alternating with the durable-write ceiling"
    )
    try:
        for r, (lo, hi) in enumerate(rounds):
            done = []
            for target in rotated(("ceiling", *TARGETS), r):
                bench.check_alive()
                if target == "ceiling":
                    payloads = [f.read_bytes() for f in files[lo:hi]]
                    os.sync()  # no writeback of earlier work during the timed run
                    took = writer.write(payloads)
                else:
                    bodies = stow_bodies(instances[target][lo:hi], f"stow-{target}-{r}")
                    os.sync()
                    conn = bench.conn(target)
                    try:
                        path = f"{bench.servers[target].prefix}/studies"
                        took = stow_requests(conn, path, bodies, 900.0)
                    finally:
                        conn.close()
                    seconds[target] += took
                done.append(f"{target} {(hi - lo) / took:.0f}/s")
            log(f"round {r + 1}/{len(rounds)} ({hi - lo} instances): {', '.join(done)}")
    finally:
        writer.cleanup()

    rates = {name: n / seconds[name] for name in TARGETS}
    for name in TARGETS:
        bench.detail("stow", name).update(instances=n, seconds=seconds[name])
    bench.detail("write_ceiling").update(
        files=writer.files,
        seconds=writer.seconds,
        file_size=writer.file_size,
        directory=str(writer.directory.parent),
    )
    log(
        f"STOW-RS: orthanc {rates['orthanc']:.1f}, lightbox {rates['lightbox']:.1f} "
        f"instances/s; ceiling {writer.per_second:.1f} files/s of {writer.file_size} B"
    )

    res = bench.results
    res.add(
        Row(
            "stow_ips",
            f"STOW-RS ingest, {STOW_BATCH}/request",
            "inst/s",
            rates["orthanc"],
            rates["lightbox"],
        )
    )
    res.add(
        Row(
            "write_ceiling_fps",
            "durable-write ceiling",
            "files/s",
            writer.per_second,
            writer.per_second,
            target="ceiling",
            ceiling=True,
        )
    )
    frac = {k: v / writer.per_second for k, v in rates.items()}
    res.add(
        Row(
            "stow_vs_ceiling",
            "STOW vs write ceiling",
            "% of ceiling",
            frac["orthanc"],
            frac["lightbox"],
            target=f">= {STOW_TARGET:.0%}",
            percent=True,
            passed=frac["lightbox"] >= STOW_TARGET,
        )
    )
