"""A DICOM node: the name an operator gives a peer, its AE title, host and port,
and the checks on each; also the ``[nodes.NAME]`` tables of the config file.

A node is registered in the index (``lightbox node add``) or declared in the
config file; both give the same ``Node``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightbox.errors import BadRequest

MAX_NAME = 64
MAX_AE_TITLE = 16
MAX_HOST = 255
# The keys of one [nodes.NAME] table, as the `lightbox node add` options name them.
DECLARED_KEYS = ("aet", "host", "port", "tls", "user")


@dataclass(frozen=True)
class Node:
    """A DICOM peer: where to reach it and whether to speak TLS to it."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False
    acts_as: str | None = None  # a user whose grants limit what the node may read
    declared: bool = field(default=False, compare=False)  # in the settings, not the index

    def __str__(self) -> str:
        scheme = " (TLS)" if self.tls else ""
        who = f" as user {self.acts_as}" if self.acts_as else ""
        where = " [settings]" if self.declared else ""
        return f"{self.name}: {self.ae_title}@{self.host}:{self.port}{scheme}{who}{where}"


def require_ae_title(value: str) -> str:
    """An AE title as PS3.5 allows it (1-16 characters of the default repertoire,
    no backslash or control characters, not only spaces); returned stripped,
    since leading and trailing spaces are not significant."""
    stripped = value.strip()
    if not stripped or len(value) > MAX_AE_TITLE:
        raise BadRequest(f"an AE title needs 1 to {MAX_AE_TITLE} characters, got {value!r}")
    if any(not (" " <= ch <= "~") or ch == "\\" for ch in value):
        raise BadRequest(f"AE title {value!r} may hold only printable ASCII without backslash")
    return stripped


def require_name(name: str) -> str:
    ok = name and len(name) <= MAX_NAME and all(ch.isalnum() or ch in "._-" for ch in name)
    if not ok:
        raise BadRequest(
            f"a node name needs 1 to {MAX_NAME} letters, digits, '.', '_' or '-', got {name!r}"
        )
    return name


def require_host(host: str) -> str:
    if not host or len(host) > MAX_HOST or any(ch.isspace() or ch == "/" for ch in host):
        raise BadRequest(f"not a host name or address: {host!r}")
    return host


def require_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise BadRequest(f"a port is between 1 and 65535, got {port}")
    return port


def checked(name: str, ae_title: str, host: str, port: int, tls: bool = False,
            acts_as: str | None = None, *, declared: bool = False) -> Node:
    """A Node whose every field is valid; BadRequest naming the first that is not."""
    return Node(require_name(name), require_ae_title(ae_title), require_host(host),
                require_port(port), tls, acts_as, declared)


def declared_nodes(tables: Any) -> tuple[Node, ...]:
    """The nodes of the config file's ``[nodes.NAME]`` tables (a mapping of name to
    a table of ``aet``, ``host``, ``port``, optional ``tls`` and ``user``), by name."""
    if not isinstance(tables, Mapping):
        raise BadRequest("setting nodes: expected [nodes.NAME] tables, "
                         f"got {type(tables).__name__}")
    return tuple(sorted((_declared(str(name), table) for name, table in tables.items()),
                        key=lambda node: node.name))


def _declared(name: str, table: Any) -> Node:
    where = f"setting nodes.{name}"
    if not isinstance(table, Mapping):
        raise BadRequest(f"{where}: expected a table of {', '.join(DECLARED_KEYS)}")
    unknown = sorted(set(table) - set(DECLARED_KEYS))
    if unknown:
        raise BadRequest(f"{where}: unknown key {unknown[0]!r} "
                         f"(a node has {', '.join(DECLARED_KEYS)})")
    missing = [key for key in ("aet", "host", "port") if key not in table]
    if missing:
        raise BadRequest(f"{where}: {missing[0]!r} is missing")
    text = {key: table[key] for key in ("aet", "host", "user") if key in table}
    for key, value in text.items():
        if not isinstance(value, str):
            raise BadRequest(f"{where}: {key!r} must be a string, got {value!r}")
    port, tls = table["port"], table.get("tls", False)
    if isinstance(port, bool) or not isinstance(port, int):
        raise BadRequest(f"{where}: 'port' must be a whole number, got {port!r}")
    if not isinstance(tls, bool):
        raise BadRequest(f"{where}: 'tls' must be true or false, got {tls!r}")
    user = text.get("user") or None
    try:
        return checked(name, text["aet"], text["host"], port, tls, user, declared=True)
    except BadRequest as exc:
        raise BadRequest(f"{where}: {exc.message}") from exc


def as_tables(found: tuple[Node, ...]) -> dict[str, dict[str, Any]]:
    """The ``[nodes.NAME]`` tables that ``declared_nodes`` reads back as ``found``."""
    tables: dict[str, dict[str, Any]] = {}
    for node in found:
        table: dict[str, Any] = {"aet": node.ae_title, "host": node.host, "port": node.port,
                                 "tls": node.tls}
        if node.acts_as:
            table["user"] = node.acts_as
        tables[node.name] = table
    return tables
