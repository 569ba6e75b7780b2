"""The ``efficientbioai benchmark`` config: one model, some images, and the variants to compare.

Each variant is a set of ``efficientbioai compress`` keys deep-merged into a base compress config (the
top-level ``model:`` plus the ``compress:`` section), so every compress key works in a variant, including
keys added to ``compress`` later (e.g. ``prune:``). The merged configs are validated with
:class:`~efficientbioai.config.CompressConfig` when the benchmark config is loaded, before anything runs.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from efficientbioai.config import (
    CompressConfig,
    ModelConfig,
    StrictConfig,
    TilingConfig,
    read_config_file,
    validate_config,
)
from efficientbioai.errors import ConfigError

# keys of a compress config that the benchmark sets itself
RESERVED = ("model", "output", "overwrite")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
TASKS = ("restoration", "semantic", "instance")


class GenerateConfig(StrictConfig):
    """Generated fluorescence-like nuclei with their ground truth (nothing is downloaded)."""

    generate: Literal["nuclei"] = Field(
        description="generator: 'nuclei' (ellipsoid nuclei, blurred, noisy; 2D or 3D from `shape`)"
    )
    shape: list[int] = Field(description="image shape, [Y, X] or [Z, Y, X]")
    count: int = Field(1, ge=1, description="number of images")
    seed: int = Field(0, description="random seed of the first image (the next ones use seed + 1, ...)")
    density: float = Field(1.0, gt=0, description="nuclei per 40 pixels² (2D) or 40³ (3D) volume")
    noise: float | None = Field(
        None,
        ge=0,
        description="noise level of the input; the target of task restoration is the same image without "
        "noise (default 0.25 for restoration, else 0.04)",
    )

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[int]) -> list[int]:
        if len(v) not in (2, 3) or min(v) < 8:
            raise ValueError(f"{v}: give 2 ([Y, X]) or 3 ([Z, Y, X]) sizes of at least 8")
        return v


class ImageSource(StrictConfig):
    """Images of your own (TIFF / NPY / zarr), optionally with ground truth."""

    path: str = Field(description="a file, folder or glob of images")
    axes: str | None = Field(None, description="axes of the images, e.g. 'zyx', 'cyx' or 'bcyx'")
    targets: str | None = Field(
        None, description="ground truth for the images (same sorted order), enabling the task metric"
    )


def _source_tag(v: Any) -> str:
    if isinstance(v, dict):
        return "generate" if "generate" in v else "path"
    return "generate" if isinstance(v, GenerateConfig) else "path"


Source = Annotated[
    Annotated[ImageSource, Tag("path")] | Annotated[GenerateConfig, Tag("generate")],
    Discriminator(_source_tag),
]


class TrainConfig(StrictConfig):
    """Train the model briefly on generated images first (for configs that must run with no files)."""

    steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="crops per step")
    crop: list[int] | None = Field(
        None, description="spatial crop shape of a training sample (default: the tiling tile shape)"
    )
    lr: float = Field(3e-3, gt=0, description="Adam learning rate")
    images: int = Field(4, ge=1, description="generated training images (other seeds than the benchmark's)")
    seed: int = Field(0, description="random seed of the training images, crops and weights")


class RunsConfig(StrictConfig):
    """How often each row runs over the images."""

    warmup: int = Field(1, ge=0, description="untimed whole-image runs per image before timing")
    repeats: int = Field(5, ge=1, description="timed whole-image runs per image (median and spread)")


class PanelsConfig(StrictConfig):
    """Image panels in report.html: input / original output / compressed output / difference."""

    enabled: bool = Field(True, description="draw the panels")
    max_images: int = Field(2, ge=1, description="panels for at most this many images")
    slice: int | None = Field(None, description="3D: the z slice shown (default: the middle one)")
    size: int = Field(320, ge=32, description="longest side of a panel in pixels")


class BenchmarkConfig(StrictConfig):
    """`efficientbioai benchmark`: the original model against compressed variants, on whole images."""

    title: str | None = Field(None, description="title of the report (default: the model's name)")
    model: ModelConfig = Field(description="the model, as in `efficientbioai compress`")
    train: TrainConfig | None = Field(
        None,
        description="train the model (kind torch / monai, no checkpoint) on generated images before the "
        "benchmark; without it the model is used as given",
    )
    images: list[Source] = Field(
        description="whole images to time and score: a path / glob, {path, axes, targets}, "
        "{generate: nuclei, shape: [...]}, or a list of those"
    )
    axes: str | None = Field(None, description="axes of `images` when it is a path (e.g. 'zyx', 'bcyx')")
    targets: str | None = Field(None, description="ground truth of `images` when it is a path")
    task: Literal["restoration", "semantic", "instance"] | None = Field(
        None,
        description="task metric against targets: restoration (Pearson, PSNR, SSIM), semantic (Dice, IoU), "
        "instance (AP@0.5, F1); also picks the training loss",
    )
    threshold: float = Field(0.5, description="semantic / instance: outputs above this are foreground")
    compress: dict[str, Any] = Field(
        default_factory=dict,
        description="compress keys shared by every variant (calibration, quantize, fidelity, engine, ...)",
    )
    variants: list[dict[str, Any]] = Field(
        min_length=1,
        description="each: {name: ..., <compress keys>} deep-merged into model + compress, e.g. "
        "{name: int8, quantize: {precision: int8}}",
    )
    tiling: TilingConfig = Field(default_factory=TilingConfig, description="sliding-window settings")
    runs: RunsConfig = Field(default_factory=RunsConfig)
    devices: Literal["auto"] | list[Literal["cpu", "gpu"]] = Field(
        "auto", description="'auto' (the CPU, and the GPU when torch sees one) or a list of cpu / gpu"
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for every row (default: all cores)")
    energy: bool = Field(True, description="measure energy (CodeCarbon offline; NVML on NVIDIA GPUs)")
    panels: PanelsConfig = Field(default_factory=PanelsConfig)
    output: Path = Field(description="folder for the report, the artifacts and the outputs")
    overwrite: bool = Field(False, description="replace a previous benchmark in `output`")

    @field_validator("images", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        if isinstance(v, str | dict):
            v = [v]
        if isinstance(v, list):
            return [{"path": s} if isinstance(s, str) else s for s in v]
        return v

    @field_validator("compress")
    @classmethod
    def _no_reserved(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in RESERVED if k in v]
        if bad:
            raise ValueError(
                f"{', '.join(bad)} cannot be set here: the model is the top-level `model:` and each variant's "
                "artifact goes to OUTPUT/artifacts/<name>"
            )
        return v

    @field_validator("variants")
    @classmethod
    def _names(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen = set()
        for i, var in enumerate(v):
            name = var.get("name")
            if not isinstance(name, str) or not NAME.match(name):
                raise ValueError(
                    f"variants[{i}] needs a `name:` of letters, digits and . _ + - (got {name!r}), "
                    "e.g. {name: int8, quantize: {precision: int8}}"
                )
            if name == "original" or name in seen:
                raise ValueError(
                    f"variants[{i}]: the name '{name}' is "
                    + ("taken by the original model's row" if name == "original" else "used twice")
                )
            seen.add(name)
            bad = [k for k in RESERVED if k in var]
            if bad:
                raise ValueError(
                    f"variants[{i}] '{name}': {', '.join(bad)} cannot be set in a variant (the model is the "
                    "top-level `model:`, the artifact goes to OUTPUT/artifacts/<name>)"
                )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BenchmarkConfig:
        if self.model.kind == "cellpose":
            raise ValueError(
                "model.kind cellpose is not supported by `benchmark` yet (Cellpose tiles its images and makes "
                "its masks itself); compare a compressed Cellpose model with `efficientbioai infer` and "
                "compare_with_original: true"
            )
        paths = [s for s in self.images if isinstance(s, ImageSource)]
        generated = [s for s in self.images if isinstance(s, GenerateConfig)]
        if (self.axes is not None or self.targets is not None) and len(paths) != 1:
            raise ValueError(
                "top-level axes / targets describe `images` when it is one path; with several sources put "
                "them in each source: {path: ..., axes: ..., targets: ...}"
            )
        if (any(s.targets for s in paths) or self.targets or generated) and self.task is None:
            raise ValueError(
                "task is needed to score the images against their ground truth: restoration | semantic "
                "| instance"
            )
        for g in generated:
            if ndim(self.model) is not None and len(g.shape) != ndim(self.model):
                raise ValueError(
                    f"images: generated shape {g.shape} is {len(g.shape)}D but model.axes "
                    f"'{self.model.axes}' is {ndim(self.model)}D"
                )
        if self.train is not None:
            if self.model.kind not in ("torch", "monai") or self.model.checkpoint is not None:
                raise ValueError(
                    "train: only for kind torch / monai without model.checkpoint (the trained weights "
                    "become the checkpoint); remove `train:` to benchmark the model as given"
                )
            if not generated:
                raise ValueError(
                    "train: needs generated images (images: {generate: nuclei, shape: [...]}) to train on; "
                    "for your own images, train your model yourself and set model.checkpoint"
                )
            if self.task is None:
                raise ValueError("train: needs a task (restoration | semantic | instance) to pick the loss")
        return self

    def source_paths(self) -> list[ImageSource]:
        """Path sources with the top-level axes / targets applied."""
        out = []
        for s in self.images:
            if isinstance(s, ImageSource):
                out.append(
                    s.model_copy(update={"axes": s.axes or self.axes, "targets": s.targets or self.targets})
                )
        return out

    def generated(self) -> list[GenerateConfig]:
        return [s for s in self.images if isinstance(s, GenerateConfig)]


def ndim(model: ModelConfig) -> int | None:
    return len(model.axes) - 2 if model.axes else None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in: mappings merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def base_compress(cfg: BenchmarkConfig, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """The compress config every variant starts from (without ``output``)."""
    base: dict[str, Any] = {"model": cfg.model.model_dump(mode="json", exclude_none=True)}
    base = deep_merge(base, cfg.compress)
    engine = base.setdefault("engine", {})
    if cfg.threads is not None:
        engine.setdefault("threads", cfg.threads)
    engine.setdefault("latency_repeats", 3)  # compress's own per-tile check; the benchmark times whole images
    if calibration:
        cal = base.setdefault("calibration", {})
        for k, v in calibration.items():
            cal.setdefault(k, v)
    return base


def variant_configs(
    cfg: BenchmarkConfig,
    artifacts: Path,
    source: str = "config",
    model_override: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
) -> list[tuple[str, CompressConfig]]:
    """(name, validated CompressConfig) per variant; a problem is reported with the variant's name."""
    base = base_compress(cfg, calibration)
    if model_override:
        base["model"] = deep_merge(base["model"], model_override)
    out = []
    for i, var in enumerate(cfg.variants):
        name = var["name"]
        overrides = {k: v for k, v in var.items() if k != "name"}
        data = deep_merge(base, overrides)
        data["output"] = str(artifacts / name)
        data["overwrite"] = True
        out.append((name, validate_config(data, CompressConfig, source=f"{source}: variants[{i}] '{name}'")))
    return out


