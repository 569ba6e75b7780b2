"""The parser interface: how a model source becomes a network we can export, calibrate and check.

``BaseParser`` is the public extension point. A subclass loads a model its own way and plugs in by name
(``model.kind: "mypkg.parsers:MyParser"``) without changes to efficientbioai::

    from efficientbioai.models import BaseParser, LoadedModel

    class MyParser(BaseParser):
        def load(self) -> LoadedModel:
            net = MyNet(**self.config.kwargs)
            net.load_state_dict(torch.load(self.config.checkpoint, weights_only=True))
            return LoadedModel(module=net.eval(), axes="bcyx", name="my-net")

        # optional: which tiles calibrate the quantizer (default: the sampled tiles unchanged)
        def calibration_tiles(self, tiles):
            return [t for t in tiles if t.std() > 0.1]

        # optional: adapt the network before export (called on every run, and again on a pruned
        # network after efficientbioai's own fine-tuning, see the `prune:` config)
        def fine_tune(self, module, tiles):
            return module
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from efficientbioai.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    import torch

    from efficientbioai.config import ModelConfig


@dataclass
class LoadedModel:
    """A model ready for compression.

    Tensors follow ``axes``: (B, C, Y, X) for ``"bcyx"`` or (B, C, Z, Y, X) for ``"bczyx"``, float32.
    Exactly one of ``module`` (a PyTorch network, also the fidelity reference) and ``onnx_path`` (a model
    that exists only as ONNX) is set.
    """

    axes: str
    module: torch.nn.Module | None = None
    onnx_path: Path | None = None
    name: str = "model"
    in_channels: int | None = None
    preprocessing: list[dict[str, Any]] = field(default_factory=list)
    postprocessing: list[dict[str, Any]] = field(default_factory=list)
    halo: list[int] | None = None
    tile_min: list[int] | None = None
    tile_step: list[int] | None = None
    preferred_tile: list[int] | None = None
    sample_inputs: list[np.ndarray] = field(default_factory=list)
    sample_outputs: list[np.ndarray] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    # the network's outputs (efficientbioai.models.outputs.records): name, channels, scale, offset and the
    # channels each occupies in the one packed tensor the module returns; None: probed by load_model
    outputs: list[dict[str, Any]] | None = None

    @property
    def spatial_axes(self) -> str:
        return self.axes[2:]

    @property
    def ndim(self) -> int:
        return len(self.spatial_axes)


class BaseParser:
    """Loads one kind of model. Subclass it and implement :meth:`load`.

    ``self.config`` is the validated ``model:`` section of the config (``path``, ``axes``, ``kwargs``,
    ``checkpoint``, ``options`` for anything of your own).
    """

    kind: str = ""

    def __init__(self, config: ModelConfig):
        self.config = config

    def load(self) -> LoadedModel:
        """Build the network (eval mode, CPU, float32) and describe its input."""
        raise NotImplementedError(f"{type(self).__name__} must implement load()")

    def calibration_tiles(self, tiles: list[np.ndarray]) -> list[np.ndarray]:
        """Choose or transform the preprocessed (C, *spatial) tiles that calibrate the quantizer."""
        return tiles

    def fine_tune(self, module: torch.nn.Module, tiles: list[np.ndarray]) -> torch.nn.Module:
        """Adapt the network before export; the default returns it unchanged.

        Called on the loaded network, and on each pruned network after the built-in fine-tuning
        (``prune.finetune``), with the preprocessed calibration tiles.
        """
        return module


PARSERS: dict[str, type[BaseParser]] = {}


def register_parser(kind: str):
    """Class decorator that makes a parser available as ``model.kind: <kind>``."""

    def deco(cls: type[BaseParser]) -> type[BaseParser]:
        cls.kind = kind
        PARSERS[kind] = cls
        return cls

    return deco


def import_object(spec: str, key: str, error: type[Exception] = ModelLoadError):
    """The object named ``"package.module:name"``; ``key`` is the config key reported on failure."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise error(f"{key}: '{spec}' must look like 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(
            f"{key}: cannot import '{module_name}' ({exc})",
            "install the package that defines it, or add its folder to PYTHONPATH",
        ) from exc
    if not hasattr(module, attr):
        raise error(f"{key}: '{module_name}' has no '{attr}'")
    return getattr(module, attr)


def get_parser(kind: str) -> type[BaseParser]:
    """The parser class for ``kind``: a registered name or ``"package.module:Class"``."""
    if kind in PARSERS:
        return PARSERS[kind]
    if ":" not in kind:
        raise ConfigError(
            f"model.kind: unknown kind '{kind}'",
            f"use one of {', '.join(sorted(PARSERS))}, or your own parser as 'package.module:ParserClass'",
        )
    cls = import_object(kind, "model.kind", ConfigError)
    if not (isinstance(cls, type) and issubclass(cls, BaseParser)):
        raise ConfigError(
            f"model.kind: '{kind}' is not a BaseParser subclass",
            "point it at a class that subclasses efficientbioai.models.BaseParser",
        )
    return cls


