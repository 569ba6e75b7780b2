"""``efficientbioai compress``: load → sample tiles → export → quantize → check fidelity → artifact dir."""

from __future__ import annotations

import datetime as _dt
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import efficientbioai
from efficientbioai import metrics
from efficientbioai.compress.export import copy_onnx, export_onnx, save_openvino, slim_onnx, to_openvino
from efficientbioai.compress.quantize import quantize_int8
from efficientbioai.config import CompressConfig
from efficientbioai.engines import (
    Engine,
    OnnxRuntimeEngine,
    OpenVINOEngine,
    default_threads,
    median_latency_ms,
    reference_engine,
)
from efficientbioai.errors import ConfigError, EfficientBioAIError, ExportError, FidelityError
from efficientbioai.io import expand_paths, read_image, to_model_layout
from efficientbioai.manifest import MANIFEST_VERSION, versions, write_manifest
from efficientbioai.models import LoadedModel, load_model
from efficientbioai.models.base import sha256
from efficientbioai.processing import apply_steps
from efficientbioai.report import human_bytes, human_count, table
from efficientbioai.sampling import Tiles, sample_tiles
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
            to_model_layout(read_image(f), cal.axes, loaded.axes, f"calibration.images: {f}") for f in files
        ]
        names = [str(f) for f in files]
    for x, name in zip(raw, names, strict=False):
        if x.shape[0] != loaded.in_channels:
            raise EfficientBioAIError(
                f"calibration.images: {name} has {x.shape[0]} channel(s) but the model takes {loaded.in_channels}",
                "set calibration.axes so that the channel axis is named 'c', or give images with the "
                "model's channels",
            )
    images = [preprocess(x, loaded) for x in raw]
    targets = None
    if cal.targets is not None:
        tfiles = expand_paths(cal.targets, "calibration.targets")
        if cal.images is None or len(tfiles) != len(images):
            raise ConfigError(
                f"calibration.targets: {len(tfiles)} target file(s) for {len(images)} image(s)",
                "give one target per calibration image, in the same (sorted) order",
            )
        targets = [
            to_model_layout(read_image(f), None, loaded.axes, f"calibration.targets: {f}") for f in tfiles
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
    manifest: dict[str, Any]

    def table(self) -> str:
        m = self.manifest
        fid = m["fidelity"]
        lines = [
            table(
                ["", "original", "compressed", "ratio"],
                _rows(m),
                title=f"{m['model']['name']}: {m['engines']['primary']['backend']} {m['precision']} "
                f"(float parts run in {m['engines']['primary']['precision']}), "
                f"{m['engines']['primary']['threads']} threads",
            )
        ]
        lines.append(
            f"fidelity on {fid['tiles']} held-out tiles: Pearson r {fid['pearson']:.5f}, relative L2 "
            f"{fid['relative_l2']:.4g}" + (f", mask IoU {fid['mask_iou']:.4f}" if "mask_iou" in fid else "")
        )
        pt = m.get("package_test")
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


def compress(cfg: CompressConfig, *, quiet: bool = False) -> CompressResult:
    """Compress the configured model into an artifact directory and check it against the original."""
    out = _prepare_output(cfg)
    threads = cfg.engine.threads or default_threads()
    q = cfg.quantize
    if "openvino" not in cfg.export.targets and q.precision != "fp32":
        raise ConfigError(
            f"quantize.precision: {q.precision} needs the OpenVINO engine",
            "add openvino to export.targets, or use precision fp32 with the ONNX engine",
        )

    _log(f"[1/6] loading model ({cfg.model.kind})", quiet)
    parser, loaded = load_model(cfg.model)

    _log("[2/6] reading images and sampling tiles", quiet)
    images, targets, image_names = read_calibration_images(cfg, loaded)
    tile_shape = resolve_tile_shape(cfg.calibration.tile_shape, loaded, images)
    calib, holdout = sample_tiles(
        images,
        tile_shape,
        cfg.calibration.num_tiles,
        cfg.fidelity.num_tiles,
        targets=targets,
        background_fraction=cfg.calibration.background_fraction,
        seed=cfg.calibration.seed,
    )
    if loaded.module is not None:
        loaded.module = parser.fine_tune(loaded.module, calib.inputs)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = _build(cfg, parser, loaded, calib, holdout, tile_shape, image_names, threads, tmp, quiet)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CompressResult(output=out, manifest=manifest)


def _build(
    cfg,
    parser,
    loaded: LoadedModel,
    calib: Tiles,
    holdout: Tiles,
    tile_shape,
    image_names,
    threads,
    tmp: Path,
    quiet: bool,
) -> dict[str, Any]:
    q = cfg.quantize
    transformations: list[dict[str, Any]] = []
    onnx_path = tmp / "model.onnx"
    example = holdout.inputs[0][np.newaxis]

    _log("[3/6] exporting to ONNX", quiet)
    if loaded.module is not None:
        export_onnx(loaded.module, example, onnx_path, loaded.axes, cfg.export.opset)
        transformations.append(
            {"step": "export_onnx", "opset": cfg.export.opset, "dynamic_axes": "batch+spatial"}
        )
    else:
        copy_onnx(loaded.onnx_path, onnx_path)
        transformations.append({"step": "onnx_dynamic_axes", "dynamic_axes": "batch+spatial"})
    if cfg.export.slim:
        slim_onnx(onnx_path)
        transformations.append({"step": "onnxslim"})

    ref_engine = reference_engine(loaded, threads)
    # The exported graph must compute what the network computes before anything else is built on it.
    with OnnxRuntimeEngine(onnx_path, threads) as ort_engine:
        try:
            parity = metrics.relative_l2(ort_engine(example), ref_engine(example))
        except Exception as exc:
            raise ExportError(
                f"the exported ONNX model does not run at tile shape {list(tile_shape)}: "
                f"{str(exc).strip().splitlines()[0][:300]}",
                "the graph may hard-code its input size: re-export it with dynamic axes, or use TorchScript "
                "weights (model.weights: torchscript)",
            ) from exc
    if parity > 1e-3:
        raise ExportError(
            f"the exported ONNX model differs from the original network (relative L2 {parity:.3g})",
            "an operation was exported incorrectly: try another export.opset or report the network",
        )

    engines: dict[str, Any] = {"onnx": {"path": "model.onnx", "precision": "fp32", "backend": "onnxruntime"}}
    if "openvino" in cfg.export.targets:
        _log(
            "[4/6] converting to OpenVINO"
            + (" and quantizing to int8 (NNCF)" if q.precision == "int8" else ""),
            quiet,
        )
        ov_model = to_openvino(onnx_path)
        if q.precision == "int8":
            tiles = parser.calibration_tiles(calib.inputs)
            ov_model = quantize_int8(ov_model, tiles, q, quiet=quiet)
            transformations.append(
                {
                    "step": "quantize_int8",
                    "tool": "nncf",
                    "preset": q.preset,
                    "per_channel": q.per_channel,
                    "fast_bias_correction": q.fast_bias_correction,
                    "keep_float": q.keep_float,
                    "keep_float_types": q.keep_float_types,
                    "calibration_tiles": len(tiles),
                }
            )
        xml = save_openvino(
            ov_model, tmp / "openvino" / "model.xml", compress_weights_to_fp16=q.precision in ("fp16", "bf16")
        )
        engine = OpenVINOEngine(xml, q.precision, threads)
        if q.precision in ("fp16", "bf16"):
            transformations.append(
                {
                    "step": "engine_precision",
                    "requested": q.precision,
                    "runs": engine.precision,
                    "weights_stored_as": "fp16",
                }
            )
        engines["openvino"] = {"path": "openvino/model.xml", **engine.describe()}
        engines["primary"] = engines["openvino"]
    else:
        _log("[4/6] ONNX Runtime engine (fp32)", quiet)
        engine = OnnxRuntimeEngine(onnx_path, threads)
        engines["primary"] = {**engines["onnx"], **engine.describe()}

    _log(f"[5/6] checking fidelity on {len(holdout.inputs)} held-out tiles", quiet)
    ref_out = run_tiles(ref_engine, holdout.inputs, loaded)
    eng_out = run_tiles(engine, holdout.inputs, loaded)
    tgt = None
    if holdout.targets:
        tgt = np.concatenate([_crop_halo(t[np.newaxis], loaded.halo) for t in holdout.targets], axis=0)
    fidelity = {
        "tiles": len(holdout.inputs),
        "background_tiles": holdout.background,
        **fidelity_figures(ref_out, eng_out, tgt, cfg),
    }
    pkg = package_test(ref_engine, engine, loaded)

    _log("[6/6] measuring latency per tile", quiet)
    reps = cfg.engine.latency_repeats
    lat_ref = median_latency_ms(ref_engine, example, repeats=reps)
    lat_eng = median_latency_ms(engine, example, repeats=reps)
    engine.close()
    ref_engine.close()

    problems = check_limits(fidelity, cfg)
    if problems:
        raise FidelityError(
            "the compressed model is further from the original than allowed: " + "; ".join(problems),
            "try quantize.preset: mixed, keep sensitive layers in float (quantize.keep_float), more "
            "calibration tiles, or precision bf16; or relax the limit",
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
        "precision": q.precision,
        "transformations": transformations,
        "engines": engines,
        "calibration": {
            "images": image_names,
            "tile_shape": list(tile_shape),
            "tiles": len(calib.inputs),
            "background_tiles": calib.background,
            "seed": cfg.calibration.seed,
        },
        "fidelity": fidelity,
        "package_test": pkg,
        "latency": {
            "tile_shape": [1, loaded.in_channels, *tile_shape],
            "threads": threads,
            "original": {"backend": ref_engine.backend, "precision": "fp32", **lat_ref},
            "compressed": {**engine.describe(), **lat_eng},
        },
        "size": {
            "parameters": _params(loaded),
            "original_bytes": _original_bytes(loaded),
            "compressed_bytes": compressed_bytes,
        },
        "versions": versions(),
        "files": files,
    }
    write_manifest(tmp, manifest)
    return manifest


def _model_spec(model_cfg) -> dict[str, Any]:
    """The ``model:`` config with absolute paths, so that ``infer`` can load the original model again."""
    spec = model_cfg.model_dump(mode="json", exclude_none=True)
    for key in ("path", "checkpoint"):
        if key in spec:
            spec[key] = str(Path(spec[key]).expanduser().resolve())
    return spec


def _rows(m: dict[str, Any]) -> list[list[Any]]:
    lat, size, fid = m["latency"], m["size"], m["fidelity"]
    o, c = lat["original"], lat["compressed"]
    ob, cb = size["original_bytes"], size["compressed_bytes"]
    rows = [
        ["engine", f"{o['backend']} fp32", f"{c['backend']} {m['precision']}", ""],
        ["parameters", human_count(size["parameters"]), human_count(size["parameters"]), ""],
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