def load_benchmark_config(path: str | Path, overrides: dict[str, Any] | None = None) -> BenchmarkConfig:
    """Read and validate a benchmark config, including every variant's merged compress config."""
    path = Path(path)
    data = read_config_file(path, overrides, examples="configs/benchmark_*.yaml")
    return check_benchmark_config(data, source=str(path))


_SOURCE_LOC = re.compile(r"^(  - images\.\d+)\.(path|generate)((?:\.\S+)?): (.*)$")


def _source_errors(text: str) -> str:
    """Error lines about image sources without pydantic's union tag, with the source's known keys."""
    models = {"path": ImageSource, "generate": GenerateConfig}
    lines = []
    for line in text.splitlines():
        m = _SOURCE_LOC.match(line)
        if m:
            head, tag, rest, msg = m.groups()
            if msg.startswith("unknown key"):
                known = list(models[tag].model_fields)
                close = difflib.get_close_matches(rest.lstrip(".").split(".")[-1], known, n=1)
                msg = "unknown key; " + (
                    f"did you mean '{close[0]}'?" if close else f"known keys here: {', '.join(known)}"
                )
            line = f"{head}{rest}: {msg}"
        lines.append(line)
    return "\n".join(lines)


def check_benchmark_config(data: dict[str, Any], source: str = "config") -> BenchmarkConfig:
    """Validate a benchmark config and every variant's merged compress config."""
    try:
        cfg = validate_config(data, BenchmarkConfig, source=source)
    except ConfigError as exc:
        raise ConfigError(_source_errors(exc.problem), exc.fix) from None
    variant_configs(cfg, cfg.output.expanduser() / "artifacts", source=source)
    return cfg
