"""PyTorch → ONNX (dynamic batch and spatial axes, slimmed) → OpenVINO IR."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np

from efficientbioai.errors import ExportError


def dynamic_axes(axes: str) -> dict[int, str]:
    return {i: {"b": "batch"}.get(a, a) for i, a in enumerate(axes) if a != "c"}


def export_onnx(module, example: np.ndarray, path: Path, axes: str, opset: int = 17) -> Path:
    """Export a network to ONNX with dynamic batch and spatial axes (legacy TorchScript exporter)."""
    import torch

    dyn = dynamic_axes(axes)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (torch.from_numpy(example),),
                str(path),
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": dyn, "output": dyn},
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"the network could not be exported to ONNX: {type(exc).__name__}: {first}",
            "an operation in the network has no ONNX equivalent at this opset: try a higher export.opset, "
            "replace the operation in your network, or export it to ONNX yourself and use model.kind: onnx",
        ) from exc
    return path


def slim_onnx(path: Path) -> None:
    """Simplify the ONNX graph in place (constant folding, dead nodes); keeps the original on failure."""
    import onnx
    import onnxslim

    try:
        slim = onnxslim.slim(onnx.load(str(path)))
    except Exception as exc:  # onnxslim is an optimisation; an unslimmed graph is still correct
        warnings.warn(f"onnxslim could not simplify the graph ({exc}); keeping it as exported", stacklevel=2)
        return
    onnx.save(slim, str(path))


def rewrite_onnx(path: Path) -> dict[str, list[str]]:
    """Apply the exact rewrites of :mod:`efficientbioai.compress.rewrite` in place.

    Returns {rewrite: names of the layers it changed} for the rewrites that changed something.
    """
    import onnx

    from efficientbioai.compress.rewrite import pointwise_before_upsample, transposed_conv_to_subpixel

    model = onnx.load(str(path))
    done = {
        "pointwise_before_upsample": pointwise_before_upsample(model),
        "transposed_conv_to_subpixel": transposed_conv_to_subpixel(model),
    }
    done = {k: v for k, v in done.items() if v}
    if done:
        onnx.save(model, str(path))
    return done


def copy_onnx(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def to_openvino(onnx_path: Path):
    """Convert an ONNX file to an in-memory ``openvino.Model``."""
    import openvino as ov

    try:
        return ov.convert_model(str(onnx_path))
    except Exception as exc:
        raise ExportError(
            f"OpenVINO could not convert {onnx_path.name}: {str(exc).strip().splitlines()[0][:300]}",
            "an operation is not supported by OpenVINO: try another export.opset, or use the ONNX Runtime "
            "engine (export.targets: [onnx])",
        ) from exc


def save_openvino(model, xml_path: Path, compress_weights_to_fp16: bool = False) -> Path:
    import openvino as ov

    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_weights_to_fp16)
    return xml_path
