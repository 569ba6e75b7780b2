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
from efficientbioai.packing import scale_factors, unpack_region, unpacked_shape

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
        return True
    if whole_post or compare:
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
    align: int = 1,
) -> OutputLayout:
    """The stored layout of a prediction: as ``infer`` writes it in memory (a size-1 channel axis
    dropped, a batch axis for several samples), chunked so that one chunk thickness of output plus a tile
    fits in ``band_bytes`` (3D: ≤ 64 × 256 × 256; 2D: ≤ 512 × 512)."""
    spatial = tuple(int(n) for n in spatial)
    ndim = len(spatial)
    batch, channel = samples > 1, channels > 1
    axes = ("c" if channel else "") + model_axes[2:]
    slab = choose_slab(spatial, inner, channels, band_bytes, largest=64 if ndim == 3 else 512)
    slab = max(align, slab // align * align)  # outputs at 1/k of the scale are written in whole k-blocks
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


class PackedStores:
    """The outputs of a network with several outputs (or one at another scale), written out of core.

    The band merger flushes blocks of the packed tensor (see :mod:`efficientbioai.packing`); the sink
    cuts each output's part out of every block (:func:`~efficientbioai.packing.unpack_region`) and writes
    it to that output's own :class:`~efficientbioai.io.ChunkedOutput`, so each output equals, to the bit,
    the one ``infer`` unpacks in memory. Progress marks stay with the packed run's (empty) store.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        spec: Any,  # the manifest's OutputSpec
        spatial: Sequence[int],
        packed: OutputLayout,
        fingerprint: str,
        pixel_size: dict[str, Any],
        model_axes: str,
        provenance: dict[str, Any] | None = None,
    ):
        self.records = list(spec.outputs)
        self.spatial = tuple(spatial)
        self.layouts: list[OutputLayout] = []
        self.outputs: list[ChunkedOutput] = []
        samples = packed.shape[0] if packed.batch else 1
        spatial_axes = model_axes[2:]
        for path, rec in zip(paths, self.records, strict=True):
            up, down = scale_factors(rec)
            shape = tuple(unpacked_shape(spatial, rec))
            chunks = [
                max(1, min(n, c * u // d))
                for n, c, u, d in zip(shape, packed.chunks[packed.lead :], up, down, strict=True)
            ]
            batch, channel = samples > 1, rec["channels"] > 1
            lead_shape = ((samples,) if batch else ()) + ((rec["channels"],) if channel else ())
            lead_chunks = ((1,) if batch else ()) + ((rec["channels"],) if channel else ())
            layout = OutputLayout(
                lead_shape + shape,
                None if batch else ("c" if channel else "") + spatial_axes,
                lead_chunks + tuple(chunks),
                int(batch) + int(channel),
                batch,
                channel,
                chunks[0],
            )
            scale = dict(zip(spatial_axes, rec["scale"], strict=True))
            self.layouts.append(layout)
            self.outputs.append(
                ChunkedOutput(
                    path,
                    layout.shape,
                    np.float32,
                    axes=layout.axes,
                    chunks=layout.chunks,
                    fingerprint=f"{fingerprint}:{rec['name']}",
                    pixel_size={a: (v[0] / scale.get(a, 1), *v[1:]) for a, v in pixel_size.items()},
                    provenance=None if provenance is None else {**provenance, "output": rec["name"]},
                )
            )

    def create(self, fill_value: float) -> None:
        for out in self.outputs:
            out.create(fill_value)

    def sink(self, sample: int) -> Sink:
        targets = [
            (o.array, lay, rec) for o, lay, rec in zip(self.outputs, self.layouts, self.records, strict=True)
        ]
        return packed_sink(targets, self.spatial, sample)

    def targets(self) -> list[tuple[Path, OutputLayout, dict[str, Any]]]:
        """(store, layout, record) per output: what a Dask worker opens to write its blocks."""
        return [
            (o.store, lay, rec) for o, lay, rec in zip(self.outputs, self.layouts, self.records, strict=True)
        ]

    def commit(self) -> list[Path]:
        return [out.commit() for out in self.outputs]

    def discard(self) -> None:
        for out in self.outputs:
            out.discard()


def packed_sink(
    targets: Sequence[tuple[Any, OutputLayout, dict[str, Any]]], spatial: Sequence[int], sample: int
) -> Sink:
    """A sink that cuts each output's part out of a packed block and writes it to that output's array
    (``targets``: (zarr array, layout, record) per output)."""

    def write(region: tuple[slice, ...], data: np.ndarray) -> None:
        for array, layout, rec in targets:
            part = unpack_region(data, region, rec, spatial)
            if part is not None:
                where, block = part
                array[layout.index(sample, where)] = block if layout.channel else block[0]

    return write


def predict_to_output(
    predictor: Predictor,
    images: Sequence[Any],
    output: ChunkedOutput,
    layout: OutputLayout,
    progress: Any = None,
    stores: PackedStores | None = None,
) -> list[Prediction]:
    """Predict each (C, *spatial) sample into ``output`` slab by slab, skipping slabs already recorded
    there (a resumed run); with ``stores``, the slabs go to each output's store instead (``output`` keeps
    the progress marks). Does not commit the output. Each prediction's seconds include its plan (the
    background statistics and sample localisation); the plans come first, for the output's fill value."""
    plans, seconds = [], []
    for image in images:
        t0 = time.perf_counter()
        plans.append(predictor.plan(image))
        seconds.append(time.perf_counter() - t0)
    array = output.create(fill_value(plans))
    background = float(np.asarray(array.fill_value))  # a resumed store keeps its own
    if stores is not None:  # the outputs get the same fill value: unwritten chunks mean the same there
        stores.create(background)
    preds = []
    for i, (image, plan) in enumerate(zip(images, plans, strict=True)):
        merger = BandMerger(
            plan.grid,
            predictor.out_channels,
            layout.sink(array, i) if stores is None else stores.sink(i),
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
