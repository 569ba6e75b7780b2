"""The tiles ``compress`` works on: calibration images read lazily, the tile shape, and the sampled tiles.

Images are read (and pre-processed) only where tiles are sampled, so a volume larger than memory can
calibrate. The sampled tiles are split three ways, never overlapping in use:

* ``calib``: calibrate the int8 quantizer (and a user parser's ``fine_tune``);
* ``val``: validation for pruning's fine-tuning and NNCF's accuracy control;
* ``holdout``: the fidelity check every candidate is judged by (never used for calibration).

Layouts: images and tiles are (C, *spatial) without a batch axis; engine outputs (B, C, *spatial).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from efficientbioai.config import CalibrationConfig
from efficientbioai.engines import Engine
from efficientbioai.errors import ConfigError, EfficientBioAIError
from efficientbioai.io import expand_paths, lazy_model_layout, read_image, to_model_layout
from efficientbioai.models import LoadedModel
from efficientbioai.nonfinite import scan
from efficientbioai.processing import apply_steps, fix_statistics
from efficientbioai.sampling import PreparedImage, Tiles, sample_tiles
from efficientbioai.tiling import round_up, valid_size

DEFAULT_TILE = {2: (256, 256), 3: (32, 128, 128)}


def preprocess(image: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """(C, *spatial) raw image → (C, *spatial) float32 as the network expects it (whole-image stats)."""
    return apply_steps(image[np.newaxis], loaded.preprocessing, loaded.axes)[0]


def postprocess(output: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """(B, C, *spatial) network output → what the user sees (e.g. probabilities after a sigmoid)."""
    return apply_steps(output, loaded.postprocessing, loaded.axes)


def crop_halo(x, halo: list[int] | None):
    """The centre of a (B, C, *spatial) array or tensor without ``halo`` pixels per side of each axis.

    The fidelity check compares only these centres: a halo is what tiled inference discards. Axes too
    small to lose two halos are kept whole.
    """
    if not halo or not any(halo):
        return x
    sl = tuple(
        slice(h, -h if h else None) if 2 * h < n else slice(None)
        for h, n in zip(halo, x.shape[2:], strict=True)
    )
    return x[(slice(None), slice(None)) + sl]


def run_tiles(engine: Engine, tiles: list[np.ndarray], loaded: LoadedModel) -> np.ndarray:
    """Postprocessed outputs for each (C, *tile) tile, halo cropped, stacked as (N, C_out, *tile)."""
    outs = [crop_halo(postprocess(engine(t[np.newaxis]), loaded), loaded.halo) for t in tiles]
    return np.concatenate(outs, axis=0)


def read_calibration_images(cal: CalibrationConfig, loaded: LoadedModel):
    """Preprocessed images (and targets) for tile sampling, plus a description of where they came from.

    Returns ``(images, targets, names)``: lazily-read :class:`PreparedImage` (C, *spatial), the targets
    in model layout or None, and one name per image (its path) for the manifest.
    """
    if cal.images is None:
        if not loaded.sample_inputs:
            raise ConfigError(
                "calibration.images: no images given and the model carries no test tensors",
                "set calibration.images to a few of your own images (a file, folder or glob of TIFF / NPY)",
            )
        warnings.warn(
            "calibrating on the model package's own test tensors; your own images (calibration.images) "
            "calibrate better and check fidelity on the data that matters",
            stacklevel=2,
        )
        raw = [
            to_model_layout(np.asarray(x), loaded.axes, loaded.axes, "test tensor")
            for x in loaded.sample_inputs
        ]
        names = ["package test tensor"]
    else:
        files = expand_paths(cal.images, "calibration.images")
        raw = [
            lazy_model_layout(read_image(f), cal.axes, loaded.axes, f"calibration.images: {f}") for f in files
        ]
        names = [str(f) for f in files]
    for x, name in zip(raw, names, strict=False):
        if x.shape[0] != loaded.in_channels:
            raise EfficientBioAIError(
                f"calibration.images: {name} has {x.shape[0]} channel(s) but the model takes {loaded.in_channels}",
                "set calibration.axes so that the channel axis is named 'c', or give images with the "
                "model's channels",
            )
        found = scan(x)  # one NaN turns every statistic and the accuracy check into NaN
        if found is not None:
            raise EfficientBioAIError(
                f"calibration.images: {name} holds non-finite values: {found.describe()}",
                "calibrate on images without NaN / inf (remove them from the image, or choose other "
                "calibration images)",
            )
    # read lazily: tiles are read (and pre-processed) where they are sampled; statistics come from a
    # strided sample, so a volume larger than memory can calibrate
    images = [
        PreparedImage(x, fix_statistics(loaded.preprocessing, x, loaded.axes), loaded.axes) for x in raw
    ]
    targets = None
    if cal.targets is not None:
        tfiles = expand_paths(cal.targets, "calibration.targets")
        if cal.images is None or len(tfiles) != len(images):
            raise ConfigError(
                f"calibration.targets: {len(tfiles)} target file(s) for {len(images)} image(s)",
                "give one target per calibration image, in the same (sorted) order",
            )
        targets = [
            lazy_model_layout(read_image(f), None, loaded.axes, f"calibration.targets: {f}") for f in tfiles
        ]
        for t, x, f in zip(targets, images, tfiles, strict=True):
            if t.shape[1:] != x.shape[1:]:
                raise EfficientBioAIError(
                    f"calibration.targets: {f} has spatial shape {t.shape[1:]} but its image has {x.shape[1:]}",
                    "targets must match their images pixel for pixel",
                )
    return images, targets, names


def resolve_tile_shape(
    requested: list[int] | None, loaded: LoadedModel, images: list[np.ndarray]
) -> tuple[int, ...]:
    """The calibration tile shape: the requested one (checked) or a valid default no larger than needed."""
    tmin, step = loaded.tile_min, loaded.tile_step
    if requested is not None:
        if len(requested) != loaded.ndim:
            raise ConfigError(
                f"calibration.tile_shape: {requested} has {len(requested)} values but the model is {loaded.ndim}D "
                f"(axes '{loaded.spatial_axes}')",
            )
        bad = [
            i
            for i, (t, m, s) in enumerate(zip(requested, tmin, step, strict=True))
            if not valid_size(t, m, s)
        ]
        if bad:
            suggestion = [round_up(t, m, s) for t, m, s in zip(requested, tmin, step, strict=True)]
            raise ConfigError(
                f"calibration.tile_shape: {requested} is not a shape this network accepts (valid sizes per axis "
                f"are {tmin} + k × {step})",
                f"use tile_shape: {suggestion}",
            )
        return tuple(requested)
    preferred = loaded.preferred_tile or DEFAULT_TILE[loaded.ndim]
    smallest = [min(im.shape[1 + i] for im in images) for i in range(loaded.ndim)]
    return tuple(
        round_up(min(p, s), m, st) for p, s, m, st in zip(preferred, smallest, tmin, step, strict=True)
    )


@dataclass
class CalibrationData:
    """The calibration images and the tiles sampled from them (see the module docstring for the split)."""

    images: list[np.ndarray]
    targets: list[np.ndarray] | None
    names: list[str]
    calib: Tiles
    holdout: Tiles
    val: Tiles
    tile_shape: tuple[int, ...]


def _part(tiles: Tiles, start: int, stop: int | None) -> Tiles:
    sl = slice(start, stop)
    return Tiles(
        inputs=tiles.inputs[sl],
        targets=tiles.targets[sl] if tiles.targets is not None else None,
        positions=tiles.positions[sl],
        background=sum(tiles.is_background[sl]),
        is_background=tiles.is_background[sl],
    )


def sample_calibration(
    images: list[np.ndarray],
    targets: list[np.ndarray] | None,
    names: list[str],
    tile_shape: tuple[int, ...],
    cal: CalibrationConfig,
    *,
    holdout_tiles: int,
    val_tiles: int,
) -> CalibrationData:
    """Sample ``cal.num_tiles`` calibration, ``val_tiles`` validation and ``holdout_tiles`` held-out tiles."""
    n_cal = cal.num_tiles
    tiles, holdout = sample_tiles(
        images,
        tile_shape,
        n_cal + val_tiles,
        holdout_tiles,
        targets=targets,
        background_fraction=cal.background_fraction,
        seed=cal.seed,
    )
    return CalibrationData(
        images=images,
        targets=targets,
        names=names,
        calib=_part(tiles, 0, n_cal),
        holdout=holdout,
        val=_part(tiles, n_cal, None),
        tile_shape=tuple(tile_shape),
    )
