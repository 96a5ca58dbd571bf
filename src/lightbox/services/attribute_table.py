"""An instance's attributes as a DICOM-dump-like table (tag, name, VR, value),
read from the DICOM JSON cached at ingest; sequences are nested rows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_description

MAX_ROWS = 5000
MAX_DEPTH = 8
MAX_VALUE = 240
MAX_VALUES = 16


@dataclass(frozen=True)
class AttributeRow:
    """One line of the table; ``depth`` counts enclosing sequence items."""

    depth: int
    tag: str
    name: str
    vr: str
    value: str


def attribute_rows(dicom_json: bytes) -> list[AttributeRow]:
    """The attributes of one instance's DICOM JSON, in tag order (bounded in size)."""
    rows: list[AttributeRow] = []
    dataset = json.loads(dicom_json)
    if isinstance(dataset, dict):
        _dataset(dataset, 0, rows)
    if len(rows) >= MAX_ROWS:
        rows = rows[:MAX_ROWS]
        rows.append(AttributeRow(0, "", "…", "", f"only the first {MAX_ROWS} rows are shown"))
    return rows


def _name(tag: int) -> str:
    if tag & 0x10000 and tag & 0xFFFF < 0x0100:
        return "Private Creator" if tag & 0xFFFF >= 0x0010 else "Private"
    if tag & 0x10000:
        return "Private tag"
    try:
        return str(dictionary_description(tag))
    except KeyError:
        return "Unknown"


def _dataset(dataset: dict[str, Any], depth: int, rows: list[AttributeRow]) -> None:
    for key in sorted(dataset):
        if len(rows) >= MAX_ROWS:
            return
        element = dataset[key]
        if not isinstance(element, dict) or len(key) != 8:
            continue
        try:
            tag = int(key, 16)
        except ValueError:
            continue
        vr = str(element.get("vr", ""))
        label = f"({key[:4]},{key[4:]})"
        if vr == "SQ":
            items = [i for i in element.get("Value", []) if isinstance(i, dict)]
            rows.append(AttributeRow(depth, label, _name(tag), vr, _items(len(items))))
            _items_rows(items, depth, rows)
            continue
        rows.append(AttributeRow(depth, label, _name(tag), vr, _value(element)))


def _items(n: int) -> str:
    return f"{n} item" if n == 1 else f"{n} items"


def _items_rows(items: list[dict[str, Any]], depth: int, rows: list[AttributeRow]) -> None:
    if depth + 1 > MAX_DEPTH:
        if items:
            rows.append(AttributeRow(depth + 1, "", "…", "", "nested too deeply to show"))
        return
    for number, item in enumerate(items, start=1):
        rows.append(AttributeRow(depth + 1, "", f"Item {number}", "", ""))
        _dataset(item, depth + 1, rows)


def _value(element: dict[str, Any]) -> str:
    if "BulkDataURI" in element:
        return "(bulk data)"
    if "InlineBinary" in element:
        return f"(binary, {len(str(element['InlineBinary'])) * 3 // 4} bytes)"
    values = element.get("Value")
    if not isinstance(values, list):
        return ""
    shown = [_one(v) for v in values[:MAX_VALUES]]
    if len(values) > MAX_VALUES:
        shown.append(f"… ({len(values)} values)")
    text = "\\".join(shown)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def _one(value: Any) -> str:
    if isinstance(value, dict):  # a person name: Alphabetic=Ideographic=Phonetic
        groups = [str(value.get(k, "")) for k in ("Alphabetic", "Ideographic", "Phonetic")]
        return "=".join(groups).rstrip("=")
    return "" if value is None else str(value)
