"""The artifact: the directory ``compress`` writes and everything else reads.

One definition of its ``manifest.yaml`` (:class:`Manifest`, a versioned pydantic model), reading and
writing it, checking the files' checksums, and opening its engines (:meth:`Artifact.open_engine`) and the
original model (:meth:`Artifact.open_original`). ``infer``, Cellpose, the benchmark, the bioimage.io
export, the benchmarks and the tutorials all go through this module; none reads manifest keys by hand.

The manifest is checksummed too: ``manifest.sha256`` beside it holds the sha256 of ``manifest.yaml``'s
bytes (in ``sha256sum`` form, so ``sha256sum -c manifest.sha256`` checks it in a shell).
:func:`write_manifest` writes both; :func:`read_manifest` refuses a manifest whose bytes no longer match
(edited after ``compress`` wrote it) or that has no checksum (written by an older version). Every path
the manifest names (engine files, ``files``) must stay inside the artifact directory, and every engine
file must be one of the checksummed ``files``: :class:`Artifact` checks both when it opens the directory,
and checks the checksums of exactly the files an engine opens before opening it.

The parts ``infer`` depends on (model, input, output, engines, calibration, files) are typed; the
measurement records (fidelity, latency, size, strategy, package test) are free-form dictionaries whose
shape is documented where ``compress`` fills them (:mod:`efficientbioai.compress`).
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import re
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from efficientbioai.errors import ConfigError, EfficientBioAIError
from efficientbioai.models.base import sha256

MANIFEST = "manifest.yaml"
MANIFEST_CHECKSUM = "manifest.sha256"  # "<sha256 of manifest.yaml's bytes>  manifest.yaml\n"
MANIFEST_VERSION = 1
RECOMPRESS = "re-run `efficientbioai compress` with this version of efficientbioai to rebuild the artifact"
EDITED = (
    "re-run `efficientbioai compress` to rebuild the artifact (a manifest edited by hand cannot be trusted: "
    "it says which files make the engines and what their checksums are)"
)


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
    """Validate ``manifest`` and write it as ``directory/manifest.yaml``, with its checksum beside it."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.model_validate(_plain(manifest))
    data = manifest.to_yaml().encode("utf-8")
    (Path(directory) / MANIFEST).write_bytes(data)
    (Path(directory) / MANIFEST_CHECKSUM).write_text(f"{hashlib.sha256(data).hexdigest()}  {MANIFEST}\n")
    return manifest


def _recorded_checksum(directory: Path) -> str | None:
    """The manifest's sha256 as ``manifest.sha256`` records it; None when there is no such file."""
    path = directory / MANIFEST_CHECKSUM
    if not path.is_file():
        return None
    text = path.read_text(errors="replace").strip()
    match = re.fullmatch(rf"([0-9a-fA-F]{{64}})(?:\s+\*?{re.escape(MANIFEST)})?", text)
    if match is None:
        raise EfficientBioAIError(
            f"{path} is damaged: it does not hold the sha256 of {MANIFEST} (got {text[:80]!r})", EDITED
        )
    return match.group(1).lower()


def _read(directory: str | Path) -> tuple[Manifest, str]:
    """(the manifest, the sha256 of its bytes) of the artifact in ``directory``, or a clear error."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise EfficientBioAIError(
            f"{directory} is not an efficientbioai artifact directory (no {MANIFEST})",
            "point at a directory written by `efficientbioai compress`",
        )
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    recorded = _recorded_checksum(directory)
    if recorded is not None and recorded != digest:  # checked first: an edit explains whatever follows
        raise EfficientBioAIError(
            f"{directory}: {MANIFEST} was edited after compress wrote it (its sha256 is {digest}, "
            f"{MANIFEST_CHECKSUM} records {recorded})",
            EDITED,
        )
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
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
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise EfficientBioAIError(
            f"{path} was not written by this version of efficientbioai ({where}: {first['msg']})", RECOMPRESS
        ) from exc
    if recorded is None:
        raise EfficientBioAIError(
            f"{directory} has no {MANIFEST_CHECKSUM} (the checksum of {MANIFEST}): it was written by an older "
            "version of efficientbioai, or the file was removed",
            RECOMPRESS,
        )
    return manifest, digest


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of the artifact in ``directory``, or a clear error (not an artifact, too old, damaged,
    edited after ``compress`` wrote it)."""
    return _read(directory)[0]


def manifest_paths(m: Manifest) -> list[tuple[str, str]]:
    """(manifest key, path) for every path the manifest names inside the artifact."""
    out = []
    for key in ("onnx", "primary", "openvino"):
        entry = getattr(m.engines, key)
        if entry is not None and entry.path is not None:
            out.append((f"engines.{key}.path", entry.path))
    for key, value in (m.engines.tensorrt or {}).items():
        if key in ("onnx", "plan", "path") and value is not None:
            out.append((f"engines.tensorrt.{key}", str(value)))
    out += [(f"files['{rel}']", rel) for rel in m.files]
    return out


