"""Pre- and post-processing steps in the bioimage.io vocabulary, applied with NumPy around an engine.

A step is a dict ``{"id": name, "kwargs": {...}}`` (bioimage.io 0.5; 0.4's ``name`` key is accepted).
Steps run on a whole image in the model's layout (e.g. ``bcyx``) so that per-sample statistics are
computed over the image, not over a tile, in ``compress`` and ``infer`` alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from efficientbioai.errors import EfficientBioAIError

_AXIS_IDS = {"batch": "b", "channel": "c", "b": "b", "c": "c", "x": "x", "y": "y", "z": "z", "i": "c"}


def normalize_steps(steps: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Bring steps from any bioimage.io format version into ``{"id", "kwargs"}`` form."""
    out = []
    for step in steps or []:
        name = step.get("id", step.get("name"))
        if name not in OPS:
            raise EfficientBioAIError(
                f"unsupported processing step '{name}'",
                f"supported steps: {', '.join(sorted(OPS))}; or load the model with kind 'torch' and "
                "apply the step yourself",
            )
        out.append({"id": name, "kwargs": dict(step.get("kwargs") or {})})
    return out


def _axes_indices(kw_axes: Any, tensor_axes: str) -> tuple[int, ...] | None:
    if kw_axes is None:
        return None
    ids = list(kw_axes) if isinstance(kw_axes, str) else [str(a) for a in kw_axes]
    letters = [_AXIS_IDS.get(a, a) for a in ids]
    return tuple(tensor_axes.index(a) for a in letters if a in tensor_axes)


def _per_channel(value: Any, x: np.ndarray, axes: str) -> np.ndarray:
    """Broadcast a scalar or per-channel list (bioimage.io 'fixed' mode) against ``x``."""
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 0:
        return arr
    shape = [1] * x.ndim
    shape[axes.index("c")] = -1
    return arr.reshape(shape)


def _zero_mean_unit_variance(x, tensor_axes, *, mode="per_sample", mean=None, std=None, eps=1e-6, **kw):
    if mean is not None and std is not None or mode == "fixed":
        return (x - _per_channel(mean, x, tensor_axes)) / (_per_channel(std, x, tensor_axes) + eps)
    red = _axes_indices(kw.get("axes"), tensor_axes)
    if mode == "per_dataset":
        raise EfficientBioAIError(
            "zero_mean_unit_variance with mode 'per_dataset' needs dataset statistics",
            "replace it with fixed mean/std values in the model description",
        )
    m = x.mean(axis=red, keepdims=True, dtype=np.float64)
    s = x.std(axis=red, keepdims=True, dtype=np.float64)
    return ((x - m) / (s + eps)).astype(np.float32)


def _scale_range(x, tensor_axes, *, min_percentile=0.0, max_percentile=100.0, eps=1e-6, mode=None, **kw):
    red = _axes_indices(kw.get("axes"), tensor_axes)
    lo = np.percentile(x, min_percentile, axis=red, keepdims=True)
    hi = np.percentile(x, max_percentile, axis=red, keepdims=True)
    return ((x - lo) / (hi - lo + eps)).astype(np.float32)


def _scale_linear(x, tensor_axes, *, gain=1.0, offset=0.0, **kw):
    return x * _per_channel(gain, x, tensor_axes) + _per_channel(offset, x, tensor_axes)


def _clip(x, tensor_axes, *, min=None, max=None, **kw):  # noqa: A002 - names from the bioimage.io spec
    return np.clip(x, min, max)


def _sigmoid(x, tensor_axes, **kw):
    return (1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float32)))).astype(np.float32)


def _binarize(x, tensor_axes, *, threshold=0.5, **kw):
    return (x > _per_channel(threshold, x, tensor_axes)).astype(np.float32)


def _ensure_dtype(x, tensor_axes, *, dtype="float32", **kw):
    return np.asarray(x).astype(dtype, copy=False)


OPS: dict[str, Callable[..., np.ndarray]] = {
    "zero_mean_unit_variance": _zero_mean_unit_variance,
    "fixed_zero_mean_unit_variance": lambda x, tensor_axes, **kw: _zero_mean_unit_variance(
        x, tensor_axes, mode="fixed", **kw
    ),
    "scale_range": _scale_range,
    "scale_linear": _scale_linear,
    "clip": _clip,
    "sigmoid": _sigmoid,
    "binarize": _binarize,
    "ensure_dtype": _ensure_dtype,
}


