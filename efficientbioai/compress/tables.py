"""What ``compress`` prints: its result as terminal tables, read from the artifact's manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from efficientbioai.artifact import Manifest
from efficientbioai.engines import latency_basis
from efficientbioai.tables import human_bytes, human_count, table


def result_table(m: Manifest, output: Path) -> str:
    """The summary of a compressed artifact: candidates tried, original vs compressed, fidelity, budget."""
    fid = m.fidelity
    lines = []
    strat = m.strategy or {}
    built = [c for c in strat.get("candidates", []) if not c["status"].startswith("skipped")]
    if len(built) > 1:  # what was tried and why the chosen one won
        lines.append(candidates_table(m))
    lines += [
        table(
            ["", "original", "compressed", "ratio"],
            comparison_rows(m),
            title=f"{m.model.name}: {m.engines.primary.backend} {m.precision} "
            f"(float parts run in {m.engines.primary.precision}), "
            f"{m.engines.primary.threads} threads",
        )
    ]
    lat = m.latency
    per_tile = f"per tile {tuple(lat['tile_shape'])}"
    lines.append(
        f"latency: {latency_basis(lat['compressed'], lat['threads'], per_tile)}; "
        "whole-image speed: efficientbioai infer / benchmark"
    )
    lines.append(
        f"fidelity on {fid['tiles']} held-out tiles: Pearson r {fid['pearson']:.5f}, relative L2 "
        f"{fid['relative_l2']:.4g}" + (f", mask IoU {fid['mask_iou']:.4f}" if "mask_iou" in fid else "")
    )
    if fid.get("outputs"):  # several outputs: each one, and which decided
        lines.append(
            "per output (Pearson r vs original): "
            + ", ".join(f"{n} {v['pearson']:.5f}" for n, v in fid["outputs"].items())
            + f"; the worst, {fid['worst_output']}, decides the figures above and the budget"
        )
    lines.append(budget_line(m))
    pt = m.package_test
    if pt:
        lines.append(
            f"package test tensor: original reproduces it to {pt['original_max_abs_diff_to_package_output']:.2g} "
            f"(max abs); compressed vs original Pearson r {pt['compressed_pearson_to_original']:.5f}, "
            f"mask IoU {pt['compressed_mask_iou_to_original']:.4f}"
        )
    lines.append(f"artifact: {output}")
    return "\n".join(lines)


def comparison_rows(m: Manifest) -> list[list[Any]]:
    """Original against compressed: engine, parameters, file size, latency, fidelity (and task metric)."""
    lat, size, fid = m.latency, m.size, m.fidelity
    o, c = lat["original"], lat["compressed"]
    ob, cb = size["original_bytes"], size["compressed_bytes"]
    rows = [
        ["engine", f"{o['backend']} fp32", f"{c['backend']} {m.precision}", ""],
        [
            "parameters",
            human_count(size["parameters"]),
            human_count(size.get("parameters_compressed") or size["parameters"]),
            f"{size['parameters'] / size['parameters_compressed']:.2f}x fewer"
            if size.get("parameters_compressed") and size["parameters_compressed"] != size["parameters"]
            else "",
        ],
        ["file size", human_bytes(ob), human_bytes(cb), f"{ob / cb:.2f}x smaller" if ob else ""],
        [
            f"latency / tile {tuple(lat['tile_shape'])}",
            f"{o['median_ms']:.1f} ms",
            f"{c['median_ms']:.1f} ms",
            f"{o['median_ms'] / c['median_ms']:.2f}x faster",
        ],
        ["Pearson r vs original", "1", f"{fid['pearson']:.5f}", ""],
        ["relative L2 vs original", "0", f"{fid['relative_l2']:.2e}", ""],
    ]
    if "compressed_metric" in fid:
        rows.append(
            [
                fid["metric"],
                f"{fid['original_metric']:.4f}",
                f"{fid['compressed_metric']:.4f}",
                f"{fid['compressed_metric'] - fid['original_metric']:+.4f}",
            ]
        )
    return rows


def budget_line(m: Manifest) -> str:
    """Whether an accuracy budget was checked, and how the chosen model did against it."""
    strat = m.strategy or {}
    budget = strat.get("budget")
    if not budget:
        return (
            "accuracy budget: OFF (quantize.max_drop: null) — this model was written without checking "
            "its accuracy against any budget; judge the figures above yourself"
        )
    chosen = next((c for c in strat.get("candidates", []) if c.get("status") == "chosen"), {})
    drop = chosen.get("metric_drop")
    what = "Pearson r to the original" if budget["metric"] == "pearson" else "task metric"
    return (
        f"accuracy budget: {what} may drop by ≤ {budget['value']:g} ({budget['type']}) on the held-out "
        f"tiles: within budget" + (f" (drop {drop:.4g})" if drop is not None else "")
    )


def candidates_table(m: Manifest) -> str:
    """What ``quantize.strategy: auto`` tried, as a table (from the manifest)."""
    strat = m.strategy
    ref = m.latency["original"]["median_ms"]
    rows = []
    for c in strat["candidates"]:
        lat = c["latency_ms"]
        rows.append(
            [
                c["name"],
                f"{lat:.1f} ms" if lat else "-",
                f"{ref / lat:.2f}x" if lat else "-",
                human_count(c["parameters"]) if c["parameters"] else "-",
                human_bytes(c["size_bytes"]) if c["size_bytes"] else "-",
                f"{c['pearson']:.5f}" if c["pearson"] is not None else "-",
                f"{c['metric_drop']:.4g}" if c["metric_drop"] is not None else "-",
                c["status"] if len(c["status"]) < 60 else c["status"][:57] + "...",
            ]
        )
    budget = strat.get("budget") or {}
    lat = m.latency
    per_tile = f"per tile {tuple(lat['tile_shape'])}"
    title = (
        f"strategy {strat.get('mode', 'auto')}: budget {budget.get('metric')} drop ≤ {budget.get('value')} "
        f"({budget.get('type')}); chosen: {strat['chosen']}\nspeed-up against PyTorch fp32 eager "
        f"({ref:.1f} ms/tile); latency "
        f"{latency_basis(lat['original'], lat['threads'], per_tile)}"
    )
    return table(
        ["candidate", "latency/tile", "speed-up", "params", "size", "Pearson r", "drop", "status"],
        rows,
        title=title,
    )
