"""Cellpose networks (``model.kind: cellpose``, the optional extra ``efficientbioai[cellpose]``).

A Cellpose 3 model is a ``CPnet`` (a residual U-Net with a "style" branch) that maps an image to three
maps: the Y and X flows and the cell probability (logits). Cellpose turns them into instance masks with
its flow dynamics. ``compress`` needs the network only; running it on whole images with Cellpose's own
tiling and dynamics is :mod:`efficientbioai.cellpose`.

What the parser does, without changing cellpose:

- **Style branch.** ``CPnet.make_style`` average-pools with a kernel equal to the input's size, so an
  exported graph hard-codes the tile it was traced with (and ``openvino.convert_model`` of the PyTorch
  network fails). :class:`efficientbioai.cellpose.network.CellposeFlows` runs cellpose's own sub-modules (``downsample``, ``upsample``,
  ``output``) and computes the style as a global mean over the spatial axes: the same numbers for every
  tile shape, exported as ``ReduceMean``, so the ONNX / OpenVINO engine accepts any tile that is a
  multiple of 8.
- **Outputs.** The engine returns the three maps (dy, dx, cellprob), the only ones Cellpose's masks
  need; the style vector (only used by Cellpose's size model) is not an output.
- **Channels.** Cellpose networks take two channels, [cytoplasm, nucleus]. With ``channels: [c, 0]``
  (the usual case: one channel to segment, no nucleus channel) the nucleus input is always zero, so it
  is folded into the network: the engine takes one channel and calibrates on single-channel images.

Weights come from a model file (``model.path``, what cellpose's training saves) or a cellpose model
name (``model.options.model_type``, e.g. ``nuclei``, ``cyto3``) that must already be in cellpose's model
folder: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from efficientbioai.errors import ConfigError, ModelLoadError
from efficientbioai.models.base import BaseParser, LoadedModel, register_parser, sha256

INSTALL_HINT = "pip install 'efficientbioai[cellpose]' (after installing torch), i.e. cellpose 3.x"
OPTIONS = ("model_type", "channels", "diam_mean", "max_pool")
NUCLEI_DIAM_MEAN = 17.0  # cellpose's diam_mean for its built-in nuclei model; 30 for all others


def require_cellpose():
    """The ``cellpose`` package (3.x), or an error that says how to install it."""
    try:
        import cellpose
        from cellpose import models  # noqa: F401  (fails where cellpose's own dependencies are broken)
    except ImportError as exc:
        raise ModelLoadError(
            f"Cellpose models need the cellpose package, which cannot be imported ({exc})",
            INSTALL_HINT,
        ) from exc
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("cellpose")
    except PackageNotFoundError:  # pragma: no cover - a source checkout
        ver = getattr(cellpose, "__version__", "0")
    major = int(ver.split(".")[0]) if ver.split(".")[0].isdigit() else 0
    if major >= 4:
        raise ModelLoadError(
            f"cellpose {ver} is installed; efficientbioai supports cellpose 3.x networks (CPnet) only — "
            "Cellpose-SAM (cellpose 4) cannot be compressed in this version",
            "pip install 'cellpose>=3,<4' (models trained with cellpose 3), or keep Cellpose-SAM in cellpose",
        )
    return cellpose


def cellpose_version() -> str:
    from importlib.metadata import version

    return version("cellpose")


# ------------------------------------------------------------------------------------- the network


def architecture(state: dict[str, Any], source: str) -> dict[str, Any]:
    """``nbase``, ``nout`` and kernel size of a cellpose 3 ``CPnet`` from its state dict."""
    if "W2" in state:
        raise ModelLoadError(
            f"{source} is a Cellpose-SAM (cellpose 4) model; efficientbioai compresses cellpose 3 networks "
            "(CPnet) only",
            "use a model trained with cellpose 3.x, or keep Cellpose-SAM in cellpose",
        )
    first = "downsample.down.res_down_0.proj.0.weight"
    if first not in state or "output.2.weight" not in state:
        kind = (
            "a transformer-backbone cellpose model"
            if any(k.startswith("encoder.") for k in state)
            else ("not a cellpose CPnet")
        )
        raise ModelLoadError(
            f"{source} is {kind} (no '{first}' weights)",
            "give a cellpose 3 model file (what cellpose's training saves), or use model.kind torch for "
            "other networks",
        )
    nbase = [int(state[first].shape[0])]
    level = 0
    while f"downsample.down.res_down_{level}.proj.1.weight" in state:
        nbase.append(int(state[f"downsample.down.res_down_{level}.proj.1.weight"].shape[0]))
        level += 1
    return {
        "nbase": nbase,
        "nout": int(state["output.2.weight"].shape[0]),
        "sz": int(state["downsample.down.res_down_0.conv.conv_0.2.weight"].shape[-1]),
    }


def build_cpnet(state: dict[str, Any], source: str, *, max_pool: bool = True, mkldnn: bool = False):
    """A cellpose ``CPnet`` (eval mode, CPU) with the weights of ``state``."""
    require_cellpose()
    from cellpose.resnet_torch import CPnet

    arch = architecture(state, source)
    net = CPnet(list(arch["nbase"]), arch["nout"], sz=arch["sz"], mkldnn=mkldnn, max_pool=max_pool)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise ModelLoadError(
            f"{source} does not fit a cellpose CPnet {arch['nbase']}: {detail[:400]}",
            "give a model file saved by cellpose 3 (CellposeModel.net.save_model / cellpose training)",
        ) from exc
    return net.eval()


# ------------------------------------------------------------------------------------- weights


def builtin_file(model_type: str) -> tuple[Path, bool]:
    """Where cellpose keeps ``model_type``'s weights (``MODEL_DIR``), and whether it is built-in.

    Mirrors ``cellpose.models.model_path`` without its download: nothing is fetched here.
    """
    require_cellpose()
    from cellpose import models

    if model_type in models.MODEL_NAMES:
        basename = f"{model_type}torch_0" if model_type in ("cyto", "cyto2", "nuclei") else model_type
        builtin = True
    elif model_type in models.get_user_models():
        basename, builtin = model_type, False
    else:
        raise ConfigError(
            f"model.options.model_type: '{model_type}' is not a cellpose model",
            f"use one of {', '.join(n for n in models.MODEL_NAMES if not n[-1].isdigit())}, a model "
            "added to cellpose's GUI, or give the model file as model.path",
        )
    path = Path(models.MODEL_DIR) / basename
    if not path.is_file():
        raise ModelLoadError(
            f"model.options.model_type: the weights of '{model_type}' are not in cellpose's model folder "
            f"({path}); efficientbioai downloads nothing",
            f'fetch them once with cellpose: python -c "from cellpose import models; '
            f"models.CellposeModel(model_type='{model_type}')\" (CELLPOSE_LOCAL_MODELS_PATH sets the "
            "folder), or give the model file as model.path",
        )
    return path, builtin


def load_state(path: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"model.path: cannot read {path} as a cellpose model file "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
            "give a model file saved by cellpose (a PyTorch state dict)",
        ) from exc
    if not isinstance(state, dict):
        raise ModelLoadError(f"model.path: {path} holds a {type(state).__name__}, not cellpose weights")
    return {k.removeprefix("module."): v for k, v in state.items()}


def parse_channels(value: Any, key: str = "model.options.channels") -> list[int]:
    """Cellpose's ``channels``: [channel to segment, nucleus channel], 0 = grayscale / none."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 3 for c in value)
    ):
        raise ConfigError(
            f"{key}: {value!r} is not a cellpose channels pair",
            "use [channel to segment, nucleus channel] with 0 = grayscale / none, 1 = red, 2 = green, "
            "3 = blue, e.g. [0, 0] for grayscale nuclei or [2, 3] for cells in green, nuclei in blue",
        )
    return [int(c) for c in value]


