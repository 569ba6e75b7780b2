"""ONNX files: quantized and converted on the ONNX / OpenVINO side (there is no PyTorch network)."""

from __future__ import annotations

from pathlib import Path

from efficientbioai.errors import ModelLoadError
from efficientbioai.models.base import BaseParser, LoadedModel, register_parser, scratch_dir, sha256


def read_onnx(src: Path):
    """The ONNX model in ``src`` (with its external data), or a clear error when it cannot be read."""
    import onnx

    try:
        return onnx.load(str(src))
    except Exception as exc:
        raise ModelLoadError(
            f"{src} is not an ONNX model ({type(exc).__name__})",
            "check the file; for TorchScript use kind 'torchscript'",
        ) from exc


def make_dynamic(src: Path, dst: Path, axes: str, model=None) -> int:
    """Write a copy of an ONNX model whose batch and spatial axes are dynamic; returns input channels.

    Models exported with fixed shapes (e.g. 1×1×512×512) usually compute the same thing at any size;
    the declared shapes and cached intermediate shapes are what pin them, so both are cleared. A graph
    that hard-codes a size in a Reshape still fails later, at conversion or first run, with a clear error.
    ``model``: ``src`` already read (:func:`read_onnx`).
    """
    import onnx

    model = model if model is not None else read_onnx(src)
    init_names = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise ModelLoadError(f"{src} has {len(inputs)} inputs; only single-input models are supported")
    for tensor in list(inputs) + list(model.graph.output):
        dims = tensor.type.tensor_type.shape.dim
        if len(dims) != len(axes):
            raise ModelLoadError(
                f"{src}: tensor '{tensor.name}' has {len(dims)} dimensions but model.axes is '{axes}'",
                "set model.axes to match the ONNX model",
            )
        for i, a in enumerate(axes):
            if a != "c":
                dims[i].ClearField("dim_value")
                dims[i].dim_param = {"b": "batch"}.get(a, a)
    del model.graph.value_info[:]
    channels = inputs[0].type.tensor_type.shape.dim[1].dim_value or None
    onnx.save(model, str(dst))
    return channels


@register_parser("onnx")
class OnnxParser(BaseParser):
    """An ONNX file; the fidelity reference is the same file run in ONNX Runtime at fp32."""

    def load(self) -> LoadedModel:
        path = self.config.path
        tmp = scratch_dir("onnx") / "dynamic.onnx"
        channels = make_dynamic(path, tmp, self.config.axes)
        return LoadedModel(
            onnx_path=tmp,
            axes=self.config.axes,
            name=path.stem,
            in_channels=channels,
            source={"path": str(path), "sha256": sha256(path), "weights": "onnx"},
        )
