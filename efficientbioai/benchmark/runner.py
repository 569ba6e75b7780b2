"""``efficientbioai benchmark``: build every variant with ``compress``, time the original and each variant
over whole images with the ``infer`` machinery, score them, and write report.json / .md / .html.

How rows are measured (the same for every row):

* one process per row (:mod:`efficientbioai.benchmark.worker`), started before any timing: the engine
  (``open_engine`` / ``open_original``), the ``Predictor`` that ``infer`` would build, and the images loaded
  into memory; then one untimed tile call and ``runs.warmup`` untimed whole-image runs;
* timed runs are interleaved: repeat r runs every row once over every image, starting with a different
  row each repeat, and only one row computes at any moment — machine drift and background load fall on
  all rows alike;
* latency = one whole image, from the first tile read to the stitched output (GPU: synchronised);
* the same number of threads for every row (OpenVINO, PyTorch, OMP_NUM_THREADS);
* peak memory = the row process's peak RSS during a run (the kernel's high-water mark, reset before each
  run), and how much of it the run added on top of the RSS after set-up;
* energy from :class:`~efficientbioai.energy.EnergyMeter` inside the row's process, with its method.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from efficientbioai.artifact import Manifest
from efficientbioai.benchmark import environment
from efficientbioai.benchmark.assemble import build_report
from efficientbioai.benchmark.config import BenchmarkConfig, RunsConfig, variant_configs
from efficientbioai.benchmark.images import (
    ImageEntry,
    default_calibration,
    load_image,
    prepare_output,
    resolve_images,
)
from efficientbioai.benchmark.protocol import Worker, WorkerError, row_spec
from efficientbioai.benchmark.report import write_reports
from efficientbioai.benchmark.rows import Row, device_rows, resolve_devices
from efficientbioai.benchmark.scoring import score_rows
from efficientbioai.benchmark.training import train_model
from efficientbioai.config import CompressConfig, TilingConfig
from efficientbioai.engines import default_threads
from efficientbioai.errors import EfficientBioAIError


@dataclass
class BenchmarkResult:
    """What :func:`benchmark` wrote: the output folder, report.json's content and report.md's text."""

    output: Path
    report: dict[str, Any]
    markdown: str

    @property
    def files(self) -> dict[str, Path]:
        return {k: self.output / v for k, v in self.report["files"].items()}

    def table(self) -> str:
        return self.markdown


def benchmark(cfg: BenchmarkConfig, *, quiet: bool = False, source: str = "config") -> BenchmarkResult:
    """Run the whole benchmark described by ``cfg`` and write its reports into ``cfg.output``."""
    started = time.perf_counter()
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    threads = cfg.threads or default_threads()
    notes: list[str] = []
    env = environment.probe(threads)
    devices = resolve_devices(cfg.devices, env["gpu"], notes)
    out = prepare_output(cfg.output, cfg.overwrite)

    _log("[1/5] preparing images", quiet)
    images = resolve_images(cfg, out)
    variants = _variant_configs(cfg, out, source, threads, notes, quiet)
    prepare_seconds = time.perf_counter() - started

    compressed = _compress_variants(variants, quiet)
    rows = device_rows(compressed, devices, notes)
    first = next(r for r in compressed if r.status == "ok")
    tiling = _common_tiling(cfg.tiling, first.manifest)

    timing_started = time.perf_counter()
    _measure(rows, images, out, tiling, cfg.runs, cfg.energy, threads, quiet)
    for im in images:  # shapes in the model's layout, for the report
        im.shape = tuple(load_image(im.spec(), first.manifest.input.axes).shape)
    timing_seconds = time.perf_counter() - timing_started

    _log("[5/5] scoring and writing the reports", quiet)
    scores = score_rows(rows, images, out, cfg.task, cfg.threshold)
    seconds = {
        "total": time.perf_counter() - started,
        "prepare": prepare_seconds,
        "compress": sum(r.compress_seconds or 0.0 for r in compressed),
        "timing": timing_seconds,
    }
    report = build_report(cfg, tiling, env, devices, images, rows, scores, notes, threads, created, seconds)
    markdown = write_reports(report, out, images, cfg.panels)
    return BenchmarkResult(out, report, markdown)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _variant_configs(
    cfg: BenchmarkConfig, out: Path, source: str, threads: int, notes: list[str], quiet: bool
) -> list[tuple[str, CompressConfig]]:
    """Each variant's compress config, after writing the default calibration images and training the
    model when the config asks for it."""
    calibration = default_calibration(cfg, out, notes)
    model_override = None
    if cfg.train is not None:
        t = cfg.train
        _log(f"training {cfg.model.name or cfg.model.factory} on generated images ({t.steps} steps)", quiet)
        weights = train_model(
            cfg.model,
            cfg.task,
            cfg.generated()[0],
            t,
            cfg.tiling.tile_shape,
            out,
            threads=threads,
            quiet=quiet,
        )
        model_override = {"checkpoint": str(weights)}
        notes.append(
            f"model: trained for {t.steps} steps on {t.images} generated images "
            f"(seed {t.seed}) before the benchmark; weights in {weights.relative_to(out)}"
        )
    return variant_configs(cfg, out / "artifacts", source, model_override, calibration)


def _compress_variants(variants: list[tuple[str, CompressConfig]], quiet: bool) -> list[Row]:
    """One CPU row per variant, compressed; a variant that fails is a failed row, unless all fail."""
    from efficientbioai.compress import compress

    rows: list[Row] = []
    for k, (name, ccfg) in enumerate(variants):
        _log(f"[2/5] compressing variant {k + 1}/{len(variants)}: {name}", quiet)
        row = Row(name, name, "cpu", "variant", artifact=ccfg.output.expanduser().resolve())
        t0 = time.perf_counter()
        try:
            result = compress(ccfg, quiet=True)
            row.manifest = result.manifest
        except EfficientBioAIError as exc:
            row.status, row.error = (
                "failed",
                f"compress: {exc.problem}" + (f" ({exc.fix})" if exc.fix else ""),
            )
            _log(f"  {name}: failed: {exc.problem}", quiet)
        row.compress_seconds = time.perf_counter() - t0
        rows.append(row)
    if not any(r.status == "ok" for r in rows):
        raise EfficientBioAIError(
            "no variant could be compressed: " + "; ".join(f"{r.id}: {r.error}" for r in rows),
            "fix the variants' compress settings (try `efficientbioai compress` with one of them)",
        )
    return rows


def _common_tiling(tiling: TilingConfig, first: Manifest) -> dict[str, Any]:
    """Every row uses the same tiles: the configured shape, else the first variant's calibration tile."""
    out = tiling.model_dump(mode="json")
    if out["tile_shape"] is None:
        out["tile_shape"] = list(first.calibration.tile_shape)
    return out


