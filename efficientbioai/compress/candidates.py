"""One candidate: a network (the original or a pruned one) at one precision, built and measured.

Building a candidate: the network is exported to ONNX once per network (:func:`build_network`: pruning
and fine-tuning first where asked), then per precision converted to OpenVINO, quantized (int8, plain or
with NNCF's accuracy control), run on the held-out tiles, timed, and judged against the fidelity limits
and the accuracy budget (:func:`build_candidate`). Which candidates are tried and which one wins is
:mod:`efficientbioai.compress.strategy`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai import metrics
from efficientbioai.compress.budget import Budget
from efficientbioai.compress.calibration import CalibrationData, crop_halo, postprocess, run_tiles
from efficientbioai.compress.export import (
    copy_onnx,
    export_onnx,
    rewrite_onnx,
    save_openvino,
    slim_onnx,
    to_openvino,
)
from efficientbioai.compress.fidelity import Reference, check_limits, fidelity_figures
from efficientbioai.compress.progress import log
from efficientbioai.compress.prune import count_parameters, fine_tune, prune
from efficientbioai.compress.quantize import quantize_int8, quantize_int8_accuracy_control
from efficientbioai.config import ExportConfig, FidelityConfig, PruneConfig, QuantizeConfig
from efficientbioai.cpu import cpu_record
from efficientbioai.engines import (
    OnnxRuntimeEngine,
    OpenVINOEngine,
    TorchEngine,
    median_latency_ms,
    reference_engine,
)
from efficientbioai.errors import ConfigError, ExportError, FidelityError
from efficientbioai.models import LoadedModel
from efficientbioai.sampling import pad_to
from efficientbioai.tables import human_count
from efficientbioai.tiling import valid_size


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


@dataclass
class BuildContext:
    """What every candidate is built from and measured against (the same for all of them)."""

    parser: Any  # the model's parser (BaseParser): calibration_tiles, fine_tune
    loaded: LoadedModel
    data: CalibrationData
    reference: Reference
    budget: Budget | None
    quantize: QuantizeConfig
    fidelity: FidelityConfig
    export: ExportConfig
    prune: PruneConfig | None
    workdir: Path  # candidates are built under workdir / "candidates"
    threads: int
    latency_repeats: int  # engine.latency_repeats
    seed: int  # calibration.seed: fine-tuning's crops and initialisation
    quiet: bool = False

    @property
    def example(self) -> np.ndarray:
        """One held-out tile as a (1, C, *tile) batch: traces, exports and times the networks."""
        return self.data.holdout.inputs[0][np.newaxis]


# -------------------------------------------------------------------------------------- the network


@dataclass
class Network:
    """An exported network (the original or a pruned one) that candidates at each precision start from."""

    onnx_path: Path
    steps: list[dict[str, Any]]  # transformations so far (prune, fine_tune, export, rewrite…)
    parameters: int


def parameter_count(loaded: LoadedModel) -> int:
    """Parameters of the loaded original (PyTorch module, or the initializers of an ONNX-only model)."""
    if loaded.module is not None:
        return count_parameters(loaded.module)
    import onnx

    return int(sum(np.prod(t.dims) for t in onnx.load(str(loaded.onnx_path)).graph.initializer))


def build_network(ctx: BuildContext, ratio: float | None) -> Network:
    """The original network (``ratio`` None) or a pruned and fine-tuned copy, exported to ONNX."""
    module, steps = ctx.loaded.module, []
    name = "original" if ratio is None else f"prune{ratio:g}"
    if ratio is not None:
        log(f"[3/5] pruning {ratio:.0%} of the channels ({ctx.prune.method}) and fine-tuning", ctx.quiet)
        module, steps = prune_and_finetune(ctx, ratio)
    log(f"[3/5] exporting the {'original' if ratio is None else 'pruned'} network to ONNX", ctx.quiet)
    onnx_path, export_steps = export_network(
        module, ctx.loaded, ctx.example, ctx.workdir / "candidates" / name, ctx.export, ctx.threads
    )
    params = count_parameters(module) if module is not None else parameter_count(ctx.loaded)
    return Network(onnx_path, steps + export_steps, params)


def export_network(
    module, loaded: LoadedModel, example: np.ndarray, directory: Path, export: ExportConfig, threads: int
) -> tuple[Path, list[dict[str, Any]]]:
    """ONNX export (or copy), slimming, exact rewrites and a parity check against ``module``.

    Returns the ONNX path and the transformations applied.
    """
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / "model.onnx"
    steps: list[dict[str, Any]] = []
    if module is not None:
        export_onnx(module, example, onnx_path, loaded.axes, export.opset)
        steps.append({"step": "export_onnx", "opset": export.opset, "dynamic_axes": "batch+spatial"})
    else:
        copy_onnx(loaded.onnx_path, onnx_path)
        steps.append({"step": "onnx_dynamic_axes", "dynamic_axes": "batch+spatial"})
    if export.slim:
        slim_onnx(onnx_path)
        steps.append({"step": "onnxslim"})
    if export.rewrite:
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


def finetune_stop_at(prune: PruneConfig, quantize: QuantizeConfig) -> float | None:
    """The validation drop at which fine-tuning stops: as configured, or half a Pearson budget."""
    stop_at = prune.finetune.stop_at_drop
    md = quantize.max_drop
    if stop_at is None and md is not None and md.metric == "pearson":
        stop_at = md.value / 2  # the other half of the budget is left to quantization
    return stop_at


def prune_and_finetune(ctx: BuildContext, ratio: float):
    """A pruned copy of the original, fine-tuned on the calibration images; and its transformation steps."""
    pc, loaded, data, quiet = ctx.prune, ctx.loaded, ctx.data, ctx.quiet
    module, prep = prune(loaded.module, ctx.example, pc, ratio)
    log(
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
    # fine-tuning crops at random
    images = [pad_to(np.asarray(im, np.float32), ft_tile) for im in data.images]
    targets = [pad_to(np.asarray(t, np.float32), ft_tile) for t in data.targets] if data.targets else None
    module, ft = fine_tune(
        module,
        loaded.module,
        images,
        targets,
        data.val.inputs,
        ft_tile,
        pc.finetune,
        task=ctx.fidelity.task,
        postprocessing=loaded.postprocessing,
        halo=loaded.halo,
        threads=ctx.threads,
        seed=ctx.seed,
        stop_at_drop=finetune_stop_at(pc, ctx.quantize),
        quiet=quiet,
    )
    if ft.steps:
        log(
            f"      fine-tuned {ft.steps} steps ({ft.mode}): validation Pearson r to the original "
            f"{ft.val_pearson_before:.4f} → {ft.val_pearson_best:.4f} (best at step {ft.best_step}; "
            f"{ft.stopped})",
            quiet,
        )
    # a user's parser may adapt the pruned network too (BaseParser.fine_tune)
    module = ctx.parser.fine_tune(module, data.calib.inputs)
    return module, [prep.as_dict(), ft.as_dict()]


# -------------------------------------------------------------------------------------- one candidate


def build_candidate(c: Candidate, ctx: BuildContext) -> None:
    """Build ``c`` under ``c.directory`` from ``c.onnx_path``, measure it and judge it (fills ``c``)."""
    if "openvino" not in ctx.export.targets:
        engine = OnnxRuntimeEngine(c.onnx_path, ctx.threads)
        c.size_bytes = c.onnx_path.stat().st_size
    else:
        engine = _openvino_engine(c, ctx)
        c.size_bytes = sum(p.stat().st_size for p in (c.directory / "openvino").iterdir())
    with engine:
        out = run_tiles(engine, ctx.data.holdout.inputs, ctx.loaded)
        c.fidelity = {
            "tiles": len(ctx.data.holdout.inputs),
            "background_tiles": ctx.data.holdout.background,
            **fidelity_figures(
                ctx.reference.outputs, out, ctx.reference.targets, ctx.fidelity, ctx.loaded.outputs
            ),
        }
        c.latency = median_latency_ms(engine, ctx.example, repeats=ctx.latency_repeats)
        c.engine = engine.describe()
    _judge(c, ctx)


def _openvino_engine(c: Candidate, ctx: BuildContext) -> OpenVINOEngine:
    """Convert to OpenVINO, quantize where the precision is int8, save the IR; the engine that runs it."""
    ov_model = to_openvino(c.onnx_path)
    if c.precision == "int8":
        ov_model = _quantize(c, ov_model, ctx)
    xml = save_openvino(
        ov_model,
        c.directory / "openvino" / "model.xml",
        compress_weights_to_fp16=c.precision in ("fp16", "bf16"),
    )
    engine = OpenVINOEngine(xml, c.precision, ctx.threads)
    if c.precision in ("fp16", "bf16"):
        c.steps.append(
            {
                "step": "engine_precision",
                "requested": c.precision,
                "runs": engine.precision,
                "weights_stored_as": "fp16",
            }
        )
    return engine


def _quantize(c: Candidate, ov_model, ctx: BuildContext):
    q = ctx.quantize
    tiles = ctx.parser.calibration_tiles(ctx.data.calib.inputs)
    step = {
        "step": "quantize_int8",
        "tool": "nncf",
        "preset": q.preset,
        "per_channel": q.per_channel,
        "fast_bias_correction": q.fast_bias_correction,
        # the weights' headroom against saturating int8 sums (x86 without VNNI): infer warns where it matters
        "overflow_fix": q.overflow_fix,
        "compressed_on": cpu_record(),
        "keep_float": q.keep_float,
        "keep_float_types": q.keep_float_types,
        "calibration_tiles": len(tiles),
    }
    if c.fallback:
        ov_model, step = _accuracy_controlled(c, ov_model, tiles, step, ctx)
    else:
        ov_model = quantize_int8(ov_model, tiles, q, quiet=ctx.quiet)
    c.steps.append(step)
    return ov_model


def _accuracy_controlled(c: Candidate, ov_model, tiles, step: dict[str, Any], ctx: BuildContext):
    """int8 with float fallback: NNCF keeps reverting the most sensitive layers until the budget holds."""
    loaded, val, budget = ctx.loaded, ctx.data.val, ctx.budget
    ref_engine = ctx.reference.engine
    if not val.inputs:  # pragma: no cover - compress samples them whenever a budget is set
        raise ConfigError("quantize.max_drop: no validation tiles", "set calibration.num_tiles")
    md = ctx.quantize.max_drop
    if md.metric == "pearson":
        val_refs = [run_tiles(ref_engine, [t], loaded) for t in val.inputs]
    else:
        if not val.targets:
            raise ConfigError(
                "quantize.max_drop.metric task needs calibration.targets", "give calibration.targets"
            )
        val_refs = [crop_halo(t[np.newaxis], loaded.halo) for t in val.targets]
        orig = [run_tiles(ref_engine, [t], loaded) for t in val.inputs]
    # NNCF measures the drop from the float network it quantizes; a pruned network has already spent
    # part of the budget, which is measured here against the original and subtracted.
    with OnnxRuntimeEngine(c.onnx_path, ctx.threads) as fp32:
        net_out = [run_tiles(fp32, [t], loaded) for t in val.inputs]
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
        return crop_halo(postprocess(o, loaded), loaded.halo)

    items = [(t[np.newaxis].astype(np.float32), r) for t, r in zip(val.inputs, val_refs, strict=True)]
    model, kept = quantize_int8_accuracy_control(
        ov_model,
        tiles,
        ctx.quantize,
        items,
        lambda outs, refs: budget.metric(np.concatenate([post(o) for o in outs]), np.concatenate(refs)),
        lambda o, r: budget.metric(post(o), r),
        max_drop=allowed,
        quiet=ctx.quiet,
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


def _judge(c: Candidate, ctx: BuildContext) -> None:
    """Check the measured candidate against the fidelity limits and the budget; set its status."""
    problems = check_limits(c.fidelity, ctx.fidelity)
    budget = ctx.budget
    if budget is not None:
        c.drop = budget.drop(c.fidelity)
        if not budget.holds(c.fidelity) and not c.fidelity.get("nonfinite_outputs"):
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
