"""``efficientbioai compress``: load → sample tiles → build candidates → choose one → artifact directory.

The steps live in their own modules: :mod:`~efficientbioai.compress.calibration` (images and tiles),
:mod:`~efficientbioai.compress.candidates` (building and measuring one candidate),
:mod:`~efficientbioai.compress.strategy` (which candidates, which one wins),
:mod:`~efficientbioai.compress.fidelity` and :mod:`~efficientbioai.compress.budget` (how good is good
enough) and :mod:`~efficientbioai.compress.tables` (what is printed). This module runs them in order and
writes the artifact (:mod:`efficientbioai.artifact`): built in a temporary directory next to ``output``
and renamed into place, so no half-written artifact is ever visible.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import efficientbioai
from efficientbioai.artifact import (
    CalibrationInfo,
    EngineEntry,
    Engines,
    InputSpec,
    Manifest,
    ModelInfo,
    OutputSpec,
    versions,
    write_manifest,
)
from efficientbioai.compress.budget import budget_from
from efficientbioai.compress.calibration import (
    CalibrationData,
    read_calibration_images,
    resolve_tile_shape,
    run_tiles,
    sample_calibration,
)
from efficientbioai.compress.candidates import BuildContext, Candidate, parameter_count
from efficientbioai.compress.fidelity import (
    Reference,
    fidelity_figures,
    measure_original,
    output_slices,
    package_test,
)
from efficientbioai.compress.progress import log
from efficientbioai.compress.prune import check_prunable
from efficientbioai.compress.strategy import search
from efficientbioai.compress.tables import result_table
from efficientbioai.config import CompressConfig
from efficientbioai.engines import Engine, OnnxRuntimeEngine, OpenVINOEngine, default_threads
from efficientbioai.errors import ConfigError, EfficientBioAIError
from efficientbioai.io.files import check_writable, make_umask_mode
from efficientbioai.models import LoadedModel, load_model
from efficientbioai.models.base import sha256


@dataclass
class CompressResult:
    output: Path
    manifest: Manifest

    def table(self) -> str:
        """The summary printed by ``efficientbioai compress`` (see :mod:`efficientbioai.compress.tables`)."""
        return result_table(self.manifest, self.output)


def compress(cfg: CompressConfig, *, quiet: bool = False) -> CompressResult:
    """Compress the configured model into an artifact directory and check it against the original."""
    out = _prepare_output(cfg)
    threads = cfg.engine.threads or default_threads()

    log(f"[1/5] loading model ({cfg.model.kind})", quiet)
    parser, loaded = _load(cfg)
    if cfg.prune is not None:
        check_prunable(loaded.module)

    log("[2/5] reading images and sampling tiles", quiet)
    images, targets, image_names = read_calibration_images(cfg.calibration, loaded)
    tile_shape = resolve_tile_shape(cfg.calibration.tile_shape, loaded, images)
    data = sample_calibration(
        images,
        targets,
        image_names,
        tile_shape,
        cfg.calibration,
        holdout_tiles=cfg.fidelity.num_tiles,
        val_tiles=_validation_tiles(cfg),
    )
    if loaded.module is not None:
        loaded.module = parser.fine_tune(loaded.module, data.calib.inputs)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    make_umask_mode(tmp)  # the artifact is this folder, moved into place: not mkdtemp's 0700
    try:
        manifest = _build(cfg, parser, loaded, data, threads, tmp, quiet)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CompressResult(output=out, manifest=manifest)


def _validation_tiles(cfg: CompressConfig) -> int:
    """Tiles set apart for fine-tuning's validation or NNCF's accuracy control (none without either)."""
    if cfg.prune is not None:
        return cfg.prune.finetune.val_tiles
    if cfg.quantize.max_drop is not None:
        return cfg.fidelity.num_tiles
    return 0


def _build(
    cfg: CompressConfig,
    parser,
    loaded: LoadedModel,
    data: CalibrationData,
    threads: int,
    tmp: Path,
    quiet: bool,
) -> Manifest:
    """Build the candidates in ``tmp``, keep the chosen one there as the artifact, write its manifest."""
    reference = measure_original(loaded, data.holdout, threads, cfg.engine.latency_repeats)
    ctx = BuildContext(
        parser=parser,
        loaded=loaded,
        data=data,
        reference=reference,
        budget=budget_from(cfg.quantize.max_drop, cfg.fidelity, output_slices(loaded.outputs)),
        quantize=cfg.quantize,
        fidelity=cfg.fidelity,
        export=cfg.export,
        prune=cfg.prune,
        workdir=tmp,
        threads=threads,
        latency_repeats=cfg.engine.latency_repeats,
        seed=cfg.calibration.seed,
        quiet=quiet,
    )
    chosen, candidates = search(ctx)

    log("[5/5] writing the artifact", quiet)
    engines, final = _install(chosen, tmp, threads)
    with final, reference.engine:
        pkg = package_test(reference.engine, final, loaded)
    if "tensorrt" in cfg.export.targets:  # TensorRT-ready ONNX (+ the plan where a GPU is present)
        engines.tensorrt = _tensorrt_target(cfg, ctx, chosen)

    files = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    compressed_bytes = (
        sum((tmp / f).stat().st_size for f in files if f.startswith("openvino/"))
        or (tmp / "model.onnx").stat().st_size
    )
    manifest = _manifest(cfg, ctx, chosen, candidates, engines, pkg, files, compressed_bytes)
    # written from its plain values (tuples, paths and NumPy scalars become YAML's), and returned as read
    return write_manifest(tmp, manifest.model_dump())


def _install(chosen: Candidate, tmp: Path, threads: int) -> tuple[Engines, Engine]:
    """Move the chosen candidate's files to the artifact's top level (the others are discarded).

    Returns the manifest's engines and the primary engine, to be opened for the package test.
    """
    shutil.move(str(chosen.onnx_path), str(tmp / "model.onnx"))
    if (chosen.directory / "openvino").is_dir():
        shutil.move(str(chosen.directory / "openvino"), str(tmp / "openvino"))
    shutil.rmtree(tmp / "candidates", ignore_errors=True)

    onnx = {"path": "model.onnx", "precision": "fp32", "backend": "onnxruntime"}
    if (tmp / "openvino").is_dir():
        openvino = EngineEntry(**{"path": "openvino/model.xml", **chosen.engine})
        engines = Engines(onnx=EngineEntry(**onnx), openvino=openvino, primary=openvino)
        return engines, OpenVINOEngine(tmp / "openvino" / "model.xml", chosen.precision, threads)
    engines = Engines(onnx=EngineEntry(**onnx), primary=EngineEntry(**{**onnx, **chosen.engine}))
    return engines, OnnxRuntimeEngine(tmp / "model.onnx", threads)


def _tensorrt_target(cfg: CompressConfig, ctx: BuildContext, chosen: Candidate) -> dict[str, Any]:
    from efficientbioai.compress.tensorrt import build_target

    loaded, ref_out = ctx.loaded, ctx.reference.outputs
    return build_target(
        cfg,
        ctx.workdir,
        chosen.precision,
        ctx.parser.calibration_tiles(ctx.data.calib.inputs),
        ctx.data.holdout.inputs,
        ref_out,
        lambda engine, tiles: run_tiles(engine, tiles, loaded),
        lambda out: fidelity_figures(ref_out, out, None, cfg.fidelity, loaded.outputs),
        ctx.threads,
        quiet=ctx.quiet,
        log=lambda msg: log(msg, ctx.quiet),
        tile_min=loaded.tile_min,
        tile_step=loaded.tile_step,
    )


def _manifest(
    cfg: CompressConfig,
    ctx: BuildContext,
    chosen: Candidate,
    candidates: list[Candidate],
    engines: Engines,
    package: dict[str, Any] | None,
    files: dict[str, str],
    compressed_bytes: int,
) -> Manifest:
    """The artifact's manifest: what was compressed, how, how well, and which files make the engines."""
    loaded, data, ref = ctx.loaded, ctx.data, ctx.reference
    q = cfg.quantize
    return Manifest(
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        efficientbioai_version=efficientbioai.__version__,
        model=ModelInfo(**{"name": loaded.name, **loaded.source, "config": _model_spec(cfg.model)}),
        input=InputSpec(
            axes=loaded.axes,
            channels=loaded.in_channels,
            tile_min=loaded.tile_min,
            tile_step=loaded.tile_step,
            halo=loaded.halo,
            preprocessing=loaded.preprocessing,
        ),
        output=OutputSpec(
            channels=int(ref.outputs.shape[1]),
            postprocessing=loaded.postprocessing,
            outputs=loaded.outputs or [],
        ),
        precision=chosen.precision,
        transformations=chosen.steps,
        engines=engines,
        calibration=CalibrationInfo(
            images=data.names,
            tile_shape=list(data.tile_shape),
            tiles=len(data.calib.inputs),
            background_tiles=data.calib.background,
            seed=cfg.calibration.seed,
        ),
        fidelity=chosen.fidelity,
        package_test=package,
        latency=_latency(ctx, ref, chosen),
        size={
            "parameters": parameter_count(loaded),
            "parameters_compressed": chosen.parameters,
            "original_bytes": _original_bytes(loaded),
            "compressed_bytes": compressed_bytes,
        },
        strategy={
            "mode": q.strategy,
            "budget": q.max_drop.model_dump() if q.max_drop is not None else None,
            "chosen": chosen.name,
            "candidates": [c.as_dict() for c in candidates],
        },
        versions=versions(),
        files=files,
    )


