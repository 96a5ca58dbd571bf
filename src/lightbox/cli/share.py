"""``lightbox share create|list|revoke``: share links from the command line.

The command line speaks for the archive's operator: it acts as ``--user``
(default: the first administrator), whose rights decide what may be shared.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from typing import Any

from lightbox.archive import Archive
from lightbox.cli.listing import print_rows
from lightbox.errors import BadRequest
from lightbox.services import sharing
from lightbox.services.auth import parse_duration

Opener = Callable[[argparse.Namespace], Archive]


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    share = sub.add_parser("share", help="share links to studies").add_subparsers(
        dest="action", required=True)
    create = share.add_parser("create", help="make a link to a study and print its URL")
    create.add_argument("study", help="Study Instance UID")
    create.add_argument("--expires", default="30d", help="lifetime, e.g. 7d, 12h (default 30d)")
    create.add_argument("--passcode", action="store_true",
                        help="ask for a passcode (prompt, or one line on standard input)")
    create.add_argument("--no-download", action="store_true", help="no ZIP download")
    create.add_argument("--deidentify", action="store_true",
                        help="de-identify (PS3.15 Basic Profile) everything the link serves")
    create.add_argument("--access", default="anyone",
                        choices=["anyone", "organisation", "collaborators"],
                        help="who may open it besides holding it: anyone (default), signed-in "
                             "users of the creator's organisation, or collaborators of --folder")
    create.add_argument("--signed-in", action="store_const", const="organisation",
                        dest="access", help="the same as --access organisation")
    create.add_argument("--folder", help="the folder (id) the link is made from")
    create.add_argument("--user", help="create as this user (default: the first administrator)")
    listing = share.add_parser("list", help="list links (of one study)")
    listing.add_argument("study", nargs="?", help="Study Instance UID")
    revoke = share.add_parser("revoke", help="revoke a link by its id")
    revoke.add_argument("id")
    for p in (create, listing, revoke):
        common(p)


def base_url(archive: Archive) -> str:
    settings = archive.settings
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{host}:{settings.http_port}"


def _read_passcode() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("passcode: ")
        if getpass.getpass("again: ") != first:
            raise BadRequest("passcodes differ")
        return first
    return sys.stdin.readline().rstrip("\n")


def _create(archive: Archive, args: argparse.Namespace) -> int:
    principal = sharing.acting_as(archive, args.user)
    made = sharing.create_share(
        archive, principal, study=args.study, expires=parse_duration(args.expires),
        passcode=_read_passcode() if args.passcode else None,
        allow_download=not args.no_download, deidentify=args.deidentify,
        access=sharing.parse_access(args.access), folder=args.folder,
    )
    sharing.record(archive, "share_create", made.link, f"cli:{principal.user}",
                   detail=_detail(made.link))
    print(f"{base_url(archive)}/s/{made.token}")
    print(f"id {made.link.id}, expires {made.link.expires_at:%Y-%m-%d %H:%M} UTC",
          file=sys.stderr)
    return 0


def _detail(link: sharing.ShareLink) -> dict[str, object]:
    return {"expires": link.expires_at.isoformat(), "passcode": link.has_passcode,
            "download": link.allow_download, "deidentify": link.deidentify,
            "access": link.access.value}


def _list(archive: Archive, args: argparse.Namespace) -> int:
    principal = sharing.acting_as(archive, None)
    print_rows((_share_row(link) for link in sharing.list_shares(archive, principal, args.study)),
               "no share links")
    return 0


def _share_row(link: sharing.ShareLink) -> str:
    flags = ",".join(name for name, on in (
        ("passcode", link.has_passcode), ("download", link.allow_download),
        ("deidentified", link.deidentify)) if on) or "-"
    return (f"{link.id}  {link.state():<8} {link.expires_at:%Y-%m-%d}  "
            f"{link.access.value:<9} {flags:<30} {link.creator:<16} {link.study_instance_uid}")


def _revoke(archive: Archive, args: argparse.Namespace) -> int:
    principal = sharing.acting_as(archive, None)
    link = sharing.revoke(archive, principal, args.id)
    sharing.record(archive, "share_revoke", link, f"cli:{principal.user}")
    print(f"link {link.id} revoked")
    return 0


def commands(open_archive: Opener) -> dict[str, Callable[[argparse.Namespace], int]]:
    actions = {"create": _create, "list": _list, "revoke": _revoke}

    def cmd_share(args: argparse.Namespace) -> int:
        archive = open_archive(args)
        try:
            return actions[args.action](archive, args)
        finally:
            archive.close()

    return {"share": cmd_share}
