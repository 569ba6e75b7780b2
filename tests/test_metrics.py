"""Task metrics: hand-computed PSNR/SSIM values, instance extraction and TP/FP/FN matching."""

from __future__ import annotations

import numpy as np
import pytest

from efficientbioai import metrics


def squares(shape: tuple[int, int], boxes: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """A label image with square objects: {label: (row, col, side)}."""
    out = np.zeros(shape, np.int32)
    for label, (r, c, s) in boxes.items():
        out[r : r + s, c : c + s] = label
    return out


def discs(shape: tuple[int, ...], centres: list[tuple[float, ...]], radius: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    mask = np.zeros(shape, bool)
    for c in centres:
        mask |= sum((g - ci) ** 2 for g, ci in zip(grids, c, strict=True)) <= radius**2
    return mask


# Three true 10x10 squares; predicted: A exact (IoU 1), B shifted 2 px (IoU 80/120), C shifted 6 px
# (IoU 40/160 = 0.25, a miss), plus one false positive far away.
TRUE = squares((40, 60), {1: (2, 2, 10), 2: (2, 25, 10), 3: (25, 2, 10)})
PRED = squares((40, 60), {1: (2, 2, 10), 2: (2, 27, 10), 3: (25, 8, 10), 4: (25, 40, 10)})


# --------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_known_mse():
    target = np.linspace(0.0, 1.0, 100).reshape(10, 10)
    assert metrics.psnr(target + 0.1, target) == pytest.approx(20.0)
    assert metrics.psnr(target - 0.1, target, data_range=2.0) == pytest.approx(20 * np.log10(20.0))
    assert metrics.psnr(target, target) == float("inf")
    # 3D, range 4, constant error 0.4 -> also 20 dB
    target3 = np.linspace(0.0, 4.0, 120).reshape(2, 6, 10)
    assert metrics.psnr(target3 + 0.4, target3) == pytest.approx(20.0)


def test_ssim_identical_2d_3d_and_noisy():
    rng = np.random.default_rng(0)
    img = rng.random((32, 32))
    assert metrics.ssim(img, img) == pytest.approx(1.0)
    vol = rng.random((5, 16, 16)).astype(np.float32)
    assert metrics.ssim(vol, vol) == pytest.approx(1.0)
    noisy = metrics.ssim(img + 0.2 * rng.standard_normal(img.shape), img)
    assert 0.0 < noisy < 0.9


def test_ssim_single_window_by_hand():
    # A 3x3 image gets a 3x3 window: SSIM is the textbook formula over all 9 pixels (sample covariance).
    x = np.array([[0.0, 1, 2], [3, 4, 5], [6, 7, 9]])
    y = np.array([[1.0, 0, 2], [3, 5, 4], [6, 9, 8]])
    L = 9.0  # range of y
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(ddof=1), y.var(ddof=1)
    cxy = ((x - mx) * (y - my)).sum() / 8
    expected = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert metrics.ssim(x, y) == pytest.approx(expected, rel=1e-9)
    assert expected < 1.0


def test_ssim_rejects_too_thin_axis():
    with pytest.raises(ValueError, match="at least 3"):
        metrics.ssim(np.zeros((2, 16, 16)), np.ones((2, 16, 16)))
    # 4 is the smallest axis -> window 3, still fine
    a = np.arange(4 * 9, dtype=float).reshape(4, 9)
    assert metrics.ssim(a, a) == pytest.approx(1.0)


# --------------------------------------------------------------------------- instances


def test_components_vs_watershed_on_touching_discs():
    mask = discs((40, 56), [(20, 18), (20, 34)], radius=10)
    prob = mask.astype(np.float32) * 0.9
    comp = metrics.instances_from_probability(prob, method="components")
    ws = metrics.instances_from_probability(prob, method="watershed")
    assert comp.dtype == np.int32 and ws.dtype == np.int32
    assert comp.max() == 1
    assert ws.max() == 2
    assert set(np.unique(ws)) == {0, 1, 2}
    assert np.array_equal(ws > 0, mask)
    left, right = (ws == ws[20, 18]).sum(), (ws == ws[20, 34]).sum()
    assert ws[20, 18] != ws[20, 34]
    assert abs(int(left) - int(right)) <= 0.05 * mask.sum()


def test_watershed_splits_touching_balls_in_3d():
    prob = discs((20, 20, 34), [(10, 10, 10), (10, 10, 22)], radius=7).astype(np.float32)
    assert metrics.instances_from_probability(prob, method="components").max() == 1
    assert metrics.instances_from_probability(prob, method="watershed").max() == 2


def test_min_size_and_renumbering_and_full_connectivity():
    prob = np.zeros((20, 20))
    prob[1:6, 1:6] = 1.0  # 25 px
    prob[10:12, 10:12] = 1.0  # speck, 4 px
    prob[14:19, 14:19] = 1.0  # 25 px
    prob[8, 1], prob[9, 2] = 1.0, 1.0  # two diagonal neighbours: one object with full connectivity
    labels = metrics.instances_from_probability(prob, threshold=0.5)
    assert labels.max() == 4
    assert (labels[8, 1] == labels[9, 2]) and labels[8, 1] > 0
    kept = metrics.instances_from_probability(prob, threshold=0.5, min_size=5)
    assert sorted(np.unique(kept)) == [0, 1, 2]
    assert np.bincount(kept.ravel()).tolist()[1:] == [25, 25]
    # the threshold is strict: exactly 0.5 is background
    assert metrics.instances_from_probability(np.full((4, 4), 0.5)).max() == 0


def test_unknown_instance_method():
    with pytest.raises(ValueError, match="components, watershed"):
        metrics.instances_from_probability(np.zeros((4, 4)), method="stardist")


def test_match_instances_hand_counted():
    m = metrics.match_instances(PRED, TRUE)
    assert (m["tp"], m["fp"], m["fn"], m["n_pred"], m["n_true"]) == (2, 2, 1, 4, 3)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["ap"] == pytest.approx(2 / 5)
    assert m["mean_matched_iou"] == pytest.approx((1 + 80 / 120) / 2)
    # at IoU 0.2 the shifted square C counts too
    low = metrics.match_instances(PRED, TRUE, iou_threshold=0.2)
    assert (low["tp"], low["fp"], low["fn"]) == (3, 1, 0)
    assert low["ap"] == pytest.approx(3 / 4)


def test_match_instances_non_consecutive_labels():
    relabel_true = np.array([0, 5, 17, 40])[TRUE]
    relabel_pred = np.array([0, 100, 3, 7, 9])[PRED]
    m = metrics.match_instances(relabel_pred, relabel_true)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 2, 1)
    assert m["ap"] == pytest.approx(2 / 5)


def test_match_instances_is_one_to_one():
    # one predicted object covering two true ones: IoU 0.5 with each, but only one may match
    true = squares((12, 24), {1: (1, 1, 10), 2: (1, 11, 10)})
    pred = (true > 0).astype(np.int32)
    m = metrics.match_instances(pred, true)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)
    assert m["mean_matched_iou"] == pytest.approx(0.5)