def _latency(ctx: BuildContext, ref: Reference, chosen: Candidate) -> dict[str, Any]:
    return {
        "tile_shape": [1, ctx.loaded.in_channels, *ctx.data.tile_shape],
        "threads": ctx.threads,
        "original": {"backend": ref.engine.backend, "precision": "fp32", **ref.latency},
        "compressed": {**chosen.engine, **chosen.latency},
    }


def _original_bytes(loaded: LoadedModel) -> int | None:
    if loaded.source.get("weights_bytes"):  # a file inside a package (a zip's member has no path of its own)
        return int(loaded.source["weights_bytes"])
    for key in ("weights_file", "path"):
        p = loaded.source.get(key)
        if p and Path(p).is_file():
            return Path(p).stat().st_size
    return None


def _model_spec(model_cfg) -> dict[str, Any]:
    """The ``model:`` config with absolute paths, so that ``infer`` can load the original model again."""
    spec = model_cfg.model_dump(mode="json", exclude_none=True)
    for key in ("path", "checkpoint"):
        if key in spec:
            spec[key] = str(Path(spec[key]).expanduser().resolve())
    return spec


def _prepare_output(cfg: CompressConfig) -> Path:
    out = cfg.output.expanduser().resolve()
    if out.exists() and not cfg.overwrite:
        raise ConfigError(
            f"output: {cfg.output} already exists",
            "choose another output directory, or set overwrite: true (or pass --overwrite) to replace it",
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output: {cfg.output} exists and is not a directory", "choose another output path")
    check_writable(out.parent, "output")  # before the model is loaded: not after minutes of work
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
