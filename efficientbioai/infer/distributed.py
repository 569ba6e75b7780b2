"""`infer` on a Dask cluster: blocks of every output are independent tasks in one task stream.

Each image's output (a :class:`~efficientbioai.io.ChunkedOutput` zarr store under a temporary name) is cut
into blocks of whole chunks. A task predicts one block: it runs the tiles of the image's *global* tile grid
that touch the block (so a tile that straddles two blocks is run by both, and blending at block edges is
exactly that of a single process) into a :class:`~efficientbioai.infer.merge.RegionMerger`, and writes the
block straight into the store. The client only sends small task descriptions (paths, settings, the
image's :class:`~efficientbioai.infer.predict.Plan`) and receives a few numbers back; each worker opens the
artifact's engine once (cached per worker thread) and reads its input lazily. The client records finished
blocks, so an interrupted run resumes where it stopped; an output is committed (renamed into place, or
converted to TIFF) when all its blocks are written.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from efficientbioai.config import JOBQUEUE_CLUSTERS, DistributedConfig, InferConfig
from efficientbioai.errors import ConfigError, EfficientBioAIError
from efficientbioai.infer.merge import RegionMerger
from efficientbioai.infer.outofcore import OutputLayout
from efficientbioai.infer.predict import Plan

if TYPE_CHECKING:
    from efficientbioai.artifact import Manifest
    from efficientbioai.infer.predict import Predictor
    from efficientbioai.infer.results import ImageRecord

# default voxels per block (256 MiB of float32 output): big enough that the tiles run twice at block
# edges are a modest share, small enough for a worker's memory
BLOCK_VOXELS = 1 << 26


# ------------------------------------------------------------------------------------------- cluster


def start_client(dcfg: DistributedConfig, quiet: bool = True):
    """A ``dask.distributed.Client`` for the configured scheduler, and the cluster it started (or None).

    ``local``: a LocalCluster with ``n_workers`` × ``threads_per_worker`` (no dashboard). An address:
    that running scheduler. ``slurm``/``pbs``/``lsf``/...: the dask-jobqueue cluster class with
    ``cluster_kwargs``, scaled to ``n_workers`` workers.
    """
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise EfficientBioAIError(
            "distributed: dask.distributed is not installed", 'pip install "dask[distributed]"'
        ) from exc
    scheduler = dcfg.scheduler
    if scheduler == "local":
        cluster = LocalCluster(
            n_workers=dcfg.n_workers,
            threads_per_worker=dcfg.threads_per_worker,
            processes=dcfg.processes,
            dashboard_address=None,
            silence_logs=50 if quiet else 30,
        )
        return Client(cluster), cluster
    if scheduler in JOBQUEUE_CLUSTERS:
        try:
            import dask_jobqueue
        except ImportError as exc:
            raise EfficientBioAIError(
                f"distributed.scheduler: {scheduler} needs dask-jobqueue, which is not installed",
                'pip install "efficientbioai[cluster]"',
            ) from exc
        cls = getattr(dask_jobqueue, JOBQUEUE_CLUSTERS[scheduler])
        try:
            cluster = cls(**dcfg.cluster_kwargs)
        except Exception as exc:
            raise ConfigError(
                f"distributed.cluster_kwargs: {JOBQUEUE_CLUSTERS[scheduler]} refused them "
                f"({type(exc).__name__}: {exc})",
                "give the keyword arguments dask-jobqueue documents for it (e.g. cores, memory, queue)",
            ) from exc
        cluster.scale(dcfg.n_workers)
        return Client(cluster), cluster
    try:
        return Client(scheduler, timeout="30s"), None
    except Exception as exc:
        raise EfficientBioAIError(
            f"distributed.scheduler: no Dask scheduler answered at {scheduler} ({type(exc).__name__}: {exc})",
            "start one (`dask scheduler`) and give its address, or use scheduler: local",
        ) from exc


# -------------------------------------------------------------------------------------------- blocks


def default_block(spatial: Sequence[int], inner: Sequence[int] | None = None) -> tuple[int, ...]:
    """About :data:`BLOCK_VOXELS` voxels, shaped like the tiles' inner region (``inner``): the tiles run
    twice at a block edge are about one tile thick whatever the axis, so proportional blocks waste least.
    Sizes are multiples of 16 (of the tile where larger) and at most the image's."""
    inner = [int(i) for i in (inner or [1] * len(spatial))]
    scale = (BLOCK_VOXELS / float(np.prod(inner))) ** (1 / len(spatial))
    out = []
    for n, i in zip(spatial, inner, strict=True):
        unit = 16 if i < 16 else i
        out.append(int(min(n, max(unit, unit * round(scale * i / unit)))))
    return tuple(out)


def check_block(
    block: Sequence[int] | None, spatial: Sequence[int], inner: Sequence[int] | None = None
) -> tuple[int, ...]:
    if block is None:
        return default_block(spatial, inner)
    if len(block) != len(spatial):
        raise ConfigError(
            f"distributed.block_shape: {list(block)} has {len(block)} values for {len(spatial)}D images",
            f"give {len(spatial)} values, e.g. {list(default_block(spatial))}",
        )
    return tuple(min(int(b), int(n)) for b, n in zip(block, spatial, strict=True))