def scratch_dir(prefix: str) -> Path:
    """A temporary folder for files a loaded model needs while the process runs; removed at exit."""
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=f"efficientbioai-{prefix}-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def infer_in_channels(module: torch.nn.Module, ndim: int) -> int | None:
    """Input channels from the first convolution weight (out, in, *kernel) of the network."""
    for p in module.parameters():
        if p.ndim == ndim + 2:
            return int(p.shape[1])
    return None


def complete(loaded: LoadedModel, config: ModelConfig) -> LoadedModel:
    """Fill what a parser left open: channels, valid tile sizes (probed), halo, from config or model."""
    from efficientbioai.processing import normalize_steps

    # a parser may write steps as bioimage.io does ({"id": "sigmoid"}, 0.4's "name"): bring them into one form
    loaded.preprocessing = normalize_steps(loaded.preprocessing)
    loaded.postprocessing = normalize_steps(loaded.postprocessing)
    if config.tile_step is not None:
        loaded.tile_step = list(config.tile_step)
    if config.halo is not None:
        loaded.halo = list(config.halo)
    if loaded.module is not None:
        loaded.module = loaded.module.eval().float()
        if loaded.in_channels is None:
            loaded.in_channels = infer_in_channels(loaded.module, loaded.ndim)
    loaded.in_channels = loaded.in_channels or 1
    if loaded.outputs is None:
        _describe_outputs(loaded, config)
    elif loaded.tile_step is None:  # a parser that described (and packed) the outputs itself
        from efficientbioai.models.outputs import probe_outputs

        loaded.tile_step = probe_outputs(_run_all(loaded), loaded.ndim, loaded.in_channels)[0]
    for key in ("tile_step", "halo"):
        value = getattr(loaded, key)
        if value is not None and len(value) != loaded.ndim:
            raise ConfigError(f"model.{key}: needs {loaded.ndim} values, one per spatial axis, got {value}")
    loaded.tile_step = loaded.tile_step or [1] * loaded.ndim
    loaded.tile_min = loaded.tile_min or list(loaded.tile_step)
    loaded.halo = loaded.halo or [0] * loaded.ndim
    loaded.source.setdefault("kind", config.kind)
    return loaded


