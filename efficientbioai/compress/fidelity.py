"""How close a compressed network stays to the original: fidelity figures, their limits, the package test.

Every candidate is run on the same held-out tiles as the original (:class:`Reference`); outputs are
postprocessed and halo-cropped (:func:`~efficientbioai.compress.calibration.run_tiles`) before they are
compared, so the figures describe what the user sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from efficientbioai import metrics
from efficientbioai.compress.calibration import crop_halo, postprocess, preprocess, run_tiles
from efficientbioai.config import FidelityConfig
from efficientbioai.engines import Engine, median_latency_ms, reference_engine
from efficientbioai.io import to_model_layout
from efficientbioai.models import LoadedModel
from efficientbioai.sampling import Tiles
from efficientbioai.tiling import valid_size


@dataclass
class Reference:
    """The original network on the held-out tiles: what every candidate is compared with."""

    engine: Engine
    outputs: np.ndarray  # (N, C_out, *tile) postprocessed, halo cropped
    targets: np.ndarray | None  # the held-out tiles' targets, halo cropped, or None
    latency: dict[str, Any]  # median_latency_ms of the original on one tile


def measure_original(loaded: LoadedModel, holdout: Tiles, threads: int, latency_repeats: int) -> Reference:
    """Run (and time) the original network on the held-out tiles."""
    engine = reference_engine(loaded, threads)
    outputs = run_tiles(engine, holdout.inputs, loaded)
    targets = None
    if holdout.targets:
        targets = np.concatenate([crop_halo(t[np.newaxis], loaded.halo) for t in holdout.targets], axis=0)
    example = holdout.inputs[0][np.newaxis]
    latency = median_latency_ms(engine, example, repeats=latency_repeats)
    return Reference(engine, outputs, targets, latency)


def output_slices(outputs: list[dict[str, Any]] | None) -> list[tuple[str, slice]] | None:
    """(name, packed channels) per output of a network with several outputs; None for one output."""
    if not outputs or len(outputs) < 2:
        return None
    return [(o["name"], slice(*o["packed_channels"])) for o in outputs]


def fidelity_figures(
    ref: np.ndarray,
    out: np.ndarray,
    targets: np.ndarray | None,
    fid: FidelityConfig,
    outputs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Compressed outputs ``out`` against the original's ``ref`` (and both against ``targets``).

    With several ``outputs`` (the manifest's records) every output is compared on its own and the worst
    one gives the figures (lowest Pearson r, highest relative L2): ``outputs`` lists each one's figures,
    ``worst_output`` names it. Targets are compared with the first output.
    """
    bad = {"compressed": int((~np.isfinite(out)).sum()), "original": int((~np.isfinite(ref)).sum())}
    slices = output_slices(outputs)
    if slices is None:
        fig: dict[str, Any] = {
            "relative_l2": metrics.relative_l2(out, ref),
            "pearson": metrics.pearson(out, ref),
            "max_abs_diff": float(np.abs(out - ref).max()),
        }
    else:
        per = {
            name: {
                "pearson": metrics.pearson(out[:, sl], ref[:, sl]),
                "relative_l2": metrics.relative_l2(out[:, sl], ref[:, sl]),
                "max_abs_diff": float(np.abs(out[:, sl] - ref[:, sl]).max()),
            }
            for name, sl in slices
        }
        worst = min(per, key=lambda n: per[n]["pearson"])
        fig = {
            "pearson": per[worst]["pearson"],
            "relative_l2": max(v["relative_l2"] for v in per.values()),
            "max_abs_diff": max(v["max_abs_diff"] for v in per.values()),
            "worst_output": worst,
            "outputs": per,
        }
        out, ref = out[:, slices[0][1]], ref[:, slices[0][1]]
    if fid.task == "semantic":
        fig["mask_iou"] = metrics.iou(out > fid.threshold, ref > fid.threshold)
    if targets is not None and fid.task is not None:
        if fid.task == "restoration":
            fig["metric"] = "pearson_vs_target"
            fig["original_metric"] = metrics.pearson(ref, targets)
            fig["compressed_metric"] = metrics.pearson(out, targets)
        else:
            fig["metric"] = "iou_vs_target"
            fig["original_metric"] = metrics.iou(ref > fid.threshold, targets > 0.5)
            fig["compressed_metric"] = metrics.iou(out > fid.threshold, targets > 0.5)
    if any(bad.values()):  # named, not reported as a NaN drop
        fig["nonfinite_outputs"] = {k: v for k, v in bad.items() if v}
    return fig


def check_limits(fig: dict[str, Any], fid: FidelityConfig) -> list[str]:
    """The ``fidelity.*`` limits the figures break, in words (empty when all hold)."""
    problems = []
    bad = fig.get("nonfinite_outputs") or {}
    for who, n in bad.items():
        problems.append(
            f"the {who} model's output holds {n:,} NaN / inf value(s) on the fidelity tiles"
            + (
                " (the original's own output: check its weights and the calibration images)"
                if who == "original"
                else " (an overflow in reduced precision, or non-finite weights)"
            )
        )
    if fid.max_pearson_drop is not None and 1 - fig["pearson"] > fid.max_pearson_drop:
        problems.append(
            f"Pearson drop {1 - fig['pearson']:.4g} > fidelity.max_pearson_drop {fid.max_pearson_drop}"
        )
    if fid.max_relative_l2 is not None and fig["relative_l2"] > fid.max_relative_l2:
        problems.append(
            f"relative L2 {fig['relative_l2']:.4g} > fidelity.max_relative_l2 {fid.max_relative_l2}"
        )
    if fid.max_metric_drop is not None and "compressed_metric" in fig:  # the config requires targets + task
        drop = fig["original_metric"] - fig["compressed_metric"]
        if drop > fid.max_metric_drop:
            problems.append(
                f"{fig['metric']} drop {drop:.4g} > fidelity.max_metric_drop {fid.max_metric_drop}"
            )
    return problems


def package_test(ref_engine: Engine, engine: Engine, loaded: LoadedModel) -> dict[str, Any] | None:
    """Replay a bioimage.io package's test tensor through the original and the compressed engine."""
    if not loaded.sample_inputs or not loaded.sample_outputs:
        return None
    x = to_model_layout(np.asarray(loaded.sample_inputs[0]), loaded.axes, loaded.axes, "test tensor")
    if not all(
        valid_size(s, m, st) for s, m, st in zip(x.shape[1:], loaded.tile_min, loaded.tile_step, strict=True)
    ):
        return None
    x = preprocess(x, loaded)[np.newaxis]
    expected = np.asarray(loaded.sample_outputs[0], np.float32)
    ref = postprocess(ref_engine(x), loaded)
    out = postprocess(engine(x), loaded)
    if ref.shape != expected.shape:
        return None
    return {
        "original_max_abs_diff_to_package_output": float(np.abs(ref - expected).max()),
        "compressed_pearson_to_original": metrics.pearson(out, ref),
        "compressed_mask_iou_to_original": metrics.iou(out > 0.5, ref > 0.5),
    }
