"""The results table: rows of figures for Orthanc and Lightbox, printed and saved as JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def fmt_number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


@dataclass
class Row:
    key: str
    figure: str
    unit: str
    orthanc: float | None
    lightbox: float | None
    target: str = ""
    # Which way is better: "higher" or "lower"; a ceiling row has neither.
    better: str = "higher"
    percent: bool = False
    ceiling: bool = False
    passed: bool | None = None

    @property
    def ratio(self) -> float | None:
        if self.ceiling or self.percent or not self.orthanc or self.lightbox is None:
            return None
        return self.lightbox / self.orthanc

    def cells(self) -> list[str]:
        fmt: Callable[[float | None], str] = fmt_percent if self.percent else fmt_number
        ratio = self.ratio
        target = self.target
        if self.passed is not None:
            target = f"{target} {'ok' if self.passed else 'MISSED'}"
        return [
            f"{self.figure} ({self.unit})",
            fmt(self.orthanc),
            fmt(self.lightbox),
            "-" if ratio is None else f"{ratio:.2f}x",
            target,
        ]


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows = [r for r in self.rows if r.key != row.key]
        self.rows.append(row)
        return row

    def table(self) -> str:
        header = ["figure", "orthanc", "lightbox", "ratio", "target"]
        body = [r.cells() for r in self.rows]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            out = [cells[0].ljust(widths[0])]
            out += [c.rjust(w) for c, w in zip(cells[1:4], widths[1:4], strict=True)]
            out.append(cells[4].ljust(widths[4]))
            return " | ".join(out).rstrip()

        rule = "-+-".join("-" * w for w in widths)
        return "\n".join([line(header), rule, *(line(c) for c in body)])

    def to_json(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            item = asdict(r)
            item["ratio"] = r.ratio
            rows.append(item)
        return {"meta": self.meta, "rows": rows, "details": self.details}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)
