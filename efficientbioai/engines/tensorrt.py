"""TensorRT (≥ 10; written for 11) engines on NVIDIA GPUs, built from the artifact's TensorRT-ready ONNX.

* Build: ``trt.Builder`` → strongly typed network (TensorRT 11 builds nothing else; the precision is in
  the graph, see :mod:`efficientbioai.compress.tensorrt`) → ``trt.OnnxParser`` → one optimization
  profile over batch *and* spatial axes (:func:`~efficientbioai.compress.tensorrt.profile_shapes`) →
  ``build_serialized_network`` → a plan (bytes).
* Run: named I/O tensors (``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``),
  ``set_input_shape``, ``set_tensor_address`` on torch CUDA tensors, ``execute_async_v3`` on a torch
  CUDA stream; no pycuda. Batches are pipelined by :class:`~efficientbioai.engines.cuda.CudaEngine`.
* A plan only runs on the GPU model and TensorRT version that built it: the artifact records both
  (:func:`plan_key`), and :func:`load_plan` rebuilds from the ONNX, saying why, when they differ.

Nothing here can run without an NVIDIA GPU and the ``tensorrt`` package (``pip install
'efficientbioai[gpu]'``); :func:`require_tensorrt` says which of the two is missing.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

from efficientbioai.engines.cuda import CudaEngine, gpu_description, require_cuda
from efficientbioai.errors import EfficientBioAIError

FP8_MIN_CAPABILITY = (8, 9)  # Ada Lovelace / Hopper and newer have FP8 tensor cores


def require_tensorrt():
    """The ``tensorrt`` module, or a clear error on how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EfficientBioAIError(
            f"backend tensorrt needs the TensorRT Python package, which is not installed ({exc})",
            "pip install 'efficientbioai[gpu]' (tensorrt-cu12, onnxruntime-gpu, nvidia-ml-py) on the GPU "
            "machine; its libraries are downloaded from NVIDIA's package index, so that machine needs to "
            "reach it",
        ) from exc
    return trt


def tensorrt_version() -> str | None:
    try:
        from importlib import metadata

        for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu12-bindings"):
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
    except Exception:  # pragma: no cover
        return None
    return None


