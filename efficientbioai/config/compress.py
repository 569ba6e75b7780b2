"""The ``compress`` config: the model, calibration images, pruning, quantization, export, fidelity.

Relative paths in a config are read from the current working directory, as on the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from efficientbioai.config.base import AXES_HELP, StrictConfig

DEFAULT_MAX_DROP = 0.01
"""The default accuracy budget: Pearson r to the original may drop by at most this (absolute)."""


AUTO_PRUNE_RATIOS = (0.25, 0.5)
"""Pruning ratios that ``quantize.strategy: auto`` tries when prune.ratio is not given."""


class ModelConfig(StrictConfig):
    """Where the model comes from and how to build it."""

    kind: str = Field(
        description="model source: torchscript | torch | monai | bioimageio | onnx, "
        "or your own parser as 'package.module:ParserClass' (a BaseParser subclass)"
    )
    path: Path | None = Field(
        None,
        description="the model file or package: a TorchScript .pt, an .onnx file, or a bioimage.io "
        "folder / .zip / rdf yaml",
    )
    axes: str | None = Field(None, description=AXES_HELP + " (read from the package for bioimageio)")
    factory: str | None = Field(
        None, description="kind 'torch': the network's constructor as 'package.module:callable'"
    )
    name: str | None = Field(None, description="kind 'monai': a class of monai.networks.nets, e.g. UNet")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for the factory / MONAI class"
    )
    checkpoint: Path | None = Field(
        None,
        description="kinds 'torch' / 'monai': a state-dict checkpoint, loaded with weights_only=True",
    )
    weights: Literal["torchscript", "pytorch_state_dict", "onnx"] | None = Field(
        None, description="kind 'bioimageio': which weight format to use (default: the first usable one)"
    )
    tile_step: list[int] | None = Field(
        None, description="valid tile sizes are multiples of this per spatial axis (default: probed)"
    )
    halo: list[int] | None = Field(
        None, description="pixels per spatial axis at each tile border that are not trusted (default 0)"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="free-form options for your own parser")
    outputs: list[str] | None = Field(
        None,
        description="names for the network's outputs, in the order forward() returns them (default: the "
        "keys of a returned dict, else output0, output1, …; one output is 'output'); infer writes each "
        "as <image>_<name>",
    )
    drop_outputs: list[str] = Field(
        default_factory=list,
        description="outputs left out of the artifact by name, e.g. a per-image style vector, which cannot be "
        "tiled",
    )

    @field_validator("axes")
    @classmethod
    def _check_axes(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in ("bcyx", "bczyx"):
            raise ValueError(f"'{v}' is not supported: use 'bcyx' (2D) or 'bczyx' (3D)")
        return v.lower() if v else v

    @field_validator("path", "checkpoint")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.expanduser().exists():
            raise ValueError(f"file not found: '{v}' (relative paths are read from {Path.cwd()})")
        return v.expanduser() if v is not None else v

    @model_validator(mode="after")
    def _needs(self) -> ModelConfig:
        need = {
            "torchscript": ("path",),
            "onnx": ("path",),
            "bioimageio": ("path",),
            "torch": ("factory",),
            "monai": ("name",),
        }.get(self.kind, ())
        for key in need:
            if getattr(self, key) is None:
                raise ValueError(f"kind '{self.kind}' needs 'model.{key}'")
        if self.kind in ("torchscript", "onnx", "torch", "monai") and self.axes is None:
            raise ValueError(f"kind '{self.kind}' needs 'model.axes' ({AXES_HELP})")
        return self


class CalibrationConfig(StrictConfig):
    """The user's images that calibrate the quantizer and check fidelity (held-out tiles)."""

    images: str | None = Field(
        None,
        description="a file, folder or glob of TIFF / NPY images; without it a bioimage.io model's own "
        "test tensors are used",
    )
    axes: str | None = Field(
        None, description="axes of the images, e.g. 'zyx' or 'cyx' (default: inferred from the model)"
    )
    targets: str | None = Field(
        None, description="ground truth for the images (same order), enabling the task metric"
    )
    num_tiles: int = Field(32, ge=1, description="number of tiles that calibrate the quantizer")
    tile_shape: list[int] | None = Field(
        None, description="spatial tile shape, e.g. [256, 256] or [32, 128, 128] (default: from the model)"
    )
    background_fraction: float = Field(
        0.25, ge=0, le=1, description="at most this fraction of the tiles may be flat background"
    )
    seed: int = Field(0, description="random seed of the tile sampler")


