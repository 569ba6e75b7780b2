"""The benchmark's report files: report.json (validated by report.schema.json), report.md (rendered
here) and report.html (rendered by :mod:`efficientbioai.benchmark.html`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai.benchmark.config import PanelsConfig
from efficientbioai.benchmark.formatting import (
    METRIC_NAMES,
    fmt_metric,
    fmt_seconds,
    headlines,
    metric_columns,
    summary_line,
    table_rows,
)
from efficientbioai.benchmark.html import render_html
from efficientbioai.benchmark.images import ImageEntry
from efficientbioai.benchmark.panels import build_panels

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


# -------------------------------------------------------------------------------------------- markdown


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(c: str) -> str:
        return str(c).replace("|", "\\|")

    align = [":--" if i < 3 else "--:" for i in range(len(header))]
    lines = ["| " + " | ".join(map(cell, header)) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    parts = [f"# {report['title']}", "", summary_line(report), "", _md_table(header, rows), ""]
    heads = headlines(report)
    if heads:
        parts += [f"- {h}" for h in heads] + [""]
    if len(report["images"]) > 1:
        parts += ["Per image (latency median; task metric):", ""]
        mcols = metric_columns(report)
        ph = ["image", *[r["id"] for r in report["rows"] if r["status"] == "ok"]]
        prow = []
        for i, im in enumerate(report["images"]):
            cells = [im["name"]]
            for r in report["rows"]:
                if r["status"] != "ok":
                    continue
                pi = next((p for p in r["per_image"] if p["image"] == im["name"]), None)
                text = fmt_seconds(pi["latency"]["median_s"]) if pi else "-"
                m = r["metrics"]["per_image"][i] if i < len(r["metrics"]["per_image"]) else {}
                if mcols and mcols[0] in m:
                    text += f"; {METRIC_NAMES.get(mcols[0], mcols[0])} {fmt_metric(m[mcols[0]])}"
                cells.append(text)
            prow.append(cells)
        parts += [_md_table(ph, prow).replace("| :-- | :-- | :-- |", "| :-- | --: | --: |"), ""]
    if report["notes"]:
        parts += ["Notes:", ""] + [f"- {n}" for n in report["notes"]] + [""]
    parts.append(
        "Files: report.json (every number, with the environment), report.html (plots and image panels), "
        "artifacts/ (one compressed model per variant), outputs/ (each row's stitched outputs)."
    )
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------- writing


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files; reports are ordinary files
    os.replace(tmp, path)


def write_reports(report: dict[str, Any], out: Path, images: list[ImageEntry], panels: PanelsConfig) -> str:
    """Write report.md, report.html, then report.json (last: its presence means the run completed)."""
    markdown = render_markdown(report)
    _atomic_write(out / "report.md", markdown)
    _atomic_write(out / "report.html", render_html(report, build_panels(report, out, images, panels)))
    _atomic_write(
        out / "report.json", json.dumps(finite(report), indent=2, allow_nan=False, default=_json_default)
    )
    return markdown


def finite(obj: Any) -> Any:
    """``obj`` with NaN / infinite floats as None (JSON has no such numbers), NumPy scalars as Python's."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
