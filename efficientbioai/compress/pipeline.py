"""``efficientbioai compress``: load → sample tiles → export → quantize → check fidelity → artifact dir."""

from __future__ import annotations

import datetime as _dt
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import efficientbioai
from efficientbioai import metrics
from efficientbioai.artifact import MANIFEST_VERSION, Manifest, versions, write_manifest
from efficientbioai.compress.export import (
    copy_onnx,
    export_onnx,
    rewrite_onnx,
    save_openvino,
    slim_onnx,
    to_openvino,
)
from efficientbioai.compress.prune import check_prunable, count_parameters, fine_tune, prune
from efficientbioai.compress.quantize import quantize_int8, quantize_int8_accuracy_control
from efficientbioai.config import CompressConfig
from efficientbioai.engines import (
    Engine,
    OnnxRuntimeEngine,
    OpenVINOEngine,
    TorchEngine,
    default_threads,
    latency_basis,
    median_latency_ms,
    reference_engine,
)
from efficientbioai.errors import ConfigError, EfficientBioAIError, ExportError, FidelityError
from efficientbioai.io import expand_paths, lazy_model_layout, read_image, to_model_layout
from efficientbioai.models import LoadedModel, load_model
from efficientbioai.models.base import sha256
from efficientbioai.processing import apply_steps, fix_statistics
from efficientbioai.sampling import PreparedImage, Tiles, pad_to, sample_tiles
from efficientbioai.tables import human_bytes, human_count, table
from efficientbioai.tiling import round_up, valid_size

DEFAULT_TILE = {2: (256, 256), 3: (32, 128, 128)}


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- data


