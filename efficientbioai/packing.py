"""The artifact's packed output: the network's outputs in one tensor on the input's grid, and back.

:mod:`efficientbioai.models.outputs` packs a network's outputs (several, at another scale, smaller by a
border) into the one tensor every engine returns; the manifest's ``output.outputs`` records where each
output lies in it (``packed_channels``, ``scale``, ``offset``). This module reads that record: it cuts one
output out of the stitched packed array (:func:`unpack`) and says which grid alignment tiles need.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np


def alignment(outputs: Sequence[Any], ndim: int) -> list[int]:
    """Per axis, the k of the smallest output scale 1/k (tiles start on multiples of it), else 1."""
    out = [1] * ndim
    for o in outputs:
        scale = o["scale"] if isinstance(o, dict) else o.scale
        for i, s in enumerate(scale):
            f = Fraction(s).limit_denominator(8)
            if f < 1:
                out[i] = max(out[i], f.denominator)
    return out


def scale_factors(record: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(up-scaling k per axis, down-scaling k per axis), 1 where the axis keeps its scale."""
    scale = [Fraction(s).limit_denominator(8) for s in record["scale"]]
    return [int(s) if s > 1 else 1 for s in scale], [s.denominator if s < 1 else 1 for s in scale]


def _border(record: dict[str, Any]) -> list[int]:
    return [max(0, -o // 2) for o in record["offset"]]


def _resample(x: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """A block of one output's packed channels (C·factor, *block) at the output's own scale."""
    ndim = x.ndim - 1
    up, down = scale_factors(record)
    c = record["channels"]
    if any(k > 1 for k in up):  # depth-to-space
        sizes = list(x.shape[1:])
        x = x.reshape([c, *up, *sizes])
        perm = [0]
        for i in range(ndim):
            perm += [1 + ndim + i, 1 + i]
        x = x.transpose(perm).reshape([c, *[n * k for n, k in zip(sizes, up, strict=True)]])
    if any(k > 1 for k in down):  # the mean of each k×k block (all equal but where tiles were blended)
        sizes = [n // k for n, k in zip(x.shape[1:], down, strict=True)]
        x = x[(slice(None), *[slice(0, n * k) for n, k in zip(sizes, down, strict=True)])]
        split = [c]
        for n, k in zip(sizes, down, strict=True):
            split += [n, k]
        x = x.reshape(split).mean(axis=tuple(2 + 2 * i for i in range(ndim)), dtype=np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def unpack(packed: np.ndarray, record: dict[str, Any], ndim: int) -> np.ndarray:
    """One output (C, *its spatial shape) from the stitched packed (C_packed, *input spatial) array."""
    x = packed[slice(*record["packed_channels"])]
    border = _border(record)
    if any(border):  # the model's own size: the border it does not compute is cropped at the image's edges
        x = x[(slice(None), *[slice(b, n - b) for b, n in zip(border, x.shape[1:], strict=True)])]
    return _resample(x, record)


def unpack_region(
    data: np.ndarray, region: Sequence[slice], record: dict[str, Any], spatial: Sequence[int]
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """One output's part of a packed block ``data`` (C_packed, *region shape) written at ``region`` of an
    input of shape ``spatial``: (the region in the output's coordinates, the block), or None when the block
    lies in the border the output does not have. Gives exactly what :func:`unpack` gives there, so an
    output written block by block (out of core) equals the one unpacked whole; regions must start and
    end on the output's k×k blocks where it is at 1/k of the input's scale."""
    x = data[slice(*record["packed_channels"])]
    up, down = scale_factors(record)
    cut, out = [], []
    for r, n, b, u, d in zip(region, spatial, _border(record), up, down, strict=True):
        lo, hi = max(r.start, b), min(r.stop, n - b)
        if lo >= hi:
            return None
        if d > 1 and (lo % d or (hi % d and hi != n)):
            raise ValueError(f"region {r} does not start and end on blocks of {d}")
        cut.append(slice(lo - r.start, hi - r.start))
        out.append(slice((lo - b) * u // d, (hi - b) * u // d))
    return tuple(out), _resample(x[(slice(None), *cut)], record)


def unpacked_shape(spatial: Sequence[int], record: dict[str, Any]) -> list[int]:
    """The spatial shape of one unpacked output for a stitched input of shape ``spatial``."""
    out = []
    for n, s, o in zip(spatial, record["scale"], record["offset"], strict=True):
        f = Fraction(s).limit_denominator(8)
        out.append(n * int(f) + o if f >= 1 else n // f.denominator)
    return out
