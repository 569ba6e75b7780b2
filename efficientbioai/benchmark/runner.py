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

import contextlib
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import efficientbioai
from efficientbioai import metrics
from efficientbioai.artifact import Manifest
from efficientbioai.benchmark import environment
from efficientbioai.benchmark.config import (
    BenchmarkConfig,
    GenerateConfig,
    variant_configs,
)
from efficientbioai.benchmark.worker import MARK, load_image
from efficientbioai.compress.rewrite import rewrite_summary
from efficientbioai.energy import energy_basis, is_cpu_time_estimate
from efficientbioai.engines import default_threads
from efficientbioai.errors import ConfigError, EfficientBioAIError

MARKER = ".efficientbioai-benchmark"
REPORT_VERSION = 1
PRIMARY_METRIC = {"restoration": "ssim", "semantic": "dice", "instance": "ap50"}
BUSY_WARNING = 0.2  # cores used by other processes during the timed runs that make timings suspect


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class ImageEntry:
    name: str  # unique, names the output files
    path: Path
    axes: str | None
    sample: int = 0
    target: Path | None = None
    generated: bool = False
    shape: tuple[int, ...] = ()  # (C, *spatial) in the model's layout

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "axes": self.axes, "sample": self.sample}


def _prepare_output(cfg: BenchmarkConfig) -> Path:
    out = cfg.output.expanduser().resolve()
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"output: {cfg.output} exists and is not a folder", "choose another output")
        if any(out.iterdir()):
            if not (out / MARKER).is_file():
                raise ConfigError(
                    f"output: {cfg.output} exists and is not a benchmark folder (no {MARKER})",
                    "choose a new or empty folder; a benchmark folder is only replaced with overwrite",
                )
            if not cfg.overwrite:
                raise ConfigError(
                    f"output: {cfg.output} already holds a benchmark",
                    "choose another output folder, or set overwrite: true (or pass --overwrite) to replace it",
                )
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `efficientbioai benchmark`; replaced by --overwrite\n")
    return out


def resolve_images(cfg: BenchmarkConfig, out: Path) -> list[ImageEntry]:
    """The benchmark images in config order: generated ones are written under OUTPUT/data first."""
    from efficientbioai.benchmark.data import write_generated
    from efficientbioai.io import expand_paths, read_axes, read_image

    entries: list[ImageEntry] = []
    paths = iter(cfg.source_paths())
    for source in cfg.images:
        if isinstance(source, GenerateConfig):
            written = write_generated(source, cfg.task, out / "data" / "images", out / "data" / "targets")
            entries += [ImageEntry(p.stem, p, None, 0, t, True) for p, t in written]
            continue
        source = next(paths)
        files = expand_paths(source.path, "images")
        targets: list[Path | None] = [None] * len(files)
        if source.targets:
            targets = list(expand_paths(source.targets, "targets"))
            if len(targets) != len(files):
                raise ConfigError(
                    f"targets: {len(targets)} target file(s) for {len(files)} image(s) in '{source.path}'",
                    "give one target per image, in the same (sorted) order",
                )
        for f, t in zip(files, targets, strict=True):
            axes = source.axes or read_axes(f)
            n = 1
            if axes and "b" in axes.lower():
                n = int(read_image(f).shape[axes.lower().index("b")])
            stem = f.name.split(".")[0]
            for k in range(n):
                entries.append(ImageEntry(stem if n == 1 else f"{stem}_b{k}", f, axes, k, t))
    seen: dict[str, int] = {}
    for e in entries:  # unique output names
        if e.name in seen:
            seen[e.name] += 1
            e.name = f"{e.name}_{seen[e.name]}"
        else:
            seen[e.name] = 0
    return entries


