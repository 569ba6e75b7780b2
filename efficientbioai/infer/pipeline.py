"""``efficientbioai infer``: an artifact directory + images → predictions, metrics, latency and energy.

The steps live in their own modules: the artifact and its engines (:mod:`efficientbioai.artifact`), the
sliding window (:class:`~efficientbioai.infer.predict.Predictor` with a
:class:`~efficientbioai.infer.merge.Merger`), out-of-core outputs (:mod:`~efficientbioai.infer.outofcore`),
Dask (:mod:`~efficientbioai.infer.distributed`), instance labels (:mod:`~efficientbioai.infer.labels`),
files (:mod:`~efficientbioai.infer.images`) and results (:mod:`~efficientbioai.infer.results`). This
module runs them per image. Artifacts of a model kind with its own pipeline (:data:`KIND_PIPELINES`) are
handed to it.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np

from efficientbioai import metrics, nonfinite
from efficientbioai.artifact import Artifact
from efficientbioai.config import GPU_BACKENDS, InferConfig
from efficientbioai.energy import EnergyMeter
from efficientbioai.engines import Engine, default_threads
from efficientbioai.errors import ConfigError
from efficientbioai.infer.distributed import blocks, infer_distributed
from efficientbioai.infer.images import (
    cache_note,
    labels_path,
    open_samples,
    output_files,
    output_paths,
    read_cache_bytes,
    read_target,
    target_files,
    unpack_outputs,
    write_outputs,
)
from efficientbioai.infer.labels import labels_provenance, wants_labels, write_labels_blockwise
from efficientbioai.infer.outofcore import (
    PackedStores,
    fingerprint,
    output_layout,
    predict_to_output,
    use_out_of_core,
)
from efficientbioai.infer.predict import Prediction, Predictor
from efficientbioai.infer.provenance import plan_outputs, predictor_settings
from efficientbioai.infer.results import ImageRecord, InferResult, RunRecord, localization_note, score
from efficientbioai.io import ChunkedOutput, expand_paths, read_image, read_pixel_size, write_image
from efficientbioai.io.files import check_writable

KIND_PIPELINES: dict[str, str] = {"cellpose": "efficientbioai.cellpose.infer:infer_cellpose"}
"""Model kinds whose artifacts ``infer`` hands to their own pipeline (``module:function``, imported on use;
called as ``function(cfg, artifact, quiet=quiet)``)."""


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _squeeze_channel(x: np.ndarray) -> np.ndarray:
    return x[0] if x.shape[0] == 1 else x


def _finite(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` where both are finite (all of them, unless filled inputs were marked NaN)."""
    keep = np.isfinite(a) & np.isfinite(b)
    return (a, b) if keep.all() else (a[keep], b[keep])