class MaxDropConfig(StrictConfig):
    """An accuracy budget against the original model."""

    metric: Literal["pearson", "task"] = Field(
        "pearson",
        description="pearson: Pearson r of the output against the original model's (no labels needed); "
        "task: the task metric against calibration.targets (Pearson r for restoration, IoU for semantic)",
    )
    value: float = Field(gt=0, description="the largest drop allowed, e.g. 0.01")
    type: Literal["absolute", "relative"] = Field(
        "absolute", description="absolute: original − compressed; relative: that divided by the original"
    )


class FineTuneConfig(StrictConfig):
    """Recovering accuracy after pruning, on tiles of the calibration images.

    Training stops early: when the validation Pearson r to the original reaches ``stop_at_drop`` (by
    default half of ``quantize.max_drop``, leaving the other half to quantization), or when it has not
    improved by ``min_delta`` for ``patience`` validations; ``steps`` is only the cap.
    """

    steps: int = Field(
        1000,
        ge=0,
        description="at most this many optimizer steps (0: no fine-tuning); training stops "
        "earlier when the validation Pearson r reaches stop_at_drop or stops improving (patience)",
    )
    # lr 3e-3 with one full-size tile per step: the setting that brought a half-pruned, trained 3D U-Net
    # within a 0.01 budget in benchmarks/prune_cpu.py (and one tile per step halves the cost of a step)
    lr: float = Field(3e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(1, ge=1, description="tiles per step")
    tile_shape: list[int] | None = Field(
        None, description="spatial shape of training tiles (default: calibration.tile_shape)"
    )
    mode: Literal["auto", "supervised", "distill"] = Field(
        "auto",
        description="supervised: the task's loss against calibration.targets; distill: match the original "
        "model's outputs (no labels needed); auto: supervised when targets are given, else distill",
    )
    eval_every: int | None = Field(
        None,
        ge=1,
        description="validate every this many steps and keep the best (default: 50, or steps / 10 when "
        "that is smaller)",
    )
    patience: int | None = Field(
        4,
        ge=1,
        description="stop after this many validations in a row without an improvement of min_delta "
        "(null: always run all steps)",
    )
    min_delta: float = Field(
        1e-4, ge=0, description="the smallest rise of the validation Pearson r that counts as improvement"
    )
    stop_at_drop: float | None = Field(
        None,
        ge=0,
        description="stop once 1 − validation Pearson r to the original is at most this (default: half of "
        "quantize.max_drop when that budget is a Pearson drop, leaving the other half to quantization; "
        "none without a budget)",
    )
    val_tiles: int = Field(
        8, ge=1, description="validation tiles that pick the best checkpoint (apart from the fidelity tiles)"
    )


class PruneConfig(StrictConfig):
    """Structured pruning: whole channels are removed, so the network gets physically smaller."""

    method: Literal["l1", "l2", "fpgm"] = Field(
        "l1", description="filter importance: L1 or L2 norm of the weights, or FPGM (geometric median)"
    )
    ratio: float | list[float] = Field(
        0.5,
        description="fraction of channels removed from every prunable layer; a list of ratios is for "
        "quantize.strategy auto, which tries them from small to large (default with auto: "
        "[0.25, 0.5])",
    )
    layer_ratios: dict[str, float] = Field(
        default_factory=dict,
        description="per-layer ratios, as {regular expression over module names: ratio}; other layers use ratio",
    )
    ignore: list[str] = Field(
        default_factory=list,
        description="module names (regular expressions) left alone; the output layers always are",
    )
    round_to: int = Field(8, ge=1, description="channel counts kept at multiples of this (engines like 8/16)")
    global_pruning: bool = Field(
        False, description="rank channels across all layers instead of removing `ratio` from each"
    )
    finetune: FineTuneConfig = Field(default_factory=FineTuneConfig)

    @field_validator("ratio")
    @classmethod
    def _ratios(cls, v: float | list[float]) -> float | list[float]:
        for r in v if isinstance(v, list) else [v]:
            if not 0 < r < 1:
                raise ValueError(f"pruning ratio {r} must lie strictly between 0 and 1, e.g. 0.5")
        if isinstance(v, list) and not v:
            raise ValueError("give at least one ratio")
        return v

    @field_validator("layer_ratios")
    @classmethod
    def _layer_ratios(cls, v: dict[str, float]) -> dict[str, float]:
        for k, r in v.items():
            if not 0 <= r < 1:
                raise ValueError(f"ratio {r} for '{k}' must be in [0, 1)")
        return v

    @property
    def ratios(self) -> list[float]:
        """The ratios to build, smallest first (``strategy: auto`` tries them in this order)."""
        return sorted(set(self.ratio)) if isinstance(self.ratio, list) else [self.ratio]

    def auto_ratios(self) -> list[float]:
        """The ladder ``strategy: auto`` climbs: the given ratios, or AUTO_PRUNE_RATIOS by default."""
        return self.ratios if "ratio" in self.model_fields_set else list(AUTO_PRUNE_RATIOS)


class QuantizeConfig(StrictConfig):
    """How the model is made smaller and faster."""

    precision: Literal["fp32", "fp16", "bf16", "int8"] = Field(
        "int8",
        description="int8: NNCF post-training quantization; fp16 / bf16: engine precision; fp32: conversion",
    )
    preset: Literal["performance", "mixed"] = Field(
        "performance",
        description="int8: 'performance' (symmetric) or 'mixed' (asymmetric activations, often more accurate)",
    )
    per_channel: bool = Field(
        True, description="int8: per-channel (true) or per-tensor (false) weight scales"
    )
    fast_bias_correction: bool = Field(True, description="int8: NNCF's fast bias correction")
    overflow_fix: Literal["all_layers", "first_layer", "none"] = Field(
        "all_layers",
        description="int8 on CPUs (OpenVINO): x86 CPUs without VNNI (AVX2-only, AVX-512 without VNNI) sum "
        "int8 products in saturating 16 bits. all_layers (default) quantizes weights to 7 bits in every "
        "layer (NNCF's overflow fix), so the engine gives the same result on every CPU; first_layer (NNCF's "
        "default) only in the first: slightly more accurate where every CPU that runs the artifact has "
        "VNNI or AMX, much less accurate elsewhere (infer warns there); none: no headroom",
    )
    keep_float: list[str] = Field(
        default_factory=list,
        description="int8: layers kept in float, as regular expressions over layer names "
        "(names are printed in the error when a layer fails, or see model.onnx)",
    )
    keep_float_types: list[str] = Field(
        default_factory=list,
        description="int8: operation types kept in float, e.g. [ConvolutionBackpropData]",
    )
    max_drop: MaxDropConfig | None = Field(
        default_factory=lambda: MaxDropConfig(value=DEFAULT_MAX_DROP),
        description="accuracy budget: how much the chosen metric may drop against the original on held-out "
        "tiles; every candidate, pruned or not, is judged against it and compress fails rather than write "
        "one outside it. Default: a Pearson drop of 0.01 (absolute). A number is shorthand for "
        "{metric: pearson, value: <number>}. With precision int8, plain int8 is tried first, then NNCF's "
        "accuracy-controlled quantization, which keeps the most sensitive layers in float until it holds. "
        "null switches the budget off: the result is written whatever its accuracy (and says so)",
    )
    strategy: Literal["fixed", "auto"] = Field(
        "fixed",
        description="fixed: build `precision`; auto: try int8 → int8 with float fallback → bf16 → fp32, "
        "without pruning and then at each prune.ratio from small to large (stopping at the first ratio "
        "where nothing stays within the budget), and keep the fastest within quantize.max_drop",
    )

    @field_validator("max_drop", mode="before")
    @classmethod
    def _drop_shorthand(cls, v: Any) -> Any:
        return {"value": v} if isinstance(v, int | float) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _auto_needs_budget(self) -> QuantizeConfig:
        if self.strategy == "auto" and self.max_drop is None:
            raise ValueError(
                "quantize.strategy auto needs an accuracy budget: remove max_drop: null (default 0.01) "
                "or set quantize.max_drop (e.g. 0.01)"
            )
        if self.strategy == "auto" and "precision" in self.model_fields_set:
            raise ValueError(
                "quantize.strategy auto chooses the precision itself: remove quantize.precision, or use "
                "strategy: fixed"
            )
        return self


class TensorRTExportConfig(StrictConfig):
    """The TensorRT engine (export.targets: [tensorrt]), for NVIDIA GPUs."""

    precision: Literal["fp32", "fp16", "bf16", "int8", "fp8"] | None = Field(
        None,
        description="precision of the TensorRT engine: fp16 / bf16 (weights and layers cast, normalisations "
        "kept fp32), int8 / fp8 (explicit Q/DQ calibrated by NNCF on the calibration tiles; fp8 needs compute "
        "capability ≥ 8.9) or fp32 (default: quantize.precision)",
    )
    batch_size: int = Field(1, ge=1, description="batch size the engine is optimised for (tiling.batch_size)")
    max_batch_size: int = Field(8, ge=1, description="largest batch the engine accepts")


class ExportConfig(StrictConfig):
    """Which engines to build."""

    targets: list[Literal["openvino", "onnx", "tensorrt"]] = Field(
        default_factory=lambda: ["openvino"],
        description="engines to build; the ONNX model is always written. tensorrt writes the TensorRT-ready "
        "ONNX (checked on the CPU with ONNX Runtime) and builds the engine when a GPU is present, otherwise "
        "on first use on the GPU machine",
    )
    tensorrt: TensorRTExportConfig = Field(default_factory=TensorRTExportConfig)
    opset: int = Field(17, ge=13, description="ONNX opset")
    slim: bool = Field(True, description="simplify the ONNX graph with onnxslim")
    rewrite: bool = Field(
        True,
        description="exact graph rewrites that make engines faster (same result up to rounding): a 1×1 "
        "convolution after a bilinear/nearest upsampling runs before it, at the low resolution; a narrow "
        "strided transposed convolution (≤ 8 output channels, e.g. a U-Net's output layer) becomes a "
        "convolution + pixel shuffle, which CPUs run much faster and OpenVINO can run in int8",
    )


class FidelityConfig(StrictConfig):
    """How the compressed model is checked against the original on held-out tiles."""

    num_tiles: int = Field(8, ge=1, description="held-out tiles (never used for calibration)")
    task: Literal["restoration", "semantic"] | None = Field(
        None, description="task metric with targets: restoration → Pearson r, semantic → IoU (default: none)"
    )
    threshold: float = Field(0.5, description="semantic: outputs above this are foreground")
    max_pearson_drop: float | None = Field(
        None, ge=0, description="fail if 1 − Pearson r(compressed, original) exceeds this, e.g. 0.01"
    )
    max_relative_l2: float | None = Field(
        None, ge=0, description="fail if ‖compressed − original‖ / ‖original‖ exceeds this"
    )
    max_metric_drop: float | None = Field(
        None, ge=0, description="fail if the task metric drops by more than this (needs targets)"
    )


class EngineConfig(StrictConfig):
    """How engines run during compression checks."""

    threads: int | None = Field(
        None, ge=1, description="CPU threads for every engine and PyTorch (default: all cores)"
    )
    latency_repeats: int = Field(10, ge=1, description="timed runs per engine after warm-up")


class CompressConfig(StrictConfig):
    """`efficientbioai compress`: model → compressed engine in an artifact directory."""

    model: ModelConfig
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    prune: PruneConfig | None = Field(
        None, description="structured pruning with fine-tuning before quantization (default: none)"
    )
    output: Path = Field(description="artifact directory to create")
    overwrite: bool = Field(False, description="replace an existing artifact directory")

    @model_validator(mode="after")
    def _budget_and_pruning(self) -> CompressConfig:
        md = self.quantize.max_drop
        if (
            md is not None
            and md.metric == "task"
            and (self.fidelity.task is None or self.calibration.targets is None)
        ):
            raise ValueError(
                "quantize.max_drop.metric task needs a task metric: set fidelity.task and "
                "calibration.targets, or use metric: pearson (against the original, no labels needed)"
            )
        p = self.prune
        if (
            p is not None
            and isinstance(p.ratio, list)
            and len(p.ratio) > 1
            and self.quantize.strategy != "auto"
        ):
            raise ValueError(
                "prune.ratio: several ratios are only tried by quantize.strategy auto; give one ratio"
            )
        if p is not None and p.finetune.mode == "supervised" and self.calibration.targets is None:
            raise ValueError(
                "prune.finetune.mode supervised needs calibration.targets; use mode distill to learn "
                "from the original model's outputs instead"
            )
        if "openvino" not in self.export.targets and (
            self.quantize.strategy == "auto" or self.quantize.precision != "fp32"
        ):
            raise ValueError(
                f"quantize: precision {self.quantize.precision if self.quantize.strategy == 'fixed' else 'auto'} "
                "needs the OpenVINO engine; add openvino to export.targets, or use precision fp32 (the "
                "TensorRT engine's precision is export.tensorrt.precision)"
            )
        return self

    @model_validator(mode="after")
    def _metric_limit_needs_targets(self) -> CompressConfig:
        if self.fidelity.max_metric_drop is not None and (
            self.fidelity.task is None or self.calibration.targets is None
        ):
            raise ValueError(
                "fidelity.max_metric_drop needs a task metric: set fidelity.task and calibration.targets, "
                "or remove max_metric_drop"
            )
        return self
