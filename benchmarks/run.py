"""Lightbox vs Orthanc benchmark (``make bench``).

    .venv/bin/python benchmarks/run.py [--quick] [--only stow,frames,metadata,qido,memory]
                                       [--work DIR] [--keep] [--lightbox-cmd CMD]
                                       [--database URL]

Starts Orthanc (with its DICOMweb plugin) and Lightbox on free loopback ports in a temporary
work dir, measures every figure for both in the same run, next to the machine's ceilings
(durable file writes; nginx serving the same frames as static files), prints a table and
writes it to WORK/results.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType

import corpus
import servers
from bench import Bench, Sizes, log
from figures import FIGURES
from probe import cpu_probe_ms
from results import Results

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Benchmark Lightbox against Orthanc and the machine's ceilings.",
    )
    p.add_argument(
        "--quick", action="store_true", help="small counts: the whole run takes under 3 minutes"
    )
    p.add_argument(
        "--only",
        default=",".join(FIGURES),
        help=f"comma-separated figures to run (default: all: {','.join(FIGURES)})",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=REPO / "bench-work",
        help="work dir: a temp run dir is made in it, and results.json written to "
        "it (default: bench-work/ in the repo)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the run dir (corpora, server data and logs)"
    )
    p.add_argument(
        "--lightbox-cmd",
        default=str(REPO / ".venv/bin/lightbox"),
        help="the lightbox executable (may include arguments)",
    )
    p.add_argument(
        "--database",
        default=None,
        metavar="URL",
        help="run Lightbox on this PostgreSQL database instead of SQLite",
    )
    p.add_argument(
        "--corpus-script",
        type=Path,
        default=corpus.default_corpus_script(),
        help="the corpus generator (default: ../shared/corpus/make_corpus.py)",
    )
    p.add_argument(
        "--stow-count",
        type=int,
        default=None,
        help="instances in the STOW figure (default 500, quick 100)",
    )
    p.add_argument(
        "--memory-count",
        type=int,
        default=None,
        help="instances in the memory figure's study (default 2000 = ~1 GB, quick 400)",
    )
    # Smoke test of the harness itself: a second Orthanc plays Lightbox.
    p.add_argument("--lightbox-is-orthanc", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in FIGURES]
    if unknown or not names:
        p.error(f"--only: unknown figure(s) {unknown}; choose from {','.join(FIGURES)}")
    args.only = [n for n in FIGURES if n in names]
    return args


def redact(text: str) -> str:
    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def filesystem_of(path: Path) -> str:
    best, fstype = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mount = fields[1]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, fstype = mount, f"{fields[2]} on {mount} ({fields[0]})"
    except (OSError, IndexError):
        pass
    return fstype


def make_sizes(args: argparse.Namespace) -> Sizes:
    sizes = Sizes.pick(args.quick)
    changes = {}
    if args.stow_count:
        changes["stow_instances"] = max(1, args.stow_count)
    if args.memory_count:
        changes["memory_instances"] = max(1, args.memory_count)
    return Sizes(**{**sizes.__dict__, **changes})


def start_servers(args: argparse.Namespace, tmp: Path) -> dict[str, servers.Server]:
    started: dict[str, servers.Server] = {}
    log("starting Orthanc")
    started["orthanc"] = servers.start_orthanc(tmp / "orthanc")
    log(f"Orthanc {started['orthanc'].info['version']} on port {started['orthanc'].port}")
    if args.lightbox_is_orthanc:
        log("starting a second Orthanc in place of Lightbox (--lightbox-is-orthanc)")
        started["lightbox"] = servers.start_orthanc(tmp / "lightbox", label="lightbox")
    else:
        log(
            f"starting Lightbox ({args.lightbox_cmd}, "
            f"{redact(args.database) if args.database else 'SQLite'})"
        )
        started["lightbox"] = servers.start_lightbox(
            tmp / "lightbox", args.lightbox_cmd, args.database
        )
    log(f"Lightbox on port {started['lightbox'].port}")
    return started


def run(args: argparse.Namespace, argv: list[str]) -> int:
    args.work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=args.work))
    command = ".venv/bin/python benchmarks/run.py " + redact(shlex.join(argv))
    sizes = make_sizes(args)
    results = Results(
        meta={
            "command": command.strip(),
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "quick": args.quick,
            "figures": args.only,
            "sizes": sizes.__dict__,
            "machine": {
                "cpus": os.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "filesystem": filesystem_of(tmp),
            },
            "lightbox": "orthanc (harness smoke test)"
            if args.lightbox_is_orthanc
            else {
                "command": args.lightbox_cmd,
                "database": redact(args.database) if args.database else "sqlite",
            },
        }
    )
    started = time.monotonic()
    failures: list[str] = []
    interrupted = False
    running: dict[str, servers.Server] = {}
    log(f"run dir {tmp} ({results.meta['machine']['filesystem']})")
    try:
        running = start_servers(args, tmp)
        results.meta["versions"] = {
            "orthanc": running["orthanc"].info.get("version"),
            "nginx": servers.nginx_version(),
        }
        bench = Bench(
            tmp=tmp,
            sizes=sizes,
            corpus_script=args.corpus_script.resolve(),
            servers=running,
            results=results,
        )
        probes = results.meta.setdefault("cpu_probe_ms", {})
        for name in args.only:
            log(f"== {name} ==")
            probes[name] = round(cpu_probe_ms(), 1)
            log(f"processor probe: {probes[name]:.0f} ms (a fixed loop; lower is faster)")
            try:
                FIGURES[name](bench)
            except Exception as exc:  # one figure failing must not lose the others
                failures.append(f"{name}: {exc}")
                log(f"!! {name} failed: {exc}")
                traceback.print_exc()
    except (OSError, RuntimeError) as exc:
        failures.append(str(exc))
        log(f"!! {exc}")
    except (KeyboardInterrupt, SystemExit):
        failures.append("interrupted")
        interrupted = True
        log("!! interrupted: stopping the servers")
    finally:
        for srv in running.values():
            srv.stop()
        servers.stop_all()
        results.meta["seconds"] = round(time.monotonic() - started, 1)
        results.meta["failures"] = failures
        out = args.work / "results.json"
        results.save(out)
        if args.keep:
            log(f"kept the run dir {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(results.table())
    print("ratio = lightbox / orthanc (for ms and MB, lower is better)")
    if results.meta.get("cpu_probe_ms"):
        probed = ", ".join(f"{k} {v:.0f}" for k, v in results.meta["cpu_probe_ms"].items())
        print(f"processor probe before each figure (ms, lower is faster): {probed}")
    print(f"results: {out}")
    print(f"reproduce: {command.strip()}")
    print(f"took {results.meta['seconds']:.0f}s")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if failures else 0


def check_commands(args: argparse.Namespace) -> str | None:
    """What is missing to run at all, before anything is started."""
    if not args.corpus_script.exists():
        return f"corpus generator not found: {args.corpus_script} (see --corpus-script)"
    if not args.lightbox_is_orthanc:
        argv0 = shlex.split(args.lightbox_cmd)
        if not argv0 or shutil.which(argv0[0]) is None:
            return f"Lightbox command not found: {args.lightbox_cmd!r} (see --lightbox-cmd)"
    for tool in (servers.ORTHANC_BIN, servers.NGINX_BIN):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install orthanc orthanc-dicomweb nginx-light)"
    if not Path(servers.ORTHANC_DICOMWEB_PLUGIN).exists():
        return f"Orthanc DICOMweb plugin not found: {servers.ORTHANC_DICOMWEB_PLUGIN}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    problem = check_commands(args)
    if problem:
        print(f"benchmarks/run.py: {problem}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
