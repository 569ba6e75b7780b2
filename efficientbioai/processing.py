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


def apply_steps(x: np.ndarray, steps: Sequence[dict[str, Any]], axes: str) -> np.ndarray:
    """Apply processing ``steps`` to ``x`` whose axes are named by ``axes`` (e.g. ``"bcyx"``)."""
    out = np.asarray(x, dtype=np.float32)
    for step in steps:
        out = OPS[step["id"]](out, axes, **step["kwargs"])
    return out
