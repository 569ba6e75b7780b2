"""Generated fluorescence-like images with known ground truth, for the demo, tests and benchmarks.

Nothing is downloaded: nuclei are ellipsoids of varying size and brightness, blurred by a gaussian
point-spread function, on a dim uneven background with Poisson-like and read noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def nuclei(
    shape: Sequence[int],
    density: float = 1.0,
    radius: tuple[float, float] = (6.0, 11.0),
    seed: int = 0,
    noise: float = 0.04,
    empty_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A 2D or 3D image (float32, roughly in [0, 1]) and its instance labels (int32, 0 = background).

    ``density`` scales the number of nuclei (1.0 ≈ one nucleus per 40 × 40 pixels in 2D, per
    40 × 40 × 40 in 3D); ``empty_fraction`` leaves that fraction of the image (its last part along the
    first axis) without nuclei, like the empty field around a sample in a light-sheet scan.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    labels = np.zeros(shape, np.int32)
    brightness = np.zeros(shape, np.float32)
    extent = list(shape)
    extent[0] = max(1, int(round(shape[0] * (1 - empty_fraction))))
    n = max(1, int(density * np.prod(extent) / 40.0 ** len(shape)))
    for k in range(1, n + 1):
        r = rng.uniform(*radius, size=len(shape)) * rng.uniform(0.8, 1.2)
        c = [rng.uniform(0, e) for e in extent]
        box = tuple(
            slice(max(0, int(ci - ri - 1)), min(s, int(ci + ri + 2)))
            for ci, ri, s in zip(c, r, shape, strict=True)
        )
        if any(b.stop <= b.start for b in box):
            continue
        grids = np.meshgrid(*[np.arange(b.start, b.stop) for b in box], indexing="ij")
        inside = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids, c, r, strict=True)) <= 1.0
        free = inside & (labels[box] == 0)
        labels[box][free] = k
        brightness[box][free] = rng.uniform(0.5, 1.0)
    # texture inside nuclei, blur (optics), uneven background, noise
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    image = brightness * (1 + 0.6 * texture)
    image = ndimage.gaussian_filter(image, 1.5)
    ramp = np.linspace(0.05, 0.12, shape[-1], dtype=np.float32)
    image = image + ramp
    image = image + noise * np.sqrt(np.clip(image, 0, None)) * rng.standard_normal(shape).astype(np.float32)
    image = image + 0.5 * noise * rng.standard_normal(shape).astype(np.float32)
    _, labels = np.unique(labels, return_inverse=True)  # consecutive ids
    return image.astype(np.float32), labels.reshape(shape).astype(np.int32)
