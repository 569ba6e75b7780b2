"""``efficientbioai infer``: an artifact directory + images → predictions, metrics, latency and energy."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai import metrics
from efficientbioai.config import BACKENDS, InferConfig, LocalizeConfig, ModelConfig
from efficientbioai.energy import (
    EnergyMeter,
    EnergyReading,
    energy_ratio_text,
    energy_summary,
    format_energy,
)
from efficientbioai.engines import Engine, OnnxRuntimeEngine, OpenVINOEngine, default_threads
from efficientbioai.errors import ConfigError, EfficientBioAIError
from efficientbioai.infer.outofcore import fingerprint, output_layout, predict_to_output, use_out_of_core
from efficientbioai.infer.predict import Prediction, Predictor, split_pointwise
from efficientbioai.io import (
    ChunkedOutput,
    expand_paths,
    lazy_model_layout,
    output_path,
    read_axes,
    read_image,
    read_pixel_size,
    write_image,
)
from efficientbioai.localize import SampleLocalizer
from efficientbioai.manifest import read_manifest
from efficientbioai.models.base import sha256
from efficientbioai.report import table
from efficientbioai.tiling import check_tile_shape


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ engines


def verify_artifact(directory: Path, manifest: dict[str, Any], prefix: str) -> None:
    """Check the checksums of the artifact's files under ``prefix`` against the manifest."""
    for rel, digest in manifest.get("files", {}).items():
        if not rel.startswith(prefix):
            continue
        path = directory / rel
        if not path.is_file():
            raise EfficientBioAIError(
                f"{path} is listed in the manifest but missing", "re-run `efficientbioai compress`"
            )
        if sha256(path) != digest:
            raise EfficientBioAIError(
                f"{path} was changed after `efficientbioai compress` wrote it (checksum differs)",
                "re-run `efficientbioai compress` to rebuild the artifact",
            )


def open_engine(
    directory: Path,
    manifest: dict[str, Any],
    backend: str | None,
    threads: int,
    hint: str = "THROUGHPUT",
    **gpu_options: Any,
) -> Engine:
    """The artifact's engine for ``backend`` (default: its primary engine).

    The GPU backends (:mod:`efficientbioai.infer.gpu`) take ``gpu_options``. OpenVINO compiles with the
    THROUGHPUT hint by default: whole-image inference keeps several requests
    in flight. On an idle 2-core CPU neither hint wins consistently (benchmarks/infer_cpu.py), but
    THROUGHPUT slowed down far less when other processes competed for the cores.
    """
    engines = manifest["engines"]
    backend = backend or engines["primary"]["backend"]
    from efficientbioai.infer.gpu import GPU_BACKENDS, open_gpu_engine

    if backend in GPU_BACKENDS:  # gpu_options: gpu (GpuConfig), tile_shape, batch_size, quiet
        return open_gpu_engine(directory, manifest, backend, threads, **gpu_options)
    if backend == "openvino":
        if "openvino" not in engines:
            raise ConfigError(
                f"backend: {directory} has no OpenVINO engine (built: {', '.join(k for k in engines if k != 'primary')})",
                "compress with export.targets: [openvino], or use backend: onnxruntime",
            )
        verify_artifact(directory, manifest, "openvino/")
        ov = engines["openvino"]
        precision = manifest["precision"] if manifest["precision"] == "int8" else ov["requested_precision"]
        engine = OpenVINOEngine(
            directory / ov["path"], precision, threads, ov.get("device", "CPU"), hint=hint
        )
        engine.label = f"openvino {manifest['precision']}"
        return engine
    if backend == "onnxruntime":
        verify_artifact(directory, manifest, "model.onnx")
        engine = OnnxRuntimeEngine(directory / engines["onnx"]["path"], threads)
        engine.label = "onnxruntime fp32"
        return engine
    if backend == "torch":
        return open_original(manifest, threads)
    raise ConfigError(f"backend: unknown backend '{backend}'", f"use one of {', '.join(BACKENDS)}")