def engine_files(m: Manifest, backend: str) -> list[tuple[str, str]]:
    """(manifest key, path) of the files the engine of ``backend`` opens (an OpenVINO IR: .xml and .bin)."""
    if backend == "openvino" and m.engines.openvino is not None and m.engines.openvino.path:
        xml = m.engines.openvino.path
        return [
            ("engines.openvino.path", xml),
            ("engines.openvino.path (its .bin)", str(Path(xml).with_suffix(".bin"))),
        ]
    if backend == "onnxruntime" and m.engines.onnx.path:
        return [("engines.onnx.path", m.engines.onnx.path)]
    if backend == "tensorrt" and m.engines.tensorrt:
        return [
            (f"engines.tensorrt.{k}", str(m.engines.tensorrt[k]))
            for k in ("onnx", "plan")
            if m.engines.tensorrt.get(k)
        ]
    return []


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
        self._checksum: str | None = None
        if manifest is None:
            manifest, self._checksum = _read(self.directory)
        self.manifest = manifest
        self.check_paths()

    def __repr__(self) -> str:
        return f"Artifact({str(self.directory)!r}, {self.manifest.model.name!r}, {self.manifest.precision})"

    @property
    def checksum(self) -> str:
        """The sha256 (hex) of ``manifest.yaml``'s bytes: the artifact's identity, for provenance records.

        Read when the artifact was opened (the bytes its manifest was parsed from), so it names exactly
        the manifest this object holds; ``manifest.sha256`` records the same digest.
        """
        if self._checksum is None:
            self._checksum = sha256(self.directory / MANIFEST)
        return self._checksum

    def path(self, rel: str) -> Path:
        return self.directory / rel

    def _inside(self, key: str, rel: str) -> Path:
        """``rel`` (the manifest's ``key``) as a path inside the artifact, or an error naming both."""
        where = f"{self.directory / MANIFEST}: {key}"
        pure = rel.replace("\\", "/")
        if not rel or pure.startswith("/") or re.match(r"^[A-Za-z]:", pure) or Path(rel).is_absolute():
            problem = "is an absolute path"
        elif ".." in pure.split("/"):
            problem = "climbs out of the artifact directory ('..')"
        else:
            path = self.directory / rel
            try:
                path.resolve().relative_to(self.directory)
                return path
            except ValueError:
                problem = f"resolves to {path.resolve()} (a link out of the artifact directory)"
        raise EfficientBioAIError(
            f"{where} '{rel}' {problem}: an artifact's files must be inside its directory",
            f"the manifest was edited or a file was replaced by a link; {EDITED}",
        )

    def check_paths(self) -> None:
        """Every path in the manifest stays inside the artifact, and every engine file is checksummed."""
        m = self.manifest
        for key, rel in manifest_paths(m):
            self._inside(key, rel)
        for backend in ("onnxruntime", "openvino", "tensorrt"):
            for key, rel in engine_files(m, backend):
                if rel not in m.files:
                    raise EfficientBioAIError(
                        f"{self.directory / MANIFEST}: {key} '{rel}' is not one of the manifest's checksummed "
                        "files, so it cannot be checked before it is opened",
                        EDITED,
                    )

    def verify_files(self, files: list[tuple[str, str]]) -> None:
        """Check exactly these (manifest key, path) files: inside the artifact, listed, checksum unchanged."""
        for key, rel in files:
            path = self._inside(key, rel)
            digest = self.manifest.files.get(rel)
            if digest is None:
                raise EfficientBioAIError(
                    f"{self.directory / MANIFEST}: {key} '{rel}' is not one of the manifest's checksummed files",
                    EDITED,
                )
            self._check_file(path, digest)

    def _check_file(self, path: Path, digest: str) -> None:
        if not path.is_file():
            raise EfficientBioAIError(
                f"{path} is listed in the manifest but missing", "re-run `efficientbioai compress`"
            )
        actual = sha256(path)
        if actual != digest:
            raise EfficientBioAIError(
                f"{path} was changed after `efficientbioai compress` wrote it (sha256 {actual}, the manifest "
                f"records {digest})",
                "re-run `efficientbioai compress` to rebuild the artifact",
            )

    def verify(self, prefix: str = "") -> None:
        """Check the checksums of the files under ``prefix`` against the manifest.

        Without a prefix, the whole artifact: the manifest's own checksum (``manifest.sha256``; the
        manifest on disk must still be the one this object holds), its paths, and every file.
        """
        if not prefix:
            _, digest = _read(self.directory)
            if digest != self.checksum:
                raise EfficientBioAIError(
                    f"{self.directory}: {MANIFEST} was edited after compress wrote it (it changed after this "
                    "artifact was opened)",
                    EDITED,
                )
            self.check_paths()
        for rel, digest in self.manifest.files.items():
            if rel.startswith(prefix):
                self._check_file(self._inside(f"files['{rel}']", rel), digest)

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
            self.verify_files(engine_files(m, "openvino"))  # exactly the files it opens
            precision = m.precision if m.precision == "int8" else ov.requested_precision
            if m.precision == "int8":
                warn_if_int8_saturates(m)
            engine = OpenVINOEngine(
                self.directory / ov.path, precision, threads, ov.device or "CPU", hint=hint
            )
            engine.label = f"openvino {m.precision}"
            return engine
        if backend == "onnxruntime":
            self.verify_files(engine_files(m, "onnxruntime"))
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
            # the files it opens, and the rest of tensorrt/ (an ONNX graph's external data)
            opened = engine_files(m, "tensorrt")
            seen = {rel for _, rel in opened}
            rest = [(f"files['{r}']", r) for r in m.files if r.startswith("tensorrt/") and r not in seen]
            self.verify_files(opened + rest)
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
            self.verify_files(engine_files(m, "onnxruntime"))
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