def preprocess(image: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """(C, *spatial) raw image → (C, *spatial) float32 as the network expects it (whole-image stats)."""
    return apply_steps(image[np.newaxis], loaded.preprocessing, loaded.axes)[0]


def postprocess(output: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """(B, C, *spatial) network output → what the user sees (e.g. probabilities after a sigmoid)."""
    return apply_steps(output, loaded.postprocessing, loaded.axes)


def read_calibration_images(cfg: CompressConfig, loaded: LoadedModel):
    """Preprocessed images (and targets) for tile sampling, plus a description of where they came from."""
    cal = cfg.calibration
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


# ------------------------------------------------------------------------------------------ fidelity


def _crop_halo(x: np.ndarray, halo: list[int]) -> np.ndarray:
    sl = tuple(
        slice(h, -h if h else None) if 2 * h < n else slice(None)
        for h, n in zip(halo, x.shape[2:], strict=True)
    )
    return x[(slice(None), slice(None)) + sl]


def run_tiles(engine: Engine, tiles: list[np.ndarray], loaded: LoadedModel) -> np.ndarray:
    """Postprocessed outputs for each (C, *tile) tile, halo cropped, stacked as (N, C_out, *tile)."""
    outs = [_crop_halo(postprocess(engine(t[np.newaxis]), loaded), loaded.halo) for t in tiles]
    return np.concatenate(outs, axis=0)


def fidelity_figures(
    ref: np.ndarray,
    out: np.ndarray,
    targets: np.ndarray | None,
    cfg,
) -> dict[str, Any]:
    fig: dict[str, Any] = {
        "relative_l2": metrics.relative_l2(out, ref),
        "pearson": metrics.pearson(out, ref),
        "max_abs_diff": float(np.abs(out - ref).max()),
    }
    if cfg.fidelity.task == "semantic":
        fig["mask_iou"] = metrics.iou(out > cfg.fidelity.threshold, ref > cfg.fidelity.threshold)
    if targets is not None and cfg.fidelity.task is not None:
        if cfg.fidelity.task == "restoration":
            fig["metric"] = "pearson_vs_target"
            fig["original_metric"] = metrics.pearson(ref, targets)
            fig["compressed_metric"] = metrics.pearson(out, targets)
        else:
            fig["metric"] = "iou_vs_target"
            fig["original_metric"] = metrics.iou(ref > cfg.fidelity.threshold, targets > 0.5)
            fig["compressed_metric"] = metrics.iou(out > cfg.fidelity.threshold, targets > 0.5)
    return fig


def check_limits(fig: dict[str, Any], cfg: CompressConfig) -> list[str]:
    f = cfg.fidelity
    problems = []
    if f.max_pearson_drop is not None and 1 - fig["pearson"] > f.max_pearson_drop:
        problems.append(
            f"Pearson drop {1 - fig['pearson']:.4g} > fidelity.max_pearson_drop {f.max_pearson_drop}"
        )
    if f.max_relative_l2 is not None and fig["relative_l2"] > f.max_relative_l2:
        problems.append(
            f"relative L2 {fig['relative_l2']:.4g} > fidelity.max_relative_l2 {f.max_relative_l2}"
        )
    if f.max_metric_drop is not None and "compressed_metric" in fig:  # the config requires targets + task
        drop = fig["original_metric"] - fig["compressed_metric"]
        if drop > f.max_metric_drop:
            problems.append(f"{fig['metric']} drop {drop:.4g} > fidelity.max_metric_drop {f.max_metric_drop}")
    return problems


def package_test(ref_engine: Engine, engine: Engine, loaded: LoadedModel) -> dict[str, Any] | None:
    """Replay a bioimage.io package's test tensor through the original and the compressed engine."""
    if not loaded.sample_inputs or not loaded.sample_outputs:
        return None
    x = to_model_layout(np.asarray(loaded.sample_inputs[0]), loaded.axes, loaded.axes, "test tensor")
    if not all(
        valid_size(s, m, st) for s, m, st in zip(x.shape[1:], loaded.tile_min, loaded.tile_step, strict=True)
    ):
        return None
    x = preprocess(x, loaded)[np.newaxis]
    expected = np.asarray(loaded.sample_outputs[0], np.float32)
    ref = postprocess(ref_engine(x), loaded)
    out = postprocess(engine(x), loaded)
    if ref.shape != expected.shape:
        return None
    return {
        "original_max_abs_diff_to_package_output": float(np.abs(ref - expected).max()),
        "compressed_pearson_to_original": metrics.pearson(out, ref),
        "compressed_mask_iou_to_original": metrics.iou(out > 0.5, ref > 0.5),
    }


# ------------------------------------------------------------------------------------------ pipeline


@dataclass
class CompressResult:
    output: Path
    manifest: Manifest

    def table(self) -> str:
        m = self.manifest
        fid = m.fidelity
        lines = []
        strat = m.strategy or {}
        built = [c for c in strat.get("candidates", []) if not c["status"].startswith("skipped")]
        if len(built) > 1:  # what was tried and why the chosen one won
            lines.append(candidates_table(m))
        lines += [
            table(
                ["", "original", "compressed", "ratio"],
                _rows(m),
                title=f"{m.model.name}: {m.engines.primary.backend} {m.precision} "
                f"(float parts run in {m.engines.primary.precision}), "
                f"{m.engines.primary.threads} threads",
            )
        ]
        lat = m.latency
        per_tile = f"per tile {tuple(lat['tile_shape'])}"
        lines.append(
            f"latency: {latency_basis(lat['compressed'], lat['threads'], per_tile)}; "
            "whole-image speed: efficientbioai infer / benchmark"
        )
        lines.append(
            f"fidelity on {fid['tiles']} held-out tiles: Pearson r {fid['pearson']:.5f}, relative L2 "
            f"{fid['relative_l2']:.4g}" + (f", mask IoU {fid['mask_iou']:.4f}" if "mask_iou" in fid else "")
        )
        lines.append(budget_line(m))
        pt = m.package_test
        if pt:
            lines.append(
                f"package test tensor: original reproduces it to {pt['original_max_abs_diff_to_package_output']:.2g} "
                f"(max abs); compressed vs original Pearson r {pt['compressed_pearson_to_original']:.5f}, "
                f"mask IoU {pt['compressed_mask_iou_to_original']:.4f}"
            )
        lines.append(f"artifact: {self.output}")
        return "\n".join(lines)


def _params(loaded: LoadedModel) -> int:
    if loaded.module is not None:
        return int(sum(p.numel() for p in loaded.module.parameters()))
    import onnx

    return int(sum(np.prod(t.dims) for t in onnx.load(str(loaded.onnx_path)).graph.initializer))


def _original_bytes(loaded: LoadedModel) -> int | None:
    for key in ("weights_file", "path"):
        p = loaded.source.get(key)
        if p and Path(p).is_file():
            return Path(p).stat().st_size
    return None


def _prepare_output(cfg: CompressConfig) -> Path:
    out = cfg.output.expanduser().resolve()
    if out.exists() and not cfg.overwrite:
        raise ConfigError(
            f"output: {cfg.output} already exists",
            "choose another output directory, or set overwrite: true (or pass --overwrite) to replace it",
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output: {cfg.output} exists and is not a directory", "choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with renames, so no half-written artifact is ever visible."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{_dt.datetime.now():%Y%m%d%H%M%S%f}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _load(cfg: CompressConfig):
    """Load the model; for pruning, a bioimage.io package's PyTorch weights are preferred (prunable)."""
    if cfg.prune is not None and cfg.model.kind == "bioimageio" and cfg.model.weights is None:
        try:
            return load_model(cfg.model.model_copy(update={"weights": "pytorch_state_dict"}))
        except EfficientBioAIError:
            pass  # no usable state dict: load as usual, check_prunable then says why it cannot be pruned
    return load_model(cfg.model)


def compress(cfg: CompressConfig, *, quiet: bool = False) -> CompressResult:
    """Compress the configured model into an artifact directory and check it against the original."""
    out = _prepare_output(cfg)
    threads = cfg.engine.threads or default_threads()

    _log(f"[1/5] loading model ({cfg.model.kind})", quiet)
    parser, loaded = _load(cfg)
    if cfg.prune is not None:
        check_prunable(loaded.module)

    _log("[2/5] reading images and sampling tiles", quiet)
    images, targets, image_names = read_calibration_images(cfg, loaded)
    tile_shape = resolve_tile_shape(cfg.calibration.tile_shape, loaded, images)
    n_cal = cfg.calibration.num_tiles
    n_val = 0
    if cfg.prune is not None:
        n_val = cfg.prune.finetune.val_tiles
    elif cfg.quantize.max_drop is not None:
        n_val = cfg.fidelity.num_tiles
    calib, holdout = sample_tiles(
        images,
        tile_shape,
        n_cal + n_val,
        cfg.fidelity.num_tiles,
        targets=targets,
        background_fraction=cfg.calibration.background_fraction,
        seed=cfg.calibration.seed,
    )
    val = Tiles(
        inputs=calib.inputs[n_cal:],
        targets=calib.targets[n_cal:] if calib.targets is not None else None,
        positions=calib.positions[n_cal:],
        background=sum(calib.is_background[n_cal:]),
        is_background=calib.is_background[n_cal:],
    )
    calib = Tiles(
        inputs=calib.inputs[:n_cal],
        targets=calib.targets[:n_cal] if calib.targets is not None else None,
        positions=calib.positions[:n_cal],
        background=sum(calib.is_background[:n_cal]),
        is_background=calib.is_background[:n_cal],
    )
    if loaded.module is not None:
        loaded.module = parser.fine_tune(loaded.module, calib.inputs)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        data = _Data(images, targets, image_names, calib, holdout, val, tuple(tile_shape))
        manifest = _build(cfg, parser, loaded, data, threads, tmp, quiet)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CompressResult(output=out, manifest=manifest)


@dataclass
class _Data:
    images: list[np.ndarray]
    targets: list[np.ndarray] | None
    names: list[str]
    calib: Tiles
    holdout: Tiles
    val: Tiles
    tile_shape: tuple[int, ...]


def _export(module, loaded: LoadedModel, example: np.ndarray, directory: Path, cfg, threads: int):
    """ONNX export (or copy), slimming, exact rewrites and a parity check against ``module``.

    Returns the ONNX path and the transformations applied.
    """
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / "model.onnx"
    steps: list[dict[str, Any]] = []
    if module is not None:
        export_onnx(module, example, onnx_path, loaded.axes, cfg.export.opset)
        steps.append({"step": "export_onnx", "opset": cfg.export.opset, "dynamic_axes": "batch+spatial"})
    else:
        copy_onnx(loaded.onnx_path, onnx_path)
        steps.append({"step": "onnx_dynamic_axes", "dynamic_axes": "batch+spatial"})
    if cfg.export.slim:
        slim_onnx(onnx_path)
        steps.append({"step": "onnxslim"})
    if cfg.export.rewrite:
        rewritten = rewrite_onnx(onnx_path)
        if rewritten:
            steps.append({"step": "rewrite", **rewritten})
    ref = TorchEngine(module, threads) if module is not None else reference_engine(loaded, threads)
    # The exported graph must compute what the network computes before anything else is built on it.
    with OnnxRuntimeEngine(onnx_path, threads) as ort_engine:
        try:
            parity = metrics.relative_l2(ort_engine(example), ref(example))
        except Exception as exc:
            raise ExportError(
                f"the exported ONNX model does not run at tile shape {list(example.shape[2:])}: "
                f"{str(exc).strip().splitlines()[0][:300]}",
                "the graph may hard-code its input size: re-export it with dynamic axes, or use TorchScript "
                "weights (model.weights: torchscript)",
            ) from exc
    if parity > 1e-3:
        raise ExportError(
            f"the exported ONNX model differs from the original network (relative L2 {parity:.3g})",
            "an operation was exported incorrectly: try another export.opset or report the network",
        )
    return onnx_path, steps


@dataclass
class Candidate:
    """One way of compressing the model: a network (original or pruned) at one precision."""

    precision: str
    prune_ratio: float | None = None
    fallback: bool = False  # int8 with NNCF accuracy control (sensitive layers back to float)
    status: str = ""
    fidelity: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    parameters: int | None = None
    size_bytes: int | None = None
    drop: float | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    directory: Path | None = None
    onnx_path: Path | None = None
    ok: bool = False  # built, and within the budget and fidelity limits (or no budget was asked for)
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        p = "int8 + float fallback" if self.fallback else self.precision
        return p if self.prune_ratio is None else f"prune {self.prune_ratio:g} + {p}"

    @property
    def slug(self) -> str:
        return self.name.replace(" + ", "_").replace(" ", "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "precision": self.precision,
            "prune_ratio": self.prune_ratio,
            "float_fallback": self.fallback,
            "status": self.status,
            "latency_ms": self.latency.get("median_ms"),
            "parameters": self.parameters,
            "size_bytes": self.size_bytes,
            "pearson": self.fidelity.get("pearson"),
            "metric_drop": self.drop,
            "float_layers": next((s.get("float_layers") for s in self.steps if "float_layers" in s), None),
            "fine_tune": next((s for s in self.steps if s.get("step") == "fine_tune"), None),
        }


class _Budget:
    """``quantize.max_drop`` measured the same way for every candidate."""

    def __init__(self, cfg: CompressConfig):
        self.md = cfg.quantize.max_drop
        self.cfg = cfg

    def metric(self, outs: np.ndarray, refs: np.ndarray) -> float:
        """Higher is better: Pearson r to the original's outputs, or the task metric against targets."""
        if self.md.metric == "pearson":
            return metrics.pearson(outs, refs)
        if self.cfg.fidelity.task == "semantic":
            return metrics.iou(outs > self.cfg.fidelity.threshold, refs > 0.5)
        return metrics.pearson(outs, refs)

    def allowed(self, original: float) -> float:
        return self.md.value * (abs(original) if self.md.type == "relative" else 1.0)

    def drop(self, fid: dict[str, Any]) -> float:
        if self.md.metric == "pearson":
            return 1.0 - fid["pearson"]
        return fid["original_metric"] - fid["compressed_metric"]

    def holds(self, fid: dict[str, Any]) -> bool:
        original = 1.0 if self.md.metric == "pearson" else fid["original_metric"]
        return self.drop(fid) <= self.allowed(original) + 1e-12

    def describe(self) -> str:
        what = "1 − Pearson r to the original" if self.md.metric == "pearson" else "task metric drop"
        return f"{what} ≤ {self.md.value:g}" + (" (relative)" if self.md.type == "relative" else "")


def _build(
    cfg, parser, loaded: LoadedModel, data: _Data, threads: int, tmp: Path, quiet: bool
) -> dict[str, Any]:
    q = cfg.quantize
    holdout = data.holdout
    example = holdout.inputs[0][np.newaxis]
    budget = _Budget(cfg) if q.max_drop is not None else None
    auto = q.strategy == "auto"

    ref_engine = reference_engine(loaded, threads)
    ref_out = run_tiles(ref_engine, holdout.inputs, loaded)
    tgt = None
    if holdout.targets:
        tgt = np.concatenate([_crop_halo(t[np.newaxis], loaded.halo) for t in holdout.targets], axis=0)
    lat_ref = median_latency_ms(ref_engine, example, repeats=cfg.engine.latency_repeats)

    ratios: list[float | None] = [None]
    if cfg.prune is not None:
        # auto climbs the ladder from the smallest ratio; fixed builds the one ratio it was given
        ratios = [None, *cfg.prune.auto_ratios()] if auto else [cfg.prune.ratios[0]]
    if auto:
        precisions = [("int8", False), ("int8", True), ("bf16", False), ("fp32", False)]
    elif q.precision == "int8" and budget is not None:
        # plain int8 first; only when it misses the budget, int8 with the sensitive layers in float
        precisions = [("int8", False), ("int8", True)]
    else:
        precisions = [(q.precision, False)]
    if budget is None:
        _log(
            "warning: quantize.max_drop is null, so no accuracy budget is checked: the result is written "
            "whatever its accuracy (the measured figures are still reported)",
            False,
        )

    candidates: list[Candidate] = []
    for i, ratio in enumerate(ratios):
        if (
            ratio is not None
            and auto
            and i > 1
            and not any(c.ok for c in candidates if c.prune_ratio == ratios[i - 1])
        ):
            # removing more channels than a ratio that already missed the budget will not recover it
            for precision, fallback in precisions:
                c = Candidate(precision, ratio, fallback)
                c.status = f"skipped: prune {ratios[i - 1]:g} already missed the budget"
                candidates.append(c)
            continue
        module, net_steps = loaded.module, []
        name = "original" if ratio is None else f"prune{ratio:g}"
        if ratio is not None:
            _log(f"[3/5] pruning {ratio:.0%} of the channels ({cfg.prune.method}) and fine-tuning", quiet)
            module, net_steps = _prune_and_finetune(cfg, parser, loaded, data, example, ratio, threads, quiet)
        _log(f"[3/5] exporting the {'original' if ratio is None else 'pruned'} network to ONNX", quiet)
        onnx_path, export_steps = _export(module, loaded, example, tmp / "candidates" / name, cfg, threads)
        net_steps = net_steps + export_steps
        params = count_parameters(module) if module is not None else _params(loaded)
        _log(
            "[4/5] building and checking "
            + ("candidates" if len(ratios) * len(precisions) > 1 else "the engine"),
            quiet,
        )
        for precision, fallback in precisions:
            c = Candidate(
                precision, ratio, fallback, parameters=params, steps=list(net_steps), onnx_path=onnx_path
            )
            plain = next(
                (
                    x
                    for x in candidates
                    if x.prune_ratio == ratio and x.precision == "int8" and not x.fallback
                ),
                None,
            )
            if fallback and plain is not None and plain.ok:
                c.status = "skipped: int8 already within budget"
                candidates.append(c)
                continue
            c.directory = tmp / "candidates" / c.slug
            try:
                _build_candidate(
                    c, cfg, parser, loaded, data, ref_engine, ref_out, tgt, budget, example, threads, quiet
                )
            except EfficientBioAIError as exc:
                if not auto and not fallback:
                    raise
                c.status = f"failed: {getattr(exc, 'problem', exc)}"
            candidates.append(c)
            if c.latency:
                _log(
                    f"      {c.name:<28} {c.latency['median_ms']:8.1f} ms/tile  Pearson r {c.fidelity['pearson']:.5f}"
                    + (f"  drop {c.drop:.4g}" if c.drop is not None else "")
                    + f"  {c.status}",
                    quiet,
                )
            else:
                _log(f"      {c.name:<28} {c.status}", quiet)
    ok = [c for c in candidates if c.ok]
    if not ok:
        raise FidelityError(_over_budget_problem(candidates, budget), _over_budget_fixes(cfg, candidates))
    chosen = min(ok, key=lambda c: c.latency["median_ms"])
    chosen.status = "chosen"

    _log("[5/5] writing the artifact", quiet)
    # The chosen candidate's files become the artifact; the others are discarded.
    shutil.move(str(chosen.onnx_path), str(tmp / "model.onnx"))
    if (chosen.directory / "openvino").is_dir():
        shutil.move(str(chosen.directory / "openvino"), str(tmp / "openvino"))
    shutil.rmtree(tmp / "candidates", ignore_errors=True)

    engines: dict[str, Any] = {"onnx": {"path": "model.onnx", "precision": "fp32", "backend": "onnxruntime"}}
    if (tmp / "openvino").is_dir():
        engines["openvino"] = {"path": "openvino/model.xml", **chosen.engine}
        engines["primary"] = engines["openvino"]
        final = OpenVINOEngine(tmp / "openvino" / "model.xml", chosen.precision, threads)
    else:
        engines["primary"] = {**engines["onnx"], **chosen.engine}
        final = OnnxRuntimeEngine(tmp / "model.onnx", threads)
    with final, ref_engine:
        pkg = package_test(ref_engine, final, loaded)
    if "tensorrt" in cfg.export.targets:  # TensorRT-ready ONNX (+ the plan where a GPU is present)
        from efficientbioai.compress.tensorrt import build_target

        engines["tensorrt"] = build_target(
            cfg,
            tmp,
            chosen.precision,
            parser.calibration_tiles(data.calib.inputs),
            data.holdout.inputs,
            ref_out,
            lambda engine, tiles: run_tiles(engine, tiles, loaded),
            lambda out: fidelity_figures(ref_out, out, None, cfg),
            threads,
            quiet=quiet,
            log=lambda msg: _log(msg, quiet),
            tile_min=loaded.tile_min,
            tile_step=loaded.tile_step,
        )

    files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    compressed_bytes = (
        sum((tmp / f).stat().st_size for f in files if f.startswith("openvino/"))
        or (tmp / "model.onnx").stat().st_size
    )
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "efficientbioai_version": efficientbioai.__version__,
        "model": {"name": loaded.name, **loaded.source, "config": _model_spec(cfg.model)},
        "input": {
            "axes": loaded.axes,
            "channels": loaded.in_channels,
            "tile_min": loaded.tile_min,
            "tile_step": loaded.tile_step,
            "halo": loaded.halo,
            "preprocessing": loaded.preprocessing,
        },
        "output": {"channels": int(ref_out.shape[1]), "postprocessing": loaded.postprocessing},
        "precision": chosen.precision,
        "transformations": chosen.steps,
        "engines": engines,
        "calibration": {
            "images": data.names,
            "tile_shape": list(data.tile_shape),
            "tiles": len(data.calib.inputs),
            "background_tiles": data.calib.background,
            "seed": cfg.calibration.seed,
        },
        "fidelity": chosen.fidelity,
        "package_test": pkg,
        "latency": {
            "tile_shape": [1, loaded.in_channels, *data.tile_shape],
            "threads": threads,
            "original": {"backend": ref_engine.backend, "precision": "fp32", **lat_ref},
            "compressed": {**chosen.engine, **chosen.latency},
        },
        "size": {
            "parameters": _params(loaded),
            "parameters_compressed": chosen.parameters,
            "original_bytes": _original_bytes(loaded),
            "compressed_bytes": compressed_bytes,
        },
        "strategy": {
            "mode": q.strategy,
            "budget": q.max_drop.model_dump() if q.max_drop is not None else None,
            "chosen": chosen.name,
            "candidates": [c.as_dict() for c in candidates],
        },
        "versions": versions(),
        "files": files,
    }
    return write_manifest(tmp, manifest)


def _prune_and_finetune(
    cfg, parser, loaded: LoadedModel, data: _Data, example, ratio: float, threads: int, quiet: bool
):
    pc = cfg.prune
    module, prep = prune(loaded.module, example, pc, ratio)
    _log(
        f"      {human_count(prep.params_before)} → {human_count(prep.params_after)} parameters "
        f"(output layers left alone: {', '.join(prep.ignored)})",
        quiet,
    )
    ft_tile = tuple(pc.finetune.tile_shape or data.tile_shape)
    if len(ft_tile) != loaded.ndim or not all(
        valid_size(t, m, s) for t, m, s in zip(ft_tile, loaded.tile_min, loaded.tile_step, strict=True)
    ):
        raise ConfigError(
            f"prune.finetune.tile_shape: {list(ft_tile)} is not a shape this network accepts",
            f"use one like calibration.tile_shape {list(data.tile_shape)}",
        )
    stop_at = pc.finetune.stop_at_drop
    md = cfg.quantize.max_drop
    if stop_at is None and md is not None and md.metric == "pearson":
        stop_at = md.value / 2  # the other half of the budget is left to quantization
    images = [
        pad_to(np.asarray(im, np.float32), ft_tile) for im in data.images
    ]  # fine-tuning crops at random
    targets = [pad_to(np.asarray(t, np.float32), ft_tile) for t in data.targets] if data.targets else None
    module, ft = fine_tune(
        module,
        loaded.module,
        images,
        targets,
        data.val.inputs,
        ft_tile,
        pc.finetune,
        task=cfg.fidelity.task,
        postprocessing=loaded.postprocessing,
        halo=loaded.halo,
        threads=threads,
        seed=cfg.calibration.seed,
        stop_at_drop=stop_at,
        quiet=quiet,
    )
    if ft.steps:
        _log(
            f"      fine-tuned {ft.steps} steps ({ft.mode}): validation Pearson r to the original "
            f"{ft.val_pearson_before:.4f} → {ft.val_pearson_best:.4f} (best at step {ft.best_step}; "
            f"{ft.stopped})",
            quiet,
        )
    # a user's parser may adapt the pruned network too (BaseParser.fine_tune)
    module = parser.fine_tune(module, data.calib.inputs)
    return module, [prep.as_dict(), ft.as_dict()]


def _build_candidate(
    c: Candidate, cfg, parser, loaded, data: _Data, ref_engine, ref_out, tgt, budget, example, threads, quiet
):
    q = cfg.quantize
    if "openvino" not in cfg.export.targets:
        engine = OnnxRuntimeEngine(c.onnx_path, threads)
        c.size_bytes = c.onnx_path.stat().st_size
    else:
        ov_model = to_openvino(c.onnx_path)
        if c.precision == "int8":
            tiles = parser.calibration_tiles(data.calib.inputs)
            step = {
                "step": "quantize_int8",
                "tool": "nncf",
                "preset": q.preset,
                "per_channel": q.per_channel,
                "fast_bias_correction": q.fast_bias_correction,
                "keep_float": q.keep_float,
                "keep_float_types": q.keep_float_types,
                "calibration_tiles": len(tiles),
            }
            if c.fallback:
                ov_model, step = _accuracy_controlled(
                    c, ov_model, tiles, step, cfg, loaded, data, budget, ref_engine, threads, quiet
                )
            else:
                ov_model = quantize_int8(ov_model, tiles, q, quiet=quiet)
            c.steps.append(step)
        xml = save_openvino(
            ov_model,
            c.directory / "openvino" / "model.xml",
            compress_weights_to_fp16=c.precision in ("fp16", "bf16"),
        )
        engine = OpenVINOEngine(xml, c.precision, threads)
        if c.precision in ("fp16", "bf16"):
            c.steps.append(
                {
                    "step": "engine_precision",
                    "requested": c.precision,
                    "runs": engine.precision,
                    "weights_stored_as": "fp16",
                }
            )
        c.size_bytes = sum(p.stat().st_size for p in (c.directory / "openvino").iterdir())
    with engine:
        out = run_tiles(engine, data.holdout.inputs, loaded)
        c.fidelity = {
            "tiles": len(data.holdout.inputs),
            "background_tiles": data.holdout.background,
            **fidelity_figures(ref_out, out, tgt, cfg),
        }
        c.latency = median_latency_ms(engine, example, repeats=cfg.engine.latency_repeats)
        c.engine = engine.describe()
    problems = check_limits(c.fidelity, cfg)
    if budget is not None:
        c.drop = budget.drop(c.fidelity)
        if not budget.holds(c.fidelity):
            problems.append(f"drop {c.drop:.4g} exceeds quantize.max_drop ({budget.describe()})")
    c.problems = problems
    c.ok = not problems
    if problems:
        c.status = "over budget: " + "; ".join(problems)
    elif budget is not None:
        c.status = "within budget"
    else:
        # "within budget" is said only where a budget was checked
        c.status = "accepted: no budget (max_drop: null)"


def _over_budget_problem(candidates: list[Candidate], budget: _Budget | None) -> str:
    """What was measured against which limit, for every candidate that was built or failed."""
    limit = f"the accuracy budget ({budget.describe()})" if budget is not None else "the fidelity limits"
    tried = []
    for c in candidates:
        if c.status.startswith("skipped"):
            continue
        if c.problems:
            tried.append(f"{c.name}: " + "; ".join(c.problems))
        else:
            tried.append(f"{c.name}: {c.status}")
        ft = next((s for s in c.steps if s.get("step") == "fine_tune"), None)
        if ft and not c.fallback and ft.get("steps"):
            r = ft["validation_pearson_to_original"]
            tried[-1] += (
                f" (fine-tuned {ft['steps']} steps, validation r {r['before']:.4f} → {r['best']:.4f}; "
                f"{ft['stopped']})"
            )
    return f"no compressed model stays within {limit} on the held-out tiles — " + " | ".join(tried)


def _over_budget_fixes(cfg: CompressConfig, candidates: list[Candidate]) -> str:
    fixes = []
    if any(c.prune_ratio is not None for c in candidates):
        fixes.append(
            "fine-tune longer (prune.finetune.steps, patience) or prune less (a smaller prune.ratio)"
        )
    if cfg.quantize.strategy != "auto":
        fixes.append("let quantize.strategy: auto try other precisions (bf16, fp32, int8 with float layers)")
    if any(c.precision == "int8" for c in candidates):
        fixes.append("try quantize.preset: mixed or more calibration tiles")
    if cfg.quantize.max_drop is not None:
        fixes.append(
            "or accept the loss explicitly: a larger quantize.max_drop, or max_drop: null (no budget: "
            "the model is written whatever its accuracy)"
        )
    else:
        fixes.append("or relax the fidelity.* limits")
    return "; ".join(fixes)


def _accuracy_controlled(
    c, ov_model, tiles, step, cfg, loaded, data: _Data, budget: _Budget, ref_engine, threads, quiet
):
    """int8 with float fallback: NNCF keeps reverting the most sensitive layers until the budget holds."""
    if not data.val.inputs:  # pragma: no cover - compress samples them whenever a budget is set
        raise ConfigError("quantize.max_drop: no validation tiles", "set calibration.num_tiles")
    md = cfg.quantize.max_drop
    if md.metric == "pearson":
        val_refs = [run_tiles(ref_engine, [t], loaded) for t in data.val.inputs]
    else:
        if not data.val.targets:
            raise ConfigError(
                "quantize.max_drop.metric task needs calibration.targets", "give calibration.targets"
            )
        val_refs = [_crop_halo(t[np.newaxis], loaded.halo) for t in data.val.targets]
        orig = [run_tiles(ref_engine, [t], loaded) for t in data.val.inputs]
    # NNCF measures the drop from the float network it quantizes; a pruned network has already spent
    # part of the budget, which is measured here against the original and subtracted.
    with OnnxRuntimeEngine(c.onnx_path, threads) as fp32:
        net_out = [run_tiles(fp32, [t], loaded) for t in data.val.inputs]
    refs_all = np.concatenate(val_refs)
    m_orig = 1.0 if md.metric == "pearson" else budget.metric(np.concatenate(orig), refs_all)
    m_net = budget.metric(np.concatenate(net_out), refs_all)
    allowed = budget.allowed(m_orig) - (m_orig - m_net)
    if allowed <= 0:
        raise FidelityError(
            f"the {'pruned ' if c.prune_ratio else ''}float network already uses the whole budget "
            f"({m_orig - m_net:.4g} of {budget.allowed(m_orig):.4g})",
            "prune less or fine-tune longer",
        )

    def post(o):
        return _crop_halo(postprocess(o, loaded), loaded.halo)

    items = [(t[np.newaxis].astype(np.float32), r) for t, r in zip(data.val.inputs, val_refs, strict=True)]
    model, kept = quantize_int8_accuracy_control(
        ov_model,
        tiles,
        cfg.quantize,
        items,
        lambda outs, refs: budget.metric(np.concatenate([post(o) for o in outs]), np.concatenate(refs)),
        lambda o, r: budget.metric(post(o), r),
        max_drop=allowed,
        quiet=quiet,
    )
    step = {
        **step,
        "accuracy_control": {
            "tool": "nncf.quantize_with_accuracy_control",
            "max_drop": allowed,
            "metric": md.metric,
        },
        "float_layers": kept,
    }
    return model, step


def _model_spec(model_cfg) -> dict[str, Any]:
    """The ``model:`` config with absolute paths, so that ``infer`` can load the original model again."""
    spec = model_cfg.model_dump(mode="json", exclude_none=True)
    for key in ("path", "checkpoint"):
        if key in spec:
            spec[key] = str(Path(spec[key]).expanduser().resolve())
    return spec


def _rows(m: Manifest) -> list[list[Any]]:
    lat, size, fid = m.latency, m.size, m.fidelity
    o, c = lat["original"], lat["compressed"]
    ob, cb = size["original_bytes"], size["compressed_bytes"]
    rows = [
        ["engine", f"{o['backend']} fp32", f"{c['backend']} {m.precision}", ""],
        [
            "parameters",
            human_count(size["parameters"]),
            human_count(size.get("parameters_compressed") or size["parameters"]),
            f"{size['parameters'] / size['parameters_compressed']:.2f}x fewer"
            if size.get("parameters_compressed") and size["parameters_compressed"] != size["parameters"]
            else "",
        ],
        ["file size", human_bytes(ob), human_bytes(cb), f"{ob / cb:.2f}x smaller" if ob else ""],
        [
            f"latency / tile {tuple(lat['tile_shape'])}",
            f"{o['median_ms']:.1f} ms",
            f"{c['median_ms']:.1f} ms",
            f"{o['median_ms'] / c['median_ms']:.2f}x faster",
        ],
        ["Pearson r vs original", "1", f"{fid['pearson']:.5f}", ""],
        ["relative L2 vs original", "0", f"{fid['relative_l2']:.2e}", ""],
    ]
    if "compressed_metric" in fid:
        rows.append(
            [
                fid["metric"],
                f"{fid['original_metric']:.4f}",
                f"{fid['compressed_metric']:.4f}",
                f"{fid['compressed_metric'] - fid['original_metric']:+.4f}",
            ]
        )
    return rows


def budget_line(m: Manifest) -> str:
    """Whether an accuracy budget was checked, and how the chosen model did against it."""
    strat = m.strategy or {}
    budget = strat.get("budget")
    if not budget:
        return (
            "accuracy budget: OFF (quantize.max_drop: null) — this model was written without checking "
            "its accuracy against any budget; judge the figures above yourself"
        )
    chosen = next((c for c in strat.get("candidates", []) if c.get("status") == "chosen"), {})
    drop = chosen.get("metric_drop")
    what = "Pearson r to the original" if budget["metric"] == "pearson" else "task metric"
    return (
        f"accuracy budget: {what} may drop by ≤ {budget['value']:g} ({budget['type']}) on the held-out "
        f"tiles: within budget" + (f" (drop {drop:.4g})" if drop is not None else "")
    )


def candidates_table(m: Manifest) -> str:
    """What ``quantize.strategy: auto`` tried, as a table (from the manifest)."""
    strat = m.strategy
    ref = m.latency["original"]["median_ms"]
    rows = []
    for c in strat["candidates"]:
        lat = c["latency_ms"]
        rows.append(
            [
                c["name"],
                f"{lat:.1f} ms" if lat else "-",
                f"{ref / lat:.2f}x" if lat else "-",
                human_count(c["parameters"]) if c["parameters"] else "-",
                human_bytes(c["size_bytes"]) if c["size_bytes"] else "-",
                f"{c['pearson']:.5f}" if c["pearson"] is not None else "-",
                f"{c['metric_drop']:.4g}" if c["metric_drop"] is not None else "-",
                c["status"] if len(c["status"]) < 60 else c["status"][:57] + "...",
            ]
        )
    budget = strat.get("budget") or {}
    lat = m.latency
    per_tile = f"per tile {tuple(lat['tile_shape'])}"
    title = (
        f"strategy {strat.get('mode', 'auto')}: budget {budget.get('metric')} drop ≤ {budget.get('value')} "
        f"({budget.get('type')}); chosen: {strat['chosen']}\nspeed-up against PyTorch fp32 eager "
        f"({ref:.1f} ms/tile); latency "
        f"{latency_basis(lat['original'], lat['threads'], per_tile)}"
    )
    return table(
        ["candidate", "latency/tile", "speed-up", "params", "size", "Pearson r", "drop", "status"],
        rows,
        title=title,
    )
