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


# --------------------------------------------------------------------------- image quality (restoration)


def _default_range(target: np.ndarray, data_range: float | None) -> float:
    """The intensity range used by PSNR/SSIM: given, else target's max − min (1.0 if target is constant)."""
    if data_range is not None:
        if data_range <= 0:
            raise ValueError(f"data_range must be positive, got {data_range}")
        return float(data_range)
    span = float(target.max() - target.min()) if target.size else 0.0
    return span if span > 0 else 1.0


def _check_same_shape(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, 10·log10(data_range² / MSE); inf when the arrays are identical.

    ``data_range`` defaults to ``target.max() - target.min()`` (1.0 for a constant target).
    """
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    _check_same_shape(pred, target)
    rng = _default_range(target, data_range)
    mse = float(np.mean((pred - target) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(rng * rng / mse))


def ssim(pred: np.ndarray, target: np.ndarray, data_range: float | None = None) -> float:
    """Mean structural similarity (skimage, uniform window) over a 2D or 3D array treated as one image.

    The window is the largest odd size ≤ 7 that fits the smallest axis, so small images work; every
    axis must be at least 3 long. ``data_range`` defaults as in :func:`psnr`.
    """
    from skimage.metrics import structural_similarity

    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    _check_same_shape(pred, target)
    smallest = min(target.shape) if target.ndim else 0
    if smallest < 3:
        raise ValueError(f"SSIM needs every axis to be at least 3 long; got shape {target.shape}")
    win = min(7, smallest)
    win -= 1 - win % 2  # make it odd
    return float(
        structural_similarity(pred, target, data_range=_default_range(target, data_range), win_size=win)
    )


# --------------------------------------------------------------------------- instance segmentation


INSTANCE_METHODS = ("components", "watershed")


def _relabel(labels: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Drop objects smaller than ``min_size`` voxels and renumber the rest 1..N (in order of old id)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels.astype(np.int32)
    counts = np.bincount(labels.ravel())
    keep = counts >= max(min_size, 1)
    keep[0] = False
    mapping = np.zeros(counts.size, np.int32)
    mapping[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return mapping[labels]


def instances_from_probability(
    prob: np.ndarray,
    threshold: float = 0.5,
    method: str = "components",
    min_size: int = 0,
    min_distance: int = 3,
) -> np.ndarray:
    """Turn a foreground probability map (2D or 3D) into an int32 label image (0 = background).

    ``components``: connected components of ``prob > threshold`` with full connectivity (8-connected in
    2D, 26-connected in 3D). ``watershed``: seeded watershed of the negated Euclidean distance transform
    of the mask, seeds being its local maxima at least ``min_distance`` apart, so touching round objects
    are split. Objects smaller than ``min_size`` voxels are removed and labels renumbered 1..N.
    """
    from scipy import ndimage as ndi

    if method not in INSTANCE_METHODS:
        raise ValueError(f"unknown instance method {method!r}; valid: {', '.join(INSTANCE_METHODS)}")
    mask = np.asarray(prob) > threshold
    structure = ndi.generate_binary_structure(mask.ndim, mask.ndim)
    components, n = ndi.label(mask, structure=structure)
    if method == "components" or n == 0:
        return _relabel(components, min_size)

    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    distance = ndi.distance_transform_edt(mask)
    # Peaks are searched per component so that a seed in one object never suppresses another's.
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(mask.shape, np.int64)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance, markers, mask=mask)
    # A component that received no seed stays unlabelled by the watershed: keep it as one object.
    orphans = mask & (labels == 0)
    if orphans.any():
        extra, _ = ndi.label(orphans, structure=structure)
        labels = np.where(extra > 0, extra + labels.max(), labels)
    return _relabel(labels, min_size)


def _pair_overlaps(
    pred_labels: np.ndarray, true_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency table of two label images.

    Returns (pred_index, true_index, intersection) for every overlapping pair of objects, plus each
    object's area; indices run over the sorted non-zero labels of each image.
    """
    p_ids, p_inv = np.unique(pred_labels, return_inverse=True)
    t_ids, t_inv = np.unique(true_labels, return_inverse=True)
    p_inv, t_inv = p_inv.ravel(), t_inv.ravel()
    p_off, t_off = int(p_ids[0] == 0) if p_ids.size else 0, int(t_ids[0] == 0) if t_ids.size else 0
    p_inv, t_inv = p_inv - p_off, t_inv - t_off  # background becomes -1
    n_p, n_t = p_ids.size - p_off, t_ids.size - t_off
    p_area = np.bincount(p_inv[p_inv >= 0], minlength=n_p)
    t_area = np.bincount(t_inv[t_inv >= 0], minlength=n_t)
    both = (p_inv >= 0) & (t_inv >= 0)
    keys, inter = np.unique(p_inv[both].astype(np.int64) * max(n_t, 1) + t_inv[both], return_counts=True)
    return keys // max(n_t, 1), keys % max(n_t, 1), inter, p_area, t_area


def match_instances(
    pred_labels: np.ndarray, true_labels: np.ndarray, iou_threshold: float = 0.5
) -> dict[str, float]:
    """Match predicted to true objects one-to-one and count TP/FP/FN at an IoU threshold.

    Pairs with IoU ≥ ``iou_threshold`` (and > 0) are candidates; the matching maximises the number of
    matched pairs, ties broken by total IoU (Hungarian algorithm). ``ap`` = TP / (TP + FP + FN), the
    "average precision" at one IoU threshold used by StarDist and Cellpose. Label values need not be
    consecutive; 0 is background. Both images empty scores 1.0 everywhere; one empty scores 0.0.
    """
    from scipy.optimize import linear_sum_assignment

    pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
    _check_same_shape(pred_labels, true_labels)
    pi, ti, inter, p_area, t_area = _pair_overlaps(pred_labels, true_labels)
    n_pred, n_true = int(p_area.size), int(t_area.size)
    pair_iou = inter / (p_area[pi] + t_area[ti] - inter)
    cand = (pair_iou >= iou_threshold) & (pair_iou > 0)
    pi, ti, pair_iou = pi[cand], ti[cand], pair_iou[cand]
    matched = np.empty(0)
    if pair_iou.size:
        rows, r_idx = np.unique(pi, return_inverse=True)
        cols, c_idx = np.unique(ti, return_inverse=True)
        k = min(rows.size, cols.size)
        # 1 per candidate pair dominates; IoU/(2k) sums to < 1, so it only breaks ties between matchings.
        weight = np.zeros((rows.size, cols.size))
        weight[r_idx, c_idx] = 1.0 + pair_iou / (2 * k)
        iou_m = np.zeros_like(weight)
        iou_m[r_idx, c_idx] = pair_iou
        r, c = linear_sum_assignment(weight, maximize=True)
        ok = weight[r, c] > 0
        matched = iou_m[r[ok], c[ok]]
    tp = int(matched.size)
    fp, fn = n_pred - tp, n_true - tp
    if n_pred == 0 and n_true == 0:
        precision = recall = f1 = ap = mean_iou = 1.0
    else:
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn)
        ap = tp / (tp + fp + fn)
        mean_iou = float(matched.mean()) if tp else 0.0
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "ap": float(ap),
        "mean_matched_iou": float(mean_iou),
        "n_pred": n_pred,
        "n_true": n_true,
    }


