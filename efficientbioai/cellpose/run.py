"""Cellpose with a compressed engine: cellpose's own code does everything but the network.

:func:`engine_model` returns a genuine ``cellpose.models.CellposeModel`` whose ``net`` runs the
artifact's engine, so ``model.eval(...)`` is cellpose's: channel selection (``channels=[cyto, nucleus]``),
percentile normalisation, diameter rescaling (``rescale = diam_mean / diameter``), tiling with
``bsize`` / ``tile_overlap`` and tapered blending (``cellpose.core.run_net``), resizing back, and flow
dynamics into masks (``cellpose.dynamics``). :func:`original_model` is the same with the original PyTorch
network, for side-by-side comparisons; :func:`segment` runs either and times the network and the mask
reconstruction separately.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai.artifact import Artifact
from efficientbioai.engines import default_threads
from efficientbioai.models.cellpose import cellpose_spec, parse_channels, require_cellpose

AP_THRESHOLDS = (0.5, 0.75, 0.9)


def cellpose_model(net, spec: dict[str, Any], label: str, threads: int):
    """A ``CellposeModel`` (no weights loaded, nothing downloaded) around ``net``."""
    require_cellpose()
    import torch
    from cellpose import models

    torch.set_num_threads(threads)  # cellpose's dynamics run in PyTorch, so do original networks
    model = models.CellposeModel(
        gpu=False,
        pretrained_model=False,
        model_type=None,
        mkldnn=False,
        diam_mean=spec["diam_mean"],
        nchan=spec["nchan"],
    )
    model.net = net
    model.mkldnn = bool(net.mkldnn)
    model.diam_mean = float(spec["diam_mean"])
    model.diam_labels = float(spec["diam_labels"])
    model.label = label
    model.threads = threads
    model.in_channels = int(spec["in_channels"])
    return model


def engine_model(
    artifact: str | Path, backend: str | None = None, threads: int | None = None, hint="LATENCY"
):
    """A ``cellpose.models.CellposeModel`` that runs the network of a compressed cellpose artifact.

    ``backend``: ``openvino`` (default: the artifact's engine), ``onnxruntime``, or ``torch`` (the original
    network, see :func:`original_model`). Cellpose calls the engine synchronously on batches of tiles, so
    OpenVINO is compiled with the LATENCY hint (all ``threads`` on one request).
    """
    from efficientbioai.cellpose.network import EngineNet

    art = Artifact(artifact)
    spec = cellpose_spec(art.manifest)
    threads = threads or default_threads()
    if backend == "torch":
        return original_model(art.directory, threads)
    engine = art.open_engine(backend, threads, hint=hint)
    net = EngineNet(
        engine,
        nchan=spec["nchan"],
        in_channels=spec["in_channels"],
        diam_mean=spec["diam_mean"],
        diam_labels=spec["diam_labels"],
    )
    return cellpose_model(net, spec, engine.label, threads)


def original_model(
    source: str | Path | dict[str, Any], threads: int | None = None, mkldnn: bool | None = None
):
    """A ``CellposeModel`` with the original PyTorch network: what a cellpose user runs today.

    ``source`` is an artifact directory (its original model is loaded from where ``compress`` found it)
    or a ``model:`` config (a dict such as ``{"kind": "cellpose", "path": "my_model"}``). ``mkldnn``
    defaults to cellpose's CPU default (on where PyTorch has MKL-DNN).
    """
    import torch

    from efficientbioai.cellpose.network import TorchNet
    from efficientbioai.config import ModelConfig
    from efficientbioai.models import load_model

    if isinstance(source, dict):
        _, loaded = load_model(ModelConfig.model_validate(source))
    else:
        art = Artifact(source)
        cellpose_spec(art.manifest)
        _, loaded = art.load_original()
    spec = loaded.source["cellpose"]
    if mkldnn is None:
        mkldnn = bool(torch.backends.mkldnn.is_available())
    net = TorchNet(loaded.module.net, mkldnn=mkldnn)
    return cellpose_model(net, spec, "torch fp32 (original)", threads or default_threads())


@dataclass
class Segmentation:
    """Cellpose's result for one image, with where the time went."""

    masks: np.ndarray  # (Y, X) labels, 0 = background
    flows: np.ndarray  # (2, Y, X) Y and X flows at the image's size
    cellprob: np.ndarray  # (Y, X) cell probability logits
    seconds: float  # the whole model.eval call
    network_seconds: float  # cellpose's _run_net: resize, tiles, network, blending, resize back
    masks_seconds: float  # cellpose's _compute_masks: flow dynamics → masks
    engine_seconds: float  # the network calls alone (inside network_seconds)
    tiles: int

    @property
    def count(self) -> int:
        return int(self.masks.max()) if self.masks.size else 0


