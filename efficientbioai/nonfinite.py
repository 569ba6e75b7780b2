"""NaN and inf in input images: found before any engine runs, refused or filled, never passed on silently.

One non-finite voxel poisons every statistic it enters: a percentile normalisation over an image with a
40×40 NaN patch returns NaN, and the whole output then reads ≈ 1.0 with exit code 0. So ``infer`` and
``compress`` scan every floating-point input once (:func:`scan`, slab by slab: memory does not grow with
the image; integer images cannot hold NaN and cost nothing) and, by default, refuse it with the count and
where the voxels are (:func:`check`). With ``nonfinite: fill`` the image is read through :class:`Filled`,
which replaces them by a stated value; the sliding window then marks the outputs of those voxels NaN
(:meth:`Filled.mask`, used by :class:`~efficientbioai.infer.predict.Predictor`), so a filled voxel's
prediction is never mistaken for a measured one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from efficientbioai.errors import EfficientBioAIError

SCAN_BYTES = 64 * 2**20  # one slab of the scan
AXES = "zyx"


def can_hold(dtype: Any) -> bool:
    """Whether arrays of ``dtype`` can hold NaN or inf (floating point and complex)."""
    return np.issubdtype(np.dtype(dtype), np.inexact)


@dataclasses.dataclass
class NonFinite:
    """What :func:`scan` found: counts, the bounding box over the spatial axes and the first voxel."""

    nan: int
    inf: int
    total: int
    lo: list[int]
    hi: list[int]  # exclusive
    first: tuple[int, ...]  # (channel, *spatial)

    @property
    def count(self) -> int:
        return self.nan + self.inf

    def describe(self) -> str:
        axes = AXES[-len(self.lo) :]
        box = ", ".join(f"{a} {lo}-{hi - 1}" for a, lo, hi in zip(axes, self.lo, self.hi, strict=True))
        first = " ".join(f"{a}={i}" for a, i in zip("c" + axes, self.first, strict=True))
        kinds = " and ".join(f"{n:,} {what}" for n, what in ((self.nan, "NaN"), (self.inf, "inf")) if n)
        return (
            f"{kinds} of {self.total:,} values ({100 * self.count / self.total:.3g}%), within {box} "
            f"(first at {first})"
        )


def scan(image: Any, max_bytes: int = SCAN_BYTES) -> NonFinite | None:
    """Non-finite values in a (C, *spatial) array-like, read slab by slab along its first spatial axis
    (``None`` when there are none, or when its data type cannot hold any)."""
    if not can_hold(image.dtype):
        return None
    shape = tuple(int(n) for n in image.shape)
    plane = int(np.prod(shape[:1] + shape[2:])) * np.dtype(image.dtype).itemsize
    step = max(1, max_bytes // max(plane, 1))
    nan = inf = 0
    lo, hi, first = None, None, None
    for start in range(0, shape[1], step):
        slab = np.asarray(image[:, start : start + step])
        bad = ~np.isfinite(slab)
        if not bad.any():
            continue
        n_nan = int(np.isnan(slab).sum())
        nan, inf = nan + n_nan, inf + int(bad.sum()) - n_nan
        where = bad.any(axis=0)
        idx = [
            np.flatnonzero(where.any(axis=tuple(a for a in range(where.ndim) if a != d)))
            for d in range(where.ndim)
        ]
        slab_lo = [int(i[0]) for i in idx]
        slab_hi = [int(i[-1]) + 1 for i in idx]
        slab_lo[0] += start
        slab_hi[0] += start
        if lo is None:
            c, *pos = (int(i) for i in np.argwhere(bad)[0])
            first = (c, pos[0] + start, *pos[1:])
            lo, hi = slab_lo, slab_hi
        else:
            lo = [min(a, b) for a, b in zip(lo, slab_lo, strict=True)]
            hi = [max(a, b) for a, b in zip(hi, slab_hi, strict=True)]
    if lo is None:
        return None
    return NonFinite(nan, inf, int(np.prod(shape)), lo, hi, first)


class Filled:
    """A (C, *spatial) array-like read with its NaN / inf replaced by ``value`` (slicing reads only the
    sliced part); :attr:`mask` is the (1, *spatial) view of where any channel was not finite."""

    def __init__(self, image: Any, value: float):
        self.image, self.value = image, float(value)
        self.shape, self.ndim, self.dtype = tuple(image.shape), len(image.shape), image.dtype
        self.mask = _Mask(image)

    def __getitem__(self, key):
        data = np.asarray(self.image[key])
        bad = ~np.isfinite(data)
        if bad.any():
            data = data.copy()
            data[bad] = self.value
        return data

    def __array__(self, dtype=None, copy=None):
        data = self[(slice(None),) * self.ndim]
        return data.astype(dtype) if dtype is not None else data


class _Mask:
    def __init__(self, image: Any):
        self.image = image
        self.shape = (1, *tuple(image.shape)[1:])
        self.ndim, self.dtype = len(self.shape), np.dtype(np.float32)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        data = np.asarray(self.image[(slice(None), *key[1:])])
        return (~np.isfinite(data)).any(axis=0, keepdims=True).astype(np.float32)


NONFINITE_FIX = (
    "remove them from the image, or set `nonfinite: fill` (and `fill_value:`) to replace them by a value; "
    "their outputs are then marked NaN"
)


def check(images: list, source: str, mode: str = "refuse", value: float = 0.0) -> tuple[list, int]:
    """``images`` unchanged when they hold no NaN / inf; otherwise refused (``mode: refuse``) with what
    and where, or read through :class:`Filled` (``mode: fill``). Returns (images, non-finite count)."""
    out, count = [], 0
    for i, im in enumerate(images):
        found = scan(im)
        if found is None:
            out.append(im)
            continue
        where = f"{source}" + (f" (sample {i})" if len(images) > 1 else "")
        if mode != "fill":
            raise EfficientBioAIError(f"{where} holds non-finite values: {found.describe()}", NONFINITE_FIX)
        count += found.count
        out.append(Filled(im, value))
    return out, count


def fill_note(source: str, count: int, value: float) -> str:
    return (
        f"{source}: {count:,} NaN / inf value(s) filled with {value:g} (nonfinite: fill); their outputs "
        "are NaN"
    )
