"""``lightbox``: serve, import, demo, users and tokens, stats, DICOM nodes and DIMSE.

Every option can also come from the environment (``LIGHTBOX_DATA``,
``LIGHTBOX_HTTP_PORT``, ...) or a TOML file (``--config`` / ``LIGHTBOX_CONFIG``).
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from lightbox import logs
from lightbox import settings as settings_module
from lightbox.archive import Archive
from lightbox.cli.listing import print_rows
from lightbox.errors import LightboxError
from lightbox.index import accounts
from lightbox.services import auth


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--data", type=Path, help="data folder (default ./lightbox-data)")
    parser.add_argument("--database", help="database URL, e.g. postgresql://host/db")


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host")
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--dicom-port", type=int)
    parser.add_argument("--aet")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--tls-cert", help="PEM certificate: DICOM TLS on the DICOM port")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", help="PEM CA bundle: require and verify client certificates")
    parser.add_argument("--https-cert", help="PEM certificate chain: HTTPS on the HTTP port")
    parser.add_argument("--https-key", help="PEM private key of --https-cert")
    parser.add_argument(
        "--dicom-accept-unknown", choices=["loopback", "all", "none"],
        help="unknown calling AEs may echo and store from: loopback (default), all, none",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightbox", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the DICOMweb server")
    demo = sub.add_parser("demo", help="load sample studies into an empty archive, then serve")
    for p in (serve, demo):
        _common(p)
        _server_options(p)
    imp = sub.add_parser("import", help="store DICOM files, folders, zips and DICOMDIRs")
    _common(imp)
    imp.add_argument("paths", nargs="+", type=Path)
    imp.add_argument("--jobs", type=int, default=4, help="parallel batches (default 4)")
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    user = sub.add_parser("user", help="manage users").add_subparsers(dest="action", required=True)
    add = user.add_parser("add", help="add a user (password from a prompt or stdin)")
    _common(add)
    add.add_argument("name")
    add.add_argument("--admin", action="store_true")
    add.add_argument("--org", help="the user's organisation (default: the default one)")
    add.add_argument("--email", help="the user's e-mail address (for invitations)")
    listing = user.add_parser("list", help="users, their role and state")
    _common(listing)
    disable = user.add_parser("disable", help="stop a user signing in or using tokens")
    _common(disable)
    disable.add_argument("name")
    disable.add_argument("--enable", action="store_true", help="undo: enable the user again")
    token = sub.add_parser("token", help="API tokens").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", help="print a new bearer token (shown once)")
    _common(create)
    create.add_argument("--user", help="owner (default: the first administrator)")
    create.add_argument("--expires", default="30d", help="lifetime, e.g. 30d, 12h (default 30d)")
    create.add_argument("--label", help="what the token is for")
    tokens = token.add_parser("list", help="tokens (never their values)")
    _common(tokens)
    tokens.add_argument("--user", help="only this user's tokens")
    revoke = token.add_parser("revoke", help="revoke a token by its id")
    _common(revoke)
    revoke.add_argument("id", type=int)
    stats = sub.add_parser("stats", help="counts and sizes")
    _common(stats)
    check = sub.add_parser(
        "check", help="compare the index with the stored files; exit 1 if an instance's "
        "file is missing or damaged")
    _common(check)
    check.add_argument("--remove-orphans", action="store_true",
                       help="remove stored files no instance refers to (see --older-than)")
    check.add_argument("--older-than", default="1h", metavar="AGE",
                       help="judge only files stored longer ago than AGE (default 1h; "
                       "shorter only while nothing is being stored)")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    from lightbox.cli import audit, dimse, folders, share

    folders.add_parsers(sub, _common)
    dimse.add_parsers(sub, _common)
    audit.add_parsers(sub, _common)
    share.add_parsers(sub, _common)
    return parser


def _settings(args: argparse.Namespace) -> settings_module.Settings:
    overrides = {
        k: getattr(args, k, None)
        for k in ("data", "database", "host", "http_port", "dicom_port", "aet", "workers",
                  "tls_cert", "tls_key", "tls_ca", "dicom_accept_unknown",
                  "https_cert", "https_key")
    }
    return settings_module.load(getattr(args, "config", None), overrides)


def _open(args: argparse.Namespace) -> Archive:
    return Archive.open(_settings(args))


def cmd_serve(args: argparse.Namespace) -> int:
    from lightbox.server import serve

    serve(_settings(args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lightbox.cli.importer import import_paths
    from lightbox.samples import write_samples

    archive = _open(args)
    if _count_instances(archive) == 0:
        with tempfile.TemporaryDirectory() as folder:
            files = list(write_samples(Path(folder)))
            summary = import_paths(archive, files, progress=False)
        print(f"loaded {summary.counts['stored']} sample instances")
    token = auth.create_token(archive, expires=auth.parse_duration("30d"), label="demo")
    name, password = auth.demo_login(archive)
    print(f"DICOMweb token (30 days): {token}")
    print(f"Sign in to the browser pages as {name} / {password}", flush=True)
    archive.close()
    # `lightbox serve` with the same settings, in this process (same pid) but a
    # new interpreter: serve forks its workers from a process without threads
    # (loading started some) and without the loading's memory to pass on.
    os.execve(sys.executable, [sys.executable, "-m", "lightbox", "serve"],
              {**os.environ, **settings_module.environment(archive.settings)})


def cmd_import(args: argparse.Namespace) -> int:
    from lightbox.cli.importer import import_paths

    archive = _open(args)
    summary = import_paths(archive, args.paths, workers=max(args.jobs, 1), progress=not args.quiet)
    for path, reason in summary.skipped:
        print(f"skipped  {path}: {reason}")
    for path, reason in summary.rejected:
        print(f"rejected {path}: {reason}")
    c = summary.counts
    print(
        f"stored {c['stored']}, duplicate {c['duplicate']}, rejected {c['rejected']}, "
        f"skipped {len(summary.skipped)}"
    )
    return 1 if c["rejected"] else 0


def _read_password(name: str) -> str:
    if sys.stdin.isatty():
        first = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != first:
            raise LightboxError("passwords differ")
        return first
    return sys.stdin.readline().rstrip("\n")


def cmd_user(args: argparse.Namespace) -> int:
    archive = _open(args)
    if args.action == "list":
        orgs = {u: org for org, users in auth.list_organisations(archive).items() for u in users}
        print_rows((_user_row(user, orgs.get(user.name, "-"))
                    for user in auth.list_users(archive)), "no users")
        return 0
    if args.action == "disable":
        auth.disable_user(archive, args.name, not args.enable)
        _audit(archive, "user_enable" if args.enable else "user_disable", {"user": args.name})
        print(f"user {args.name} {'enabled' if args.enable else 'disabled'}")
        return 0
    auth.add_user(archive, args.name, _read_password(args.name), is_admin=args.admin,
                  organisation=args.org, email=args.email)
    _audit(archive, "user_add", {"user": args.name, "admin": args.admin, "org": args.org})
    print(f"user {args.name} added{' (administrator)' if args.admin else ''}")
    return 0


def _user_row(user: accounts.User, organisation: str) -> str:
    role = "admin" if user.is_admin else "member"
    state = "disabled" if user.disabled else "active"
    return f"{user.name}\t{role}\t{state}\t{organisation}\t{user.email or '-'}"


def _token_row(t: accounts.TokenInfo) -> str:
    until = t.expires_at.isoformat(timespec="minutes") if t.expires_at else "never"
    state = "revoked" if t.revoked else "active"
    return f"{t.id}\t{t.user}\t{t.label or '-'}\texpires {until}\t{state}"


def cmd_token(args: argparse.Namespace) -> int:
    archive = _open(args)
    if args.action == "list":
        print_rows(map(_token_row, auth.list_tokens(archive, args.user)), "no tokens")
        return 0
    if args.action == "revoke":
        auth.revoke_token_id(archive, args.id)
        _audit(archive, "token_revoke", {"token": args.id})
        print(f"token {args.id} revoked (servers forget cached tokens within 30 s)")
        return 0
    expires = auth.parse_duration(args.expires)
    token = auth.create_token(archive, user=args.user, expires=expires, label=args.label)
    _audit(archive, "token_create", {"user": args.user or "(first administrator)",
                                     "expires": args.expires})
    print(token)
    return 0


def _audit(archive: Archive, action: str, detail: dict[str, Any]) -> None:
    """Rights given from the command line, in the audit trail (written at once)."""
    from lightbox.services.audit import Event

    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # no login name in this environment
        who = "unknown"
    archive.audit.record(Event(action, f"cli:{who}", detail=detail), now=True)


def _count_instances(archive: Archive) -> int:
    from lightbox.index.schema import instances

    with archive.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(instances)).scalar_one())


def cmd_stats(args: argparse.Namespace) -> int:
    from lightbox.index.schema import instances, patients, series, studies

    archive = _open(args)
    with archive.db.read() as conn:
        for name, table in (
            ("patients", patients),
            ("studies", studies),
            ("series", series),
            ("instances", instances),
        ):
            n = conn.execute(select(func.count()).select_from(table)).scalar_one()
            print(f"{name:<10} {n}")
        size = conn.execute(select(func.coalesce(func.sum(instances.c.size), 0))).scalar_one()
    print(f"{'bytes':<10} {size}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lightbox.services import integrity

    age = auth.parse_duration(args.older_than).total_seconds()
    archive = _open(args)
    with tqdm(unit=" entries", disable=args.quiet or not sys.stderr.isatty(),
              desc="checking") as bar:
        report = integrity.check(archive, remove_orphans=args.remove_orphans,
                                 orphan_age=age, progress=bar.update)
    print(f"{_n(report.instances, 'instance')}, {_n(report.blobs, 'stored file')}")
    for damaged in report.damaged:
        found = "missing" if damaged.on_disk is None else f"{damaged.on_disk} bytes"
        print(f"damaged: instance {damaged.sop_instance_uid}: file {damaged.key} "
              f"{found}, indexed as {damaged.indexed} bytes")
    if report.orphans:
        print(f"orphans: {_n(report.orphans, 'stored file')} ({report.orphan_bytes} bytes) "
              "that no instance refers to")
    if report.young:
        print(f"{_n(report.young, 'newer file')} that no instance refers to yet: not judged "
              f"(stored within {args.older_than})")
    if report.removed:
        _audit(archive, "orphans_removed", {"files": report.removed,
                                            "bytes": report.removed_bytes})
        print(f"removed {_n(report.removed, 'orphan')} ({report.removed_bytes} bytes)")
    elif report.orphans:
        print("remove them with: lightbox check --remove-orphans")
    print("ok" if report.ok else _n(len(report.damaged), "damaged instance"))
    return 0 if report.ok else 1


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


COMMANDS: dict[str, Any] = {
    "serve": cmd_serve,
    "check": cmd_check,
    "demo": cmd_demo,
    "import": cmd_import,
    "user": cmd_user,
    "token": cmd_token,
    "stats": cmd_stats,
}


def main(argv: list[str] | None = None) -> int:
    from lightbox.cli import audit, dimse, folders, share

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logs.quiet_decoder_attempts()
    logs.quiet_pydicom_warnings()
    commands = {**COMMANDS, **dimse.commands(_open), **audit.commands(_open),
                **share.commands(_open), **folders.commands(_open)}
    try:
        code = int(commands[args.command](args))
        sys.stdout.flush()  # a reader gone shows here, not in a traceback at exit
        return code
    except BrokenPipeError:
        # Whoever read the output stopped reading (`lightbox audit … | head`).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except LightboxError as exc:
        print(f"lightbox: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
