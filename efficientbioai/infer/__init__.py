"""Sliding-window inference with compressed engines over whole 2D / 3D images.

Public API: :func:`infer` (the ``infer`` command), :class:`Predictor` (one engine over one image, built
with :meth:`Predictor.from_artifact`), the :class:`Merger` interface (where blended tiles go: in memory,
a bounded band flushed to disk, one Dask block) and the result types. Engines come from
:class:`efficientbioai.artifact.Artifact`.
"""

from efficientbioai.infer.merge import BandMerger, InMemoryMerger, Merger, RegionMerger
from efficientbioai.infer.pipeline import infer
from efficientbioai.infer.predict import Plan, Prediction, Predictor
from efficientbioai.infer.results import ImageRecord, InferResult, RunRecord

__all__ = [
    "BandMerger",
    "ImageRecord",
    "InMemoryMerger",
    "InferResult",
    "Merger",
    "Plan",
    "Prediction",
    "Predictor",
    "RegionMerger",
    "RunRecord",
    "infer",
]
