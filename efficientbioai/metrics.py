"""Agreement and task metrics on NumPy arrays (any shape; computed over all elements)."""

from __future__ import annotations

import numpy as np


def relative_l2(pred: np.ndarray, ref: np.ndarray) -> float:
    """‖pred − ref‖₂ / ‖ref‖₂ (0 is identical)."""
    pred, ref = np.asarray(pred, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(pred - ref) / denom) if denom > 0 else float(np.linalg.norm(pred - ref))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation coefficient; 1.0 for two identical constant arrays, 0.0 for one constant."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    if denom == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float((a * b).sum() / denom)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else 1.0
