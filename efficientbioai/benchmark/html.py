"""report.html: one self-contained page (inline SVG charts, base64 PNG image panels, no external assets
or scripts)."""

from __future__ import annotations

from html import escape
from typing import Any

import numpy as np
import yaml

from efficientbioai.benchmark import plots
from efficientbioai.benchmark.environment import flag_summary
from efficientbioai.benchmark.formatting import (
    METRIC_NAMES,
    fmt_joules,
    fmt_ratio,
    fmt_seconds,
    headlines,
    summary_line,
    table_rows,
)
from efficientbioai.tables import human_bytes

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px;color:#222;
background:#fff;max-width:1320px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:26px 0 8px}h3{font-size:15px;margin:18px 0 6px}
.sub{color:#555;font-size:13px;margin:0 0 14px}
.plots{display:flex;flex-wrap:wrap;gap:14px}.plots svg{border:1px solid #ddd;border-radius:4px}
table.results{border-collapse:collapse;font-size:12.5px}
table.results th,table.results td{border-bottom:1px solid #e2e2e2;padding:4px 6px;text-align:right;
white-space:nowrap}
table.results th{white-space:normal;vertical-align:bottom;max-width:110px}
.scroll{overflow-x:auto}
table.results th:nth-child(-n+3),table.results td:nth-child(-n+3){text-align:left}
table.results th{background:#f4f4f4}
tr.failed td{color:#a00}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
table.panels td{vertical-align:top;padding:4px 8px 10px 0;font-size:12px}
table.panels img{display:block;image-rendering:pixelated;border:1px solid #ccc}
.cap{color:#555;font-size:11px;max-width:330px}
ul{font-size:13px}pre{font-size:11.5px;background:#f7f7f7;padding:10px;overflow:auto}
table.env td{font-size:12.5px;padding:2px 10px 2px 0;vertical-align:top}
"""


def _charts(report: dict[str, Any]) -> list[str]:
    ok = [r for r in report["rows"] if r["status"] == "ok" and r["latency"]]
    if not ok:
        return []
    colors = plots.row_colors([r["id"] for r in ok], [r["variant"] for r in ok])
    charts = []

    lat_bars = []
    unit_ms = max(r["latency"]["median_s"] for r in ok) < 1
    k = 1e3 if unit_ms else 1.0
    for r in ok:
        lat = r["latency"]
        sp = (r.get("ratios") or {}).get("speedup")
        lat_bars.append(
            plots.Bar(
                r["id"],
                lat["median_s"] * k,
                colors[r["id"]],
                lat["q1_s"] * k,
                lat["q3_s"] * k,
                note="reference" if r["variant"] is None else fmt_ratio(sp, "faster", "slower") if sp else "",
                text=fmt_seconds(lat["median_s"]),
            )
        )
    n_img = len(report["images"])
    what = "whole image" if n_img == 1 else f"{n_img} whole images"
    charts.append(
        plots.bar_chart(
            f"Latency ({what}; median, IQR whiskers)",
            lat_bars,
            "milliseconds" if unit_ms else "seconds",
            element_id="latency-chart",
        )
    )

    en = [r for r in ok if r["energy"] and r["energy"].get("joules_median") is not None]
    if en:
        methods = sorted({r["energy"]["method"] for r in en})
        bars = []
        for r in en:
            runs = sorted(r["energy"]["runs_j"])
            q = np.percentile(runs, [25, 75]) if len(runs) > 1 else [None, None]
            ratio = (r.get("ratios") or {}).get("energy")
            bars.append(
                plots.Bar(
                    r["id"],
                    r["energy"]["joules_median"],
                    colors[r["id"]],
                    None if q[0] is None else float(q[0]),
                    None if q[1] is None else float(q[1]),
                    note="reference"
                    if r["variant"] is None
                    else fmt_ratio(ratio, "less", "more")
                    if ratio
                    else "",
                    text=fmt_joules(r["energy"]["joules_median"]),
                )
            )
        charts.append(
            plots.bar_chart(
                f"Energy per pass ({', '.join(methods)})", bars, "joules", element_id="energy-chart"
            )
        )

    primary = report.get("primary_metric")
    points = []
    for r in ok:
        sp = 1.0 if r["variant"] is None else (r.get("ratios") or {}).get("speedup")
        if sp is None:
            continue
        if primary:
            y = r["metrics"]["mean"].get(primary)
        else:
            y = 1.0 if r["variant"] is None else r["agreement"]["mean"].get("pearson")
        if y is not None:
            points.append(plots.Point(r["id"], sp, y, colors[r["id"]]))
    if points:
        ylabel = (
            f"{METRIC_NAMES.get(primary, primary)} vs ground truth"
            if primary
            else "Pearson r vs the original"
        )
        charts.append(plots.scatter("Accuracy against speed", points, "speed-up vs the original (×)", ylabel))
    return charts


def _html_table(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    colors = plots.row_colors([r["id"] for r in ok], [r["variant"] for r in ok])
    out = ['<table class="results"><thead><tr>']
    out += [f"<th>{escape(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for r, cells in zip(report["rows"], rows, strict=True):
        cls = ' class="failed"' if r["status"] != "ok" else ""
        out.append(f"<tr{cls}>")
        for i, c in enumerate(cells):
            if i == 0 and r["id"] in colors:
                c_html = f'<span class="swatch" style="background:{colors[r["id"]]}"></span>{escape(c)}'
            else:
                c_html = escape(c)
            out.append(f"<td>{c_html}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _panel_cell(p, display: int = 220) -> str:
    k = max(1, display // max(p.width, p.height))  # small images: whole-pixel upscaling
    return (
        f'<td><b>{escape(p.title)}</b><img src="{p.uri}" width="{p.width * k}" height="{p.height * k}" '
        f'alt="{escape(p.title)}"><div class="cap">{escape(p.caption)}</div></td>'
    )


def _panels_html(panel_sets: list[dict[str, Any]]) -> str:
    if not panel_sets:
        return ""
    out = ['<h2 id="panels">Images</h2>']
    for ps in panel_sets:
        out.append(f"<h3>{escape(ps['image'])} — {escape(ps['device'])}, {escape(ps['where'])}</h3>")
        out.append('<table class="panels">')
        n = len(ps["rows"])
        for k, row in enumerate(ps["rows"]):
            out.append("<tr>")
            if k == 0:
                for p in (ps["input"], ps["original"]):
                    out.append(_panel_cell(p).replace("<td>", f'<td rowspan="{n}">', 1))
            out += [_panel_cell(p) for p in row.panels]
            out.append("</tr>")
        out.append("</table>")
    return "".join(out)


def _env_html(report: dict[str, Any]) -> str:
    env = report["environment"]
    cpu = env["cpu"]
    gpu = env["gpu"]
    items = [
        (
            "CPU",
            f"{cpu['model']} ({cpu['architecture']}), {cpu['logical_cores']} logical cores, "
            f"{cpu['usable_cores']} usable",
        ),
        ("instruction sets", flag_summary(cpu)),
        ("OpenVINO CPU capabilities", ", ".join(cpu.get("openvino_capabilities") or []) or "-"),
        ("threads per row", str(env["threads"])),
        ("memory", human_bytes(env.get("memory_bytes"))),
        (
            "GPU",
            ", ".join(f"{d['name']} ({human_bytes(d['memory_bytes'])})" for d in gpu["devices"])
            if gpu["available"]
            else (gpu.get("note") or "none"),
        ),
        ("OS / Python", f"{env['os']} / {env['python']}"),
        ("load average at start", ", ".join(map(str, env.get("load_average_at_start") or [])) or "-"),
        ("versions", ", ".join(f"{k} {v}" for k, v in env["versions"].items())),
    ]
    rows = "".join(f"<tr><td><b>{escape(k)}</b></td><td>{escape(v)}</td></tr>" for k, v in items)
    return f'<table class="env">{rows}</table>'


def render_html(report: dict[str, Any], panel_sets: list[dict[str, Any]] | None = None) -> str:
    """The page: charts, headlines, the results table, image panels (from
    :func:`~efficientbioai.benchmark.panels.build_panels`), notes, environment and configuration."""
    charts = _charts(report)
    heads = headlines(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(report['title'])}</title>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<style>{CSS}</style></head><body>",
        f"<h1>{escape(report['title'])}</h1>",
        f'<p class="sub">{escape(summary_line(report))}</p>',
        '<section id="plots" class="plots">' + "".join(charts) + "</section>",
    ]
    if heads:
        parts.append("<ul>" + "".join(f"<li>{escape(h)}</li>" for h in heads) + "</ul>")
    parts += ['<h2 id="results">Results</h2>', '<div class="scroll">' + _html_table(report) + "</div>"]
    parts.append(
        '<p class="sub">latency: whole image from the first tile read to the stitched output, median over the '
        "timed runs, [first–third quartile]; speed-up, energy and size ratios are against the original model "
        "on the same device; peak RSS is the row process's peak resident memory during a run, (+run) what "
        "the run added on top of its memory after loading.</p>"
    )
    parts.append(_panels_html(panel_sets or []))
    if report["notes"]:
        parts.append(
            '<h2 id="notes">Notes</h2><ul>'
            + "".join(f"<li>{escape(n)}</li>" for n in report["notes"])
            + "</ul>"
        )
    parts += ['<h2 id="environment">Environment</h2>', _env_html(report)]
    parts.append(
        "<details><summary>Configuration</summary><pre>"
        + escape(yaml.safe_dump(report["config"], sort_keys=False))
        + "</pre></details>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)
