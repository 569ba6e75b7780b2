"""The benchmark's reports: report.json (validated by report.schema.json), report.md and a self-contained
report.html (inline SVG charts, base64 PNG image panels, no external assets or scripts)."""

from __future__ import annotations

import json
import os
import tempfile
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from efficientbioai.benchmark import plots
from efficientbioai.benchmark.environment import flag_summary
from efficientbioai.tables import human_bytes

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
SHOWN_METRICS = {
    "restoration": ["pearson", "psnr", "ssim"],
    "semantic": ["dice", "iou"],
    "instance": ["ap50", "f1"],
}
METRIC_NAMES = {
    "pearson": "Pearson r",
    "psnr": "PSNR",
    "ssim": "SSIM",
    "dice": "Dice",
    "iou": "IoU",
    "ap50": "AP@0.5",
    "f1": "F1",
}


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


# ------------------------------------------------------------------------------------------ formatting


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 0.001:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def fmt_latency(lat: dict[str, Any] | None) -> str:
    """'23.5 ms [23.2–23.8]': median [first–third quartile], in the median's unit."""
    if not lat:
        return "-"
    med = fmt_seconds(lat["median_s"])
    unit, k = ("s", 1.0) if lat["median_s"] >= 1 else ("ms", 1e3) if lat["median_s"] >= 1e-3 else ("µs", 1e6)
    q1, q3 = lat["q1_s"] * k, lat["q3_s"] * k
    digits = 2 if unit == "s" else 1
    return f"{med} [{q1:.{digits}f}–{q3:.{digits}f}]" if med.endswith(f" {unit}") else med


def fmt_joules(j: float | None) -> str:
    if j is None:
        return "-"
    if j >= 1000:
        return f"{j / 1000:.3g} kJ"
    if j >= 0.1:
        return f"{j:.3g} J"
    return f"{j * 1000:.3g} mJ"


def fmt_energy(e: dict[str, Any] | None) -> str:
    if not e or e.get("joules_median") is None:
        return "-"
    return f"{fmt_joules(e['joules_median'])} ({e['method']})"


def fmt_ratio(r: float | None, more: str = "", less: str = "") -> str:
    """'3.28× smaller' for r ≥ 1 and '1.69× larger' for r < 1 (r = original / row)."""
    if r is None:
        return "-"
    if not more:
        return f"{r:.2f}×"
    return f"{r:.2f}× {more}" if r >= 1 else f"{1 / r:.2f}× {less}"


def fmt_memory(m: dict[str, Any] | None) -> str:
    if not m or m.get("peak_rss_bytes") is None:
        return "-"
    text = human_bytes(m["peak_rss_bytes"])
    if m.get("peak_rss_increase_bytes") is not None:
        text += f" (+{human_bytes(m['peak_rss_increase_bytes'])})"
    if m.get("gpu_peak_bytes") is not None:
        text += f"; GPU {human_bytes(m['gpu_peak_bytes'])}"
    return text


