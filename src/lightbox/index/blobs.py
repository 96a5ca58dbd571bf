"""What the index says of the blob store: which keys it refers to, and their sizes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from sqlalchemy import Connection, select

from lightbox.index.schema import instances

_BATCH = 500  # values per IN (...)


def in_key_order(conn: Connection, *, sqlite: bool) -> Iterator[tuple[str, int, str]]:
    """Every instance's blob key, size and SOP Instance UID, streamed in the
    byte order of the keys (the order the blob store lists its files in).
    The query runs at once: the rows are those of this moment."""
    # PostgreSQL's default collation may not be byte order; "C" is.
    key = instances.c.blob_key if sqlite else instances.c.blob_key.collate("C")
    rows = conn.execution_options(stream_results=True, yield_per=2000).execute(
        select(instances.c.blob_key, instances.c.size, instances.c.sop_instance_uid)
        .order_by(key))
    return ((str(blob_key), int(size), str(uid)) for blob_key, size, uid in rows)


def of_instances(conn: Connection, sop_instance_uids: Sequence[str]) -> list[tuple[str, str, int]]:
    """SOP Instance UID, blob key and size of those of the instances indexed."""
    found: list[tuple[str, str, int]] = []
    for start in range(0, len(sop_instance_uids), _BATCH):
        uids = list(sop_instance_uids[start:start + _BATCH])
        found.extend((str(uid), str(key), int(size)) for uid, key, size in conn.execute(
            select(instances.c.sop_instance_uid, instances.c.blob_key, instances.c.size)
            .where(instances.c.sop_instance_uid.in_(uids))))
    return found


def referenced(conn: Connection, keys: Sequence[str]) -> set[str]:
    """Those of ``keys`` an instance refers to (each look-up reads the whole
    table, the key having no index of its own: for a few keys only)."""
    found: set[str] = set()
    for start in range(0, len(keys), _BATCH):
        batch = list(keys[start:start + _BATCH])
        found.update(str(k) for k in conn.execute(
            select(instances.c.blob_key).where(instances.c.blob_key.in_(batch))).scalars())
    return found
