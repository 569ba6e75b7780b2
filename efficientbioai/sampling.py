"""Drawing tiles from the user's images for calibration and for the held-out fidelity check.

Images are read lazily: a candidate tile is read (and pre-processed) where it lies, so calibration on a
volume larger than memory reads only its tiles and a strided sample for its statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from efficientbioai.processing import apply_steps


@dataclass
class Tiles:
    """Tiles in model layout without batch: inputs (C, *tile), optional targets (C_t, *tile)."""

    inputs: list[np.ndarray] = field(default_factory=list)
    targets: list[np.ndarray] | None = None
    positions: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    background: int = 0  # how many of the tiles are flat background
    is_background: list[bool] = field(default_factory=list)


def pad_to(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Pad the spatial axes of (C, *spatial) up to ``shape`` (reflect where possible)."""
    pads = [(0, 0)] + [(0, max(0, t - s)) for s, t in zip(image.shape[1:], shape, strict=True)]
    if not any(p[1] for p in pads):
        return image
    mode = "reflect" if all(p[1] < s for p, s in zip(pads[1:], image.shape[1:], strict=True)) else "symmetric"
    return np.pad(image, pads, mode=mode)


class PreparedImage:
    """A lazily-read (C, *spatial) image with point-wise pre-processing applied to what is read.

    ``steps`` must be point-wise (statistics fixed, e.g. by
    :func:`~efficientbioai.processing.fix_statistics`); ``axes`` are the network's (``bcyx``/``bczyx``).
    Slicing reads only the slice; ``np.asarray`` reads the whole image (fine-tuning needs it).
    """

    def __init__(self, image: Any, steps: Sequence[dict[str, Any]], axes: str):
        self.image, self.steps, self.axes = image, list(steps), axes
        self.shape = tuple(int(n) for n in image.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key) -> np.ndarray:
        x = np.asarray(self.image[key], np.float32)
        if x.ndim != self.ndim:  # an integer index dropped an axis: read it as a slice instead
            raise IndexError("PreparedImage takes slices only")
        return apply_steps(x[np.newaxis], self.steps, self.axes)[0] if self.steps else x

    def __array__(self, dtype=None, copy=None):
        x = self[(slice(None),) * self.ndim]
        return x.astype(dtype) if dtype is not None else x


def _crop(image: Any, start: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """The tile at ``start`` of a lazily-read image, padded (as :func:`pad_to`) where the image is
    smaller than the tile (``start`` is then 0 along that axis)."""
    region = tuple(slice(s, s + t) for s, t in zip(start, shape, strict=True))
    tile = np.asarray(image[(slice(None), *region)], np.float32)
    return np.ascontiguousarray(pad_to(tile, shape))


def sample_tiles(
    images: list[np.ndarray],
    tile_shape: tuple[int, ...],
    n_calibration: int,
    n_holdout: int,
    *,
    targets: list[np.ndarray] | None = None,
    background_fraction: float = 0.25,
    seed: int = 0,
) -> tuple[Tiles, Tiles]:
    """Calibration and held-out tiles from preprocessed (C, *spatial) images, at different positions.

    Images may be lazily-read array-likes (zarr, memory maps, :class:`PreparedImage`): only the candidate
    tiles and a strided sample (for the median) are read.

    Background is judged by a cheap statistic: the mean absolute deviation of a tile from its image's
    median (the background level of sparse fluorescence images). Tiles scoring under twice the 10th
    percentile of all candidates count as flat background, and at most ``background_fraction`` of the
    chosen tiles may be background, so empty regions cannot dominate calibration. Images smaller than a
    tile are padded.
    """
    rng = np.random.default_rng(seed)
    tile_shape = tuple(int(t) for t in tile_shape)
    padded = [tuple(max(s, t) for s, t in zip(im.shape[1:], tile_shape, strict=True)) for im in images]
    total = n_calibration + n_holdout
    n_bg_allowed = int(np.floor(background_fraction * total))
    medians = [
        float(np.median(np.asarray(im[(slice(None),) + tuple(slice(None, None, 4) for _ in tile_shape)])))
        for im in images
    ]

    def draw(n: int) -> tuple[list, list[float]]:
        cand, scores = [], []
        for k in range(n):
            i = k % len(images)
            start = tuple(int(rng.integers(0, s - t + 1)) for s, t in zip(padded[i], tile_shape, strict=True))
            cand.append((i, start))
            scores.append(float(np.abs(_crop(images[i], start, tile_shape) - medians[i]).mean()))
        return cand, scores

    cand, scores = draw(max(4 * total, 16))
    threshold = 2 * float(np.percentile(scores, 10))
    # Sparse samples: keep drawing (bounded) until there are enough non-background candidates.
    for _ in range(20):
        if sum(s >= threshold for s in scores) >= total - n_bg_allowed:
            break
        more, more_scores = draw(2 * total)
        cand += more
        scores += more_scores
    is_bg = [s < threshold for s in scores]
    content = [c for c, bg in zip(cand, is_bg, strict=True) if not bg]
    background = [c for c, bg in zip(cand, is_bg, strict=True) if bg]
    rng.shuffle(content)
    rng.shuffle(background)
    content = list(dict.fromkeys(content))  # the same position drawn twice is one tile
    n_bg = min(len(background), n_bg_allowed)
    n_content = min(len(content), total - n_bg)
    n_bg = min(len(background), total - n_content)
    chosen = [(c, False) for c in content[:n_content]] + [(c, True) for c in background[:n_bg]]
    order = rng.permutation(len(chosen))
    chosen = [chosen[j] for j in order]

    def collect(items) -> Tiles:
        out = Tiles(targets=[] if targets is not None else None)
        for (i, start), bg in items:
            out.inputs.append(_crop(images[i], start, tile_shape))
            if targets is not None:
                out.targets.append(_crop(targets[i], start, tile_shape))
            out.positions.append((i, start))
            out.background += bg
            out.is_background.append(bool(bg))
        return out

    holdout_n = min(n_holdout, max(1, len(chosen) // 5)) if len(chosen) < total else n_holdout
    return collect(chosen[holdout_n:]), collect(chosen[:holdout_n])