def check_packed_blocks(
    spec: Any, block: Sequence[int], spatial: Sequence[int], align: Sequence[int] | None
) -> None:
    """Blocks of a network with several outputs (or one at another scale) must map to whole chunks of
    every output's store, so that no two workers write into one chunk."""
    for rec in spec.outputs:
        if any(rec["offset"]):
            raise ConfigError(
                f"distributed: output '{rec['name']}' is smaller than the input by a border "
                f"({rec['offset']} pixels), so the blocks of the input do not fall on whole chunks of it",
                "remove the distributed section (out of core on one machine writes it: tiling.out_of_core)",
            )
    for axis, (b, n, a) in enumerate(zip(block, spatial, align or [1] * len(block), strict=True)):
        if a > 1 and b < n and b % a:
            raise ConfigError(
                f"distributed.block_shape: {list(block)} along spatial axis {axis} is not a multiple of {a}, "
                f"which an output at 1/{a} of the input's scale needs",
                f"use a block shape that is a multiple of {a} along that axis",
            )


def blocks(spatial: Sequence[int], block: Sequence[int]) -> list[tuple[slice, ...]]:
    """The blocks of an image, in C order of their corners."""
    ranges = [range(0, n, b) for n, b in zip(spatial, block, strict=True)]
    return [
        tuple(slice(c, min(c + b, n)) for c, b, n in zip(corner, block, spatial, strict=True))
        for corner in itertools.product(*ranges)
    ]


@dataclass(frozen=True)
class BlockJob:
    """Everything a worker needs to predict one block (small: no image data)."""

    cfg: InferConfig
    artifact: Path
    backend: str | None
    engine_threads: int
    image: Path
    axes: str | None
    sample: int
    plan: Plan
    store: Path
    layout: OutputLayout
    region: tuple[slice, ...]
    # several outputs (or one at another scale): (store, layout, record) per output, and the input's
    # spatial shape; each block is cut into every output's store (efficientbioai.infer.outofcore.PackedStores)
    outputs: tuple = ()
    spatial: tuple[int, ...] = ()
    # nonfinite: fill, for an image that holds NaN / inf: the value they are read as (their outputs NaN)
    fill: float | None = None


_LOCAL = threading.local()


def _worker_engine(job: BlockJob):
    """The artifact's engine and predictor, opened once per worker thread and kept."""
    from efficientbioai.artifact import Artifact
    from efficientbioai.infer.predict import Predictor

    cache = getattr(_LOCAL, "engines", None)
    if cache is None:
        cache = _LOCAL.engines = {}
    key = (str(job.artifact), job.backend, job.engine_threads, job.cfg.tiling.model_dump_json())
    if key not in cache:
        artifact = Artifact(job.artifact)
        engine = artifact.open_engine(job.backend, job.engine_threads)
        cache[key] = (
            engine,
            Predictor.from_artifact(artifact.manifest, engine, job.cfg.tiling),
            artifact.manifest,
        )
    return cache[key]


def _worker_image(job: BlockJob, model_input, tile_shape):
    """The (C, *spatial) sample of the job's image, opened lazily and kept for the next blocks."""
    from efficientbioai.infer.images import open_samples, read_cache_bytes
    from efficientbioai.nonfinite import Filled

    cache = getattr(_LOCAL, "images", None)
    if cache is None:
        cache = _LOCAL.images = {}
    key = (str(job.image), job.axes, job.sample)
    if key not in cache:
        cache.clear()  # one image at a time per thread: tasks of one image run together
        image = open_samples(job.image, job.axes, model_input, read_cache_bytes(job.cfg), tile_shape)[2][
            job.sample
        ]
        if job.fill is not None:  # read and marked as the driver's plan saw it
            image = Filled(image, job.fill)
        cache[key] = image
    return cache[key]


def run_block(job: BlockJob) -> dict[str, Any]:
    """Predict one block into the output store (runs on a worker); returns a few numbers."""
    import zarr

    t0 = time.perf_counter()
    _, predictor, manifest = _worker_engine(job)
    image = _worker_image(job, manifest.input, predictor.tile_shape)
    if job.outputs:
        from efficientbioai.infer.outofcore import packed_sink

        targets = [
            (zarr.open_array(store=str(store), path="0", mode="r+"), layout, rec)
            for store, layout, rec in job.outputs
        ]
        sink = packed_sink(targets, job.spatial, job.sample)
    else:
        sink = job.layout.sink(zarr.open_array(store=str(job.store), path="0", mode="r+"), job.sample)
    merger = RegionMerger(job.plan.grid, predictor.out_channels, job.region, predictor.blend, sink)
    pred = predictor(image, merger=merger, plan=job.plan)
    return {"seconds": time.perf_counter() - t0, "computed": pred.computed}


def close_client(client, cluster) -> None:
    try:
        client.close()
    finally:
        if cluster is not None:
            cluster.close()


