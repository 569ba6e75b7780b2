"""``efficientbioai infer`` for cellpose artifacts: cellpose's eval with the engine, masks written as labels.

``efficientbioai.infer.infer`` hands artifacts of ``model.kind: cellpose`` to :func:`infer_cellpose`. The
config's ``cellpose:`` section holds cellpose's own settings (channels, diameter, thresholds, tile size);
the outputs are label images (0 = background), one per input. With ``targets`` the masks are scored
with cellpose's AP at IoU 0.5 / 0.75 / 0.9, and with ``compare_with_original`` the original network runs
through the same cellpose code and both mask sets are scored against each other.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai import nonfinite
from efficientbioai.artifact import Artifact
from efficientbioai.cellpose.run import average_precision, engine_model, original_model, segment
from efficientbioai.config import InferConfig
from efficientbioai.energy import EnergyMeter, EnergyReading, format_energy
from efficientbioai.engines import default_threads
from efficientbioai.errors import ConfigError, EfficientBioAIError
from efficientbioai.infer.images import output_paths, target_files
from efficientbioai.infer.provenance import plan_outputs
from efficientbioai.infer.results import energy_note
from efficientbioai.io import expand_paths, read_axes, read_image, read_pixel_size, write_image
from efficientbioai.models.cellpose import cellpose_spec, parse_channels
from efficientbioai.tables import table


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


@dataclass
class CellposeRun:
    """One model (engine or original) on one image."""

    engine: str
    seconds: float | None
    network_seconds: float | None = None
    masks_seconds: float | None = None
    energy: EnergyReading | None = None
    tiles: int = 0
    objects: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        e = self.energy
        return {
            "engine": self.engine,
            "seconds": self.seconds,
            "network_seconds": self.network_seconds,
            "masks_seconds": self.masks_seconds,
            "energy_joules": e.joules if e else None,
            "energy_method": e.method if e else None,
            "tiles": self.tiles,
            "objects": self.objects,
            "metrics": self.metrics,
        }


@dataclass
class CellposeImage:
    input: Path
    output: Path
    shape: tuple[int, ...]
    status: str  # "done" | "exists"
    runs: list[CellposeRun] = field(default_factory=list)
    agreement: dict[str, float] = field(default_factory=dict)  # engine masks scored against the original's


@dataclass
class CellposeInferResult:
    images: list[CellposeImage]
    threads: int
    settings: dict[str, Any]
    task: str = "cellpose"

    def table(self) -> str:
        names: list[str] = []
        for im in self.images:
            for r in im.runs:
                names += [k for k in r.metrics if k not in names]
        header = ["image", "engine", "network", "masks", "total", "energy", "tiles", "objects", *names]
        rows = []
        for im in self.images:
            for r in im.runs:
                rows.append(
                    [
                        im.input.name,
                        r.engine,
                        f"{r.network_seconds:.2f} s" if r.network_seconds is not None else "-",
                        f"{r.masks_seconds:.2f} s" if r.masks_seconds is not None else "-",
                        f"{r.seconds:.2f} s" if r.seconds is not None else "exists",
                        format_energy(r.energy) if r.energy else "-",
                        r.tiles or "-",
                        r.objects,
                        *[f"{r.metrics[k]:.4f}" if k in r.metrics else "-" for k in names],
                    ]
                )
        s = self.settings
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        title = (
            f"cellpose inference ({threads}; channels {s['channels']}, diameter {s['diameter']}, "
            f"bsize {s['bsize']}; network = cellpose's tiling + network, masks = flow dynamics; whole image)"
        )
        out = [table(header, rows, title=title)]
        note = energy_note([r.energy for im in self.images for r in im.runs])
        if note:
            out.append(note)
        speed = self.speedup()
        if speed:
            out.append(speed)
        for im in self.images:
            if im.agreement:
                out.append(
                    f"{im.input.name}: {im.runs[0].engine} masks vs the original's: "
                    + ", ".join(f"AP@{int(k[2:]) / 100:g} {v:.4f}" for k, v in im.agreement.items())
                )
        return "\n".join(out)

    def speedup(self) -> str | None:
        """'x× faster in total (y× for the network)' when the original ran beside the engine."""
        pairs = [im.runs for im in self.images if len(im.runs) == 2 and im.runs[0].seconds]
        if not pairs:
            return None
        a = sum(r[0].seconds for r in pairs), sum(r[0].network_seconds for r in pairs)
        b = sum(r[1].seconds for r in pairs), sum(r[1].network_seconds for r in pairs)
        n = len(pairs)
        return (
            f"{pairs[0][0].engine} is {b[0] / a[0]:.2f}x faster than {pairs[0][1].engine} in total, "
            f"including cellpose's flow dynamics (mask making), and {b[1] / a[1]:.2f}x for the network alone "
            f"(whole image{'s' if n > 1 else ''}, {self.threads} thread{'s' if self.threads != 1 else ''}, "
            "after one untimed warm-up, one timed run per image, not a median)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "threads": self.threads,
            "settings": self.settings,
            "images": [
                {
                    "input": str(im.input),
                    "output": str(im.output),
                    "shape": list(im.shape),
                    "status": im.status,
                    "runs": [r.as_dict() for r in im.runs],
                    "agreement": im.agreement,
                }
                for im in self.images
            ],
        }


def image_for_cellpose(raw: Any, axes: str | None, source: str) -> tuple[np.ndarray, int | None]:
    """A 2D image (optionally with channels) as cellpose takes it, and its channel axis (or None)."""
    arr = np.asarray(raw)
    if axes:
        axes = axes.lower()
        if len(axes) != arr.ndim:
            raise EfficientBioAIError(
                f"{source}: axes '{axes}' do not describe an array of shape {arr.shape}",
                "set `axes:` with one letter per dimension, e.g. yx, cyx or yxc",
            )
        for a in "btz":
            if a in axes:
                if arr.shape[axes.index(a)] != 1:
                    raise EfficientBioAIError(
                        f"{source}: has {arr.shape[axes.index(a)]} planes along '{a}'; cellpose engines "
                        "segment 2D images",
                        "store one 2D image (with its channels) per file",
                    )
                arr = arr.take(0, axis=axes.index(a))
                axes = axes.replace(a, "")
        if set(axes) - set("cyx") or not {"y", "x"} <= set(axes):
            raise EfficientBioAIError(
                f"{source}: axes '{axes}' are not a 2D image", "use axes yx, cyx or yxc"
            )
        return arr, axes.index("c") if "c" in axes else None
    if arr.ndim > 2:
        arr = arr.squeeze()
    if arr.ndim == 2:
        return arr, None
    if arr.ndim == 3 and min(arr.shape) <= 4:
        return arr, int(np.argmin(arr.shape))  # the short axis holds the channels, as cellpose assumes
    raise EfficientBioAIError(
        f"{source}: shape {tuple(np.asarray(raw).shape)} is not a 2D image with at most 4 channels",
        "set `axes:` (e.g. cyx) or store one 2D image per file",
    )


def _settings(cfg: InferConfig) -> dict[str, Any]:
    c = cfg.cellpose
    return {
        "channels": parse_channels(c.channels, "cellpose.channels"),
        "diameter": c.diameter,
        "flow_threshold": c.flow_threshold,
        "cellprob_threshold": c.cellprob_threshold,
        "min_size": c.min_size,
        "niter": c.niter,
        "bsize": c.bsize,
        "tile_overlap": c.tile_overlap,
        "batch_size": c.batch_size,
        "augment": c.augment,
        "normalize": c.normalize,
        "invert": c.invert,
    }


def _read_labels(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    labels = np.asarray(read_image(path))
    if labels.shape != shape:
        labels = labels.squeeze()
    if labels.shape != shape:
        raise EfficientBioAIError(
            f"targets: {path} has shape {labels.shape} but its image is {shape} (y, x)",
            "targets must be label images (0 = background) matching their images pixel for pixel",
        )
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise EfficientBioAIError(
            f"targets: {path} holds non-integer values", "give label images: 0 = background, 1, 2, … objects"
        )
    return labels.astype(np.int32)


def _warm_up(model, image: np.ndarray, channel_axis: int | None, kwargs: dict[str, Any]) -> None:
    """One untimed run on a corner of the image (first calls compile kernels and allocate)."""
    sl = [slice(None)] * image.ndim
    spatial = [i for i in range(image.ndim) if i != channel_axis]
    for i in spatial[-2:]:
        sl[i] = slice(0, min(image.shape[i], 256))
    segment(model, image[tuple(sl)], channel_axis=channel_axis, **kwargs)


def infer_cellpose(cfg: InferConfig, artifact: Artifact, *, quiet: bool = False) -> CellposeInferResult:
    """Segment every input with cellpose running the artifact's engine (and the original, if asked)."""
    from tqdm.auto import tqdm

    directory = artifact.directory
    spec = cellpose_spec(artifact.manifest)
    settings = _settings(cfg)
    if "tiling" in cfg.model_fields_set:
        warnings.warn(
            "tiling: cellpose artifacts are tiled by cellpose; set cellpose.bsize / tile_overlap / "
            "batch_size instead (tiling is ignored)",
            stacklevel=2,
        )
    if cfg.task not in (None, "instance"):
        warnings.warn(
            f"task: {cfg.task} does not apply to cellpose artifacts (AP of the masks is reported)",
            stacklevel=2,
        )
    if spec["in_channels"] == 1 and settings["channels"][1] != 0:
        raise ConfigError(
            f"cellpose.channels: {settings['channels']} uses a nucleus channel, but {directory} was compressed "
            "for one channel (model.options.channels [c, 0])",
            "set cellpose.channels to [c, 0], or compress again with model.options.channels [c, n]",
        )
    files = expand_paths(cfg.input, "input")
    targets = target_files(cfg, len(files), "label image")
    threads = cfg.threads or default_threads()
    out_paths = output_paths(cfg, files)
    kwargs = dict(settings)

    _log(f"loading engine from {directory}", quiet)
    models = [engine_model(directory, cfg.backend, threads)]
    if cfg.compare_with_original and cfg.backend != "torch":
        _log("loading the original network for comparison", quiet)
        models.append(original_model(directory, threads))
    provenance, skips = plan_outputs(  # every existing output checked before any work
        files,
        [[o] for o in out_paths],
        directory,
        artifact.manifest.model.name,
        models[0].label,
        {"axes": cfg.axes, "cellpose": settings},
        cfg.overwrite,
    )
    meter = EnergyMeter(enabled=cfg.energy)
    records: list[CellposeImage] = []
    warmed: set[int] = set()
    try:
        for k, (path, tpath, opath) in enumerate(zip(files, targets, out_paths, strict=True)):
            raw = read_image(path)
            image, channel_axis = image_for_cellpose(raw, cfg.axes or read_axes(path), f"input: {path}")
            spatial = tuple(s for i, s in enumerate(image.shape) if i != channel_axis)
            record = CellposeImage(path, opath, tuple(raw.shape), "done")
            truth = _read_labels(tpath, spatial) if tpath is not None else None
            if skips[k]:
                _log(
                    f"[{k + 1}/{len(files)}] {path.name}: {opath} exists, skipped: written by this model with "
                    "these settings (overwrite: true recomputes)",
                    quiet,
                )
                record.status = "exists"
                masks = np.asarray(read_image(opath))
                record.runs.append(
                    CellposeRun(
                        models[0].label,
                        None,
                        objects=int(masks.max(initial=0)),
                        metrics=average_precision(truth, masks) if truth is not None else {},
                    )
                )
                records.append(record)
                continue
            _log(f"[{k + 1}/{len(files)}] {path.name} {tuple(raw.shape)}", quiet)
            found = nonfinite.scan(
                image[np.newaxis] if channel_axis is None else np.moveaxis(image, channel_axis, 0)
            )
            if found is not None:  # a label image has no value to mark filled pixels with: refused
                raise EfficientBioAIError(
                    f"input: {path} holds non-finite values: {found.describe()}",
                    "remove them from the image (cellpose artifacts write label images, which cannot mark "
                    "filled pixels, so nonfinite: fill is not available for them)",
                )
            results = []
            for m_idx, model in enumerate(
                tqdm(models, desc=path.name, unit="model", disable=quiet, leave=False)
            ):
                if m_idx not in warmed:
                    _warm_up(model, image, channel_axis, kwargs)
                    warmed.add(m_idx)
                with meter.measure() as m:
                    seg = segment(model, image, channel_axis=channel_axis, **kwargs)
                results.append(seg)
                record.runs.append(
                    CellposeRun(
                        model.label,
                        seg.seconds,
                        seg.network_seconds,
                        seg.masks_seconds,
                        m.reading,
                        tiles=seg.tiles,
                        objects=seg.count,
                        metrics=average_precision(truth, seg.masks) if truth is not None else {},
                    )
                )
            masks = results[0].masks
            dtype = np.uint16 if masks.max(initial=0) < 2**16 else np.uint32
            write_image(
                opath,
                masks.astype(dtype),
                axes="yx",
                pixel_size=read_pixel_size(path),
                provenance=provenance[k],
            )
            if len(results) == 2:
                record.agreement = average_precision(results[1].masks, results[0].masks)
            records.append(record)
    finally:
        for model in models:
            close = getattr(getattr(model.net, "engine", None), "close", None)
            if close is not None:
                close()
        meter.close()
    return CellposeInferResult(records, threads, settings)
