import numpy as np
import pytest

from efficientbioai.errors import EfficientBioAIError
from efficientbioai.processing import apply_steps, normalize_steps


def steps(*items):
    return normalize_steps([{"id": i, "kwargs": k} for i, k in items])


def test_zero_mean_unit_variance_over_xy_per_channel():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(5, 2, (32, 32)), rng.normal(-3, 7, (32, 32))])[None].astype(np.float32)
    y = apply_steps(x, steps(("zero_mean_unit_variance", {"axes": ["x", "y"]})), "bcyx")
    np.testing.assert_allclose(y.mean(axis=(2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(2, 3)), 1, atol=1e-4)


def test_fixed_mean_std_per_channel():
    x = np.ones((1, 2, 4, 4), np.float32)
    y = apply_steps(x, steps(("zero_mean_unit_variance", {"mean": [1, 0], "std": [1, 2], "eps": 0})), "bcyx")
    np.testing.assert_allclose(y[0, 0], 0)
    np.testing.assert_allclose(y[0, 1], 0.5)


def test_scale_range_percentiles():
    x = np.arange(101, dtype=np.float32).reshape(1, 1, 1, 101)
    y = apply_steps(x, steps(("scale_range", {"min_percentile": 10, "max_percentile": 90, "eps": 0})), "bcyx")
    assert y[0, 0, 0, 10] == pytest.approx(0)
    assert y[0, 0, 0, 90] == pytest.approx(1)


def test_scale_linear_clip_sigmoid_binarize_dtype():
    x = np.array([-2.0, 0.0, 2.0], np.float32).reshape(1, 1, 1, 3)
    np.testing.assert_allclose(
        apply_steps(x, steps(("scale_linear", {"gain": 2, "offset": 1})), "bcyx").ravel(), [-3, 1, 5]
    )
    np.testing.assert_allclose(
        apply_steps(x, steps(("clip", {"min": -1, "max": 1})), "bcyx").ravel(), [-1, 0, 1]
    )
    np.testing.assert_allclose(
        apply_steps(x, steps(("sigmoid", {})), "bcyx").ravel(), 1 / (1 + np.exp([2.0, 0.0, -2.0])), rtol=1e-6
    )
    np.testing.assert_array_equal(
        apply_steps(x, steps(("binarize", {"threshold": 0.5})), "bcyx").ravel(), [0, 0, 1]
    )
    assert apply_steps(x, steps(("ensure_dtype", {"dtype": "uint8"})), "bcyx").dtype == np.uint8


def test_format_04_name_key_and_unknown_step():
    assert normalize_steps([{"name": "sigmoid"}]) == [{"id": "sigmoid", "kwargs": {}}]
    with pytest.raises(EfficientBioAIError, match="unsupported processing step 'scale_mean_variance'"):
        normalize_steps([{"id": "scale_mean_variance"}])
