"""The accuracy budget (``quantize.max_drop``): how much accuracy compression may cost.

One :class:`Budget` measures every candidate the same way: the drop of Pearson r to the original's
outputs, or of the task metric against the targets, on the held-out tiles.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from efficientbioai import metrics
from efficientbioai.config import FidelityConfig, MaxDropConfig


class Budget:
    """``quantize.max_drop`` measured the same way for every candidate."""

    def __init__(
        self,
        max_drop: MaxDropConfig,
        fidelity: FidelityConfig,
        outputs: list[tuple[str, slice]] | None = None,
    ):
        self.md = max_drop
        self.fidelity = fidelity
        self.outputs = outputs  # (name, packed channels) per output: the worst output decides

    def metric(self, outs: np.ndarray, refs: np.ndarray) -> float:
        """Higher is better: Pearson r to the original's outputs (the worst output's, with several), or the
        task metric of the first output against targets."""
        if self.md.metric == "pearson":
            if self.outputs:
                return min(metrics.pearson(outs[:, sl], refs[:, sl]) for _, sl in self.outputs)
            return metrics.pearson(outs, refs)
        if self.outputs:
            outs = outs[:, self.outputs[0][1]]
        if self.fidelity.task == "semantic":
            return metrics.iou(outs > self.fidelity.threshold, refs > 0.5)
        return metrics.pearson(outs, refs)

    def allowed(self, original: float) -> float:
        """The largest drop allowed from the original's figure ``original``."""
        return self.md.value * (abs(original) if self.md.type == "relative" else 1.0)

    def drop(self, fid: dict[str, Any]) -> float:
        """The drop in the fidelity figures ``fid`` (see :func:`~efficientbioai.compress.fidelity.fidelity_figures`)."""
        if self.md.metric == "pearson":
            return 1.0 - fid["pearson"]
        return fid["original_metric"] - fid["compressed_metric"]

    def holds(self, fid: dict[str, Any]) -> bool:
        original = 1.0 if self.md.metric == "pearson" else fid["original_metric"]
        return self.drop(fid) <= self.allowed(original) + 1e-12

    def describe(self) -> str:
        what = "1 − Pearson r to the original" if self.md.metric == "pearson" else "task metric drop"
        return f"{what} ≤ {self.md.value:g}" + (" (relative)" if self.md.type == "relative" else "")


def budget_from(
    max_drop: MaxDropConfig | None, fidelity: FidelityConfig, outputs: list[tuple[str, slice]] | None = None
) -> Budget | None:
    """The budget of ``quantize.max_drop``, or None when it is null (no budget is checked)."""
    return Budget(max_drop, fidelity, outputs) if max_drop is not None else None
