"""The artifact: the directory ``compress`` writes and everything else reads.

One definition of its ``manifest.yaml`` (:class:`Manifest`, a versioned pydantic model), reading and
writing it, checking the files' checksums, and opening its engines (:meth:`Artifact.open_engine`) and the
original model (:meth:`Artifact.open_original`). ``infer``, Cellpose, the benchmark, the bioimage.io
export, the benchmarks and the tutorials all go through this module; none reads manifest keys by hand.

The parts ``infer`` depends on (model, input, output, engines, calibration, files) are typed; the
measurement records (fidelity, latency, size, strategy, package test) are free-form dictionaries whose
shape is documented where ``compress`` fills them (:mod:`efficientbioai.compress`).
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from efficientbioai.errors import ConfigError, EfficientBioAIError
from efficientbioai.models.base import sha256

MANIFEST = "manifest.yaml"
MANIFEST_VERSION = 1
RECOMPRESS = "re-run `efficientbioai compress` with this version of efficientbioai to rebuild the artifact"


def versions() -> dict[str, str]:
    """Versions of the packages an artifact's engines depend on (recorded in the manifest)."""
    out = {"python": platform.python_version()}
    for pkg in (
        "efficientbioai",
        "torch",
        "openvino",
        "nncf",
        "onnx",
        "onnxruntime",
        "onnxslim",
        "numpy",
        "monai",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """A part that records more than ``infer`` reads (model sources and engines differ in their facts)."""

    model_config = ConfigDict(extra="allow")


class ModelInfo(_Open):
    """Where the original came from (plus the loader's facts: path, sha256, rdf, weights, cellpose…)."""

    name: str
    kind: str | None = None
    config: dict[str, Any] | None = None  # the ModelConfig that loads the original again

    def fact(self, key: str, default: Any = None) -> Any:
        """One of the loader's extra facts (``path``, ``sha256``, ``rdf``, ``cellpose``…)."""
        return (self.model_extra or {}).get(key, default)


class InputSpec(_Part):
    axes: str  # the network's axes: bcyx or bczyx
    channels: int
    tile_min: list[int] | None = None
    tile_step: list[int] | None = None
    halo: list[int] | None = None
    preprocessing: list[dict[str, Any]] = []

    @property
    def ndim(self) -> int:
        return len(self.axes) - 2


class OutputSpec(_Part):
    """The network's output as the engines return it, and the outputs it holds.

    ``channels`` are the engine's (packed) channels. ``outputs`` lists the network's own outputs (name,
    channels, per-axis ``scale`` and ``offset``, ``packed_channels``: [start, stop)); see
    :mod:`efficientbioai.models.outputs`. Empty: one output, of the input's size.
    """

    channels: int
    postprocessing: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []

    @property
    def packed(self) -> bool:
        """Whether the engine's tensor holds several outputs, or one at another scale or size."""
        o = self.outputs
        return len(o) > 1 or (len(o) == 1 and (any(s != 1 for s in o[0]["scale"]) or any(o[0]["offset"])))

    def names(self) -> list[str]:
        return [o["name"] for o in self.outputs] or ["output"]


class EngineEntry(_Open):
    """One engine file of the artifact (OpenVINO IR, ONNX); engine-specific facts are kept as extras."""

    backend: str
    precision: str
    path: str | None = None
    requested_precision: str | None = None
    device: str | None = None
    threads: int | None = None


class Engines(_Part):
    onnx: EngineEntry
    primary: EngineEntry
    openvino: EngineEntry | None = None
    tensorrt: dict[str, Any] | None = None  # see efficientbioai.compress.tensorrt.build_target

    def built(self) -> list[str]:
        return [k for k in ("onnx", "openvino", "tensorrt") if getattr(self, k) is not None]


class CalibrationInfo(_Part):
    images: list[str]
    tile_shape: list[int]
    tiles: int
    background_tiles: int = 0
    seed: int | None = None


class Manifest(_Part):
    """``manifest.yaml``: what was compressed, how, how well, and which files make the engines."""

    manifest_version: Literal[1] = MANIFEST_VERSION
    created: str
    efficientbioai_version: str
    model: ModelInfo
    input: InputSpec
    output: OutputSpec
    precision: str
    transformations: list[dict[str, Any]] = []
    engines: Engines
    calibration: CalibrationInfo
    fidelity: dict[str, Any]
    package_test: dict[str, Any] | None = None
    latency: dict[str, Any]
    size: dict[str, Any]
    strategy: dict[str, Any] | None = None
    versions: dict[str, str] = {}
    files: dict[str, str] = {}

    @property
    def pruned(self) -> bool:
        return any("prun" in str(t.get("step", "")) for t in self.transformations)

    @property
    def task(self) -> str | None:
        return self.fidelity.get("task")

    @property
    def original_is_torch(self) -> bool:
        """Whether the original can be re-loaded as a PyTorch module (not an ONNX file)."""
        return (
            self.model.config is not None and (self.latency.get("original") or {}).get("backend") == "torch"
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.model_dump(exclude_none=False)), sort_keys=False)


