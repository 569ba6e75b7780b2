"""The benchmark report's numbers as text, shared by report.md and report.html: value formats, the
results table, one headline per variant and the summary line."""

from __future__ import annotations

from typing import Any

from efficientbioai.benchmark.environment import flag_summary
from efficientbioai.tables import human_bytes

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
AGREEMENT_NAMES = {"pearson": "r vs original", "mask_dice": "mask Dice vs original"}


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
