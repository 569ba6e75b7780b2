"""report.json's content: each row's statistics (latency, memory, energy, size), the ratios against the
original and the fp32 engine, and the notes that explain how to read them."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from efficientbioai.artifact import Manifest
from efficientbioai.benchmark.config import BenchmarkConfig
from efficientbioai.benchmark.images import ImageEntry
from efficientbioai.benchmark.rows import Row
from efficientbioai.compress.rewrite import rewrite_summary
from efficientbioai.energy import energy_basis, is_cpu_time_estimate

REPORT_VERSION = 1
PRIMARY_METRIC = {"restoration": "ssim", "semantic": "dice", "instance": "ap50"}
BUSY_WARNING = 0.2  # cores used by other processes during the timed runs that make timings suspect


def build_report(
    cfg: BenchmarkConfig,
    tiling: dict[str, Any],
    env: dict[str, Any],
    devices: list[str],
    images: list[ImageEntry],
    rows: list[Row],
    scores: dict[str, Any],
    notes: list[str],
    threads: int,
    created: str,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """report.json's content (see report.schema.json): settings, environment, images, one entry per row
    with its statistics, ratios and scores, and the notes; ``cfg`` is recorded whole."""
    out_rows = [_row_report(r, images, scores) for r in rows]
    _add_ratios(out_rows)
    ok = [r for r in rows if r.manifest]
    model_name = ok[0].manifest.model.name if ok else None
    notes = _notes(notes, out_rows, ok, cfg.energy)
    targets = any(im.target is not None for im in images)
    return {
        "schema_version": REPORT_VERSION,
        "kind": "efficientbioai-benchmark-report",
        "title": cfg.title or f"{model_name or 'model'}: original vs compressed",
        "created": created,
        "model": {
            "name": model_name,
            "kind": cfg.model.kind,
            "axes": ok[0].manifest.input.axes if ok else None,
        },
        "task": cfg.task,
        "primary_metric": PRIMARY_METRIC.get(cfg.task) if (cfg.task and targets) else None,
        "threshold": cfg.threshold,
        "settings": {
            "threads": threads,
            "devices": devices,
            "warmup": cfg.runs.warmup,
            "repeats": cfg.runs.repeats,
            "order": "interleaved: each repeat runs every row once over every image, starting with a "
            "different row; one row computes at a time, each in its own process",
            "latency": "whole image: first tile read to stitched output (GPU synchronised), medians over "
            "the repeats of one pass over all images",
            "tiling": tiling,
            "energy": cfg.energy,
        },
        "environment": env,
        "images": [
            {
                "name": im.name,
                "path": str(im.path),
                "sample": im.sample,
                "shape": list(im.shape),
                "voxels": int(np.prod(im.shape[1:])) if im.shape else None,
                "target": str(im.target) if im.target else None,
                "generated": im.generated,
            }
            for im in images
        ],
        "rows": out_rows,
        "notes": notes,
        "seconds": seconds,
        "config": cfg.model_dump(mode="json"),
        "files": {
            "json": "report.json",
            "markdown": "report.md",
            "html": "report.html",
            "outputs": "outputs",
            "artifacts": "artifacts",
        },
    }


def _notes(
    notes: list[str], out_rows: list[dict[str, Any]], rows_with_manifest: list[Row], energy: bool
) -> list[str]:
    """``notes`` with what the rows' numbers need said: how energy and memory were measured, unchecked
    accuracy budgets, machine load during the timings, failed rows."""
    notes = list(notes)
    energies = [r["energy"] for r in out_rows if r["energy"] and r["energy"]["joules_median"] is not None]
    if energies:
        bases = sorted({e.get("basis") or e["method"] for e in energies})
        sources = sorted({e["source"] for e in energies if e["source"]})
        note = f"energy: {'; '.join(bases)} — {'; '.join(sources)}"
        if any(e.get("cpu_time_estimate") for e in energies):
            note += (
                ". No power counter was readable: energy ratios here are close to the ratios of CPU "
                "times, not measured savings"
            )
        notes.insert(0, note)
    elif energy:
        notes.insert(0, "energy: unavailable (see each row's energy.source in report.json)")
    else:
        notes.insert(0, "energy: not measured (energy: false in the config)")
    unbudgeted = [r.id for r in rows_with_manifest if not (r.manifest.strategy or {}).get("budget")]
    if unbudgeted:
        notes.append(
            f"{', '.join(unbudgeted)}: compressed with quantize.max_drop: null, so no accuracy budget was "
            "checked; judge its agreement with the original above"
        )
    mem = next((r["memory"]["method"] for r in out_rows if r["memory"] and r["memory"]["method"]), None)
    if mem:
        notes.append(
            f"memory: peak RSS = {mem}; '+x' is what a run added to the RSS the row had after loading its "
            "engine and images"
        )
    busy = [r for r in out_rows if r["other_load_cores"] is not None and r["other_load_cores"] > BUSY_WARNING]
    if busy:
        notes.append(
            "machine load: other processes used "
            + ", ".join(f"{r['other_load_cores']:.2f} cores during {r['id']}" for r in busy)
            + " (of the timed runs' wall time): timings are noisier than on an idle machine, and PyTorch "
            "rows (OpenMP threads wait for each other at every layer) usually lose more than OpenVINO rows, "
            "which inflates speed-ups; rows were interleaved so that the load falls on all of them"
        )
    for r in out_rows:
        if r["status"] == "failed":
            notes.append(f"{r['id']}: failed — {r['error']}")
    return notes


def _row_report(row: Row, images: list[ImageEntry], scores: dict[str, Any]) -> dict[str, Any]:
    voxels = sum(int(np.prod(im.shape[1:])) for im in images) if images and images[0].shape else None
    rep: dict[str, Any] = {
        "id": row.id,
        "variant": row.variant,
        "device": row.device,
        "status": row.status,
        "error": row.error,
        "engine": None,
        "transformations": _transformations(row.manifest) if row.kind == "variant" else [],
        "artifact": str(row.artifact) if row.kind == "variant" and row.artifact else None,
        "compress_seconds": row.compress_seconds,
        "compress_fidelity": row.manifest.fidelity if row.kind == "variant" and row.manifest else None,
        "latency": None,
        "per_image": [],
        "throughput_mvoxel_s": None,
        "memory": None,
        "energy": None,
        "size": _size(row) if row.manifest else None,
        "metrics": {"mean": {}, "per_image": []},
        "agreement": {"mean": {}, "per_image": []},
        "ratios": {},
        "other_load_cores": None,
        "setup_seconds": None,
    }
    if row.status != "ok" or not row.runs:
        return rep
    rd = row.ready
    rep["setup_seconds"] = {"load": rd.get("load_seconds"), "warmup": rd.get("warmup_seconds")}
    rep["engine"] = {
        "label": rd.get("label"),
        "backend": rd.get("backend"),
        "precision": rd.get("precision"),
        "requested_precision": row.precision
        if row.device == "gpu"
        else row.manifest.precision
        if row.kind == "variant" and row.manifest
        else "fp32",
        "threads": rd.get("threads"),
    }
    repeats = sorted({x["repeat"] for x in row.runs})
    # one "pass" = every image once; its time / energy is the sum over the images
    passes = [sum(x["seconds"] for x in row.runs if x["repeat"] == r) for r in repeats]
    rep["latency"] = _stats(passes)
    rep["per_image"] = _per_image(row.runs, images)
    if voxels:
        rep["throughput_mvoxel_s"] = voxels / rep["latency"]["median_s"] / 1e6
    rep["memory"] = _memory(row.runs, rd)
    rep["energy"] = _energy(row.runs, repeats)
    others = [x["other_cpu"] for x in row.runs if x.get("other_cpu") is not None]
    walls = [x["wall"] for x in row.runs if x.get("other_cpu") is not None]
    if others and sum(walls) > 0:
        rep["other_load_cores"] = sum(others) / sum(walls)
    s = scores.get(row.id)
    if s:
        rep["metrics"], rep["agreement"] = s["metrics"], s["agreement"]
    return rep


def _per_image(runs: list[dict[str, Any]], images: list[ImageEntry]) -> list[dict[str, Any]]:
    out = []
    for i, im in enumerate(images):
        mine = [x for x in runs if x["image"] == i]
        if not mine:
            continue
        out.append(
            {
                "image": im.name,
                "latency": _stats([x["seconds"] for x in mine]),
                "tiles": mine[0]["tiles"],
                "skipped_tiles": mine[0]["skipped"],
            }
        )
    return out


def _memory(runs: list[dict[str, Any]], ready: dict[str, Any]) -> dict[str, Any]:
    peaks = [x["peak_rss"] for x in runs if x.get("peak_rss")]
    incs = [x["peak_rss"] - x["rss_before"] for x in runs if x.get("peak_rss") and x.get("rss_before")]
    gpu_peaks = [x["gpu_peak_bytes"] for x in runs if x.get("gpu_peak_bytes") is not None]
    return {
        "peak_rss_bytes": max(peaks) if peaks else None,
        "peak_rss_increase_bytes": max(incs) if incs else None,
        "rss_after_setup_bytes": ready.get("rss_after_setup"),
        "gpu_peak_bytes": max(gpu_peaks) if gpu_peaks else None,
        "method": ready.get("memory_method"),
    }


def _energy(runs: list[dict[str, Any]], repeats: list[int]) -> dict[str, Any]:
    """Energy per pass over the images, or why there is none."""
    readings = [x.get("energy") for x in runs]
    if all(e and e.get("joules") is not None for e in readings):
        per_pass = [sum(x["energy"]["joules"] for x in runs if x["repeat"] == r) for r in repeats]
        methods = {x["energy"]["method"] for x in runs}
        method = "measured" if methods == {"measured"} else "estimated"
        details = runs[0]["energy"].get("details") or {}
        return {
            "joules_median": statistics.median(per_pass),
            "runs_j": per_pass,
            "method": method,
            "basis": energy_basis(method, details),
            "cpu_time_estimate": is_cpu_time_estimate(method, details),
            "source": runs[0]["energy"].get("source"),
        }
    reason = next(
        (
            (e.get("details") or {}).get("reason")
            for e in readings
            if e and (e.get("details") or {}).get("reason")
        ),
        None,
    )
    return {
        "joules_median": None,
        "runs_j": [],
        "method": "unavailable",
        "source": reason,
    }


def _stats(values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    if len(v) >= 2:
        q = statistics.quantiles(v, n=4, method="inclusive")
        q1, q3 = q[0], q[2]
    else:
        q1 = q3 = v[0]
    return {
        "median_s": statistics.median(v),
        "q1_s": q1,
        "q3_s": q3,
        "min_s": v[0],
        "max_s": v[-1],
        "runs_s": values,
    }


def _transformations(manifest: Manifest | None) -> list[str]:
    if manifest is None:
        return []
    out = []
    for t in manifest.transformations:
        step = str(t.get("step"))
        if step in ("export_onnx", "onnxslim", "onnx_dynamic_axes"):
            continue
        if step == "quantize_int8":
            out.append(f"int8 ({t.get('tool', 'nncf')}, {t.get('preset')} preset)")
        elif step == "rewrite":
            out.append("exact rewrite: " + rewrite_summary(t))
        elif step == "engine_precision":
            out.append(f"engine precision {t.get('requested')} → runs {t.get('runs')}")
        else:
            params = ", ".join(
                f"{k} {v}" for k, v in t.items() if k != "step" and isinstance(v, int | float | str | bool)
            )
            out.append(f"{step}" + (f" ({params})" if params else ""))
    return out


def _size(row: Row) -> dict[str, Any]:
    size = row.manifest.size if row.manifest is not None else {}
    params = size.get("parameters")
    if row.kind == "original" or row.device == "gpu":
        b = size.get("original_bytes")
        method = "original weights file"
        if b is None and params:
            b, method = int(params) * 4, "parameters × 4 bytes (fp32)"
        return {"bytes": b, "parameters": params, "method": method}
    comp_params = size.get("parameters_compressed") or params
    return {
        "bytes": size.get("compressed_bytes"),
        "parameters": comp_params,
        "method": "engine files in the artifact (openvino/)",
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per device: each row against the original (speed-up, energy, size, memory) and, for variants,
    against the unpruned fp32 engine."""
    for device in {r["device"] for r in rows}:
        same = [r for r in rows if r["device"] == device and r["status"] == "ok" and r["latency"]]
        orig = next((r for r in same if r["variant"] is None), None)
        fp32 = next(
            (
                r
                for r in same
                if r["variant"] is not None
                and (r["engine"] or {}).get("requested_precision") == "fp32"
                and not any("prun" in t for t in r["transformations"])
            ),
            None,
        )
        for r in same:
            ratios: dict[str, Any] = {}
            if orig is not None:
                ratios["speedup"] = _ratio(orig["latency"]["median_s"], r["latency"]["median_s"])
                oe, re_ = (
                    (orig["energy"] or {}).get("joules_median"),
                    (r["energy"] or {}).get("joules_median"),
                )
                ratios["energy"] = _ratio(oe, re_)
                ratios["size"] = _ratio((orig["size"] or {}).get("bytes"), (r["size"] or {}).get("bytes"))
                ratios["memory"] = _ratio(
                    (orig["memory"] or {}).get("peak_rss_bytes"), (r["memory"] or {}).get("peak_rss_bytes")
                )
            if fp32 is not None and r is not fp32 and r["variant"] is not None:
                ratios["speedup_vs_fp32_engine"] = _ratio(
                    fp32["latency"]["median_s"], r["latency"]["median_s"]
                )
                ratios["fp32_engine_row"] = fp32["id"]
            r["ratios"] = ratios


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None
