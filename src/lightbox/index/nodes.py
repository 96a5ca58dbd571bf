"""Known DICOM nodes in the index: the peers Lightbox talks to over DIMSE."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, delete, select

from lightbox.errors import Conflict, NotFound
from lightbox.index.schema import nodes


@dataclass(frozen=True)
class NodeRow:
    name: str
    ae_title: str
    host: str
    port: int
    tls: bool
    acts_as: str | None = None


def _node(row: Any) -> NodeRow:
    return NodeRow(
        name=row.name, ae_title=row.ae_title, host=row.host, port=int(row.port), tls=bool(row.tls),
        acts_as=row.acts_as,
    )


def add_node(conn: Connection, node: NodeRow) -> None:
    """Insert a node; Conflict when the name is taken."""
    if conn.execute(select(nodes.c.id).where(nodes.c.name == node.name)).first() is not None:
        raise Conflict(f"a node named {node.name!r} already exists")
    conn.execute(
        nodes.insert().values(
            name=node.name,
            ae_title=node.ae_title,
            host=node.host,
            port=node.port,
            tls=node.tls,
            acts_as=node.acts_as,
            created_at=datetime.now(UTC),
        )
    )


def get_node(conn: Connection, name: str) -> NodeRow:
    row = conn.execute(select(nodes).where(nodes.c.name == name)).first()
    if row is None:
        raise NotFound(f"no node named {name!r}")
    return _node(row)


def list_nodes(conn: Connection) -> list[NodeRow]:
    return [_node(r) for r in conn.execute(select(nodes).order_by(nodes.c.name))]


def nodes_with_ae_title(conn: Connection, ae_title: str) -> list[NodeRow]:
    stmt = select(nodes).where(nodes.c.ae_title == ae_title).order_by(nodes.c.name)
    return [_node(r) for r in conn.execute(stmt)]


def remove_node(conn: Connection, name: str) -> None:
    """Delete a node; NotFound when there is none of that name."""
    if conn.execute(delete(nodes).where(nodes.c.name == name)).rowcount == 0:
        raise NotFound(f"no node named {name!r}")
