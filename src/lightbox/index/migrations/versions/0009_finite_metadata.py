"""Cached DICOM JSON without NaN or infinities: instances stored before floats
that are not finite became null kept ``NaN``/``Infinity`` in their metadata,
which is not JSON and which browsers refuse. Rewritten here as null, the form
ingest now gives them (PS3.18 Table F.2.3-1 has no other).

Revision ID: 0009
Revises: 0008
"""

import json
import math
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"

_instances = sa.table("instances", sa.column("pk", sa.Integer),
                      sa.column("dicom_json", sa.LargeBinary))


def _finite(node: Any) -> Any:
    if isinstance(node, float) and not math.isfinite(node):
        return None
    if isinstance(node, list):
        return [_finite(item) for item in node]
    if isinstance(node, dict):
        return {key: _finite(value) for key, value in node.items()}
    return node


def upgrade() -> None:
    conn = op.get_bind()
    # Only entries that may hold such a token: the scan is done by the database.
    if conn.dialect.name == "postgresql":
        holds = "position(CAST(:token AS bytea) IN dicom_json) > 0"
    else:
        holds = "instr(dicom_json, CAST(:token AS BLOB)) > 0"
    suspects = sa.text(f"SELECT pk, dicom_json FROM instances WHERE "
                       f"{holds.replace(':token', ':nan')} OR {holds.replace(':token', ':inf')}")
    found = conn.execute(suspects, {"nan": "NaN", "inf": "Infinity"}).all()
    for pk, data in found:
        fixed = json.dumps(_finite(json.loads(bytes(data))), separators=(",", ":"),
                           ensure_ascii=False, allow_nan=False).encode()
        if fixed != bytes(data):
            conn.execute(sa.update(_instances).where(_instances.c.pk == pk)
                         .values(dicom_json=fixed))


def downgrade() -> None:
    pass  # null stays null: the values were never representable in JSON
