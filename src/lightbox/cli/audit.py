"""``lightbox audit verify`` and ``lightbox audit export``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from lightbox.archive import Archive
from lightbox.errors import BadRequest
from lightbox.index import audit as index
from lightbox.index.schema import as_utc
from lightbox.services import atna, audit

Opener = Callable[[argparse.Namespace], Archive]


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    trail = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="action", required=True)
    verify = trail.add_parser("verify", help="check the hash chain; exit 1 if broken")
    export = trail.add_parser("export", help="print every event")
    export.add_argument("--format", choices=["json", "atna"], default="json",
                        help="JSON lines (default) or DICOM audit messages (one per line)")
    export.add_argument("--output", help="write to this file instead of standard output")
    for p in (verify, export):
        common(p)


def _export(archive: Archive, out: TextIO, form: str) -> int:
    count = 0
    with archive.db.read() as conn:
        for row in index.rows(conn):
            if form == "atna":
                out.write(atna.to_xml(row, archive.settings.aet) + "\n")
            else:
                row["at"] = as_utc(row["at"]).isoformat()
                row["detail"] = json.loads(row["detail"]) if row["detail"] else None
                out.write(json.dumps(row, sort_keys=True) + "\n")
            count += 1
    return count


def commands(open_archive: Opener) -> dict[str, Callable[[argparse.Namespace], int]]:
    def cmd_audit(args: argparse.Namespace) -> int:
        archive = open_archive(args)
        try:
            if args.action == "verify":
                verdict = audit.verify(archive.db)
                if verdict.ok:
                    print(f"audit trail intact: {verdict.rows} events")
                    return 0
                print(f"audit trail broken: {verdict.problem}", file=sys.stderr)
                return 1
            if args.output:
                try:
                    out = open(args.output, "w", encoding="utf-8")  # noqa: SIM115
                except OSError as exc:
                    raise BadRequest(f"cannot write {args.output}: "
                                     f"{exc.strerror or exc}") from exc
                with out:
                    count = _export(archive, out, args.format)
                print(f"exported {count} events to {args.output}", file=sys.stderr)
            else:
                _export(archive, sys.stdout, args.format)
            return 0
        finally:
            archive.close()

    return {"audit": cmd_audit}