def _plain(obj: Any) -> Any:
    """Make a structure safe for ``yaml.safe_dump`` (tuples, paths, NumPy scalars)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def write_manifest(directory: Path, manifest: Manifest | dict[str, Any]) -> Manifest:
    """Validate ``manifest`` and write it as ``directory/manifest.yaml``."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.model_validate(_plain(manifest))
    (Path(directory) / MANIFEST).write_text(manifest.to_yaml())
    return manifest


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of the artifact in ``directory``, or a clear error (not an artifact, too old, damaged)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise EfficientBioAIError(
            f"{directory} is not an efficientbioai artifact directory (no {MANIFEST})",
            "point at a directory written by `efficientbioai compress`",
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EfficientBioAIError(f"{path} is not valid YAML: {exc}", RECOMPRESS) from exc
    if not isinstance(data, dict):
        raise EfficientBioAIError(f"{path} does not hold a manifest (a mapping)", RECOMPRESS)
    if data.get("manifest_version") != MANIFEST_VERSION:
        raise EfficientBioAIError(
            f"{path}: manifest version {data.get('manifest_version')} is not supported by this efficientbioai "
            f"(it reads version {MANIFEST_VERSION})",
            RECOMPRESS,
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise EfficientBioAIError(
            f"{path} was not written by this version of efficientbioai ({where}: {first['msg']})", RECOMPRESS
        ) from exc


def warn_if_int8_saturates(m: Manifest) -> None:
    """Warn when this CPU saturates int8 sums and the artifact's weights leave no headroom for it."""
    from efficientbioai.cpu import describe_cap, int8_saturates

    step = next((t for t in m.transformations if t.get("step") == "quantize_int8"), None)
    fix = (step or {}).get("overflow_fix", "first_layer")  # before the option: NNCF's default
    if step is None or fix == "all_layers" or not int8_saturates():
        return
    cap = describe_cap()
    warnings.warn(
        f"this CPU has no int8 dot-product instructions (no VNNI{f'; {cap}' if cap else ''}), and this "
        f"int8 artifact was quantized with overflow_fix: {fix}: its int8 sums saturate here, so its "
        "accuracy can be well below what compress measured. Fix: re-run `efficientbioai compress` with "
        "quantize.overflow_fix: all_layers (the default), or use backend: onnxruntime (fp32)",
        UserWarning,
        stacklevel=3,
    )


class Artifact:
    """An artifact directory and its manifest: checksums, engines, the original model."""

    def __init__(self, directory: str | Path, manifest: Manifest | None = None):
        self.directory = Path(directory).expanduser().resolve()
        self.manifest = manifest if manifest is not None else read_manifest(self.directory)

    def __repr__(self) -> str:
        return f"Artifact({str(self.directory)!r}, {self.manifest.model.name!r}, {self.manifest.precision})"

    def path(self, rel: str) -> Path:
        return self.directory / rel

    def verify(self, prefix: str = "") -> None:
        """Check the checksums of the files under ``prefix`` against the manifest."""
        for rel, digest in self.manifest.files.items():
            if not rel.startswith(prefix):
                continue
            path = self.directory / rel
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
        self, backend: str | None = None, threads: int = 1, hint: str = "THROUGHPUT", **gpu_options: Any
    ):
        """The engine for ``backend`` (default: the artifact's primary engine).

        The GPU backends (``tensorrt``, ``torch-cuda``, ``onnxruntime-cuda``, ``onnxruntime-tensorrt``) take
        ``gpu_options`` (``gpu``: a GpuConfig, ``tile_shape``, ``batch_size``, ``quiet``). OpenVINO compiles
        with the THROUGHPUT hint by default: whole-image inference keeps several requests in flight. On an
        idle 2-core CPU neither hint wins consistently (benchmarks/infer_cpu.py), but THROUGHPUT slowed
        down far less when other processes competed for the cores.
        """
        from efficientbioai.config import BACKENDS, GPU_BACKENDS
        from efficientbioai.engines import OnnxRuntimeEngine, OpenVINOEngine

        m = self.manifest
        backend = backend or m.engines.primary.backend
        if backend in GPU_BACKENDS:
            return self._open_gpu_engine(backend, threads, **gpu_options)
        if backend == "openvino":
            ov = m.engines.openvino
            if ov is None:
                raise ConfigError(
                    f"backend: {self.directory} has no OpenVINO engine (built: {', '.join(m.engines.built())})",
                    "compress with export.targets: [openvino], or use backend: onnxruntime",
                )
            self.verify("openvino/")
            precision = m.precision if m.precision == "int8" else ov.requested_precision
            if m.precision == "int8":
                warn_if_int8_saturates(m)
            engine = OpenVINOEngine(
                self.directory / ov.path, precision, threads, ov.device or "CPU", hint=hint
            )
            engine.label = f"openvino {m.precision}"
            return engine
        if backend == "onnxruntime":
            self.verify("model.onnx")
            engine = OnnxRuntimeEngine(self.directory / m.engines.onnx.path, threads)
            engine.label = "onnxruntime fp32"
            return engine
        if backend == "torch":
            return self.open_original(threads)
        raise ConfigError(f"backend: unknown backend '{backend}'", f"use one of {', '.join(BACKENDS)}")

    def load_original(self):
        """(parser, LoadedModel) of the original, re-loaded from where ``compress`` found it."""
        from efficientbioai.config import ModelConfig
        from efficientbioai.models import load_model

        spec = self.manifest.model.config
        if spec is None:
            raise EfficientBioAIError(
                "the manifest does not say how to load the original model (written by an older version)",
                "re-run `efficientbioai compress`, or set compare_with_original: false",
            )
        try:
            return load_model(ModelConfig.model_validate(spec))
        except Exception as exc:
            problem = getattr(exc, "problem", str(exc))
            where = spec.get("path") or spec.get("factory") or spec.get("name")
            raise EfficientBioAIError(
                f"the original model could not be loaded from {where}: {problem}",
                "keep the original model where `compress` found it, or set compare_with_original: false",
            ) from exc

    def open_original(self, threads: int = 1):
        """The original model as an engine (PyTorch fp32, or ONNX Runtime for an ONNX original)."""
        from efficientbioai.engines import reference_engine

        _, loaded = self.load_original()
        engine = reference_engine(loaded, threads)
        engine.label = f"{engine.backend} fp32 (original)"
        return engine

    def _open_gpu_engine(
        self,
        backend: str,
        threads: int,
        gpu=None,
        tile_shape: tuple[int, ...] | None = None,
        batch_size: int = 1,
        quiet: bool = True,
    ):
        """The engine for a GPU backend, or a clear error naming what is missing."""
        from efficientbioai.config import GPU_BACKENDS, GpuConfig
        from efficientbioai.engines.cuda import require_cuda

        gpu = gpu or GpuConfig()
        m = self.manifest
        if backend == "tensorrt":
            from efficientbioai.compress.tensorrt import profile_shapes
            from efficientbioai.engines.tensorrt import TensorRTEngine, load_plan, require_tensorrt

            entry = m.engines.tensorrt
            if entry is None:
                raise ConfigError(
                    f"backend: {self.directory} has no TensorRT engine (built: {', '.join(m.engines.built())})",
                    "compress with export.targets: [openvino, tensorrt], or use backend: torch-cuda",
                )
            require_cuda("backend tensorrt", gpu.index)
            require_tensorrt()
            self.verify("tensorrt/")
            profile = profile_shapes(
                tile_shape or tuple(m.calibration.tile_shape),
                m.input.channels,
                m.input.tile_min,
                m.input.tile_step,
                batch_size,
                max(batch_size, entry.get("max_batch_size", 8)),
            )
            plan, info = load_plan(self.directory, entry, profile, gpu.index, quiet=quiet)
            engine = TensorRTEngine(plan, entry["precision"], gpu.index)
            engine.plan_info = info
            return engine
        if backend in ("onnxruntime-cuda", "onnxruntime-tensorrt"):
            from efficientbioai.engines import OnnxRuntimeEngine

            require_cuda(f"backend {backend}", gpu.index)
            self.verify("model.onnx")
            engine = OnnxRuntimeEngine(
                self.directory / m.engines.onnx.path,
                threads,
                device=backend.split("-")[1],
                gpu_index=gpu.index,
            )
            engine.label = f"{backend} fp32"
            return engine
        if backend == "torch-cuda":
            from efficientbioai.engines import TorchEngine
            from efficientbioai.engines.cuda import TorchCudaEngine

            require_cuda("backend torch-cuda", gpu.index)
            original = self.open_original(threads)
            if not isinstance(original, TorchEngine):
                raise EfficientBioAIError(
                    "backend torch-cuda: the original model exists only as ONNX, there is no PyTorch module",
                    "use backend: tensorrt or onnxruntime-cuda",
                )
            engine = TorchCudaEngine(original.module, gpu.torch_precision, gpu.index, gpu.channels_last)
            engine.label = f"torch-cuda {gpu.torch_precision} (original)"
            return engine
        raise ConfigError(
            f"backend: {backend!r} is not a GPU backend", f"use one of {', '.join(GPU_BACKENDS)}"
        )
