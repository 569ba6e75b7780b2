"""Scoring the rows' saved outputs: task metrics against the targets, agreement with the original."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai import metrics
from efficientbioai.benchmark.images import ImageEntry
from efficientbioai.benchmark.rows import Row
from efficientbioai.errors import EfficientBioAIError


def _read_target(path: Path, pred: np.ndarray, sample: int) -> np.ndarray:
    from efficientbioai.io import read_image

    target = np.asarray(read_image(path))
    if target.ndim == pred.ndim + 1 and target.shape[1:] == pred.shape and sample < target.shape[0]:
        target = target[sample]
    if target.shape != pred.shape:
        if target.size != pred.size:
            raise EfficientBioAIError(
                f"targets: {path} has shape {target.shape} but its image's prediction has shape {pred.shape}",
                "targets must match their images pixel for pixel, in the same sorted order as the images",
            )
        target = target.reshape(pred.shape)
    return target


def _squeeze(x: np.ndarray) -> np.ndarray:
    return x[0] if x.shape[0] == 1 else x


def score_rows(
    rows: list[Row], images: list[ImageEntry], out: Path, task: str | None, threshold: float
) -> dict[str, dict[str, Any]]:
    """Per row: task metrics against the targets and agreement with the original on the same device,
    from the outputs the rows saved under ``out``/outputs."""
    results: dict[str, dict[str, Any]] = {}
    targets: dict[str, np.ndarray] = {}
    originals = {r.device: r for r in rows if r.kind == "original" and r.status == "ok"}
    for row in rows:
        if row.status != "ok":
            continue
        per_metrics, per_agree = [], []
        for im in images:
            pred = _squeeze(np.load(out / "outputs" / row.id / f"{im.name}.npy"))
            m: dict[str, float] = {}
            if im.target is not None and task is not None:
                if im.name not in targets:
                    targets[im.name] = _read_target(im.target, pred, im.sample)
                m = metrics.task_metrics(task, pred, targets[im.name], threshold=threshold)
            per_metrics.append(m)
            a: dict[str, float] = {}
            ref_row = originals.get(row.device)
            if ref_row is not None and ref_row is not row:
                ref = _squeeze(np.load(out / "outputs" / ref_row.id / f"{im.name}.npy"))
                a = {
                    "pearson": metrics.pearson(pred, ref),
                    "relative_l2": metrics.relative_l2(pred, ref),
                    "max_abs_diff": float(np.abs(pred - ref).max()),
                }
                if task in ("semantic", "instance"):
                    a["mask_dice"] = metrics.dice(pred > threshold, ref > threshold)
            per_agree.append(a)
        results[row.id] = {
            "metrics": {"mean": _mean(per_metrics), "per_image": per_metrics},
            "agreement": {"mean": _mean(per_agree), "per_image": per_agree},
        }
    return results


def _mean(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for d in dicts for k in d]
    out = {}
    for k in dict.fromkeys(keys):
        vals = [d[k] for d in dicts if k in d and d[k] is not None and np.isfinite(d[k])]
        if vals:
            out[k] = float(np.mean(vals))
    return out
