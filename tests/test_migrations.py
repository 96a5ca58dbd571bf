"""Migrations that rewrite what earlier versions stored, on both backends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import select, text, update

from lightbox.archive import Archive
from lightbox.index.schema import instances
from lightbox.services.ingest import Offer, Status, store_instances
from tests.factories import ct_dataset, write


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def test_metadata_cached_with_nan_is_rewritten_as_null(archive: Archive, tmp_path: Path) -> None:
    nan, inf = float("nan"), float("inf")
    ds = ct_dataset(DiffusionGradientOrientation=[nan, inf, 1.0],
                    StudyDescription="NaN,Infinity]")  # the tokens inside a string stay
    [outcome] = store_instances(archive, [Offer(write(ds, tmp_path / "a.dcm"), "test")])
    assert outcome.status is Status.STORED
    with archive.db.read() as conn:
        [current] = conn.execute(select(instances.c.dicom_json)).scalars().all()
    # What an earlier version cached: the bare tokens, which are not JSON.
    old = bytes(current).replace(b'"Value":[null,null,1.0]', b'"Value":[NaN,Infinity,1.0]')
    assert old != bytes(current)
    with archive.db.write() as conn:
        conn.execute(update(instances).values(dicom_json=old))
        conn.execute(text("UPDATE alembic_version SET version_num = '0008'"))
    archive.db.migrate()
    with archive.db.read() as conn:
        [fixed] = conn.execute(select(instances.c.dicom_json)).scalars().all()
    parsed = json.loads(bytes(fixed), parse_constant=_refuse)
    assert parsed["00189089"] == {"vr": "FD", "Value": [None, None, 1.0]}
    assert parsed["00081030"]["Value"] == ["NaN,Infinity]"]
    assert bytes(fixed) == bytes(current)  # byte for byte what ingest now caches