def _measure(
    rows: list[Row],
    images: list[ImageEntry],
    out: Path,
    tiling: dict[str, Any],
    runs: RunsConfig,
    energy: bool,
    threads: int,
    quiet: bool,
) -> None:
    """Start every runnable row's process, wait until all are warm, then time them, interleaved; each
    row's ``ready`` and ``runs`` are filled in, and a row that fails is marked failed."""
    runnable = [r for r in rows if r.status == "ok"]
    _log(f"[3/5] starting {len(runnable)} rows (one process each) and warming up", quiet)
    try:
        for r in runnable:
            spec = row_spec(
                r.id,
                r.kind,
                r.device,
                r.precision,
                r.artifact,
                threads=threads,
                tiling=tiling,
                images=[im.spec() for im in images],
                energy=energy,
                warmup=runs.warmup,
                outputs=out / "outputs" / r.id,
            )
            r.worker = Worker(spec, out / "logs" / f"{r.id}.log", threads)
        runnable = _wait_until_ready(runnable, quiet)
        if not runnable:
            raise EfficientBioAIError(
                "no row could run: " + "; ".join(f"{r.id}: {r.error}" for r in rows if r.error),
                f"see the logs in {out / 'logs'}",
            )
        _log(
            f"[4/5] timing: {runs.repeats} run(s) per image and row, interleaved "
            f"({len(runnable)} rows × {len(images)} image(s))",
            quiet,
        )
        _time_rows(runnable, len(images), runs.repeats, quiet)
    finally:
        for r in rows:
            if r.worker is not None:
                r.worker.close()
                r.worker = None


def _wait_until_ready(rows: list[Row], quiet: bool) -> list[Row]:
    """The rows whose process loaded and warmed up; the others are marked failed (the CPU original's
    failure ends the benchmark: it is every CPU row's reference)."""
    for r in rows:
        try:
            r.ready = r.worker.answer()
        except WorkerError as exc:
            if r.id == "original":
                raise EfficientBioAIError(
                    f"the original model could not run: {exc.problem}", exc.fix
                ) from None
            r.status, r.error = "failed", f"inference: {exc.problem}"
            _log(f"  {r.id}: failed: {exc.problem}", quiet)
            r.worker.close()
            r.worker = None
    return [r for r in rows if r.status == "ok"]


def _time_rows(rows: list[Row], n_images: int, repeats: int, quiet: bool) -> None:
    """``repeats`` timed passes; each runs every row over every image, starting with a different row, and
    records the wall time and the CPU time other processes used meanwhile."""
    for rep in range(repeats):
        shift = rep % len(rows)
        for r in rows[shift:] + rows[:shift]:
            if r.status != "ok":
                continue
            for i in range(n_images):
                busy0, own0, t0 = (
                    environment.machine_busy_seconds(),
                    environment.own_cpu_seconds(),
                    time.perf_counter(),
                )
                try:
                    res = r.worker.run(i)
                except WorkerError as exc:
                    if r.id == "original":
                        raise
                    r.status, r.error = "failed", f"inference: {exc.problem}"
                    _log(f"  {r.id}: failed: {exc.problem}", quiet)
                    break
                wall = time.perf_counter() - t0
                busy1, own1 = environment.machine_busy_seconds(), environment.own_cpu_seconds()
                other = None
                if busy0 is not None and busy1 is not None:
                    other = max(0.0, (busy1 - busy0) - res["cpu_seconds"] - (own1 - own0))
                r.runs.append({"repeat": rep, "image": i, "wall": wall, "other_cpu": other, **res})
            _log(
                f"  repeat {rep + 1}/{repeats} {r.id}: "
                + ", ".join(f"{x['seconds']:.3f} s" for x in r.runs if x["repeat"] == rep),
                quiet,
            )