def test_match_instances_maximises_number_of_matches():
    # 1D: t1=[0,10), t2=[10,20); p1=[2,14) has IoU 8/14 with t1 and 4/18 with t2; p2=[0,2) has 2/10 with t1.
    # Greedily taking the best pair (p1,t1) leaves one match; the optimal matching gets two.
    true = np.zeros(24, np.int32)
    true[0:10], true[10:20] = 1, 2
    pred = np.zeros(24, np.int32)
    pred[2:14], pred[0:2] = 1, 2
    m = metrics.match_instances(pred, true, iou_threshold=0.15)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    assert m["mean_matched_iou"] == pytest.approx((4 / 18 + 2 / 10) / 2)
    assert metrics.match_instances(pred, true, iou_threshold=0.5)["tp"] == 1


def test_match_instances_empty_cases():
    empty = np.zeros((8, 8), np.int32)
    both = metrics.match_instances(empty, empty)
    assert (both["tp"], both["fp"], both["fn"], both["n_pred"], both["n_true"]) == (0, 0, 0, 0, 0)
    for key in ("precision", "recall", "f1", "ap", "mean_matched_iou"):
        assert both[key] == 1.0
    some = squares((8, 8), {3: (0, 0, 2), 9: (4, 4, 2)})
    no_pred = metrics.match_instances(empty, some)
    assert (no_pred["tp"], no_pred["fp"], no_pred["fn"], no_pred["n_true"]) == (0, 0, 2, 2)
    no_true = metrics.match_instances(some, empty)
    assert (no_true["tp"], no_true["fp"], no_true["fn"], no_true["n_pred"]) == (0, 2, 0, 2)
    for m in (no_pred, no_true):
        for key in ("precision", "recall", "f1", "ap", "mean_matched_iou"):
            assert m[key] == 0.0


