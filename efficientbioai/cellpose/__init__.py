"""Run Cellpose with a compressed engine (the optional extra ``efficientbioai[cellpose]``).

Cellpose does all it normally does — channels, normalisation, diameter rescaling, tiling, flow
dynamics — and only the network runs on the engine::

    from efficientbioai.cellpose import engine_model, original_model, segment, average_precision

    model = engine_model("runs/cellpose_int8")          # a cellpose.models.CellposeModel
    masks, flows, styles = model.eval(img, channels=[0, 0], diameter=17)   # cellpose's own eval
    result = segment(model, img, channels=[0, 0], diameter=17)            # same, timed by phase

Or from the command line: ``efficientbioai infer`` with a cellpose artifact (see docs/cellpose.md).
Importing this package does not import cellpose; the functions do, with a clear error when it is missing.
"""

from efficientbioai.cellpose.run import (
    AP_THRESHOLDS,
    Segmentation,
    average_precision,
    engine_model,
    original_model,
    segment,
)
from efficientbioai.cellpose.train import train_cpnet

__all__ = [
    "AP_THRESHOLDS",
    "Segmentation",
    "average_precision",
    "engine_model",
    "original_model",
    "segment",
    "train_cpnet",
]