# Statistics of images larger than this many values are taken from a strided sample of about this size.
MAX_STATISTICS_SAMPLE = 1 << 24
WHOLE_IMAGE_STEPS = {"zero_mean_unit_variance", "scale_range"}


def strided_sample(image, max_values: int = MAX_STATISTICS_SAMPLE) -> np.ndarray:
    """A float32 (C, *spatial) sample of a (C, *spatial) array-like, read with one stride on every
    spatial axis so that it holds at most about ``max_values`` values (the whole image when it is small).

    Lazily-read arrays (zarr, memory maps) are only read at the sampled positions' chunks/pages; no
    float64 or whole-image float32 copy is made.
    """
    shape = tuple(int(n) for n in image.shape)
    ndim = len(shape) - 1
    stride = 1
    while int(np.prod([shape[0], *(-(-n // stride) for n in shape[1:])])) > max_values:
        stride += 1
    key = (slice(None), *[slice(None, None, stride)] * ndim)
    return np.asarray(image[key], dtype=np.float32)


def fix_statistics(
    steps: Sequence[dict[str, Any]], image, axes: str, max_values: int = MAX_STATISTICS_SAMPLE
) -> list[dict[str, Any]]:
    """``steps`` with every per-image statistic (per-sample mean/std, percentiles) measured once on a
    strided sample of the (C, *spatial) ``image`` (:func:`strided_sample`) and written in as fixed values,
    so that the steps can then be applied tile by tile. ``axes`` are the network's (``bcyx``/``bczyx``).

    Images up to ``max_values`` values are sampled whole, giving the statistics of the whole image.
    """
    sample = None
    out: list[dict[str, Any]] = []
    for step in steps:
        kw = dict(step.get("kwargs") or {})
        fixed = step
        whole = step["id"] in WHOLE_IMAGE_STEPS and not (
            step["id"] == "zero_mean_unit_variance"
            and (kw.get("mode") == "fixed" or (kw.get("mean") is not None and kw.get("std") is not None))
        )
        if whole:
            if sample is None:
                sample = apply_steps(strided_sample(image, max_values)[np.newaxis], out, axes)
            red = _axes_indices(kw.get("axes"), axes)
            eps = kw.get("eps", 1e-6)
            if step["id"] == "zero_mean_unit_variance":
                if kw.get("mode") == "per_dataset":
                    OPS[step["id"]](sample, axes, **kw)  # the same error as on a whole image
                m = sample.mean(axis=red, keepdims=True, dtype=np.float64)
                s = sample.std(axis=red, keepdims=True, dtype=np.float64)
                mean, std = m, s
            else:
                lo = np.percentile(sample, kw.get("min_percentile", 0.0), axis=red, keepdims=True)
                hi = np.percentile(sample, kw.get("max_percentile", 100.0), axis=red, keepdims=True)
                mean, std = lo, hi - lo
            fixed = {
                "id": "zero_mean_unit_variance",
                "kwargs": {"mean": _as_fixed(mean, axes), "std": _as_fixed(std, axes), "eps": eps},
            }
        out.append(fixed)
        if sample is not None:
            sample = apply_steps(sample, [fixed], axes)
    return out


def _as_fixed(stat: np.ndarray, axes: str) -> float | list[float]:
    """A keepdims statistic of a one-sample image as a number or a per-channel list."""
    stat = np.asarray(stat, np.float64)
    per_channel = stat.shape[axes.index("c")] if stat.ndim == len(axes) else 1
    if per_channel > 1:
        return [float(v) for v in stat.reshape(-1)]
    return float(stat.reshape(-1)[0])


def apply_steps(x: np.ndarray, steps: Sequence[dict[str, Any]], axes: str) -> np.ndarray:
    """Apply processing ``steps`` to ``x`` whose axes are named by ``axes`` (e.g. ``"bcyx"``)."""
    out = np.asarray(x, dtype=np.float32)
    for step in steps:
        out = OPS[step["id"]](out, axes, **step["kwargs"])
    return out