def open_original(manifest: dict[str, Any], threads: int) -> Engine:
    """The original model, re-loaded from where `compress` found it (PyTorch fp32, or ONNX Runtime)."""
    from efficientbioai.engines import reference_engine
    from efficientbioai.models import load_model

    spec = manifest["model"].get("config")
    if spec is None:
        raise EfficientBioAIError(
            "the manifest does not say how to load the original model (written by an older version)",
            "re-run `efficientbioai compress`, or set compare_with_original: false",
        )
    try:
        _, loaded = load_model(ModelConfig.model_validate(spec))
    except Exception as exc:
        problem = getattr(exc, "problem", str(exc))
        raise EfficientBioAIError(
            f"the original model could not be loaded from {spec.get('path') or spec.get('factory') or spec.get('name')}: {problem}",
            "keep the original model where `compress` found it, or set compare_with_original: false",
        ) from exc
    engine = reference_engine(loaded, threads)
    engine.label = f"{engine.backend} fp32 (original)"
    return engine


# ------------------------------------------------------------------------------------------- images


def model_layout(image, axes: str | None, model_axes: str, source: str):
    """(C, *spatial) without loading lazily-read arrays (see :func:`~efficientbioai.io.lazy_model_layout`)."""
    return lazy_model_layout(image, axes, model_axes, source)


def split_batch(image, axes: str | None, source: str) -> list:
    """An image with a batch axis ('b' in the axes) as a list of samples, else ``[image]``."""
    if not axes or "b" not in axes:
        return [image]
    arr = np.asarray(image)
    return [np.take(arr, i, axis=axes.index("b")) for i in range(arr.shape[axes.index("b")])]


# ------------------------------------------------------------------------------------------ results


@dataclass
class RunRecord:
    """One engine on one image."""

    engine: str
    seconds: float | None
    voxels: int
    energy: EnergyReading | None
    tiles: int = 0
    skipped: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    skipped_fraction: float | None = None  # voxels no engine computed (background value), of all voxels

    def as_dict(self) -> dict[str, Any]:
        e = self.energy
        return {
            "engine": self.engine,
            "seconds": self.seconds,
            "voxels_per_second": self.voxels / self.seconds if self.seconds else None,
            "energy_joules": e.joules if e else None,
            "energy_method": e.method if e else None,
            "tiles": self.tiles,
            "skipped_tiles": self.skipped,
            "skipped_voxel_fraction": self.skipped_fraction,
            "metrics": self.metrics,
        }


@dataclass
class ImageRecord:
    input: Path
    output: Path
    shape: tuple[int, ...]
    status: str  # "done" | "exists"
    runs: list[RunRecord] = field(default_factory=list)
    agreement: dict[str, float] = field(default_factory=dict)


