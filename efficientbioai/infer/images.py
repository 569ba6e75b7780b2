"""The files of an ``infer`` run: inputs opened lazily as (C, *spatial) samples, outputs, targets, labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai.artifact import InputSpec, OutputSpec
from efficientbioai.config import InferConfig
from efficientbioai.errors import ConfigError, EfficientBioAIError
from efficientbioai.io import expand_paths, lazy_model_layout, output_path, read_axes, read_image, write_image
from efficientbioai.io.cache import ChunkCache, cached
from efficientbioai.io.layout import LazyLayout
from efficientbioai.packing import unpack


def split_batch(image, axes: str | None, source: str) -> list:
    """An image with a batch axis ('b' in the axes) as a list of samples, else ``[image]``."""
    if not axes or "b" not in axes:
        return [image]
    arr = np.asarray(image)
    return [np.take(arr, i, axis=axes.index("b")) for i in range(arr.shape[axes.index("b")])]


def open_samples(
    path: Path,
    axes: str | None,
    model_input: InputSpec,
    cache_bytes: int = 0,
    tile_shape: Sequence[int] | None = None,
):
    """(raw array, axes, [(C, *spatial) samples]) of one input, read lazily where possible.

    ``axes``: the input's axes as configured (``None``: read from the file's metadata, else inferred);
    ``model_input``: the network's input (axes and channels) from the artifact's manifest;
    ``cache_bytes``: a zarr input is read through a :class:`~efficientbioai.io.cache.ChunkCache` of
    this many bytes of decoded chunks (0: none), grown to hold twice the chunks under one tile of
    ``tile_shape`` when the input's chunks are large (:meth:`~efficientbioai.io.cache.ChunkCache.fit`;
    :func:`cache_note` says so).
    """
    model_axes = model_input.axes
    raw = cached(read_image(path), cache_bytes)
    axes = axes or read_axes(path)
    samples = split_batch(raw, axes, str(path))
    sample_axes = axes.replace("b", "") if axes else None
    images = [lazy_model_layout(s, sample_axes, model_axes, f"input: {path}") for s in samples]
    for im in images:
        if im.shape[0] != model_input.channels:
            raise EfficientBioAIError(
                f"input: {path} has {im.shape[0]} channel(s) (axes '{sample_axes or 'inferred'}') but "
                f"the model takes {model_input.channels}",
                "set `axes:` so that the channel axis is named 'c' (e.g. axes: cyx or yxc)",
            )
    image = images[0]
    if (
        isinstance(raw, ChunkCache)
        and tile_shape is not None
        and isinstance(image, LazyLayout)
        and image.array is raw
    ):
        raw.fit(image.array_read_shape(tile_shape))  # what one tile reads of the input
    return raw, axes, images


def cache_note(raw) -> str | None:
    """A line for the user when the read cache had to grow for the input's chunks (else ``None``)."""
    before = getattr(raw, "grown_from", None)
    if not isinstance(raw, ChunkCache) or before is None:
        return None
    return (
        f"input chunks {tuple(raw.chunks)} are large for the tiles: the read cache grew from "
        f"{before / 2**20:.0f} to {raw.max_bytes / 2**20:.0f} MB (tiling.read_cache_mb) so that overlapping "
        "tiles do not decode them again; chunks of e.g. 64 x 256 x 256 read faster and in less memory"
    )


def read_cache_bytes(cfg: InferConfig) -> int:
    """``tiling.read_cache_mb`` in bytes."""
    return int(cfg.tiling.read_cache_mb * 2**20)


def target_files(cfg: InferConfig, n: int, what: str = "target") -> list[Path | None]:
    """One target file per input (sorted order), or ``None`` each when no targets are configured."""
    if cfg.targets is None:
        return [None] * n
    files = expand_paths(cfg.targets, "targets")
    if len(files) != n:
        raise ConfigError(
            f"targets: {len(files)} target file(s) for {n} input image(s)",
            f"give one {what} per input image, in the same (sorted) order",
        )
    return files