# ------------------------------------------------------------------------------------------ stream


def infer_distributed(
    cfg: InferConfig,
    directory: Path,
    manifest: Manifest,
    files: list[Path],
    targets: list[Path | None],
    out_paths: list[Path],
    predictor: Predictor,
    quiet: bool = False,
    provenance: list[dict[str, Any]] | None = None,
    skips: list[bool] | None = None,
) -> list[ImageRecord]:
    """Every block of every image as one Dask task stream (see :mod:`efficientbioai.infer.distributed`).

    ``provenance`` and ``skips``: per input, what its outputs record and whether they exist already
    (:func:`efficientbioai.infer.provenance.plan_outputs`; computed here when not given)."""
    from dask.distributed import as_completed

    from efficientbioai import nonfinite
    from efficientbioai.infer.images import (
        cache_note,
        open_samples,
        output_files,
        read_cache_bytes,
        read_target,
    )
    from efficientbioai.infer.labels import wants_labels, write_labels_blockwise
    from efficientbioai.infer.outofcore import PackedStores, fill_value, fingerprint, output_layout
    from efficientbioai.infer.predict import split_pointwise
    from efficientbioai.infer.provenance import plan_outputs, predictor_settings
    from efficientbioai.infer.results import ImageRecord, RunRecord, score
    from efficientbioai.io import ChunkedOutput, read_image, read_pixel_size

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    dcfg = cfg.distributed
    model_axes = manifest.input.axes
    out_channels = manifest.output.channels
    band_bytes = int(cfg.tiling.band_memory_mb * 2**20)
    task = cfg.task or manifest.task or ("restoration" if cfg.targets else None)
    records: list[ImageRecord] = []
    pending: dict[int, dict[str, Any]] = {}  # image number → its output, blocks and record
    jobs: list[tuple[int, tuple[int, int], BlockJob]] = []
    if provenance is None or skips is None:
        provenance, skips = plan_outputs(
            files,
            [output_files(o, manifest.output) for o in out_paths],
            directory,
            manifest.model.name,
            predictor.engine.label,
            predictor_settings(predictor, cfg),
            cfg.overwrite,
        )
    for k, (path, opath) in enumerate(zip(files, out_paths, strict=True)):
        raw, axes, images = open_samples(
            path, cfg.axes, manifest.input, read_cache_bytes(cfg), predictor.tile_shape
        )
        if note := cache_note(raw):
            log(f"  {path.name}: {note}")
        spatial = tuple(images[0].shape[1:])
        voxels = int(np.prod(spatial)) * len(images)
        record = ImageRecord(path, opath, tuple(raw.shape), "done")
        records.append(record)
        written = output_files(opath, manifest.output)
        record.output = written[0]
        if skips[k]:
            log(
                f"[{k + 1}/{len(files)}] {path.name}: {written[0]} exists, skipped: written by this model with "
                "these settings (overwrite: true recomputes)"
            )
            record.status = "exists"
            record.runs.append(RunRecord(predictor.engine.label, None, voxels, None))
            continue
        images, filled = nonfinite.check(images, f"input: {path}", cfg.nonfinite, cfg.fill_value)
        prov = provenance[k]
        if filled:
            log(f"  {nonfinite.fill_note(path.name, filled, cfg.fill_value)}")
            prov = {**prov, "filled_nonfinite": filled}
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
            provenance=prov,
        )
        regions = blocks(spatial, block)
        stores = None
        if manifest.output.packed:
            check_packed_blocks(manifest.output, block, spatial, predictor.align)
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
        n_jobs = 0
        plans = [predictor.plan(im) for im in images]  # small: sent to every task of its sample
        background = float(np.asarray(out.create(fill_value(plans)).fill_value))  # before any task opens it
        if stores is not None:
            stores.create(background)
        for i, plan in enumerate(plans):
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
                    tuple(stores.targets()) if stores is not None else (),
                    spatial,
                    cfg.fill_value if filled else None,
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
            "stores": stores,
        }
        skipped = sum(int(p.skipped.sum()) for p in plans)
        log(
            f"[{k + 1}/{len(files)}] {path.name} {tuple(raw.shape)}: {n_jobs} block(s) of {list(block)}"
            + (f" ({len(regions) * len(images) - n_jobs} already written)" if out.resumed else "")
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
            if item["stores"] is not None:  # every output to its own file; the packed store held progress
                item["stores"].commit()
                item["out"].discard()
            else:
                if wants_labels(cfg.instance, task, bool(item["layout"].lead)):
                    write_labels_blockwise(
                        cfg.instance, cfg.threshold, item["out"], item["layout"], item["regions"], client
                    )
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
                target = read_target(item["tpath"], written.shape, model_axes)
                run.metrics = score(task, written, target, cfg.threshold, cfg.instance)

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
    log(
        f"distributed: {len(jobs)} block task(s) in {time.perf_counter() - t_start:.2f} s wall; "
        f"the tasks ran {busy:.2f} s in all (engine loading included)"
    )
    return records