@dataclass
class InferResult:
    images: list[ImageRecord]
    task: str | None
    threads: int

    def table(self) -> str:
        metric_names: list[str] = []
        for im in self.images:
            for r in im.runs:
                metric_names += [k for k in r.metrics if k not in metric_names]
        skipping = any(r.skipped for im in self.images for r in im.runs)
        header = [
            "image",
            "engine",
            "latency",
            "Mvoxel/s",
            "energy",
            "tiles (skipped)",
            *(["voxels skipped"] if skipping else []),
            *metric_names,
        ]
        rows = []
        totals: dict[str, list[float]] = {}
        for im in self.images:
            for r in im.runs:
                rows.append(
                    [
                        im.input.name,
                        r.engine,
                        f"{r.seconds:.2f} s" if r.seconds is not None else "exists",
                        f"{r.voxels / r.seconds / 1e6:.2f}" if r.seconds else "-",
                        format_energy(r.energy) if r.energy else "-",
                        f"{r.tiles} ({r.skipped})" if r.tiles else "-",
                        *([_percent(r.skipped_fraction)] if skipping else []),
                        *[f"{r.metrics[k]:.4f}" if k in r.metrics else "-" for k in metric_names],
                    ]
                )
                if r.seconds is not None:
                    t = totals.setdefault(r.engine, [0.0, 0.0, 0.0, 0])
                    t[0] += r.seconds
                    t[1] += r.voxels
                    t[2] += r.energy.joules if r.energy and r.energy.joules is not None else float("nan")
                    t[3] += 1
        if len(self.images) > 1:
            for name, (sec, vox, joules, n) in totals.items():
                rows.append(
                    [
                        f"total ({n} image{'s' if n > 1 else ''})",
                        name,
                        f"{sec:.2f} s",
                        f"{vox / sec / 1e6:.2f}",
                        "-" if np.isnan(joules) else f"{joules:.1f} J",
                        "",
                        *([""] if skipping else []),
                        *[""] * len(metric_names),
                    ]
                )
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        out = [table(header, rows, title=f"inference ({threads}; latency = whole image, tiles to stitched)")]
        note = energy_note([r.energy for im in self.images for r in im.runs])
        if note:
            out.append(note)
        speed = self.speedup()
        if speed:
            out.append(speed)
        for im in self.images:
            if im.agreement:
                out.append(
                    f"{im.input.name}: engine vs original on the whole image: "
                    + ", ".join(f"{k} {v:.5g}" for k, v in im.agreement.items())
                )
        return "\n".join(out)

    def speedup(self) -> str | None:
        """'x× faster (what was compared), y× less energy (how it was obtained)' when the original ran too."""
        pairs = [(im.runs[0], im.runs[1]) for im in self.images if len(im.runs) == 2 and im.runs[0].seconds]
        if not pairs:
            return None
        eng = sum(a.seconds for a, _ in pairs)
        orig = sum(b.seconds for _, b in pairs)
        n = len(pairs)
        text = (
            f"{pairs[0][0].engine} is {orig / eng:.2f}x faster than {pairs[0][1].engine} "
            f"(whole image{'s' if n > 1 else ''}: tiles read to stitched output, pre/post-processing "
            f"included; {self.threads} thread{'s' if self.threads != 1 else ''}; after one untimed warm-up; "
            f"one timed run per image, not a median)"
        )
        ej = [a.energy.joules for a, _ in pairs if a.energy and a.energy.joules]
        oj = [b.energy.joules for _, b in pairs if b.energy and b.energy.joules]
        if len(ej) == len(oj) == len(pairs):
            e = pairs[0][0].energy
            text += " and " + energy_ratio_text(sum(oj) / sum(ej), e.method, e.details)
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "threads": self.threads,
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


# ----------------------------------------------------------------------------------------- pipeline


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


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.1%}"


def energy_note(readings: list[EnergyReading | None]) -> str | None:
    """'energy: <how it was obtained> — <sources>' for the readings that have a figure."""
    return energy_summary(readings)


def _predictor(cfg: InferConfig, manifest: dict[str, Any], engine: Engine) -> Predictor:
    inp = manifest["input"]
    ndim = len(inp["axes"]) - 2
    tile = cfg.tiling.tile_shape or manifest["calibration"]["tile_shape"]
    tile = check_tile_shape(
        tile, inp.get("tile_min") or [1] * ndim, inp.get("tile_step") or [1] * ndim, "tiling.tile_shape"
    )
    return Predictor(
        engine=engine,
        axes=inp["axes"],
        out_channels=manifest["output"]["channels"],
        tile_shape=tile,
        tile_min=inp.get("tile_min"),
        tile_step=inp.get("tile_step"),
        halo=inp.get("halo"),
        pre=inp.get("preprocessing") or [],
        post=manifest["output"].get("postprocessing") or [],
        overlap=cfg.tiling.overlap,
        blend=cfg.tiling.blend,
        batch_size=cfg.tiling.batch_size,
        skip_background=cfg.tiling.background.skip,
        background_threshold=cfg.tiling.background.threshold,
        localizer=sample_localizer(cfg.tiling.localize),
    )


def sample_localizer(cfg: LocalizeConfig) -> SampleLocalizer | None:
    """The ``tiling.localize`` options as a :class:`SampleLocalizer` (``None`` when disabled)."""
    if not cfg.enabled:
        return None
    return SampleLocalizer(
        downsample=None if cfg.downsample == "auto" else cfg.downsample,
        sigma=cfg.sigma,
        min_size=cfg.min_size,
        margin=None if cfg.margin == "auto" else cfg.margin,
        region=cfg.region,
        invert=cfg.invert,
        value=cfg.value,
    )


