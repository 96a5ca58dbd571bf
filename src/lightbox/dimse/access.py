"""Who may call the SCP, what they may do, and as which Principal (one place).

Known nodes (matched by calling AE title and peer address) may use every
service. Unknown callers may only verify and store, and only when
``dicom_accept_unknown`` allows their address: ``loopback`` (default) for
127.0.0.1 and ::1, ``all`` for any, ``none`` for no one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lightbox.archive import Archive
from lightbox.errors import BadRequest, NotFound
from lightbox.index import accounts
from lightbox.services import nodes
from lightbox.services.auth import Principal, principal_of
from lightbox.services.nodes import Node
from lightbox.settings import ACCEPT_UNKNOWN


class Service(enum.Enum):
    ECHO = "C-ECHO"
    STORE = "C-STORE"
    FIND = "C-FIND"
    MOVE = "C-MOVE"
    GET = "C-GET"
    COMMIT = "storage commitment"


UNKNOWN_CALLER_SERVICES = frozenset({Service.ECHO, Service.STORE})
ALL_SERVICES = frozenset(Service)


class AcceptUnknown(enum.Enum):
    LOOPBACK = "loopback"
    ALL = "all"
    NONE = "none"


def accept_unknown(value: str) -> AcceptUnknown:
    text = value.strip().lower()
    try:
        return AcceptUnknown(ACCEPT_UNKNOWN.get(text, text))
    except ValueError as exc:
        raise BadRequest(
            f"dicom_accept_unknown must be loopback, all or none, got {value!r}"
        ) from exc


@dataclass(frozen=True)
class Peer:
    """A calling AE as admitted: who it claims to be, where from, what it may do."""

    ae_title: str
    address: str
    port: int
    node: Node | None
    services: frozenset[Service]

    @property
    def known(self) -> bool:
        return self.node is not None

    def may(self, service: Service) -> bool:
        return service in self.services

    def __str__(self) -> str:
        who = f" (node {self.node.name})" if self.node else ""
        return f"{self.ae_title}@{self.address}:{self.port}{who}"


def admit(archive: Archive, ae_title: str, address: str, port: int) -> Peer | None:
    """The Peer for a calling AE, or None when the association must be rejected."""
    ae_title = ae_title.strip()
    node = nodes.identify(archive, ae_title, address)
    if node is not None:
        return Peer(ae_title, address, port, node, ALL_SERVICES)
    policy = accept_unknown(archive.settings.dicom_accept_unknown)
    allowed = policy is AcceptUnknown.ALL or (
        policy is AcceptUnknown.LOOPBACK and nodes.is_loopback(address)
    )
    if not allowed:
        return None
    return Peer(ae_title, address, port, None, UNKNOWN_CALLER_SERVICES)


def principal_for(archive: Archive, peer: Peer) -> Principal:
    """The rights a DIMSE peer acts with.

    A node registered to act as a user reads what that user may see (nothing
    while the user is disabled); other peers read and write every study.
    """
    acts_as = peer.node.acts_as if peer.node is not None else None
    if acts_as is None:
        return Principal(user=f"dicom:{peer.ae_title}", is_admin=False, studies=None)
    with archive.db.read() as conn:
        try:
            user = accounts.get_user(conn, acts_as)
        except NotFound:
            user = None
    if user is None or user.disabled:
        return Principal(user=f"dicom:{peer.ae_title}", is_admin=False, studies=frozenset())
    return principal_of(archive, user)


def operator_principal() -> Principal:
    """The rights of the operator running an SCU command from the CLI (the whole archive)."""
    return Principal(user="operator", is_admin=True, studies=None)