# --------------------------------------------------------------------------- one entry point per task


TASKS = ("restoration", "semantic", "instance")


def _foreground(target: np.ndarray) -> np.ndarray:
    """Foreground of a target: > 0 for bool/integer masks and label images, > 0.5 for float ones."""
    if target.dtype == bool or np.issubdtype(target.dtype, np.integer):
        return target > 0
    return target > 0.5


def _true_instances(target: np.ndarray) -> np.ndarray:
    """A label image from a target: binary masks (bool, 0/1, or non-integral floats) get labelled."""
    from scipy import ndimage as ndi

    if target.dtype != bool and np.issubdtype(target.dtype, np.floating):
        integral = np.array_equal(target, np.round(target)) and target.min(initial=0) >= 0
        target = target.astype(np.int64) if integral else target > 0.5
    if target.dtype == bool or target.max(initial=0) <= 1:
        structure = ndi.generate_binary_structure(target.ndim, target.ndim)
        return ndi.label(target > 0, structure=structure)[0]
    return target


def task_metrics(
    task: str,
    pred: np.ndarray,
    target: np.ndarray,
    threshold: float = 0.5,
    instance_method: str = "components",
) -> dict[str, float]:
    """Metrics of a prediction against ground truth for a task.

    ``restoration``: pearson, psnr, ssim. ``semantic``: dice, iou of ``pred > threshold`` against the
    target's foreground. ``instance``: ``pred`` is a foreground probability turned into objects with
    :func:`instances_from_probability`; the target is a label image (a binary mask is split into its
    connected components); returns ap50, f1, precision, recall, n_pred, n_true. A leading size-1 channel
    axis of ``pred`` absent from ``target`` is dropped.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.ndim == target.ndim + 1 and pred.shape[0] == 1:
        pred = pred[0]
    _check_same_shape(pred, target)
    if task == "restoration":
        return {"pearson": pearson(pred, target), "psnr": psnr(pred, target), "ssim": ssim(pred, target)}
    if task == "semantic":
        p, t = pred > threshold, _foreground(target)
        return {"dice": dice(p, t), "iou": iou(p, t)}
    labels = instances_from_probability(pred, threshold=threshold, method=instance_method)
    m = match_instances(labels, _true_instances(target), iou_threshold=0.5)
    return {
        "ap50": m["ap"],
        "f1": m["f1"],
        "precision": m["precision"],
        "recall": m["recall"],
        "n_pred": float(m["n_pred"]),
        "n_true": float(m["n_true"]),
    }
