"""``lightbox org add|list`` and ``lightbox folder list|create|add|invite``.

The command line speaks for the archive's operator: folder commands act as
``--user`` (default: the first administrator), whose rights decide.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from lightbox.archive import Archive
from lightbox.cli.listing import print_rows
from lightbox.cli.share import base_url
from lightbox.index.folders import FolderEntry
from lightbox.services import auth, folders, invitations, sharing
from lightbox.services.audit import Caller

Opener = Callable[[argparse.Namespace], Archive]
CLI = Caller(source="command line")


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    org = sub.add_parser("org", help="organisations (the users of one hospital)")
    org_actions = org.add_subparsers(dest="action", required=True)
    org_add = org_actions.add_parser("add", help="make an organisation")
    org_add.add_argument("name")
    org_list = org_actions.add_parser("list", help="organisations and their users")
    for p in (org_add, org_list):
        common(p)

    folder = sub.add_parser("folder", help="folders and their collaborators")
    actions = folder.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="a user's folders")
    create = actions.add_parser("create", help="make a folder (the user owns it)")
    create.add_argument("name")
    add = actions.add_parser("add", help="put studies into a folder")
    add.add_argument("folder", help="folder id (from `folder list`)")
    add.add_argument("studies", nargs="+", metavar="STUDY_UID")
    invite = actions.add_parser("invite", help="add a collaborator by user name or e-mail "
                                               "address (an invitation link when unknown)")
    invite.add_argument("folder", help="folder id")
    invite.add_argument("who", help="user name or e-mail address")
    invite.add_argument("--role", default="viewer",
                        choices=[r.value for r in folders.Role])
    for p in (listing, create, add, invite):
        common(p)
        p.add_argument("--user", help="act as this user (default: the first administrator)")


def _org(archive: Archive, args: argparse.Namespace) -> int:
    if args.action == "add":
        auth.add_organisation(archive, args.name)
        print(f"organisation {args.name} added")
        return 0
    print_rows((f"{name}\t{', '.join(users) or '-'}"
                for name, users in auth.list_organisations(archive).items()), "no organisations")
    return 0


def _folder_row(e: FolderEntry) -> str:
    kind = "inbox" if e.folder.inbox_of else "folder"
    return (f"{e.folder.public_id}\t{kind}\t{e.role or 'admin'}\t{e.studies} studies\t"
            f"{e.members} collaborators\t{e.folder.name}")


def _folder(archive: Archive, args: argparse.Namespace) -> int:
    principal = sharing.acting_as(archive, args.user)
    if args.action == "list":
        print_rows(map(_folder_row, folders.list_folders(archive, principal)), "no folders")
    elif args.action == "create":
        made = folders.create_folder(archive, principal, args.name, caller=CLI)
        print(made.public_id)
    elif args.action == "add":
        added = folders.add_studies(archive, principal, args.folder, args.studies, caller=CLI)
        print(f"{added} studies added")
    else:
        invited = invitations.invite(archive, principal, args.folder, args.who,
                                     folders.parse_role(args.role), site_url=base_url(archive),
                                     caller=CLI)
        if invited.member is not None:
            print(f"{invited.member.name} is {invited.member.role} of the folder")
        else:
            print(invited.url)
            sent = "e-mailed" if invited.emailed else (invited.mail_error or "pass it on")
            print(f"invitation for {invited.email}: {sent}", file=sys.stderr)
    return 0


def commands(open_archive: Opener) -> dict[str, Callable[[argparse.Namespace], int]]:
    def run(action: Callable[[Archive, argparse.Namespace], int]) -> Callable[
            [argparse.Namespace], int]:
        def command(args: argparse.Namespace) -> int:
            archive = open_archive(args)
            try:
                return action(archive, args)
            finally:
                archive.close()
        return command

    return {"org": run(_org), "folder": run(_folder)}