def localization_note(pred: Prediction) -> str:
    """One line on what sample localisation found in an image."""
    loc = pred.localization
    if not loc.found:
        return "sample localisation found no foreground; the whole image was run"
    return (
        f"sample in {len(loc.regions)} region(s) (downsampled {'x'.join(map(str, loc.factor))}, Otsu "
        f"threshold {loc.threshold:.4g}); {pred.skipped} of {pred.tiles} tiles skipped, "
        f"{pred.skipped_fraction:.1%} of the voxels hold the background value"
    )


def _read_target(path: Path, shape: tuple[int, ...], model_axes: str) -> np.ndarray:
    target = np.asarray(read_image(path))
    spatial = shape[-(len(model_axes) - 2) :]
    if target.shape != tuple(shape) and target.squeeze().shape != tuple(s for s in shape if s != 1):
        raise EfficientBioAIError(
            f"targets: {path} has shape {target.shape} but its image's prediction has shape {tuple(shape)} "
            f"(spatial {tuple(spatial)})",
            "targets must match their images pixel for pixel, in the same sorted order as the inputs",
        )
    return target.reshape(shape) if target.size == int(np.prod(shape)) else target


def _metrics(cfg: InferConfig, task: str | None, pred: np.ndarray, target: np.ndarray | None) -> dict:
    if target is None or task is None:
        return {}
    return metrics.task_metrics(
        task, pred, target, threshold=cfg.threshold, instance_method=cfg.instance.method
    )


def _squeeze_channel(x: np.ndarray) -> np.ndarray:
    return x[0] if x.shape[0] == 1 else x


def labels_path(output: Path) -> Path:
    """Where the label image of ``output`` goes: ``<stem>_labels`` with the output's suffix."""
    name = output.name
    for suffix in (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".zarr"):
        if name.lower().endswith(suffix):
            return output.with_name(name[: -len(suffix)] + "_labels" + name[-len(suffix) :])
    return output.with_name(name + "_labels")


def _wants_labels(cfg: InferConfig, task: str | None, several: bool = False) -> bool:
    """Whether to write labels (``instance.write_labels`` with task instance); ``several``: the prediction
    has channel or sample axes, which is an error then."""
    if not (cfg.instance.write_labels and task == "instance"):
        return False
    if several:
        raise ConfigError(
            "instance.write_labels: labels are made from one foreground channel of one image, but this "
            "prediction has several channels or samples",
            "set instance.write_labels: false, or give single-channel, single-sample images",
        )
    return True


def _write_labels_blockwise(cfg: InferConfig, out: ChunkedOutput, layout, regions, client=None) -> None:
    """Label the prediction in ``out``'s store block by block into ``labels_path(out.path)``."""
    from efficientbioai.infer.labels import label_blocks

    spatial = layout.shape
    labels = ChunkedOutput(
        labels_path(out.path),
        spatial,
        np.int32,
        axes=layout.axes,
        chunks=layout.chunks,
        fingerprint=out.fingerprint + "-labels",
        pixel_size=out.metadata.get("pixel_size"),
    )
    label_blocks(
        out.store,
        labels.store,
        regions,
        threshold=cfg.threshold,
        method=cfg.instance.method,
        min_size=cfg.instance.min_size,
        client=client,
    )
    labels.commit()


def _open_samples(path: Path, cfg: InferConfig, manifest: dict[str, Any]):
    """(raw array, axes, [(C, *spatial) samples]) of one input, read lazily where possible."""
    model_axes = manifest["input"]["axes"]
    raw = read_image(path)
    axes = cfg.axes or read_axes(path)
    samples = split_batch(raw, axes, str(path))
    sample_axes = axes.replace("b", "") if axes else None
    images = [model_layout(s, sample_axes, model_axes, f"input: {path}") for s in samples]
    for im in images:
        if im.shape[0] != manifest["input"]["channels"]:
            raise EfficientBioAIError(
                f"input: {path} has {im.shape[0]} channel(s) (axes '{sample_axes or 'inferred'}') but "
                f"the model takes {manifest['input']['channels']}",
                "set `axes:` so that the channel axis is named 'c' (e.g. axes: cyx or yxc)",
            )
    return raw, axes, images


