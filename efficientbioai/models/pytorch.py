"""PyTorch model sources: TorchScript files, Python factories with state dicts, MONAI networks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from efficientbioai.errors import ModelLoadError
from efficientbioai.models.base import BaseParser, LoadedModel, import_object, register_parser, sha256


def load_torchscript(path: Path):
    import torch

    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(
            f"{path} is not a TorchScript file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            "if it is a state dict, use kind 'torch' with a factory (or 'monai'); if it is ONNX, use kind 'onnx'",
        ) from exc


def read_state_dict(checkpoint: Path) -> dict:
    """The state dict in a checkpoint (read with ``weights_only=True``), or a clear error."""
    import torch

    try:
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"model.checkpoint: cannot read {checkpoint} as a weights-only PyTorch checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            "save the weights with torch.save(model.state_dict(), path); pickled whole models are not loaded "
            "for safety",
        ) from exc
    for key in ("state_dict", "model_state_dict", "model", "network"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ModelLoadError(
            f"model.checkpoint: {checkpoint} holds a {type(state).__name__}, not a state dict"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def fit_state_dict(module, state: dict, checkpoint: Path, label: str):
    """Load ``state`` (read from ``checkpoint``) into ``module``, explaining mismatches."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise ModelLoadError(
            f"model.checkpoint: {checkpoint} does not fit the {label} architecture: {detail[:600]}",
            "check model.kwargs (channels, strides, dimensions…) against the ones used for training",
        ) from exc
    return module


def load_state_dict_into(module, checkpoint: Path, label: str):
    """Load a state-dict checkpoint (``weights_only=True``) into ``module``, explaining mismatches."""
    return fit_state_dict(module, read_state_dict(checkpoint), checkpoint, label)


def import_callable(spec: str, key: str = "model.factory"):
    fn = import_object(spec, key)
    if not callable(fn):
        raise ModelLoadError(f"{key}: '{spec}' is not callable")
    return fn


def build(fn, kwargs: dict[str, Any], label: str):
    try:
        return fn(**kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"could not build {label} with kwargs {kwargs}: {type(exc).__name__}: {exc}",
            "check model.kwargs against the network's constructor",
        ) from exc


@register_parser("torchscript")
class TorchScriptParser(BaseParser):
    """A TorchScript archive (``torch.jit.save``)."""

    def load(self) -> LoadedModel:
        path = self.config.path
        return LoadedModel(
            module=load_torchscript(path),
            axes=self.config.axes,
            name=path.stem,
            source={"path": str(path), "sha256": sha256(path), "weights": "torchscript"},
        )


@register_parser("torch")
class TorchFactoryParser(BaseParser):
    """A network built by a Python callable, with weights from a state-dict checkpoint."""

    def load(self) -> LoadedModel:
        cfg = self.config
        module = build(import_callable(cfg.factory), cfg.kwargs, cfg.factory)
        source = {"factory": cfg.factory, "kwargs": cfg.kwargs, "weights": "pytorch_state_dict"}
        if cfg.checkpoint is not None:
            load_state_dict_into(module, cfg.checkpoint, cfg.factory)
            source.update(path=str(cfg.checkpoint), sha256=sha256(cfg.checkpoint))
        return LoadedModel(module=module, axes=cfg.axes, name=cfg.factory.rpartition(":")[2], source=source)


@register_parser("monai")
class MonaiParser(BaseParser):
    """A MONAI network from ``monai.networks.nets`` by class name, kwargs and checkpoint."""

    def load(self) -> LoadedModel:
        import monai.networks.nets as nets

        cfg = self.config
        cls = getattr(nets, cfg.name, None)
        if cls is None:
            raise ModelLoadError(
                f"model.name: MONAI has no network '{cfg.name}'",
                "use a class name from monai.networks.nets, e.g. UNet, BasicUNet, DynUNet, SegResNet",
            )
        module = build(cls, cfg.kwargs, f"monai {cfg.name}")
        source = {"monai": cfg.name, "kwargs": cfg.kwargs, "weights": "pytorch_state_dict"}
        if cfg.checkpoint is not None:
            load_state_dict_into(module, cfg.checkpoint, f"monai {cfg.name}")
            source.update(path=str(cfg.checkpoint), sha256=sha256(cfg.checkpoint))
        return LoadedModel(module=module, axes=cfg.axes, name=cfg.name, source=source)