def infer(cfg: InferConfig, *, quiet: bool = False) -> InferResult:
    """Run the artifact's engine (and, if asked, the original model) over every input image."""
    from tqdm.auto import tqdm

    artifact = Artifact(cfg.model)
    directory, manifest = artifact.directory, artifact.manifest
    check_writable(cfg.output.expanduser(), "output")  # before any engine runs
    own = KIND_PIPELINES.get(manifest.model.kind or "")
    if own is not None:  # e.g. cellpose: it tiles and makes the masks itself
        module, _, name = own.partition(":")
        return getattr(importlib.import_module(module), name)(cfg, artifact, quiet=quiet)
    if "cellpose" in cfg.model_fields_set:
        raise ConfigError(
            f"cellpose: settings were given, but {directory} holds a '{manifest.model.kind}' model "
            f"('{manifest.model.name}'), not a Cellpose one, so they would be ignored",
            "remove the cellpose section, or point model at an artifact compressed from a Cellpose model "
            "(model.kind: cellpose)",
        )
    model_axes = manifest.input.axes
    files = expand_paths(cfg.input, "input")
    targets = target_files(cfg, len(files))
    threads = cfg.threads or default_threads()
    task = cfg.task or manifest.task or ("restoration" if cfg.targets else None)
    if cfg.targets is not None and task is None:
        task = "restoration"
    out_paths = output_paths(cfg, files)

    if cfg.distributed is not None and cfg.compare_with_original:
        raise ConfigError(
            "distributed: cannot be combined with compare_with_original (the comparison holds both whole "
            "outputs in memory on one machine)",
            "set compare_with_original: false, or remove the distributed section",
        )
    from efficientbioai.infer.gpu import choose_backend, nvml_index

    backend, why = choose_backend(manifest, cfg.backend)
    _log(f"loading engine from {directory}: {backend} ({why})", quiet)
    engines: list[Engine] = [
        artifact.open_engine(
            backend,
            threads,
            gpu=cfg.gpu,
            tile_shape=tuple(cfg.tiling.tile_shape or manifest.calibration.tile_shape),
            batch_size=cfg.tiling.batch_size,
            quiet=quiet,
        )
    ]
    if cfg.compare_with_original and backend != "torch":
        _log("loading the original model for comparison", quiet)
        engines.append(artifact.open_original(threads))
    predictors = [Predictor.from_artifact(manifest, e, cfg.tiling) for e in engines]
    written_files = [output_files(o, manifest.output) for o in out_paths]
    provenance, skips = plan_outputs(  # every existing output checked before any work
        files,
        written_files,
        directory,
        manifest.model.name,
        engines[0].label,
        predictor_settings(predictors[0], cfg),
        cfg.overwrite,
    )
    on_gpu = backend in GPU_BACKENDS
    meter = EnergyMeter(enabled=cfg.energy, gpu_index=nvml_index(cfg.gpu.index) if on_gpu else None)
    band_bytes = int(cfg.tiling.band_memory_mb * 2**20)
    records: list[ImageRecord] = []
    warmed = set()
    if cfg.distributed is not None:
        try:
            records = infer_distributed(
                cfg, directory, manifest, files, targets, out_paths, predictors[0], quiet, provenance, skips
            )
        finally:
            engines[0].close()
            meter.close()
        return InferResult(records, task, threads)
    try:
        for k, (path, tpath, opath) in enumerate(zip(files, targets, out_paths, strict=True)):
            raw, _, images = open_samples(
                path, cfg.axes, manifest.input, read_cache_bytes(cfg), predictors[0].tile_shape
            )
            if note := cache_note(raw):
                _log(f"  {path.name}: {note}", quiet)
            spatial = tuple(images[0].shape[1:])
            voxels = int(np.prod(spatial)) * len(images)
            record = ImageRecord(path, opath, tuple(raw.shape), "done")
            written = written_files[k]
            if skips[k]:
                _log(
                    f"[{k + 1}/{len(files)}] {path.name}: {written[0]} exists, skipped: written by this model "
                    "with these settings (overwrite: true recomputes)",
                    quiet,
                )
                record.status, record.output = "exists", written[0]
                existing = np.asarray(read_image(written[0]), np.float32)
                target = read_target(tpath, existing.shape, model_axes) if tpath else None
                record.runs.append(
                    RunRecord(
                        engines[0].label,
                        None,
                        voxels,
                        None,
                        metrics=score(task, existing, target, cfg.threshold, cfg.instance),
                    )
                )
                records.append(record)
                continue
            _log(f"[{k + 1}/{len(files)}] {path.name} {tuple(raw.shape)}", quiet)
            images, filled = nonfinite.check(images, f"input: {path}", cfg.nonfinite, cfg.fill_value)
            prov = provenance[k]
            if filled:
                _log(f"  {nonfinite.fill_note(path.name, filled, cfg.fill_value)}", quiet)
                prov = {**prov, "filled_nonfinite": filled}
            out_channels = manifest.output.channels
            if use_out_of_core(
                cfg.tiling.out_of_core,
                opath,
                voxels,
                out_channels,
                band_bytes,
                predictors[0].post,
                compare=len(engines) > 1,
            ):
                predictor = predictors[0]
                if 0 not in warmed:
                    predictor.warm_up(images[0].shape[0])
                    warmed.add(0)
                layout = output_layout(
                    spatial,
                    model_axes,
                    out_channels,
                    len(images),
                    predictor.grid(spatial).inner,
                    band_bytes,
                    align=(predictor.align or [1])[0],
                )
                out = ChunkedOutput(
                    opath,
                    layout.shape,
                    np.float32,
                    axes=layout.axes,
                    chunks=layout.chunks,
                    fingerprint=fingerprint(path, directory, predictor),
                    pixel_size=read_pixel_size(path),  # the input's pixel sizes carried over
                    provenance=prov,
                )
                stores = None
                if manifest.output.packed:  # each output to its own file; `out` keeps the progress
                    stores = PackedStores(
                        written,
                        manifest.output,
                        spatial,
                        layout,
                        out.fingerprint,
                        read_pixel_size(path),
                        model_axes,
                        prov,
                    )
                _log(
                    f"  out of core: chunks of {layout.slab} plane(s) along the first axis written to "
                    f"{out.store.name} as they complete",
                    quiet,
                )
                if out.resumed:
                    _log(f"  resuming {opath.name}: {out.finished_count()} chunk slab(s) done", quiet)
                with (
                    meter.measure() as m,
                    tqdm(
                        desc=f"{path.name} · {engines[0].label} (out of core)",
                        unit="tile",
                        disable=quiet,
                        leave=False,
                    ) as bar,
                ):
                    preds = predict_to_output(predictor, images, out, layout, progress=bar, stores=stores)
                if stores is not None:
                    stores.commit()
                    out.discard()
                else:
                    if wants_labels(cfg.instance, task, bool(layout.lead)):
                        slabs = blocks(spatial, (layout.slab, *spatial[1:]))
                        write_labels_blockwise(cfg.instance, cfg.threshold, out, layout, slabs)
                    out.commit()
                tiles = sum(p.tiles for p in preds)
                resumed = tiles - sum(p.visited for p in preds)  # written by an interrupted run
                run = RunRecord(
                    engines[0].label,
                    sum(p.seconds for p in preds),
                    round(voxels * (tiles - resumed) / tiles) if tiles else voxels,  # about what ran now
                    m.reading,
                    tiles=tiles,
                    skipped=sum(p.skipped for p in preds),
                    skipped_fraction=sum(p.skipped_fraction for p in preds) / len(preds),
                    resumed=resumed,
                )
                for p in preds:
                    if p.localization is not None:
                        _log(f"  {path.name}: {localization_note(p)}", quiet)
                record.runs.append(run)
                if tpath is not None:
                    first = np.asarray(read_image(written[0]), np.float32)
                    target = read_target(tpath, first.shape, model_axes)
                    run.metrics = score(task, first, target, cfg.threshold, cfg.instance)
                record.output = written[0]
                records.append(record)
                continue
            outputs, packed = [], []
            for e_idx, (engine, predictor) in enumerate(zip(engines, predictors, strict=True)):
                if e_idx not in warmed:
                    predictor.warm_up(images[0].shape[0])
                    warmed.add(e_idx)
                preds: list[Prediction] = []
                with meter.measure(getattr(engine, "synchronize", None)) as m:
                    for im in images:
                        with tqdm(
                            desc=f"{path.name} · {engine.label}", unit="tile", disable=quiet, leave=False
                        ) as bar:
                            preds.append(predictor(im, progress=bar))
                out = (
                    np.stack([_squeeze_channel(p.output) for p in preds])
                    if len(preds) > 1
                    else _squeeze_channel(preds[0].output)
                )
                outputs.append(out)
                packed.append(preds)
                run = RunRecord(
                    engine.label,
                    sum(p.seconds for p in preds),
                    voxels,
                    m.reading,
                    tiles=sum(p.tiles for p in preds),
                    skipped=sum(p.skipped for p in preds),
                    skipped_fraction=sum(p.skipped_fraction for p in preds) / len(preds),
                )
                record.runs.append(run)
                for p in preds:
                    if p.localization is not None and e_idx == 0:
                        _log(f"  {path.name}: {localization_note(p)}", quiet)
            if manifest.output.packed:  # several outputs, or one at another scale: a file per output
                named = [
                    unpack_outputs([p.output for p in run_preds], manifest.output, len(model_axes) - 2)
                    for run_preds in packed
                ]
                record.output = write_outputs(
                    opath,
                    named[0],
                    model_axes,
                    len(images) > 1,
                    read_pixel_size(path),
                    manifest.output,
                    prov,
                )[0]
                outputs = [next(iter(n.values())) for n in named]  # the first output is scored
            out_axes = ("b" if len(images) > 1 else "") + (
                ("c" if outputs[0].ndim > len(model_axes) - 2 + (len(images) > 1) else "") + model_axes[2:]
            )
            if not manifest.output.packed:
                write_image(  # no b in TIFF/OME axes; the input's pixel sizes carried over
                    opath,
                    outputs[0],
                    axes=None if "b" in out_axes else out_axes,
                    pixel_size=read_pixel_size(path),
                    provenance=prov,
                )
            if not manifest.output.packed and wants_labels(
                cfg.instance, task, several=outputs[0].ndim != len(model_axes) - 2
            ):
                labels = metrics.instances_from_probability(
                    outputs[0], cfg.threshold, cfg.instance.method, cfg.instance.min_size
                )
                write_image(
                    labels_path(opath),
                    labels,
                    axes=out_axes,
                    pixel_size=read_pixel_size(path),
                    provenance=labels_provenance(prov, cfg.instance, cfg.threshold),
                )
            if tpath is not None:
                target = read_target(tpath, outputs[0].shape, model_axes)
                for run, out in zip(record.runs, outputs, strict=True):
                    run.metrics = score(task, out, target, cfg.threshold, cfg.instance)
            if len(outputs) == 2:
                a, b = _finite(outputs[0], outputs[1])  # without the marked outputs of filled inputs
                record.agreement = {
                    "pearson": metrics.pearson(a, b),
                    "relative_l2": metrics.relative_l2(a, b),
                }
                if manifest.output.packed:  # every output against the original's, by name
                    record.agreement = {
                        f"pearson {name}": metrics.pearson(*_finite(named[0][name], named[1][name]))
                        for name in named[0]
                    }
            records.append(record)
    finally:
        for e in engines:
            e.close()
        meter.close()
    return InferResult(records, task, threads)