def _run_all(loaded: LoadedModel):
    """``x → [every output as a NumPy array]`` for the loaded network (PyTorch or ONNX Runtime)."""
    from efficientbioai.models.outputs import flatten_outputs

    if loaded.module is not None:
        import torch

        def run(x: np.ndarray) -> list[np.ndarray]:
            with torch.inference_mode():
                return [o.float().numpy() for o in flatten_outputs(loaded.module(torch.from_numpy(x)))]

        return run
    import onnxruntime as ort

    session = ort.InferenceSession(str(loaded.onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: [np.asarray(o) for o in session.run(None, {name: x})]


def _describe_outputs(loaded: LoadedModel, config: ModelConfig) -> None:
    """Probe every output (scale, border, spatial or not); pack them into one tensor where needed.

    A network with one output of its input's size is left as it is. Otherwise the PyTorch module is
    wrapped (:func:`~efficientbioai.models.outputs.pack_module`) so that every engine sees one tensor, and
    the halo and tile step grow to what the outputs need. ONNX-only networks cannot be wrapped yet.
    """
    from efficientbioai.models import outputs as out

    inputs = out.required_inputs(loaded.module) if loaded.module is not None else []
    if len(inputs) > 1:
        raise ModelLoadError(
            f"the network's forward() takes {len(inputs)} inputs ({', '.join(inputs)}): networks with several "
            "inputs are not supported yet (each tile is one image tensor)",
            "wrap the network in a module whose forward(x) takes one tensor (e.g. the image, with the other "
            "inputs as channels or fixed tensors), and name that module's factory in model.factory",
        )
    run = _run_all(loaded)
    steps = list(loaded.tile_step) if loaded.tile_step is not None else None
    step, sizes, shapes = out.probe_outputs(run, loaded.ndim, loaded.in_channels, steps, loaded.tile_min)
    example = None
    if loaded.module is not None:
        import torch

        with torch.inference_mode():
            example = loaded.module(torch.zeros(1, loaded.in_channels, *[s[0] for s in sizes]))
    names = out.output_names(example, len(shapes), config.outputs)
    described = out.describe_outputs(shapes, sizes, names, loaded.ndim)
    kept = out.check_packable(described, config.drop_outputs)
    loaded.tile_step = step
    if len(described) == 1 and kept[0].plain:
        loaded.outputs = out.records(kept)
        return
    if loaded.module is None:
        raise ModelLoadError(
            f"the ONNX network has {len(described)} output(s) "
            f"({', '.join(f'{o.name}: scale {[str(s) for s in o.scale]}' for o in described)}): "
            "several outputs, or outputs at another scale, are supported for PyTorch models only so far",
            "compress the PyTorch model (kind torch / torchscript / monai), or export an ONNX file with one "
            "output of the input's size",
        )
    index = [i for i, o in enumerate(described) if o.name not in config.drop_outputs]
    loaded.module = out.pack_module(loaded.module, described, index, loaded.ndim)
    loaded.halo = out.halo_for(kept, loaded.halo or [0] * loaded.ndim, loaded.ndim)
    loaded.tile_step = out.step_for(kept, loaded.tile_step)
    loaded.outputs = out.records(kept)
    loaded.source["outputs"] = [o.name for o in described]


# ONNX ops whose initializer inputs are weights (an infinite value there is damage, not a mask or a bound)
_WEIGHT_OPS = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "BatchNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "PRelu",
}


def _bad_values(name: str, values: np.ndarray, allow_inf: bool) -> str | None:
    """How ``values`` are not finite (``name``: NaN count, inf count), or None when they are fine."""
    nan = int(np.isnan(values).sum())
    inf = 0 if allow_inf else int(np.isinf(values).sum())
    if not nan and not inf:
        return None
    counts = " and ".join(
        part for part in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if part
    )
    return f"'{name}' (shape {tuple(values.shape)}) holds {counts} value(s) of {values.size}"


def check_finite(loaded: LoadedModel) -> None:
    """Refuse a network whose weights hold NaN or infinite values, naming the first such parameter.

    NaN is refused anywhere (PyTorch parameters and buffers, ONNX initializers and constants); an
    infinite value is refused in PyTorch parameters and normalisation statistics, and in the ONNX
    initializers that feed weight inputs (convolutions, matrix products, normalisations): elsewhere
    ±inf is a legitimate bound or mask value (a Clip's max, an attention mask).
    """
    bad = None
    if loaded.module is not None:
        import torch

        params = {name for name, _ in loaded.module.named_parameters()}
        for name, t in loaded.module.state_dict().items():
            if not (torch.is_tensor(t) and t.is_floating_point()):
                continue
            if bool(torch.isfinite(t).all()):
                continue
            weight = name in params or name.endswith(("running_mean", "running_var"))
            bad = _bad_values(name, t.detach().float().cpu().numpy(), allow_inf=not weight)
            if bad:
                break
    elif loaded.onnx_path is not None:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(loaded.onnx_path))
        feeds_weights = {
            i for node in model.graph.node if node.op_type in _WEIGHT_OPS for i in list(node.input)[1:]
        }
        tensors = [(t.name, t) for t in model.graph.initializer] + [
            (node.output[0], a.t)
            for node in model.graph.node
            if node.op_type == "Constant"
            for a in node.attribute
            if a.name == "value"
        ]
        for name, t in tensors:
            values = numpy_helper.to_array(t)
            if values.dtype.kind != "f":
                continue
            bad = _bad_values(name, values, allow_inf=name not in feeds_weights)
            if bad:
                break
    if bad:
        where = loaded.source.get("weights_file") or loaded.source.get("path") or loaded.name
        raise ModelLoadError(
            f"{where}: the model's weights are not finite: parameter {bad}; a network with such weights "
            "computes NaN or garbage, so it is not compressed",
            "the weights file is damaged, or the training that wrote it diverged: re-download or re-export "
            "the weights, or retrain (e.g. from a checkpoint saved before the loss became NaN)",
        )


def load_model(config: ModelConfig) -> tuple[BaseParser, LoadedModel]:
    """Resolve ``config.kind`` to a parser, load the model and fill in derived facts."""
    parser = get_parser(config.kind)(config)
    loaded = parser.load()
    if not isinstance(loaded, LoadedModel):
        raise ModelLoadError(
            f"{type(parser).__name__}.load() must return a LoadedModel, got {type(loaded).__name__}"
        )
    if (loaded.module is None) == (loaded.onnx_path is None):
        raise ModelLoadError(f"{type(parser).__name__}.load() must set exactly one of module / onnx_path")
    if loaded.axes not in ("bcyx", "bczyx"):
        raise ModelLoadError(
            f"model axes '{loaded.axes}' are not supported", "use 'bcyx' (2D) or 'bczyx' (3D)"
        )
    check_finite(loaded)  # before anything runs the network
    return parser, complete(loaded, config)