def _infer_distributed(
    cfg: InferConfig,
    directory: Path,
    manifest: dict[str, Any],
    files: list[Path],
    targets: list[Path | None],
    out_paths: list[Path],
    predictor: Predictor,
    quiet: bool,
) -> list[ImageRecord]:
    """Every block of every image as one Dask task stream (see :mod:`efficientbioai.infer.distributed`)."""
    from dask.distributed import as_completed

    from efficientbioai.infer.distributed import (
        BlockJob,
        blocks,
        check_block,
        close_client,
        run_block,
        start_client,
    )

    dcfg = cfg.distributed
    model_axes = manifest["input"]["axes"]
    out_channels = manifest["output"]["channels"]
    band_bytes = int(cfg.tiling.band_memory_mb * 2**20)
    task = (
        cfg.task or (manifest.get("fidelity") or {}).get("task") or ("restoration" if cfg.targets else None)
    )
    records: list[ImageRecord] = []
    pending: dict[int, dict[str, Any]] = {}  # image number → its output, blocks and record
    jobs: list[tuple[int, tuple[int, int], BlockJob]] = []
    for k, (path, opath) in enumerate(zip(files, out_paths, strict=True)):
        raw, axes, images = _open_samples(path, cfg, manifest)
        spatial = tuple(images[0].shape[1:])
        voxels = int(np.prod(spatial)) * len(images)
        record = ImageRecord(path, opath, tuple(raw.shape), "done")
        records.append(record)
        if opath.exists() and not cfg.overwrite:
            _log(
                f"[{k + 1}/{len(files)}] {path.name}: {opath} exists, skipped (overwrite: true recomputes)",
                quiet,
            )
            record.status = "exists"
            record.runs.append(RunRecord(predictor.engine.label, None, voxels, None))
            continue
        whole_post = split_pointwise(predictor.post)[1]
        if whole_post:
            raise ConfigError(
                "distributed: the model's post-processing needs whole-image statistics "
                f"({', '.join(s['id'] for s in whole_post)})",
                "remove the distributed section",
            )
        grid = predictor.grid(spatial)
        block = check_block(dcfg.block_shape, spatial, grid.inner)
        layout = output_layout(spatial, model_axes, out_channels, len(images), grid.inner, band_bytes, block)
        out = ChunkedOutput(
            opath,
            layout.shape,
            np.float32,
            axes=layout.axes,
            chunks=layout.chunks,
            fingerprint=fingerprint(path, directory, predictor, ["distributed", block]),
            pixel_size=read_pixel_size(path),  # the input's pixel sizes carried over
        )
        regions = blocks(spatial, block)
        n_jobs = 0
        for i, im in enumerate(images):
            plan = predictor.plan(im)  # small: sent to every task of this sample
            done = out.done(i)
            for b, region in enumerate(regions):
                if b in done:
                    continue
                job = BlockJob(
                    cfg,
                    directory,
                    cfg.backend,
                    dcfg.engine_threads or dcfg.threads_per_worker,
                    path,
                    axes,
                    i,
                    plan,
                    out.store,
                    layout,
                    region,
                )
                jobs.append((k, (i, b), job))
                n_jobs += 1
        pending[k] = {
            "out": out,
            "left": n_jobs,
            "voxels": voxels,
            "record": record,
            "tpath": targets[k],
            "layout": layout,
            "regions": regions,
        }
        skipped = int(plan.skipped.sum()) * len(images)
        _log(
            f"[{k + 1}/{len(files)}] {path.name} {tuple(raw.shape)}: {n_jobs} block(s) of {list(block)}"
            + (f" ({len(regions) * len(images) - n_jobs} already written)" if out.resumed else ""),
            quiet,
        )
        pending[k]["tiles"], pending[k]["skipped"] = len(grid) * len(images), skipped

    if not pending:  # every output exists already
        return records
    client, cluster = start_client(dcfg, quiet)
    t_start = last = time.perf_counter()
    busy = 0.0
    try:
        futures = {}
        for k, unit, job in jobs:
            fut = client.submit(run_block, job, pure=False)
            futures[fut] = (k, unit)

        def commit(k: int) -> None:
            nonlocal last
            item = pending.pop(k)
            if _wants_labels(cfg, task, bool(item["layout"].lead)):
                _write_labels_blockwise(cfg, item["out"], item["layout"], item["regions"], client)
            item["out"].commit()
            now = time.perf_counter()
            rec = item["record"]
            run = RunRecord(
                predictor.engine.label + f" (dask, {dcfg.n_workers} workers)",
                now - last,  # wall time since the previous output was finished: sums to the stream's
                item["voxels"],
                None,
                tiles=item["tiles"],
                skipped=item["skipped"],
            )
            last = now
            rec.runs.append(run)
            if item["tpath"] is not None:
                written = np.asarray(read_image(rec.output), np.float32)
                run.metrics = _metrics(
                    cfg, task, written, _read_target(item["tpath"], written.shape, model_axes)
                )

        for k in [k for k, item in pending.items() if item["left"] == 0]:
            commit(k)
        for fut in as_completed(list(futures)):
            k, unit = futures.pop(fut)
            busy += fut.result()["seconds"]  # a failed block raises here; finished ones stay recorded
            item = pending[k]
            item["out"].mark(*unit)  # (sample, block): a rerun skips it
            item["left"] -= 1
            if item["left"] == 0:
                commit(k)
    finally:
        close_client(client, cluster)
    _log(
        f"distributed: {len(jobs)} block task(s) in {time.perf_counter() - t_start:.2f} s wall; "
        f"the tasks ran {busy:.2f} s in all (engine loading included)",
        quiet,
    )
    return records