def default_calibration(cfg: BenchmarkConfig, out: Path, notes: list[str]) -> dict[str, Any] | None:
    """calibration.images when the config gives none: generated images, else the benchmark's own."""
    from efficientbioai.benchmark.data import CALIBRATION_SEED_OFFSET, write_generated

    if (cfg.compress.get("calibration") or {}).get("images"):
        return None
    generated = cfg.generated()
    if generated:
        spec = generated[0].model_copy(update={"count": 2})
        folder = out / "data" / "calibration"
        write_generated(spec, cfg.task, folder, None, seed_offset=CALIBRATION_SEED_OFFSET)
        notes.append(
            "calibration: 2 generated images with other seeds than the benchmark images "
            f"({folder.relative_to(out)})"
        )
        return {"images": str(folder)}
    if cfg.model.kind == "bioimageio":
        return None  # compress uses the package's own test tensors (and warns)
    first = cfg.source_paths()[0]
    notes.append(
        "calibration: no calibration.images given, so the benchmark images themselves calibrated the "
        "quantizer (your own, separate images in compress.calibration.images avoid this)"
    )
    return {"images": first.path, **({"axes": first.axes} if first.axes else {})}


def train_model(cfg: BenchmarkConfig, out: Path, threads: int, quiet: bool) -> Path:
    """Train the configured network on generated images; the weights become its checkpoint."""
    import torch

    from efficientbioai.benchmark.data import default_crop, train_module
    from efficientbioai.models import load_model

    t = cfg.train
    spec = cfg.generated()[0]
    crop = t.crop or default_crop(len(spec.shape), spec.shape, cfg.tiling.tile_shape)
    _log(f"training {cfg.model.name or cfg.model.factory} on generated images ({t.steps} steps)", quiet)
    _, loaded = load_model(cfg.model)
    module = train_module(
        loaded.module,
        cfg.task,
        spec,
        steps=t.steps,
        batch_size=t.batch_size,
        crop=crop,
        lr=t.lr,
        images=t.images,
        seed=t.seed,
        threads=threads,
        quiet=quiet,
    )
    path = out / "model" / "weights.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    id: str
    variant: str | None
    device: str
    kind: str  # "original" | "variant"
    precision: str = "fp32"  # GPU rows: autocast precision
    artifact: Path | None = None
    manifest: Manifest | None = None
    compress_seconds: float | None = None
    status: str = "ok"  # ok | failed
    error: str | None = None
    ready: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)  # each: repeat, image, result
    worker: Worker | None = None


class WorkerError(EfficientBioAIError):
    pass