def _timed(fn, totals: dict[str, float], key: str):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t0

    return wrapper


def segment(
    model,
    image: np.ndarray,
    *,
    channels: Sequence[int] = (0, 0),
    channel_axis: int | None = None,
    diameter: float | None = None,
    **eval_kwargs: Any,
) -> Segmentation:
    """Run ``model.eval`` (cellpose's) on one 2D image and time its network and mask phases.

    ``channels`` and ``diameter`` mean what they mean in cellpose: ``[channel to segment, nucleus
    channel]`` (0 = grayscale / none) and the objects' diameter in pixels (the image is resized by
    ``diam_mean / diameter`` for the network; ``None`` uses the model's training diameter, as
    ``CellposeModel`` does). Other keywords (``flow_threshold``, ``cellprob_threshold``, ``min_size``,
    ``niter``, ``batch_size``, ``bsize``, ``tile_overlap``, ``augment``, ``normalize``, ``invert``…) go to
    ``CellposeModel.eval`` unchanged.
    """
    from efficientbioai.errors import EfficientBioAIError

    channels = parse_channels(list(channels), "channels")
    if getattr(model, "in_channels", 2) == 1 and channels[1] != 0:
        raise EfficientBioAIError(
            f"channels {channels}: this engine was compressed for one channel (channels [c, 0]); it has no "
            "nucleus input",
            "run it with channels [c, 0], or compress the model with model.options.channels [c, n]",
        )
    if diameter is not None and diameter <= 0:
        raise EfficientBioAIError(
            f"diameter {diameter}: estimating diameters needs cellpose's size model, which compressed "
            "engines do not run",
            "give the objects' diameter in pixels, or leave it out to use the model's training diameter",
        )
    totals = {"network": 0.0, "masks": 0.0}
    net = model.net
    engine0, tiles0 = net.seconds, net.tiles
    model._run_net = _timed(model._run_net, totals, "network")
    model._compute_masks = _timed(model._compute_masks, totals, "masks")
    try:
        with warnings.catch_warnings():
            # cellpose.dynamics builds sparse tensors; PyTorch notes that it does not check them
            warnings.filterwarnings("ignore", message="Sparse invariant checks")
            t0 = time.perf_counter()
            masks, flows, _styles = model.eval(
                image, channels=channels, channel_axis=channel_axis, diameter=diameter, **eval_kwargs
            )
            seconds = time.perf_counter() - t0
    finally:  # the instance attributes shadowed the class's methods; removing them restores those
        del model._run_net, model._compute_masks
    return Segmentation(
        masks=np.asarray(masks),
        flows=np.asarray(flows[1]),
        cellprob=np.asarray(flows[2]),
        seconds=seconds,
        network_seconds=totals["network"],
        masks_seconds=totals["masks"],
        engine_seconds=net.seconds - engine0,
        tiles=net.tiles - tiles0,
    )


def average_precision(
    masks_true: np.ndarray, masks_pred: np.ndarray, thresholds: Sequence[float] = AP_THRESHOLDS
) -> dict[str, float]:
    """Cellpose's AP = TP / (TP + FP + FN) at each IoU threshold (``cellpose.metrics.average_precision``).

    Keys are ``ap50``, ``ap75``, ``ap90`` for the default thresholds. Labels need not be consecutive
    (they are renumbered first; cellpose counts objects as the largest label). Two images without objects
    agree perfectly (1.0); cellpose itself returns NaN there.
    """
    require_cellpose()
    from cellpose import metrics
    from skimage.segmentation import relabel_sequential

    true, pred = np.asarray(masks_true), np.asarray(masks_pred)
    if true.shape != pred.shape:
        raise ValueError(f"masks of shape {pred.shape} cannot be compared with masks of shape {true.shape}")
    keys = [f"ap{round(t * 100)}" for t in thresholds]
    if true.max(initial=0) == 0 and pred.max(initial=0) == 0:
        return dict.fromkeys(keys, 1.0)
    # cellpose counts objects as the largest label: renumber 1..N so that gaps in the labels do not count
    true, pred = (relabel_sequential(np.asarray(x, np.int32))[0] for x in (true, pred))
    ap = metrics.average_precision([true], [pred], threshold=list(thresholds))[0][0]
    return {k: float(v) for k, v in zip(keys, ap, strict=True)}