# --------------------------------------------------------------------------- task_metrics


def test_task_metrics_restoration_with_channel_squeeze():
    target = np.linspace(0.0, 1.0, 256).reshape(16, 16)
    out = metrics.task_metrics("restoration", (target + 0.1)[None], target)
    assert set(out) == {"pearson", "psnr", "ssim"}
    assert out["pearson"] == pytest.approx(1.0)
    assert out["psnr"] == pytest.approx(20.0)
    assert 0.9 < out["ssim"] < 1.0
    same = metrics.task_metrics("restoration", target, target)
    assert same == {"pearson": pytest.approx(1.0), "psnr": float("inf"), "ssim": pytest.approx(1.0)}


def test_task_metrics_semantic_targets():
    pred = np.zeros((10, 10), np.float32)
    pred[0:5, :] = 0.8  # 50 px predicted
    mask = np.zeros((10, 10), np.uint8)
    mask[0:3, :] = 1
    mask[8:10, :] = 1  # 50 px true, 30 shared -> dice 60/100, iou 30/70
    expected = {"dice": pytest.approx(0.6), "iou": pytest.approx(3 / 7)}
    assert metrics.task_metrics("semantic", pred, mask) == expected
    assert metrics.task_metrics("semantic", pred[None], mask.astype(bool)) == expected
    assert metrics.task_metrics("semantic", pred, mask * 7) == expected  # label image: > 0 is foreground
    assert metrics.task_metrics("semantic", pred, mask * 0.6) == expected  # float: > 0.5 is foreground
    assert metrics.task_metrics("semantic", pred, mask * 0.4) == {"dice": 0.0, "iou": 0.0}
    # a higher threshold empties the prediction
    assert metrics.task_metrics("semantic", pred, mask, threshold=0.9)["dice"] == 0.0


def test_task_metrics_instance():
    prob = (PRED > 0).astype(np.float32) * 0.9
    out = metrics.task_metrics("instance", prob[None], TRUE)
    assert out == {
        "ap50": pytest.approx(2 / 5),
        "f1": pytest.approx(4 / 7),
        "precision": pytest.approx(0.5),
        "recall": pytest.approx(2 / 3),
        "n_pred": 4.0,
        "n_true": 3.0,
    }
    # a binary-mask target is split into connected components first (same objects here)
    assert metrics.task_metrics("instance", prob, TRUE > 0) == out
    assert metrics.task_metrics("instance", prob, (TRUE > 0).astype(np.float32)) == out


def test_task_metrics_instance_watershed_splits_touching_nuclei():
    mask = discs((40, 56), [(20, 18), (20, 34)], radius=10)
    true = np.where(mask, 1 + (np.arange(56) >= 26)[None, :], 0).astype(np.int32)
    prob = mask.astype(np.float32)
    # the merged blob matches only the right half (IoU just over 0.5: it owns the middle column)
    assert (true == 2).sum() > (true == 1).sum()
    comp = metrics.task_metrics("instance", prob, true)
    assert (comp["n_pred"], comp["ap50"], comp["precision"], comp["recall"]) == (1.0, 0.5, 1.0, 0.5)
    ws = metrics.task_metrics("instance", prob, true, instance_method="watershed")
    assert (ws["n_pred"], ws["ap50"], ws["f1"]) == (2.0, 1.0, 1.0)


def test_task_metrics_errors():
    with pytest.raises(ValueError, match=r"prediction shape \(2, 8, 8\) differs from target shape \(8, 8\)"):
        metrics.task_metrics("semantic", np.zeros((2, 8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="differs from target shape"):
        metrics.task_metrics("restoration", np.zeros((8, 9)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="restoration, semantic, instance"):
        metrics.task_metrics("denoising", np.zeros((8, 8)), np.zeros((8, 8)))