class Worker:
    """A row's process (see :mod:`efficientbioai.benchmark.worker`)."""

    def __init__(self, spec: dict[str, Any], log: Path, threads: int):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log
        self.log = open(log, "a", buffering=1)  # noqa: SIM115 - closed in close()
        package_root = str(Path(efficientbioai.__file__).resolve().parents[1])
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from efficientbioai.benchmark.worker import main; raise SystemExit(main())",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
            env=env,
        )
        self._send(spec)

    def _send(self, obj: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._died()

    def _died(self):
        self.proc.wait(timeout=30)
        tail = ""
        with contextlib.suppress(OSError):
            tail = "".join(self.log_path.read_text().splitlines(keepends=True)[-8:]).strip()
        raise WorkerError(
            f"the row's process ended unexpectedly (exit code {self.proc.returncode})"
            + (f": {tail[-600:]}" if tail else ""),
            f"see {self.log_path}",
        )

    def answer(self) -> dict[str, Any]:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self._died()
            if line.startswith(MARK):
                obj = json.loads(line[len(MARK) :])
                if "error" in obj:
                    self.log.write(obj.get("traceback") or "")
                    raise WorkerError(obj["error"], obj.get("fix"))
                return obj
            self.log.write(line)

    def run(self, image: int) -> dict[str, Any]:
        self._send({"cmd": "run", "image": image})
        return self.answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            for line in self.proc.stdout:
                self.log.write(line)
            self.proc.stdout.close()
        self.log.close()


def resolve_devices(cfg: BenchmarkConfig, env: dict[str, Any], notes: list[str]) -> list[str]:
    gpu = env["gpu"]
    if cfg.devices == "auto":
        if gpu["available"]:
            return ["cpu", "gpu"]
        notes.append(f"GPU: {gpu['note']}; there are no GPU rows")
        return ["cpu"]
    devices = list(dict.fromkeys(cfg.devices))
    if "gpu" in devices and not gpu["available"]:
        raise ConfigError(
            f"devices: gpu was asked for, but {gpu['note']}",
            "use devices: auto (the GPU when there is one) or devices: [cpu]",
        )
    return devices



def gpu_rows(variants: list[Row], notes: list[str]) -> list[Row]:
    """GPU rows: the original (PyTorch fp32) and, as PyTorch autocast, the fp16 / bf16 variants."""
    base = next(r for r in variants if r.status == "ok")
    rows = [Row("original@gpu", None, "gpu", "original", "fp32", base.artifact, base.manifest)]
    skipped = []
    for r in variants:
        if r.status != "ok":
            continue
        prec = r.manifest.precision
        if prec in ("fp16", "bf16") and not r.manifest.pruned:
            rows.append(Row(f"{r.variant}@gpu", r.variant, "gpu", "variant", prec, r.artifact, r.manifest))
        else:
            skipped.append(r.variant)
    if skipped:
        notes.append(
            f"GPU: no GPU engine for {', '.join(skipped)} in this version (int8, pruned and fp32-engine variants "
            "run on NVIDIA GPUs through TensorRT: `efficientbioai infer` with backend tensorrt, compared in "
            "benchmarks/gpu.py); the GPU rows are the original "
            "PyTorch model in fp32 and, for fp16 / bf16 variants, the same model under torch.autocast"
        )
    return rows


# ------------------------------------------------------------------------------------------- metrics


def _read_target(path: Path, pred: np.ndarray, sample: int) -> np.ndarray:
    from efficientbioai.io import read_image

    target = np.asarray(read_image(path))
    if target.ndim == pred.ndim + 1 and target.shape[1:] == pred.shape and sample < target.shape[0]:
        target = target[sample]
    if target.shape != pred.shape:
        if target.size != pred.size:
            raise EfficientBioAIError(
                f"targets: {path} has shape {target.shape} but its image's prediction has shape {pred.shape}",
                "targets must match their images pixel for pixel, in the same sorted order as the images",
            )
        target = target.reshape(pred.shape)
    return target


def _squeeze(x: np.ndarray) -> np.ndarray:
    return x[0] if x.shape[0] == 1 else x


def score_rows(
    rows: list[Row], images: list[ImageEntry], out: Path, task: str | None, threshold: float
) -> dict[str, dict[str, Any]]:
    """Per row: task metrics against the targets and agreement with the original on the same device."""
    results: dict[str, dict[str, Any]] = {}
    targets: dict[str, np.ndarray] = {}
    originals = {r.device: r for r in rows if r.kind == "original" and r.status == "ok"}
    for row in rows:
        if row.status != "ok":
            continue
        per_metrics, per_agree = [], []
        for im in images:
            pred = _squeeze(np.load(out / "outputs" / row.id / f"{im.name}.npy"))
            m: dict[str, float] = {}
            if im.target is not None and task is not None:
                if im.name not in targets:
                    targets[im.name] = _read_target(im.target, pred, im.sample)
                m = metrics.task_metrics(task, pred, targets[im.name], threshold=threshold)
            per_metrics.append(m)
            a: dict[str, float] = {}
            ref_row = originals.get(row.device)
            if ref_row is not None and ref_row is not row:
                ref = _squeeze(np.load(out / "outputs" / ref_row.id / f"{im.name}.npy"))
                a = {
                    "pearson": metrics.pearson(pred, ref),
                    "relative_l2": metrics.relative_l2(pred, ref),
                    "max_abs_diff": float(np.abs(pred - ref).max()),
                }
                if task in ("semantic", "instance"):
                    a["mask_dice"] = metrics.dice(pred > threshold, ref > threshold)
            per_agree.append(a)
        results[row.id] = {
            "metrics": {"mean": _mean(per_metrics), "per_image": per_metrics},
            "agreement": {"mean": _mean(per_agree), "per_image": per_agree},
        }
    return results


def _mean(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for d in dicts for k in d]
    out = {}
    for k in dict.fromkeys(keys):
        vals = [d[k] for d in dicts if k in d and d[k] is not None and np.isfinite(d[k])]
        if vals:
            out[k] = float(np.mean(vals))
    return out


# ------------------------------------------------------------------------------------------ pipeline


@dataclass
class BenchmarkResult:
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
    from efficientbioai.compress import compress

    started = time.perf_counter()
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    threads = cfg.threads or default_threads()
    notes: list[str] = []
    env = environment.probe(threads)
    devices = resolve_devices(cfg, env, notes)
    out = _prepare_output(cfg)

    phases: dict[str, float] = {}
    _log("[1/5] preparing images", quiet)
    images = resolve_images(cfg, out)
    calibration = default_calibration(cfg, out, notes)
    model_override = None
    if cfg.train is not None:
        weights = train_model(cfg, out, threads, quiet)
        model_override = {"checkpoint": str(weights)}
        notes.append(
            f"model: trained for {cfg.train.steps} steps on {cfg.train.images} generated images "
            f"(seed {cfg.train.seed}) before the benchmark; weights in {weights.relative_to(out)}"
        )
    variants = variant_configs(cfg, out / "artifacts", source, model_override, calibration)
    phases["prepare"] = time.perf_counter() - started

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
    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        raise EfficientBioAIError(
            "no variant could be compressed: " + "; ".join(f"{r.id}: {r.error}" for r in rows),
            "fix the variants' compress settings (try `efficientbioai compress` with one of them)",
        )

    all_rows: list[Row] = []
    if "cpu" in devices:
        all_rows.append(Row("original", None, "cpu", "original", "fp32", ok[0].artifact, ok[0].manifest))
        all_rows += rows
    else:
        notes.append("CPU rows: not run (devices excludes cpu)")
        all_rows += [r for r in rows if r.status != "ok"]
    if "gpu" in devices:
        all_rows += gpu_rows(rows, notes)
    runnable = [r for r in all_rows if r.status == "ok"]
    # every row uses the same tiles: the configured shape, else the first variant's calibration tile
    tiling = cfg.tiling.model_dump(mode="json")
    if tiling["tile_shape"] is None:
        tiling["tile_shape"] = list(ok[0].manifest.calibration.tile_shape)

    _log(f"[3/5] starting {len(runnable)} rows (one process each) and warming up", quiet)
    timing_started = time.perf_counter()
    try:
        for r in runnable:
            spec = {
                "row": r.id,
                "kind": r.kind,
                "device": r.device,
                "precision": r.precision,
                "artifact": str(r.artifact),
                "threads": threads,
                "tiling": tiling,
                "images": [im.spec() for im in images],
                "energy": cfg.energy,
                "warmup": cfg.runs.warmup,
                "outputs": str(out / "outputs" / r.id),
                "gpu_index": 0,
            }
            r.worker = Worker(spec, out / "logs" / f"{r.id}.log", threads)
        for r in runnable:
            try:
                r.ready = r.worker.answer()
            except WorkerError as exc:
                if r.id == "original":  # the reference of every CPU row
                    raise EfficientBioAIError(
                        f"the original model could not run: {exc.problem}", exc.fix
                    ) from None
                r.status, r.error = "failed", f"inference: {exc.problem}"
                _log(f"  {r.id}: failed: {exc.problem}", quiet)
                r.worker.close()
                r.worker = None
        runnable = [r for r in runnable if r.status == "ok"]
        if not runnable:
            raise EfficientBioAIError(
                "no row could run: " + "; ".join(f"{r.id}: {r.error}" for r in all_rows if r.error),
                f"see the logs in {out / 'logs'}",
            )
        for im in images:  # shapes in the model's layout, for the report
            im.shape = tuple(load_image(im.spec(), ok[0].manifest.input.axes).shape)

        _log(
            f"[4/5] timing: {cfg.runs.repeats} run(s) per image and row, interleaved "
            f"({len(runnable)} rows × {len(images)} image(s))",
            quiet,
        )
        for rep in range(cfg.runs.repeats):
            shift = rep % len(runnable)
            for r in runnable[shift:] + runnable[:shift]:
                if r.status != "ok":
                    continue
                for i in range(len(images)):
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
                    f"  repeat {rep + 1}/{cfg.runs.repeats} {r.id}: "
                    + ", ".join(f"{x['seconds']:.3f} s" for x in r.runs if x["repeat"] == rep),
                    quiet,
                )
    finally:
        for r in all_rows:
            if r.worker is not None:
                r.worker.close()
                r.worker = None
    phases["timing"] = time.perf_counter() - timing_started

    _log("[5/5] scoring and writing the reports", quiet)
    scores = score_rows(all_rows, images, out, cfg.task, cfg.threshold)
    report = build_report(
        cfg,
        tiling,
        env,
        devices,
        images,
        all_rows,
        scores,
        notes,
        threads,
        created,
        seconds={
            "total": time.perf_counter() - started,
            "prepare": phases["prepare"],
            "compress": sum(r.compress_seconds or 0.0 for r in rows),
            "timing": phases["timing"],
        },
    )
    from efficientbioai.benchmark.report import write_reports

    markdown = write_reports(report, out, cfg, images, all_rows)
    return BenchmarkResult(out, report, markdown)


