"""Known DICOM nodes: the peers Lightbox queries, retrieves from and sends to, and
the callers it trusts.

A node is named by the operator (``pacs``, ``ct-scanner``); its AE title, host
and port are what DIMSE needs. A calling peer is a known node when its AE title
and its network address both match one. Nodes are registered in the index
(``lightbox node add``) or declared in the settings (the config file's
``[nodes.NAME]`` tables, or ``LIGHTBOX_NODES``);
a declared node hides a registered one of the same name.
"""

from __future__ import annotations

import ipaddress
import socket

from lightbox.archive import Archive
from lightbox.dicom.node import Node, checked, require_ae_title
from lightbox.errors import BadRequest, Conflict, NotFound
from lightbox.index import accounts
from lightbox.index import nodes as index
from lightbox.index.nodes import NodeRow

__all__ = ["Node", "require_ae_title"]

WHERE = "the config file's [nodes.NAME] tables or LIGHTBOX_NODES"


def _from_row(row: NodeRow) -> Node:
    return Node(row.name, row.ae_title, row.host, row.port, row.tls, row.acts_as)


def _declared(archive: Archive) -> dict[str, Node]:
    return {node.name: node for node in archive.settings.nodes}


def add_node(
    archive: Archive, *, name: str, ae_title: str, host: str, port: int, tls: bool = False,
    acts_as: str | None = None,
) -> Node:
    """Register a node; BadRequest for invalid fields, Conflict when the name is taken
    (in the index or the config file).

    With ``acts_as`` (a user name), what the node may find and retrieve is
    what that user may see; without, it reads the whole archive.
    """
    node = checked(name, ae_title, host, port, tls, acts_as)
    if node.name in _declared(archive):
        raise Conflict(f"a node named {node.name!r} is declared in the settings ({WHERE})")
    row = NodeRow(node.name, node.ae_title, node.host, node.port, node.tls, node.acts_as)
    with archive.db.write() as conn:
        if acts_as is not None:
            accounts.get_user(conn, acts_as)  # NotFound for an unknown user
        index.add_node(conn, row)
    return _from_row(row)


def _merged(archive: Archive, registered: list[NodeRow]) -> list[Node]:
    """Registered and declared nodes by name; a declared node hides a registered
    one of its name (the settings are what the operator last said)."""
    declared = _declared(archive)
    found = {row.name: _from_row(row) for row in registered if row.name not in declared}
    return sorted([*found.values(), *declared.values()], key=lambda node: node.name)


def list_nodes(archive: Archive) -> list[Node]:
    """Every known node, registered or declared, by name."""
    with archive.db.read() as conn:
        return _merged(archive, index.list_nodes(conn))


def get_node(archive: Archive, name: str) -> Node:
    """The node called ``name``; NotFound when there is none."""
    declared = _declared(archive).get(name)
    if declared is not None:
        return declared
    with archive.db.read() as conn:
        return _from_row(index.get_node(conn, name))


def remove_node(archive: Archive, name: str) -> None:
    """Forget a registered node; NotFound for none, BadRequest for a declared one."""
    if name in _declared(archive):
        raise BadRequest(f"node {name!r} is declared in the settings; remove it from {WHERE}")
    with archive.db.write() as conn:
        index.remove_node(conn, name)


def nodes_with_ae_title(archive: Archive, ae_title: str) -> list[Node]:
    """Every known node under ``ae_title`` (usually one), by name."""
    title = ae_title.strip()
    with archive.db.read() as conn:
        found = _merged(archive, index.nodes_with_ae_title(conn, title))
    return [node for node in found if node.ae_title == title]


def shadowed(archive: Archive) -> list[str]:
    """Names of registered nodes that a node declared in the settings hides."""
    with archive.db.read() as conn:
        return [row.name for row in index.list_nodes(conn) if row.name in _declared(archive)]


def missing_users(archive: Archive) -> list[str]:
    """Problems with declared nodes that act as a user who does not exist."""
    problems = []
    with archive.db.read() as conn:
        for node in archive.settings.nodes:
            if node.acts_as is None:
                continue
            try:
                accounts.get_user(conn, node.acts_as)
            except NotFound:
                problems.append(f"node {node.name!r} in the settings acts as user "
                                f"{node.acts_as!r}, who does not exist")
    return problems


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