def output_paths(cfg: InferConfig, files: list[Path]) -> list[Path]:
    """Where each input's result goes; inputs that would overwrite each other's output are an error."""
    fmt = cfg.output_format
    out_dir = cfg.output.expanduser()
    paths = [
        output_path(f, out_dir, fmt or ("zarr" if f.suffix.lower() == ".zarr" else "tiff")) for f in files
    ]
    dupes = {p for p in paths if paths.count(p) > 1}
    if dupes:
        raise ConfigError(
            f"input: several inputs would be written to the same output ({', '.join(sorted(map(str, dupes)))})",
            "give inputs with distinct names (e.g. not a.tif and a.npy side by side)",
        )
    return paths


def read_target(path: Path, shape: tuple[int, ...], model_axes: str) -> np.ndarray:
    target = np.asarray(read_image(path))
    spatial = shape[-(len(model_axes) - 2) :]
    if target.shape != tuple(shape) and target.squeeze().shape != tuple(s for s in shape if s != 1):
        raise EfficientBioAIError(
            f"targets: {path} has shape {target.shape} but its image's prediction has shape {tuple(shape)} "
            f"(spatial {tuple(spatial)})",
            "targets must match their images pixel for pixel, in the same sorted order as the inputs",
        )
    return target.reshape(shape) if target.size == int(np.prod(shape)) else target


def labels_path(output: Path) -> Path:
    """Where the label image of ``output`` goes: ``<stem>_labels`` with the output's suffix."""
    name = output.name
    for suffix in (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".zarr"):
        if name.lower().endswith(suffix):
            return output.with_name(name[: -len(suffix)] + "_labels" + name[-len(suffix) :])
    return output.with_name(name + "_labels")


def output_files(output: Path, spec: OutputSpec) -> list[Path]:
    """The files an image's result is written to: ``output`` itself, or ``<stem>_<name>`` per output of a
    network with several outputs, with ``output``'s suffix."""
    if len(spec.outputs) <= 1:  # one output, at any scale: the image's output file
        return [output]
    name = output.name
    for suffix in (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".zarr", ".npy"):
        if name.lower().endswith(suffix):
            return [
                output.with_name(f"{name[: -len(suffix)]}_{n}{name[-len(suffix) :]}") for n in spec.names()
            ]
    return [output.with_name(f"{name}_{n}") for n in spec.names()]


def unpack_outputs(packed: list[np.ndarray], spec: OutputSpec, ndim: int) -> dict[str, np.ndarray]:
    """Each output (by name) from the stitched packed outputs of an image's samples: (C, *spatial), the
    channel axis dropped for one channel, samples stacked first when there are several."""
    out = {}
    for record in spec.outputs:
        parts = [unpack(p, record, ndim) for p in packed]
        parts = [x[0] if x.shape[0] == 1 else x for x in parts]
        out[record["name"]] = np.stack(parts) if len(parts) > 1 else parts[0]
    return out


def write_outputs(
    output: Path,
    named: dict[str, np.ndarray],
    model_axes: str,
    several: bool,
    pixel_size: dict[str, Any],
    spec: OutputSpec,
    provenance: dict[str, Any] | None = None,
) -> list[Path]:
    """Write each output to its file (see :func:`output_files`), pixel sizes divided by its scale."""
    spatial_axes = model_axes[2:]
    paths = output_files(output, spec)
    for path, record in zip(paths, spec.outputs, strict=True):
        array = named[record["name"]]
        axes = ("c" if array.ndim > len(spatial_axes) + several else "") + spatial_axes
        scale = dict(zip(spatial_axes, record["scale"], strict=True))
        sizes = {a: (v[0] / scale.get(a, 1), *v[1:]) for a, v in pixel_size.items()}
        record = None if provenance is None else {**provenance, "output": record["name"]}
        write_image(path, array, axes=None if several else axes, pixel_size=sizes, provenance=record)
    return paths
