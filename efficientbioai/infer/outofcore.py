"""Out-of-core inference: outputs written chunk by chunk, memory independent of the image size.

The :class:`~efficientbioai.infer.merge.BandMerger` blends tiles into slabs along the slowest spatial
axis and hands each finished slab to a sink that writes it into a :class:`~efficientbioai.io.ChunkedOutput`
(a zarr store under a temporary name; TIFF outputs are written from it page by page at the end). Each
written slab is recorded, so a rerun after an interruption computes only the slabs that are missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai.errors import ConfigError
from efficientbioai.infer.merge import BandMerger, Sink, choose_slab
from efficientbioai.infer.predict import Plan, Prediction, Predictor, split_pointwise
from efficientbioai.io import ChunkedOutput

# float32 outputs larger than band_memory_mb × this factor go out of core when out_of_core is auto
AUTO_FACTOR = 4


def use_out_of_core(
    mode: str,
    output: Path,
    voxels: int,
    channels: int,
    band_bytes: int,
    post,
    compare: bool,
    packed: bool = False,
) -> bool:
    """Whether an image goes out of core (``tiling.out_of_core``; see :class:`TilingConfig`).

    ``auto`` chooses it for zarr outputs and for outputs over ``AUTO_FACTOR`` × the band memory, unless
    the model's post-processing needs whole-image statistics or the original model runs alongside
    (``compare_with_original``), which both need whole outputs in memory.
    """
    whole_post = split_pointwise(post)[1]
    if mode == "false":
        return False
    if mode == "true":
        if whole_post:
            raise ConfigError(
                "tiling.out_of_core: true, but the model's post-processing needs whole-image statistics "
                f"({', '.join(s['id'] for s in whole_post)})",
                "set tiling.out_of_core: auto or false",
            )
        if compare:
            raise ConfigError(
                "tiling.out_of_core: true cannot be combined with compare_with_original (the comparison "
                "holds both whole outputs in memory)",
                "set compare_with_original: false, or tiling.out_of_core: auto",
            )
        if packed:
            raise ConfigError(
                "tiling.out_of_core: true: this artifact's network has several outputs (or one at another "
                "scale), which are written from memory only so far",
                "set tiling.out_of_core: auto or false (the image's outputs must fit in memory)",
            )
        return True
    if whole_post or compare or packed:
        return False
    return output.suffix.lower() == ".zarr" or voxels * channels * 4 > AUTO_FACTOR * band_bytes


@dataclass(frozen=True)
class OutputLayout:
    """How one input's prediction is stored: shape, axes and chunks of the array, and slab size."""

    shape: tuple[int, ...]
    axes: str | None  # None for a stack of samples (TIFF/OME axes have no batch letter)
    chunks: tuple[int, ...]
    lead: int  # leading non-spatial axes (batch, channel) in the stored array
    batch: bool
    channel: bool
    slab: int  # planes per written chunk along the first spatial axis

    def index(self, sample: int, region: Sequence[slice]) -> tuple:
        """The stored array's index of a spatial ``region`` of ``sample`` (all channels)."""
        return ((sample,) if self.batch else ()) + ((slice(None),) if self.channel else ()) + tuple(region)

    def sink(self, array: Any, sample: int) -> Sink:
        def write(region: tuple[slice, ...], data: np.ndarray) -> None:
            array[self.index(sample, region)] = data if self.channel else data[0]

        return write


def output_layout(
    spatial: Sequence[int],
    model_axes: str,
    channels: int,
    samples: int,
    inner: Sequence[int],
    band_bytes: int,
    block: Sequence[int] | None = None,
) -> OutputLayout:
    """The stored layout of a prediction: as ``infer`` writes it in memory (a size-1 channel axis
    dropped, a batch axis for several samples), chunked so that one chunk thickness of output plus a tile
    fits in ``band_bytes`` (3D: ≤ 64 × 256 × 256; 2D: ≤ 512 × 512)."""
    spatial = tuple(int(n) for n in spatial)
    ndim = len(spatial)
    batch, channel = samples > 1, channels > 1
    axes = ("c" if channel else "") + model_axes[2:]
    slab = choose_slab(spatial, inner, channels, band_bytes, largest=64 if ndim == 3 else 512)
    rest = [min(256 if ndim == 3 else 512, n) for n in spatial[1:]]
    if block is not None:  # Dask: chunks must tile the blocks
        slab = int(np.gcd(slab, block[0]))
        rest = [int(np.gcd(r, b)) for r, b in zip(rest, block[1:], strict=True)]
    chunks = ((1,) if batch else ()) + ((channels,) if channel else ()) + (slab, *rest)
    shape = ((samples,) if batch else ()) + ((channels,) if channel else ()) + spatial
    return OutputLayout(
        shape, None if batch else axes, chunks, int(batch) + int(channel), batch, channel, slab
    )


def fingerprint(input_path: Path, artifact: Path, predictor: Predictor, extra: Any = None) -> str:
    """What the output of an input depends on: the input file, the artifact and the tiling settings."""
    try:
        stat = input_path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        stamp = None
    manifest = (artifact / "manifest.yaml").read_bytes() if (artifact / "manifest.yaml").is_file() else b""
    key = {
        "input": str(input_path.resolve()),
        "stamp": stamp,
        "manifest": hashlib.sha256(manifest).hexdigest(),
        "engine": getattr(predictor.engine, "label", "") or predictor.engine.backend,
        "tiling": [
            list(predictor.tile_shape),
            predictor.overlap,
            predictor.blend,
            predictor.skip_background,
            predictor.background_threshold,
        ],
        # sample localisation decides which tiles hold the background value: part of what was computed
        "localize": dataclasses.asdict(predictor.localizer) if predictor.localizer is not None else None,
        "extra": extra,
    }
    return json.dumps(key, sort_keys=True, default=str)


def fill_value(plans: Sequence[Plan]) -> float:
    """The value a prediction's unwritten chunks may hold: skipped tiles' value when every plan has the
    same one for every channel (their chunks are then not written at all), else 0."""
    values = {float(v) for p in plans if p.value is not None for v in np.ravel(p.value)}
    if len(values) == 1 and all(p.value is not None for p in plans):
        return values.pop()
    return 0.0


def predict_to_output(
    predictor: Predictor,
    images: Sequence[Any],
    output: ChunkedOutput,
    layout: OutputLayout,
    progress: Any = None,
) -> list[Prediction]:
    """Predict each (C, *spatial) sample into ``output`` slab by slab, skipping slabs already recorded
    there (a resumed run). Does not commit the output. Each prediction's seconds include its plan (the
    background statistics and sample localisation); the plans come first, for the output's fill value."""
    plans, seconds = [], []
    for image in images:
        t0 = time.perf_counter()
        plans.append(predictor.plan(image))
        seconds.append(time.perf_counter() - t0)
    array = output.create(fill_value(plans))
    background = float(np.asarray(array.fill_value))  # a resumed store keeps its own
    preds = []
    for i, (image, plan) in enumerate(zip(images, plans, strict=True)):
        merger = BandMerger(
            plan.grid,
            predictor.out_channels,
            layout.sink(array, i),
            layout.slab,
            predictor.blend,
            done=output.done(i),
            on_slab=lambda k, i=i: output.mark(i, k),
            background=background,
            chunks=array.chunks[layout.lead + 1 :],
        )
        pred = predictor(image, progress=progress, merger=merger, plan=plan)
        pred.seconds += seconds[i]
        preds.append(pred)
    return preds
