"""Known DICOM nodes: the peers Lightbox queries, retrieves from and sends to, and
the callers it trusts.

A node is named by the operator (``pacs``, ``ct-scanner``); its AE title, host
and port are what DIMSE needs. A calling peer is a known node when its AE title
and its network address both match one.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from lightbox.archive import Archive
from lightbox.errors import BadRequest
from lightbox.index import accounts
from lightbox.index import nodes as index
from lightbox.index.nodes import NodeRow

MAX_NAME = 64
MAX_AE_TITLE = 16
MAX_HOST = 255


@dataclass(frozen=True)
class Node:
    """A DICOM peer: where to reach it and whether to speak TLS to it."""

    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False
    acts_as: str | None = None  # a user whose grants limit what the node may read

    def __str__(self) -> str:
        scheme = " (TLS)" if self.tls else ""
        who = f" as user {self.acts_as}" if self.acts_as else ""
        return f"{self.name}: {self.ae_title}@{self.host}:{self.port}{scheme}{who}"


def _from_row(row: NodeRow) -> Node:
    return Node(row.name, row.ae_title, row.host, row.port, row.tls, row.acts_as)


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


def _require_name(name: str) -> str:
    ok = name and len(name) <= MAX_NAME and all(ch.isalnum() or ch in "._-" for ch in name)
    if not ok:
        raise BadRequest(
            f"a node name needs 1 to {MAX_NAME} letters, digits, '.', '_' or '-', got {name!r}"
        )
    return name


def _require_host(host: str) -> str:
    if not host or len(host) > MAX_HOST or any(ch.isspace() or ch == "/" for ch in host):
        raise BadRequest(f"not a host name or address: {host!r}")
    return host


def _require_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise BadRequest(f"a port is between 1 and 65535, got {port}")
    return port


def add_node(
    archive: Archive, *, name: str, ae_title: str, host: str, port: int, tls: bool = False,
    acts_as: str | None = None,
) -> Node:
    """Register a node; BadRequest for invalid fields, Conflict when the name is taken.

    With ``acts_as`` (a user name), what the node may find and retrieve is
    what that user may see; without, it reads the whole archive.
    """
    row = NodeRow(
        name=_require_name(name),
        ae_title=require_ae_title(ae_title),
        host=_require_host(host),
        port=_require_port(port),
        tls=tls,
        acts_as=acts_as,
    )
    with archive.db.write() as conn:
        if acts_as is not None:
            accounts.get_user(conn, acts_as)  # NotFound for an unknown user
        index.add_node(conn, row)
    return _from_row(row)


def list_nodes(archive: Archive) -> list[Node]:
    with archive.db.read() as conn:
        return [_from_row(r) for r in index.list_nodes(conn)]


def get_node(archive: Archive, name: str) -> Node:
    """The node called ``name``; NotFound when there is none."""
    with archive.db.read() as conn:
        return _from_row(index.get_node(conn, name))


def remove_node(archive: Archive, name: str) -> None:
    with archive.db.write() as conn:
        index.remove_node(conn, name)


def nodes_with_ae_title(archive: Archive, ae_title: str) -> list[Node]:
    """Every node registered under ``ae_title`` (usually one), by name."""
    with archive.db.read() as conn:
        return [_from_row(r) for r in index.nodes_with_ae_title(conn, ae_title.strip())]


def identify(archive: Archive, ae_title: str, address: str) -> Node | None:
    """The known node a caller is, matched by AE title and network address; None if none.

    A node's host may be a name: it is resolved here, so a node registered as
    ``pacs.example.org`` is recognised when it calls from that name's address.
    """
    for node in nodes_with_ae_title(archive, ae_title):
        if same_host(node.host, address):
            return node
    return None


def same_host(host: str, address: str) -> bool:
    """Whether ``address`` (an IP a connection came from) is one of ``host``'s addresses."""
    peer = _ip(address)
    if peer is None:
        return False
    literal = _ip(host)
    if literal is not None:
        return literal == peer
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return any(_ip(str(info[4][0])) == peer for info in infos)


def is_loopback(address: str) -> bool:
    ip = _ip(address)
    return ip is not None and ip.is_loopback


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    # A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