def fmt_metric(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"


def engine_text(r: dict[str, Any]) -> str:
    e = r.get("engine")
    if not e:
        return "-"
    label = e.get("label") or e.get("backend") or "-"
    req, runs = e.get("requested_precision"), e.get("precision")
    if runs and req and runs != req and req != "int8":  # e.g. fp16 asked, bf16 run (int8: float parts)
        label += f" (runs {runs})"
    return label


def metric_columns(report: dict[str, Any]) -> list[str]:
    task = report.get("task")
    have = {k for r in report["rows"] for k in r["metrics"]["mean"]}
    return [m for m in SHOWN_METRICS.get(task, []) if m in have]


def agreement_columns(report: dict[str, Any]) -> list[str]:
    have = {k for r in report["rows"] for k in r["agreement"]["mean"]}
    return [k for k in ("pearson", "mask_dice") if k in have]


AGREEMENT_NAMES = {"pearson": "r vs original", "mask_dice": "mask Dice vs original"}


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    mcols, acols = metric_columns(report), agreement_columns(report)
    header = [
        "row",
        "device",
        "engine",
        "latency, median [IQR]",
        "speed-up",
        "Mvoxel/s",
        "energy / pass",
        "energy vs original",
        "peak RSS (+run)",
        "size",
        "size vs original",
        *[METRIC_NAMES.get(m, m) for m in mcols],
        *[AGREEMENT_NAMES[a] for a in acols],
    ]
    rows = []
    for r in report["rows"]:
        if r["status"] != "ok":
            rows.append([r["id"], r["device"], "failed", *["-"] * (len(header) - 3)])
            continue
        ratios = r.get("ratios") or {}
        size = r.get("size") or {}
        rows.append(
            [
                r["id"],
                r["device"],
                engine_text(r),
                fmt_latency(r["latency"]),
                "1 (reference)" if r["variant"] is None else fmt_ratio(ratios.get("speedup")),
                f"{r['throughput_mvoxel_s']:.3g}" if r.get("throughput_mvoxel_s") else "-",
                fmt_energy(r.get("energy")),
                "" if r["variant"] is None else fmt_ratio(ratios.get("energy"), "less", "more"),
                fmt_memory(r.get("memory")),
                human_bytes(size.get("bytes")) if size.get("bytes") else "-",
                "" if r["variant"] is None else fmt_ratio(ratios.get("size"), "smaller", "larger"),
                *[fmt_metric(r["metrics"]["mean"].get(m)) for m in mcols],
                *[
                    "(reference)" if r["variant"] is None else fmt_metric(r["agreement"]["mean"].get(a))
                    for a in acols
                ],
            ]
        )
    return header, rows


def headlines(report: dict[str, Any]) -> list[str]:
    """One sentence per variant row: how much faster, less energy, smaller, and the metric change."""
    out = []
    primary = report.get("primary_metric")
    origs = {r["device"]: r for r in report["rows"] if r["variant"] is None and r["status"] == "ok"}
    for r in report["rows"]:
        if r["variant"] is None or r["status"] != "ok":
            continue
        ratios = r.get("ratios") or {}
        parts = []
        if ratios.get("speedup"):
            parts.append(fmt_ratio(ratios["speedup"], "faster", "slower"))
        if ratios.get("speedup_vs_fp32_engine") and r["id"] != ratios.get("fp32_engine_row"):
            parts.append(
                fmt_ratio(ratios["speedup_vs_fp32_engine"], "faster", "slower")
                + f" than {ratios['fp32_engine_row']}"
            )
        if ratios.get("energy"):
            how = (
                "estimated from CPU time × an assumed power, not measured"
                if r["energy"].get("cpu_time_estimate")
                else r["energy"].get("basis") or r["energy"]["method"]
            )
            parts.append(fmt_ratio(ratios["energy"], "less", "more") + f" energy ({how})")
        if ratios.get("size"):
            parts.append(fmt_ratio(ratios["size"], "smaller", "larger"))
        o = origs.get(r["device"])
        if primary and o and primary in r["metrics"]["mean"] and primary in o["metrics"]["mean"]:
            a, b = o["metrics"]["mean"][primary], r["metrics"]["mean"][primary]
            parts.append(
                f"{METRIC_NAMES.get(primary, primary)} {fmt_metric(b)} (original {fmt_metric(a)}, {b - a:+.4f})"
            )
        elif "pearson" in r["agreement"]["mean"]:
            parts.append(f"Pearson r {r['agreement']['mean']['pearson']:.5f} vs the original's output")
        device = f" on the {r['device'].upper()}" if len(origs) > 1 else ""
        out.append(f"{r['id']}{device}: " + ", ".join(parts))
    return out


def summary_line(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    cpu = env["cpu"]
    shapes = sorted({" × ".join(map(str, im["shape"][1:])) for im in report["images"] if im["shape"]})
    gpu = env["gpu"]["devices"][0]["name"] if env["gpu"]["available"] and env["gpu"]["devices"] else None
    return (
        f"{report['model']['name']} · task {report['task'] or '-'} · {len(report['images'])} image(s) "
        f"({', '.join(shapes)}) · CPU {cpu['model']} ({flag_summary(cpu)})"
        + (f" · GPU {gpu}" if gpu else "")
        + f" · {s['threads']} thread{'s' if s['threads'] != 1 else ''} · {s['repeats']} timed run(s) per image "
        f"after {s['warmup']} warm-up, "
        f"rows interleaved · speed-ups: whole-image latency (tiles read to stitched output, pre/post-processing "
        f"included), median over the timed runs, against the original model · {report['created']}"
    )


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


# ------------------------------------------------------------------------------------------------ html

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


# --------------------------------------------------------------------------------------------- writing


def build_panels(report: dict[str, Any], out: Path, cfg, images, rows) -> list[dict[str, Any]]:
    """Panels for the first images, per device: input / original / each variant / difference."""
    from efficientbioai.benchmark.panels import image_panels
    from efficientbioai.benchmark.worker import load_image

    if not cfg.panels.enabled or not report["model"]["axes"]:
        return []
    axes = report["model"]["axes"]
    ndim = len(axes) - 2
    sets = []
    for device in report["settings"]["devices"]:
        ok = [r for r in report["rows"] if r["device"] == device and r["status"] == "ok"]
        orig = next((r for r in ok if r["variant"] is None), None)
        if orig is None:
            continue
        for im in images[: cfg.panels.max_images]:
            image = load_image(im.spec(), axes)
            original = np.load(out / "outputs" / orig["id"] / f"{im.name}.npy")
            variants = {
                r["id"]: np.load(out / "outputs" / r["id"] / f"{im.name}.npy") for r in ok if r["variant"]
            }
            if not variants:
                continue
            where, inp, origp, prow = image_panels(
                image, original, variants, ndim, size=cfg.panels.size, z=cfg.panels.slice
            )
            sets.append(
                {
                    "image": im.name,
                    "device": device,
                    "where": where,
                    "input": inp,
                    "original": origp,
                    "rows": prow,
                }
            )
    return sets


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files; reports are ordinary files
    os.replace(tmp, path)


def write_reports(report: dict[str, Any], out: Path, cfg, images, rows) -> str:
    """Write report.md, report.html, then report.json (last: its presence means the run completed)."""
    markdown = render_markdown(report)
    _atomic_write(out / "report.md", markdown)
    _atomic_write(out / "report.html", render_html(report, build_panels(report, out, cfg, images, rows)))
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
