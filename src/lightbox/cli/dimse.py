"""``lightbox node …``, ``echo``, ``find``, ``move``, ``get``, ``send``: DICOM nodes and
Lightbox as a DIMSE SCU. A NODE is a registered node's name (or ``AET@host:port``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lightbox.archive import Archive
from lightbox.cli.listing import print_rows
from lightbox.dicom.attributes import QueryLevel
from lightbox.dimse import query, scu
from lightbox.services import nodes

Opener = Callable[[argparse.Namespace], Archive]
LEVELS = {"patient": QueryLevel.PATIENT, "study": QueryLevel.STUDY,
          "series": QueryLevel.SERIES, "image": QueryLevel.INSTANCE}


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    node = sub.add_parser("node", help="known DICOM nodes").add_subparsers(
        dest="action", required=True)
    add = node.add_parser("add", help="register a node")
    add.add_argument("name")
    # dest differs from the settings' own --aet (our AE title), which this is not.
    add.add_argument("--aet", dest="node_aet", required=True, help="its AE title")
    add.add_argument("--host", required=True)
    add.add_argument("--port", required=True, type=int)
    add.add_argument("--tls", action="store_true", help="talk DICOM TLS to it")
    add.add_argument("--user", help="its C-FIND, C-MOVE and C-GET see only what this user "
                                    "may see (default: the whole archive)")
    listing = node.add_parser("list", help="show registered nodes")
    remove = node.add_parser("remove", help="forget a node")
    remove.add_argument("name")
    for p in (add, listing, remove):
        common(p)

    echo = sub.add_parser("echo", help="C-ECHO a node")
    find = sub.add_parser("find", help="C-FIND on a node; prints the matches")
    move = sub.add_parser("move", help="C-MOVE a study from a node (default: to us)")
    get = sub.add_parser("get", help="C-GET a study from a node into this archive")
    send = sub.add_parser("send", help="C-STORE a stored study to a node")
    for p in (echo, find, move, get, send):
        common(p)
        p.add_argument("node", help="node name, or AET@host:port")
        p.add_argument("--aet", help="our AE title (default from settings)")
    find.add_argument("--level", choices=sorted(LEVELS), default="study")
    find.add_argument("-k", "--key", action="append", default=[], metavar="TAG=VALUE",
                      help="matching / return key, e.g. -k PatientID=123 -k StudyDate=2024-")
    move.add_argument("--study", required=True, help="Study Instance UID")
    move.add_argument("--to", help="destination AE title (default: our own)")
    get.add_argument("--study", required=True, help="Study Instance UID")
    send.add_argument("study", help="Study Instance UID")


def commands(open_archive: Opener) -> dict[str, Callable[[argparse.Namespace], int]]:
    def cmd_node(args: argparse.Namespace) -> int:
        archive = open_archive(args)
        if args.action == "add":
            added = nodes.add_node(archive, name=args.name, ae_title=args.node_aet, host=args.host,
                                   port=args.port, tls=args.tls, acts_as=args.user)
            print(f"added {added}")
        elif args.action == "list":
            print_rows((str(found) for found in nodes.list_nodes(archive)), "no nodes")
        else:
            nodes.remove_node(archive, args.name)
            print(f"removed {args.name}")
        return 0

    def cmd_echo(args: argparse.Namespace) -> int:
        archive = open_archive(args)
        node = scu.resolve_node(archive, args.node)
        status = scu.echo(archive, node)
        print(f"C-ECHO {node.name}: status 0x{status:04X}")
        return 0 if status == 0 else 1

    def cmd_find(args: argparse.Namespace) -> int:
        archive = open_archive(args)
        node = scu.resolve_node(archive, args.node)
        level = LEVELS[args.level]
        keys = query.merged_keys(level, [query.parse_key(k) for k in args.key])
        matches = scu.find(archive, node, level, keys)
        for match in matches:
            print(query.describe(match))
        print(f"{len(matches)} match(es)")
        return 0

    def cmd_move(args: argparse.Namespace) -> int:
        archive = open_archive(args)
        node = scu.resolve_node(archive, args.node)
        result = scu.move(archive, node, args.study, args.to or archive.settings.aet)
        print(f"C-MOVE {args.study}: {result}")
        return 1 if result.failed else 0

    def cmd_get(args: argparse.Namespace) -> int:
        archive = open_archive(args)
        node = scu.resolve_node(archive, args.node)
        result = scu.get(archive, node, args.study)
        print(f"C-GET {args.study}: {result}")
        return 1 if result.failed else 0

    def cmd_send(args: argparse.Namespace) -> int:
        archive = open_archive(args)
        node = scu.resolve_node(archive, args.node)
        result = scu.send(archive, node, args.study)
        print(f"C-STORE {args.study} to {node.name}: {result}")
        return 1 if result.failed else 0

    return {"node": cmd_node, "echo": cmd_echo, "find": cmd_find, "move": cmd_move,
            "get": cmd_get, "send": cmd_send}