def plan_key(gpu: dict[str, Any], trt_version: str) -> str:
    """A file-name-safe key for one GPU model + TensorRT version (a plan runs only there)."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", gpu["name"]).strip("-").lower()
    return f"{name}-sm{gpu['compute_capability'].replace('.', '')}-trt{trt_version}"


def check_precision_supported(precision: str, gpu: dict[str, Any]) -> None:
    """FP8 needs compute capability ≥ 8.9; bf16 ≥ 8.0 (Ampere)."""
    cc = tuple(int(x) for x in gpu["compute_capability"].split("."))
    if precision == "fp8" and cc < FP8_MIN_CAPABILITY:
        raise EfficientBioAIError(
            f"fp8 needs an NVIDIA GPU of compute capability ≥ 8.9 (Ada, Hopper or newer); "
            f"{gpu['name']} has {gpu['compute_capability']}",
            "compress with export.tensorrt.precision int8 (or fp16) for this GPU",
        )
    if precision == "bf16" and cc < (8, 0):
        raise EfficientBioAIError(
            f"bf16 needs an NVIDIA GPU of compute capability ≥ 8.0 (Ampere or newer); {gpu['name']} has "
            f"{gpu['compute_capability']}",
            "compress with export.tensorrt.precision fp16 for this GPU",
        )


class _Logger:
    """A TensorRT logger that keeps the messages, so that a failed build can say why."""

    def __new__(cls, trt, quiet: bool):
        sev = trt.ILogger.Severity
        loud = {sev.INTERNAL_ERROR, sev.ERROR, sev.WARNING}

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[str] = []

            def log(self, severity, msg):
                self.messages.append(f"{severity}: {msg}")
                if not quiet and severity in loud:
                    print(f"tensorrt: {msg}", file=sys.stderr)

        return Logger()


def build_plan(
    onnx_path: Path,
    profile: dict[str, tuple[int, ...]],
    *,
    workspace_gb: float | None = None,
    opt_level: int = 3,
    quiet: bool = True,
) -> bytes:
    """Build a serialized TensorRT engine (plan) from an ONNX file with one optimization profile."""
    trt = require_tensorrt()
    logger = _Logger(trt, quiet)
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:  # required on 10.x for Q/DQ-typed graphs; always on (ignored) in 11.x
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EfficientBioAIError(
            f"TensorRT could not parse {onnx_path.name}: " + "; ".join(errors[:3]),
            "an operation of the network is not supported by this TensorRT version: use backend "
            "onnxruntime-cuda or torch-cuda, or report the network",
        )
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    opt_profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    opt_profile.set_shape(name, profile["min"], profile["opt"], profile["max"])
    config.add_optimization_profile(opt_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        tail = [m for m in logger.messages if "ERROR" in m][-3:]
        raise EfficientBioAIError(
            "TensorRT could not build an engine from "
            f"{onnx_path.name} for input shapes {profile['min']} … {profile['max']}: " + "; ".join(tail),
            "try a smaller tile / batch (tiling.tile_shape, tiling.batch_size), or another precision",
        )
    return bytes(plan)


def load_plan(
    directory: Path,
    entry: dict[str, Any],
    profile: dict[str, tuple[int, ...]],
    index: int = 0,
    quiet: bool = False,
) -> tuple[bytes, dict[str, Any]]:
    """The plan for this GPU and TensorRT version: the artifact's, a cached rebuild, or a new build.

    ``entry`` is the manifest's ``engines.tensorrt``. A plan built elsewhere (another GPU model or
    TensorRT version), or none (compressed on a machine without a GPU), is rebuilt from the artifact's
    TensorRT ONNX, with a message; the rebuild is cached under ``tensorrt/plans/`` when the artifact is
    writable. Returns (plan bytes, what was used).
    """
    from efficientbioai.compress.tensorrt import profile_covers

    require_cuda("backend tensorrt", index)
    require_tensorrt()
    gpu = gpu_description(index)
    version = tensorrt_version() or "unknown"
    check_precision_supported(entry.get("precision", "fp32"), gpu)
    key = plan_key(gpu, version)
    recorded = entry.get("plan")
    built_for = entry.get("built_for") or {}
    stored_profile = {k: tuple(v) for k, v in (entry.get("profile") or {}).items()}
    # the tiles infer sends: (batch_size, C, *tile), and single tiles (the background value)
    needed = (profile["opt"], (1, *profile["opt"][1:]))
    covers = bool(stored_profile) and all(profile_covers(stored_profile, n) for n in needed)
    if recorded and built_for.get("key") == key and covers and (directory / recorded).is_file():
        return (directory / recorded).read_bytes(), {"plan": recorded, "source": "artifact", "key": key}
    cache = directory / "tensorrt" / "plans" / f"{key}-{'x'.join(map(str, profile['max']))}.plan"
    if cache.is_file():
        return cache.read_bytes(), {"plan": str(cache.relative_to(directory)), "source": "cache", "key": key}
    onnx_rel = entry.get("onnx")
    if not onnx_rel or not (directory / onnx_rel).is_file():
        raise EfficientBioAIError(
            f"{directory} has no TensorRT plan for this GPU ({gpu['name']}, TensorRT {version}) and no "
            f"TensorRT ONNX ({onnx_rel or 'not recorded'}) to build one from",
            "re-run `efficientbioai compress` with export.targets including tensorrt",
        )
    if not recorded:
        why = "the artifact was compressed on a machine without a GPU"
    elif built_for.get("key") != key:
        why = (
            f"its plan was built for {built_for.get('gpu', '?')} with TensorRT {built_for.get('tensorrt', '?')}, "
            f"this is {gpu['name']} with TensorRT {version}"
        )
    else:
        why = f"its plan's input shapes {stored_profile.get('min')} … {stored_profile.get('max')} do not cover {profile['opt']}"
    if not quiet:
        print(
            f"building the TensorRT engine from {onnx_rel} ({why}); this takes a minute or two once",
            file=sys.stderr,
            flush=True,
        )
    t0 = time.perf_counter()
    plan = build_plan(directory / onnx_rel, profile, quiet=quiet)
    info = {
        "plan": None,
        "source": "built",
        "key": key,
        "reason": why,
        "build_seconds": time.perf_counter() - t0,
    }
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_bytes(plan)
        tmp.replace(cache)
        info["plan"] = str(cache.relative_to(directory))
    except OSError:  # a read-only artifact: the engine is rebuilt next time
        pass
    return plan, info


class TensorRTEngine(CudaEngine):
    """A deserialized TensorRT plan run on torch CUDA tensors; input and output are float32."""

    backend = "tensorrt"

    def __init__(self, plan: bytes, precision: str, index: int = 0):
        import torch

        trt = require_tensorrt()
        self.device = require_cuda("backend tensorrt", index)
        self.index = index
        self.precision = precision
        self.threads = torch.get_num_threads()
        self.label = f"tensorrt {precision}"
        self._logger = _Logger(trt, quiet=True)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise EfficientBioAIError(
                    "TensorRT could not load the plan: "
                    + "; ".join(m for m in self._logger.messages if "ERROR" in m)[-500:],
                    "delete the artifact's tensorrt/plans/ folder to rebuild it for this GPU",
                )
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.inputs) != 1 or not self.outputs:
            raise EfficientBioAIError(
                f"the TensorRT engine has inputs {self.inputs} and outputs {self.outputs}; one image input "
                "and at least one output are expected",
                "re-run `efficientbioai compress`",
            )
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = {
            k: tuple(v)
            for k, v in zip(
                ("min", "opt", "max"), self.engine.get_tensor_profile_shape(self.inputs[0], 0), strict=True
            )
        }

    def run_device(self, x, stream):
        import torch

        from efficientbioai.compress.tensorrt import profile_covers

        shape = tuple(x.shape)
        if not profile_covers(self.profile, shape):
            raise EfficientBioAIError(
                f"input of shape {shape} is outside the TensorRT engine's shapes {self.profile['min']} … "
                f"{self.profile['max']}",
                "use a tile shape and batch size within that range, or delete tensorrt/plans/ to rebuild",
            )
        name = self.inputs[0]
        x = x.to(self._dtypes[name]).contiguous()
        self.context.set_input_shape(name, shape)
        self.context.set_tensor_address(name, x.data_ptr())
        outs = {}
        for o in self.outputs:
            out = torch.empty(
                tuple(self.context.get_tensor_shape(o)), dtype=self._dtypes[o], device=self.device
            )
            self.context.set_tensor_address(o, out.data_ptr())
            outs[o] = out
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EfficientBioAIError("TensorRT failed to run the batch", "see the messages above")
        return outs[self.outputs[0]].float()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "tensorrt": tensorrt_version(),
            "profile": {k: list(v) for k, v in self.profile.items()},
        }

    def close(self) -> None:
        self.context = self.engine = self._runtime = None


def _torch_dtype(trt, dtype):
    import torch

    names = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int32": torch.int32,
        "int64": torch.int64,
        "int8": torch.int8,
        "bool": torch.bool,
    }
    table = {getattr(trt, k): v for k, v in names.items() if hasattr(trt, k)}
    if dtype not in table:
        raise EfficientBioAIError(f"TensorRT I/O type {dtype} is not supported", "re-run compress")
    return table[dtype]
