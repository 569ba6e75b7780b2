"""What a compress / infer / benchmark config needs, checked against this machine, with the fix for each gap."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from efficientbioai.doctor.machine import (
    LIBRARIES,
    gpu_report,
    has_gpu,
    installed,
    library_versions,
)
from efficientbioai.errors import EfficientBioAIError


@dataclass
class Need:
    """Something a config needs, whether this machine has it, and the command that fixes it."""

    what: str
    why: str
    ok: bool
    fix: str | None = None


def _lib_need(libs, name: str, why: str) -> Need:
    return Need(name, why, installed(libs, name), libs[name]["install"])


def _gpu_need(gpu: dict[str, Any], why: str) -> Need:
    return Need(
        "NVIDIA GPU",
        why,
        has_gpu(gpu),
        "run on a machine with an NVIDIA GPU and driver (nvidia-smi must list it), or use the CPU engine: "
        "export.targets [openvino] / backend openvino",
    )


def _compress_needs(model: dict, section: dict, libs, gpu, where: str) -> list[Need]:
    needs: list[Need] = []
    kind = str(model.get("kind", ""))
    if kind == "cellpose":
        needs.append(_lib_need(libs, "cellpose", f"{where}model.kind cellpose"))
        model_type = (model.get("options") or {}).get("model_type")
        if model_type and needs[-1].ok:
            needs.append(_cellpose_weights(str(model_type), where))
    elif ":" in kind:
        module = kind.partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        needs.append(
            Need(
                f"python module '{module}'",
                f"{where}model.kind {kind} (your own parser)",
                found,
                f"install the package that defines '{module}', or run from the folder that contains it "
                "(or add that folder to PYTHONPATH)",
            )
        )
    elif kind == "monai":
        needs.append(_lib_need(libs, "monai", f"{where}model.kind monai"))
    if section.get("prune"):
        needs.append(_lib_need(libs, "torch-pruning", f"{where}prune"))
    quantize = section.get("quantize") or {}
    if quantize.get("precision", "int8") == "int8" or quantize.get("strategy") == "auto":
        needs.append(_lib_need(libs, "nncf", f"{where}quantize (int8)"))
    targets = (section.get("export") or {}).get("targets") or ["openvino"]
    if "openvino" in targets:
        needs.append(_lib_need(libs, "openvino", f"{where}export.targets openvino"))
    if "tensorrt" in targets:
        why = f"{where}export.targets tensorrt"
        needs += [_gpu_need(gpu, why), _lib_need(libs, "tensorrt", why)]
    return needs


def _cellpose_weights(model_type: str, where: str) -> Need:
    """cellpose's own weights for ``options.model_type`` must be on disk: efficientbioai downloads nothing."""
    from efficientbioai.models.cellpose import builtin_file

    try:
        path, _ = builtin_file(model_type)
        return Need(f"cellpose weights '{model_type}'", f"{where}model.options.model_type", True, str(path))
    except EfficientBioAIError as exc:
        return Need(f"cellpose weights '{model_type}'", f"{where}model.options.model_type", False, exc.fix)


def _infer_needs(data: dict, libs, gpu) -> list[Need]:
    needs: list[Need] = []
    artifact = Path(str(data.get("model")))
    kind = None
    if (artifact / "manifest.yaml").is_file():
        from efficientbioai.artifact import read_manifest
        from efficientbioai.errors import EfficientBioAIError

        try:
            kind = read_manifest(artifact).model.kind
        except EfficientBioAIError as exc:  # damaged, or written by another version
            needs.append(Need(f"artifact {artifact}", exc.problem, False, exc.fix))
    else:
        needs.append(
            Need(
                f"artifact {artifact}",
                "model",
                False,
                "run `efficientbioai compress` first, or point model at an artifact directory (with manifest.yaml)",
            )
        )
    if kind == "cellpose":
        needs.append(_lib_need(libs, "cellpose", "model: a cellpose artifact"))
    backend = data.get("backend")
    if backend == "tensorrt":
        needs += [_gpu_need(gpu, "backend tensorrt"), _lib_need(libs, "tensorrt", "backend tensorrt")]
    elif backend in ("openvino", "onnxruntime"):
        needs.append(_lib_need(libs, backend, f"backend {backend}"))
    device = str(data.get("device", ""))
    if "cuda" in device or "gpu" in device.lower():
        needs.append(_gpu_need(gpu, f"device {device}"))
    dist = data.get("distributed")
    if dist:
        needs.append(_lib_need(libs, "dask", "distributed"))
        scheduler = str((dist or {}).get("scheduler", "local")) if isinstance(dist, dict) else "local"
        if scheduler.lower() in ("slurm", "pbs", "lsf", "sge", "htcondor", "moab", "oar"):
            needs.append(_lib_need(libs, "dask-jobqueue", f"distributed.scheduler {scheduler}"))
    return needs


def config_needs(path: str | Path, libs=None, gpu=None) -> tuple[str, list[Need]]:
    """(config type, needs) for a compress, infer or benchmark config file.

    The YAML is read, not validated: doctor must be able to say "this needs TensorRT" about a config
    that this installation would refuse.
    """
    from efficientbioai.config import read_config_file

    libs = libs if libs is not None else library_versions()
    gpu = gpu if gpu is not None else gpu_report()
    data = read_config_file(Path(path))
    needs = [_lib_need(libs, lib.name, "every command") for lib in LIBRARIES if lib.required]
    if "variants" in data:
        kind = "benchmark"
        shared = data.get("compress") or {}
        needs += _compress_needs(data.get("model") or {}, shared, libs, gpu, "")
        for v in data.get("variants") or []:
            if isinstance(v, dict):
                merged = {**shared, **{k: v[k] for k in v if k != "name"}}
                needs += _compress_needs(
                    data.get("model") or {}, merged, libs, gpu, f"variant {v.get('name')}: "
                )
        for d in data.get("devices") or []:
            if "cuda" in str(d) or "gpu" in str(d).lower():
                needs.append(_gpu_need(gpu, f"devices {d}"))
    elif isinstance(data.get("model"), dict):
        kind = "compress"
        needs += _compress_needs(data["model"], data, libs, gpu, "")
    else:
        kind = "infer"
        needs += _infer_needs(data, libs, gpu)
    unique: dict[tuple[str, bool], Need] = {}
    for n in needs:  # one line per missing / present piece, the first reason kept
        unique.setdefault((n.what, n.ok), n)
    return kind, list(unique.values())