# -------------------------------------------------------------------------------------------- report


def _stats(values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    if len(v) >= 2:
        q = statistics.quantiles(v, n=4, method="inclusive")
        q1, q3 = q[0], q[2]
    else:
        q1 = q3 = v[0]
    return {
        "median_s": statistics.median(v),
        "q1_s": q1,
        "q3_s": q3,
        "min_s": v[0],
        "max_s": v[-1],
        "runs_s": values,
    }


def _transformations(manifest: Manifest | None) -> list[str]:
    if manifest is None:
        return []
    out = []
    for t in manifest.transformations:
        step = str(t.get("step"))
        if step in ("export_onnx", "onnxslim", "onnx_dynamic_axes"):
            continue
        if step == "quantize_int8":
            out.append(f"int8 ({t.get('tool', 'nncf')}, {t.get('preset')} preset)")
        elif step == "rewrite":
            out.append("exact rewrite: " + rewrite_summary(t))
        elif step == "engine_precision":
            out.append(f"engine precision {t.get('requested')} → runs {t.get('runs')}")
        else:
            params = ", ".join(
                f"{k} {v}" for k, v in t.items() if k != "step" and isinstance(v, int | float | str | bool)
            )
            out.append(f"{step}" + (f" ({params})" if params else ""))
    return out


def _size(row: Row) -> dict[str, Any]:
    size = row.manifest.size if row.manifest is not None else {}
    params = size.get("parameters")
    if row.kind == "original" or row.device == "gpu":
        b = size.get("original_bytes")
        method = "original weights file"
        if b is None and params:
            b, method = int(params) * 4, "parameters × 4 bytes (fp32)"
        return {"bytes": b, "parameters": params, "method": method}
    comp_params = size.get("parameters_compressed") or params
    return {
        "bytes": size.get("compressed_bytes"),
        "parameters": comp_params,
        "method": "engine files in the artifact (openvino/)",
    }


def _row_report(row: Row, images: list[ImageEntry], scores: dict[str, Any]) -> dict[str, Any]:
    voxels = sum(int(np.prod(im.shape[1:])) for im in images) if images and images[0].shape else None
    rep: dict[str, Any] = {
        "id": row.id,
        "variant": row.variant,
        "device": row.device,
        "status": row.status,
        "error": row.error,
        "engine": None,
        "transformations": _transformations(row.manifest) if row.kind == "variant" else [],
        "artifact": str(row.artifact) if row.kind == "variant" and row.artifact else None,
        "compress_seconds": row.compress_seconds,
        "compress_fidelity": row.manifest.fidelity if row.kind == "variant" and row.manifest else None,
        "latency": None,
        "per_image": [],
        "throughput_mvoxel_s": None,
        "memory": None,
        "energy": None,
        "size": _size(row) if row.manifest else None,
        "metrics": {"mean": {}, "per_image": []},
        "agreement": {"mean": {}, "per_image": []},
        "ratios": {},
        "other_load_cores": None,
        "setup_seconds": None,
    }
    if row.status != "ok" or not row.runs:
        return rep
    rd = row.ready
    rep["setup_seconds"] = {"load": rd.get("load_seconds"), "warmup": rd.get("warmup_seconds")}
    rep["engine"] = {
        "label": rd.get("label"),
        "backend": rd.get("backend"),
        "precision": rd.get("precision"),
        "requested_precision": row.precision
        if row.device == "gpu"
        else row.manifest.precision
        if row.kind == "variant" and row.manifest
        else "fp32",
        "threads": rd.get("threads"),
    }
    repeats = sorted({x["repeat"] for x in row.runs})
    # one "pass" = every image once; its time / energy is the sum over the images
    passes = [sum(x["seconds"] for x in row.runs if x["repeat"] == r) for r in repeats]
    rep["latency"] = _stats(passes)
    for i, im in enumerate(images):
        runs = [x for x in row.runs if x["image"] == i]
        if not runs:
            continue
        rep["per_image"].append(
            {
                "image": im.name,
                "latency": _stats([x["seconds"] for x in runs]),
                "tiles": runs[0]["tiles"],
                "skipped_tiles": runs[0]["skipped"],
            }
        )
    if voxels:
        rep["throughput_mvoxel_s"] = voxels / rep["latency"]["median_s"] / 1e6
    peaks = [x["peak_rss"] for x in row.runs if x.get("peak_rss")]
    incs = [x["peak_rss"] - x["rss_before"] for x in row.runs if x.get("peak_rss") and x.get("rss_before")]
    gpu_peaks = [x["gpu_peak_bytes"] for x in row.runs if x.get("gpu_peak_bytes") is not None]
    rep["memory"] = {
        "peak_rss_bytes": max(peaks) if peaks else None,
        "peak_rss_increase_bytes": max(incs) if incs else None,
        "rss_after_setup_bytes": rd.get("rss_after_setup"),
        "gpu_peak_bytes": max(gpu_peaks) if gpu_peaks else None,
        "method": rd.get("memory_method"),
    }
    readings = [x.get("energy") for x in row.runs]
    if all(e and e.get("joules") is not None for e in readings):
        per_pass = [sum(x["energy"]["joules"] for x in row.runs if x["repeat"] == r) for r in repeats]
        methods = {x["energy"]["method"] for x in row.runs}
        method = "measured" if methods == {"measured"} else "estimated"
        details = row.runs[0]["energy"].get("details") or {}
        rep["energy"] = {
            "joules_median": statistics.median(per_pass),
            "runs_j": per_pass,
            "method": method,
            "basis": energy_basis(method, details),
            "cpu_time_estimate": is_cpu_time_estimate(method, details),
            "source": row.runs[0]["energy"].get("source"),
        }
    else:
        reason = next(
            (
                (e.get("details") or {}).get("reason")
                for e in readings
                if e and (e.get("details") or {}).get("reason")
            ),
            None,
        )
        rep["energy"] = {
            "joules_median": None,
            "runs_j": [],
            "method": "unavailable",
            "source": reason,
        }
    others = [x["other_cpu"] for x in row.runs if x.get("other_cpu") is not None]
    walls = [x["wall"] for x in row.runs if x.get("other_cpu") is not None]
    if others and sum(walls) > 0:
        rep["other_load_cores"] = sum(others) / sum(walls)
    s = scores.get(row.id)
    if s:
        rep["metrics"], rep["agreement"] = s["metrics"], s["agreement"]
    return rep


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    for device in {r["device"] for r in rows}:
        same = [r for r in rows if r["device"] == device and r["status"] == "ok" and r["latency"]]
        orig = next((r for r in same if r["variant"] is None), None)
        fp32 = next(
            (
                r
                for r in same
                if r["variant"] is not None
                and (r["engine"] or {}).get("requested_precision") == "fp32"
                and not any("prun" in t for t in r["transformations"])
            ),
            None,
        )
        for r in same:
            ratios: dict[str, Any] = {}
            if orig is not None:
                ratios["speedup"] = _ratio(orig["latency"]["median_s"], r["latency"]["median_s"])
                oe, re_ = (
                    (orig["energy"] or {}).get("joules_median"),
                    (r["energy"] or {}).get("joules_median"),
                )
                ratios["energy"] = _ratio(oe, re_)
                ratios["size"] = _ratio((orig["size"] or {}).get("bytes"), (r["size"] or {}).get("bytes"))
                ratios["memory"] = _ratio(
                    (orig["memory"] or {}).get("peak_rss_bytes"), (r["memory"] or {}).get("peak_rss_bytes")
                )
            if fp32 is not None and r is not fp32 and r["variant"] is not None:
                ratios["speedup_vs_fp32_engine"] = _ratio(
                    fp32["latency"]["median_s"], r["latency"]["median_s"]
                )
                ratios["fp32_engine_row"] = fp32["id"]
            r["ratios"] = ratios


def build_report(
    cfg: BenchmarkConfig,
    tiling: dict[str, Any],
    env: dict[str, Any],
    devices: list[str],
    images: list[ImageEntry],
    rows: list[Row],
    scores: dict[str, Any],
    notes: list[str],
    threads: int,
    created: str,
    seconds: dict[str, float],
) -> dict[str, Any]:
    out_rows = [_row_report(r, images, scores) for r in rows]
    _add_ratios(out_rows)
    ok = [r for r in rows if r.manifest]
    model_name = ok[0].manifest.model.name if ok else None
    notes = list(notes)
    energies = [r["energy"] for r in out_rows if r["energy"] and r["energy"]["joules_median"] is not None]
    if energies:
        bases = sorted({e.get("basis") or e["method"] for e in energies})
        sources = sorted({e["source"] for e in energies if e["source"]})
        note = f"energy: {'; '.join(bases)} — {'; '.join(sources)}"
        if any(e.get("cpu_time_estimate") for e in energies):
            note += (
                ". No power counter was readable: energy ratios here are close to the ratios of CPU "
                "times, not measured savings"
            )
        notes.insert(0, note)
    elif cfg.energy:
        notes.insert(0, "energy: unavailable (see each row's energy.source in report.json)")
    else:
        notes.insert(0, "energy: not measured (energy: false in the config)")
    unbudgeted = [r.id for r in ok if not (r.manifest.strategy or {}).get("budget")]
    if unbudgeted:
        notes.append(
            f"{', '.join(unbudgeted)}: compressed with quantize.max_drop: null, so no accuracy budget was "
            "checked; judge its agreement with the original above"
        )
    mem = next((r["memory"]["method"] for r in out_rows if r["memory"] and r["memory"]["method"]), None)
    if mem:
        notes.append(
            f"memory: peak RSS = {mem}; '+x' is what a run added to the RSS the row had after loading its "
            "engine and images"
        )
    busy = [r for r in out_rows if r["other_load_cores"] is not None and r["other_load_cores"] > BUSY_WARNING]
    if busy:
        notes.append(
            "machine load: other processes used "
            + ", ".join(f"{r['other_load_cores']:.2f} cores during {r['id']}" for r in busy)
            + " (of the timed runs' wall time): timings are noisier than on an idle machine, and PyTorch "
            "rows (OpenMP threads wait for each other at every layer) usually lose more than OpenVINO rows, "
            "which inflates speed-ups; rows were interleaved so that the load falls on all of them"
        )
    for r in out_rows:
        if r["status"] == "failed":
            notes.append(f"{r['id']}: failed — {r['error']}")
    targets = any(im.target is not None for im in images)
    return {
        "schema_version": REPORT_VERSION,
        "kind": "efficientbioai-benchmark-report",
        "title": cfg.title or f"{model_name or 'model'}: original vs compressed",
        "created": created,
        "model": {
            "name": model_name,
            "kind": cfg.model.kind,
            "axes": ok[0].manifest.input.axes if ok else None,
        },
        "task": cfg.task,
        "primary_metric": PRIMARY_METRIC.get(cfg.task) if (cfg.task and targets) else None,
        "threshold": cfg.threshold,
        "settings": {
            "threads": threads,
            "devices": devices,
            "warmup": cfg.runs.warmup,
            "repeats": cfg.runs.repeats,
            "order": "interleaved: each repeat runs every row once over every image, starting with a "
            "different row; one row computes at a time, each in its own process",
            "latency": "whole image: first tile read to stitched output (GPU synchronised), medians over "
            "the repeats of one pass over all images",
            "tiling": tiling,
            "energy": cfg.energy,
        },
        "environment": env,
        "images": [
            {
                "name": im.name,
                "path": str(im.path),
                "sample": im.sample,
                "shape": list(im.shape),
                "voxels": int(np.prod(im.shape[1:])) if im.shape else None,
                "target": str(im.target) if im.target else None,
                "generated": im.generated,
            }
            for im in images
        ],
        "rows": out_rows,
        "notes": notes,
        "seconds": seconds,
        "config": cfg.model_dump(mode="json"),
        "files": {
            "json": "report.json",
            "markdown": "report.md",
            "html": "report.html",
            "outputs": "outputs",
            "artifacts": "artifacts",
        },
    }