def infer(cfg: InferConfig, *, quiet: bool = False) -> InferResult:
    """Run the artifact's engine (and, if asked, the original model) over every input image."""
    from tqdm.auto import tqdm

    directory = cfg.model.expanduser().resolve()
    manifest = read_manifest(directory)
    if manifest["model"].get("kind") == "cellpose":  # cellpose tiles and makes the masks itself
        from efficientbioai.cellpose.infer import infer_cellpose

        return infer_cellpose(cfg, directory, manifest, quiet=quiet)
    model_axes = manifest["input"]["axes"]
    files = expand_paths(cfg.input, "input")
    targets = target_files(cfg, len(files))
    threads = cfg.threads or default_threads()
    task = (
        cfg.task or (manifest.get("fidelity") or {}).get("task") or ("restoration" if cfg.targets else None)
    )
    if cfg.targets is not None and task is None:
        task = "restoration"
    out_paths = output_paths(cfg, files)

    if cfg.distributed is not None and cfg.compare_with_original:
        raise ConfigError(
            "distributed: cannot be combined with compare_with_original (the comparison holds both whole "
            "outputs in memory on one machine)",
            "set compare_with_original: false, or remove the distributed section",
        )
    from efficientbioai.infer.gpu import GPU_BACKENDS, choose_backend, nvml_index

    backend, why = choose_backend(manifest, cfg.backend)
    _log(f"loading engine from {directory}: {backend} ({why})", quiet)
    engines: list[Engine] = [
        open_engine(
            directory,
            manifest,
            backend,
            threads,
            gpu=cfg.gpu,
            tile_shape=tuple(cfg.tiling.tile_shape or manifest["calibration"]["tile_shape"]),
            batch_size=cfg.tiling.batch_size,
            quiet=quiet,
        )
    ]
    if cfg.compare_with_original and backend != "torch":
        _log("loading the original model for comparison", quiet)
        engines.append(open_original(manifest, threads))
    predictors = [_predictor(cfg, manifest, e) for e in engines]
    on_gpu = backend in GPU_BACKENDS
    meter = EnergyMeter(enabled=cfg.energy, gpu_index=nvml_index(cfg.gpu.index) if on_gpu else None)
    band_bytes = int(cfg.tiling.band_memory_mb * 2**20)
    records: list[ImageRecord] = []
    warmed = set()
    if cfg.distributed is not None:
        try:
            records = _infer_distributed(
                cfg, directory, manifest, files, targets, out_paths, predictors[0], quiet
            )
        finally:
            engines[0].close()
            meter.close()
        return InferResult(records, task, threads)
    try:
        for k, (path, tpath, opath) in enumerate(zip(files, targets, out_paths, strict=True)):
            raw, _, images = _open_samples(path, cfg, manifest)
            spatial = tuple(images[0].shape[1:])
            voxels = int(np.prod(spatial)) * len(images)
            record = ImageRecord(path, opath, tuple(raw.shape), "done")
            if opath.exists() and not cfg.overwrite:
                _log(
                    f"[{k + 1}/{len(files)}] {path.name}: {opath} exists, skipped (overwrite: true recomputes)",
                    quiet,
                )
                record.status = "exists"
                existing = np.asarray(read_image(opath), np.float32)
                target = _read_target(tpath, existing.shape, model_axes) if tpath else None
                record.runs.append(
                    RunRecord(
                        engines[0].label, None, voxels, None, metrics=_metrics(cfg, task, existing, target)
                    )
                )
                records.append(record)
                continue
            _log(f"[{k + 1}/{len(files)}] {path.name} {tuple(raw.shape)}", quiet)
            out_channels = manifest["output"]["channels"]
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
                    spatial, model_axes, out_channels, len(images), predictor.grid(spatial).inner, band_bytes
                )
                out = ChunkedOutput(
                    opath,
                    layout.shape,
                    np.float32,
                    axes=layout.axes,
                    chunks=layout.chunks,
                    fingerprint=fingerprint(path, directory, predictor),
                    pixel_size=read_pixel_size(path),  # the input's pixel sizes carried over
                )
                _log(
                    f"  out of core: chunks of {layout.slab} plane(s) along the first axis written to "
                    f"{out.store.name} as they complete",
                    quiet,
                )
                if out.resumed:
                    _log(
                        f"  resuming {opath.name}: {sum(map(len, out._done.values()))} chunk slab(s) done",
                        quiet,
                    )
                with (
                    meter.measure() as m,
                    tqdm(
                        desc=f"{path.name} · {engines[0].label} (out of core)",
                        unit="tile",
                        disable=quiet,
                        leave=False,
                    ) as bar,
                ):
                    preds = predict_to_output(predictor, images, out, layout, progress=bar)
                if _wants_labels(cfg, task, bool(layout.lead)):
                    from efficientbioai.infer.distributed import blocks

                    slabs = blocks(spatial, (layout.slab, *spatial[1:]))
                    _write_labels_blockwise(cfg, out, layout, slabs)
                out.commit()
                run = RunRecord(
                    engines[0].label,
                    sum(p.seconds for p in preds),
                    voxels,
                    m.reading,
                    tiles=sum(p.tiles for p in preds),
                    skipped=sum(p.skipped for p in preds),
                    skipped_fraction=sum(p.skipped_fraction for p in preds) / len(preds),
                )
                for p in preds:
                    if p.localization is not None:
                        _log(f"  {path.name}: {localization_note(p)}", quiet)
                record.runs.append(run)
                if tpath is not None:
                    written = np.asarray(read_image(opath), np.float32)
                    run.metrics = _metrics(cfg, task, written, _read_target(tpath, written.shape, model_axes))
                records.append(record)
                continue
            outputs = []
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
            out_axes = ("b" if len(images) > 1 else "") + (
                ("c" if outputs[0].ndim > len(model_axes) - 2 + (len(images) > 1) else "") + model_axes[2:]
            )
            write_image(  # no b in TIFF/OME axes; the input's pixel sizes carried over
                opath,
                outputs[0],
                axes=None if "b" in out_axes else out_axes,
                pixel_size=read_pixel_size(path),
            )
            if _wants_labels(cfg, task, several=outputs[0].ndim != len(model_axes) - 2):
                labels = metrics.instances_from_probability(
                    outputs[0], cfg.threshold, cfg.instance.method, cfg.instance.min_size
                )
                write_image(labels_path(opath), labels, axes=out_axes, pixel_size=read_pixel_size(path))
            if tpath is not None:
                target = _read_target(tpath, outputs[0].shape, model_axes)
                for run, out in zip(record.runs, outputs, strict=True):
                    run.metrics = _metrics(cfg, task, out, target)
            if len(outputs) == 2:
                record.agreement = {
                    "pearson": metrics.pearson(outputs[0], outputs[1]),
                    "relative_l2": metrics.relative_l2(outputs[0], outputs[1]),
                }
            records.append(record)
    finally:
        for e in engines:
            e.close()
        meter.close()
    return InferResult(records, task, threads)