@register_parser("cellpose")
class CellposeParser(BaseParser):
    """A cellpose 3 network from a model file (``path``) or a cellpose model name (``options.model_type``).

    ``options``: ``model_type`` (cellpose model name), ``channels`` ([cyto, nucleus] as in cellpose,
    default [0, 0]: with nucleus 0 the engine takes one channel), ``diam_mean`` (override the diameter
    the network was trained at), ``max_pool`` (default true, as cellpose).
    """

    def load(self) -> LoadedModel:
        cfg = self.config
        require_cellpose()
        from efficientbioai.cellpose.network import CellposeFlows

        opts = dict(cfg.options)
        unknown = sorted(set(opts) - set(OPTIONS))
        if unknown:
            raise ConfigError(
                f"model.options: unknown option(s) {', '.join(unknown)} for kind cellpose",
                f"valid options: {', '.join(OPTIONS)}",
            )
        model_type = opts.get("model_type")
        if (cfg.path is None) == (model_type is None):
            raise ConfigError(
                "model: kind cellpose needs exactly one of model.path (a cellpose model file) and "
                "model.options.model_type (a cellpose model name such as nuclei or cyto3)",
                "set one of them",
            )
        if cfg.axes not in (None, "bcyx"):
            raise ConfigError("model.axes: cellpose networks are 2D ('bcyx')", "remove model.axes")
        channels = parse_channels(opts.get("channels", [0, 0]))
        if model_type is not None:
            path, builtin = builtin_file(str(model_type))
        else:
            path = Path(cfg.path)
            if path.is_dir():
                raise ConfigError(
                    f"model.path: {path} is a folder; cellpose models are single files",
                    "point model.path at the model file (cellpose saves it under <save_path>/models/)",
                )
            model_type = None
            builtin = path.name.endswith("nucleitorch_0")  # cellpose.models.get_model_params does the same
        state = load_state(path)
        net = build_cpnet(state, str(path), max_pool=bool(opts.get("max_pool", True)))
        diam_labels = float(net.diam_labels.item())
        if opts.get("diam_mean") is not None:
            diam_mean = float(opts["diam_mean"])
        elif builtin:  # cellpose ignores the file's diam_mean for its built-in models
            diam_mean = NUCLEI_DIAM_MEAN if "nuclei" in path.name else 30.0
        else:
            diam_mean = float(net.diam_mean.item())
        nchan = int(net.nbase[0])
        in_channels = 1 if nchan == 2 and channels[1] == 0 else nchan
        return LoadedModel(
            module=CellposeFlows(net, in_channels).eval(),
            axes="bcyx",
            name=f"cellpose {model_type or path.name}",
            in_channels=in_channels,
            # cellpose.transforms.normalize_img: 1st → 0 and 99th percentile → 1, per channel, whole image
            preprocessing=[
                {
                    "id": "scale_range",
                    "kwargs": {"min_percentile": 1.0, "max_percentile": 99.0, "axes": ["y", "x"]},
                }
            ],
            tile_step=[8, 8],  # three 2× max-pools
            preferred_tile=[224, 224],  # cellpose's bsize
            source={
                "kind": "cellpose",
                "path": str(path),
                "sha256": sha256(path),
                "weights": "cellpose_state_dict",
                "cellpose": {
                    "model_type": model_type,
                    "builtin": bool(builtin),
                    "channels": channels,
                    "nbase": list(net.nbase),
                    "nchan": nchan,
                    "in_channels": in_channels,
                    "nout": int(net.nout),
                    "max_pool": bool(opts.get("max_pool", True)),
                    "diam_mean": diam_mean,
                    "diam_labels": diam_labels,
                    "style": "global spatial mean (exportable; equals CPnet.make_style)",
                    "outputs": ["dy", "dx", "cellprob"],
                    "cellpose_version": cellpose_version(),
                },
            },
        )


def cellpose_spec(manifest) -> dict[str, Any]:
    """The ``cellpose`` facts a compressed artifact records (``manifest``: an artifact's
    :class:`~efficientbioai.artifact.Manifest`), or an error for other artifacts."""
    model = manifest.model
    spec = model.fact("cellpose")
    if model.kind != "cellpose" or not isinstance(spec, dict):
        raise ModelLoadError(
            f"the artifact holds a '{model.kind}' model, not a cellpose network",
            "compress a cellpose model (model.kind: cellpose) first",
        )
    return spec
