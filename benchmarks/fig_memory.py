"""Figure f: peak memory while storing and retrieving a large study, both streamed."""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any

import corpus
import servers
from bench import TARGETS, Bench, log, prepare_series
from dicomweb_clients import STOW_TYPE, STUDY_ACCEPT, BenchHTTPError, check_stow_reply
from results import Row

RSS_TARGET_MB = 300.0


class RssSampler:
    """Peak RSS of a process tree during a block: VmHWM after a reset, and VmRSS samples."""

    def __init__(self, pid: int, interval_s: float = 0.05, limit_s: float = 3600.0) -> None:
        self.pid, self.interval_s, self.limit_s = pid, interval_s, limit_s
        self.samples: list[int] = []
        self.pss_samples: list[int] = []
        self.largest_samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.hwm_reset = False
        self.start_kb = 0
        self.hwm_kb = 0
        self.largest_hwm_kb = 0

    def _run(self) -> None:
        end = time.monotonic() + self.limit_s
        while not self._stop.is_set() and time.monotonic() < end:
            self.samples.append(servers.rss_kb(self.pid))
            self.pss_samples.append(servers.pss_kb(self.pid))
            self.largest_samples.append(servers.largest_kb(self.pid))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.hwm_reset = servers.reset_hwm(self.pid)
        self.start_kb = servers.rss_kb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.hwm_kb = servers.hwm_kb(self.pid) if self.hwm_reset else 0
        self.largest_hwm_kb = servers.largest_kb(self.pid, "VmHWM") if self.hwm_reset else 0

    @property
    def peak_mb(self) -> float:
        return max([self.hwm_kb, *self.samples, self.start_kb]) / 1024

    @property
    def peak_pss_mb(self) -> float:
        return max(self.pss_samples, default=0) / 1024

    @property
    def largest_mb(self) -> float:
        """The peak RSS of the largest single process."""
        return max([self.largest_hwm_kb, *self.largest_samples]) / 1024

    def summary(self) -> dict[str, Any]:
        return {
            "start_mb": self.start_kb / 1024,
            "peak_mb": self.peak_mb,
            "hwm_mb": self.hwm_kb / 1024 if self.hwm_reset else None,
            "sampled_peak_mb": max(self.samples, default=0) / 1024,
            "median_sample_mb": statistics.median(self.samples) / 1024 if self.samples else None,
            "samples": len(self.samples),
            "sampled_peak_pss_mb": self.peak_pss_mb,
            "largest_process_peak_mb": self.largest_mb,
        }


def _memory_one(bench: Bench, name: str) -> dict[str, float]:
    srv = bench.servers[name]
    study = corpus.LargeStudy.from_files(
        bench.series_files, bench.sizes.memory_instances, f"mem-{name}-{bench.run_id}"
    )
    size_mb = study.content_length / 1e6
    out: dict[str, float] = {"idle_mb": servers.rss_kb(srv.pid) / 1024, "size_mb": size_mb}
    os.sync()
    log(f"{name}: streaming a {size_mb:.0f} MB STOW upload ({study.count} instances, one request)")
    conn = bench.conn(name, timeout_s=600.0)
    with RssSampler(srv.pid) as stow_rss:
        t0 = time.perf_counter()
        reply = conn.stream_post(
            f"{srv.prefix}/studies",
            study.chunks(),
            study.content_length,
            STOW_TYPE.format(boundary=study.boundary),
        )
        stow_s = time.perf_counter() - t0
    check_stow_reply(reply, study.count, f"{name} large STOW")
    log(f"{name}: stored in {stow_s:.1f}s; peak RSS {stow_rss.peak_mb:.0f} MB")

    log(f"{name}: WADO-RS retrieve of the whole study, streamed")
    with RssSampler(srv.pid) as get_rss:
        t0 = time.perf_counter()
        status, headers, nbytes, head = conn.stream_get(
            f"{srv.prefix}/studies/{study.study_uid}",
            STUDY_ACCEPT,
            max_bytes=4 * study.content_length + (1 << 30),
        )
        get_s = time.perf_counter() - t0
    if status != 200 or nbytes < study.payload_bytes:
        raise BenchHTTPError(
            f"{name} study retrieve: HTTP {status}, {nbytes} bytes of "
            f"{study.payload_bytes}: {head[:300]!r}"
        )
    log(
        f"{name}: retrieved {nbytes / 1e6:.0f} MB in {get_s:.1f}s; "
        f"peak RSS {get_rss.peak_mb:.0f} MB"
    )
    bench.detail("memory", name).update(
        instances=study.count,
        upload_bytes=study.content_length,
        stow_seconds=stow_s,
        retrieve_bytes=nbytes,
        retrieve_seconds=get_s,
        retrieve_content_type=headers.get("content-type"),
        retrieve_transfer_encoding=headers.get("transfer-encoding"),
        stow_rss=stow_rss.summary(),
        retrieve_rss=get_rss.summary(),
        idle_mb=out["idle_mb"],
    )
    out.update(
        stow_mb=stow_rss.peak_mb,
        get_mb=get_rss.peak_mb,
        stow_pss_mb=stow_rss.peak_pss_mb,
        get_pss_mb=get_rss.peak_pss_mb,
        stow_largest_mb=stow_rss.largest_mb,
        get_largest_mb=get_rss.largest_mb,
        stow_mbps=study.content_length / stow_s / 1e6,
        get_mbps=nbytes / get_s / 1e6,
    )
    return out


def figure_memory(bench: Bench) -> None:
    prepare_series(bench)
    got: dict[str, dict[str, float]] = {}
    for name in TARGETS:
        bench.check_alive()
        got[name] = _memory_one(bench, name)
    o, lb = got["orthanc"], got["lightbox"]
    res = bench.results
    res.add(
        Row(
            "rss_idle_mb",
            "RSS before the memory figures",
            "MB",
            o["idle_mb"],
            lb["idle_mb"],
            better="lower",
        )
    )
    # The target applies to what the process tree occupies: summed PSS counts a
    # page shared by several processes once. Summed RSS counts it once per
    # process, so for processes forked from one parent (which share most of
    # their pages) it adds up memory that is there only once.
    kinds = (
        ("pss", "pss_mb", f"peak memory (summed PSS), {{}} of {lb['size_mb']:.0f} MB", True),
        ("rss", "mb", "  summed RSS (shared pages once per process), {}", False),
        ("largest", "largest_mb", "  RSS of the largest process, {}", False),
    )
    for prefix, field, label, checked in kinds:
        for key, what in (("stow", "streamed STOW"), ("get", "study retrieve")):
            mb = lb[f"{key}_{field}"]
            res.add(
                Row(
                    f"{prefix}_{key}_mb",
                    label.format(what),
                    "MB",
                    o[f"{key}_{field}"],
                    mb,
                    target=f"< {RSS_TARGET_MB:.0f} MB" if checked else "",
                    better="lower",
                    passed=mb < RSS_TARGET_MB if checked else None,
                )
            )
    res.add(
        Row("large_stow_mbps", "large STOW throughput", "MB/s", o["stow_mbps"], lb["stow_mbps"])
    )
    res.add(
        Row(
            "study_retrieve_mbps",
            "study retrieve throughput",
            "MB/s",
            o["get_mbps"],
            lb["get_mbps"],
        )
    )
