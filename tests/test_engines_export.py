"""Engines agree with PyTorch; export errors name the cause."""

import contextlib

import numpy as np
import pytest
import torch

from efficientbioai.compress.export import export_onnx, slim_onnx, to_openvino
from efficientbioai.engines import OnnxRuntimeEngine, OpenVINOEngine, TorchEngine, median_latency_ms
from efficientbioai.errors import ExportError

from .conftest import tiny_unet


@pytest.fixture
def exported(tmp_path):
    net = tiny_unet(3)
    x = np.random.default_rng(0).random((1, 1, 16, 32, 32)).astype(np.float32)
    path = export_onnx(net, x, tmp_path / "m.onnx", "bczyx")
    slim_onnx(path)
    return net, path


def test_engines_agree_on_shapes_they_were_not_exported_at(exported):
    net, path = exported
    x = np.random.default_rng(1).random((2, 1, 8, 24, 40)).astype(np.float32)
    ref = TorchEngine(net)(x)
    with OnnxRuntimeEngine(path, threads=1) as ort:
        np.testing.assert_allclose(ort(x), ref, atol=1e-4)
    ov = OpenVINOEngine(to_openvino(path), "fp32", threads=1)
    assert ov.precision == "fp32" and ov.threads == 1
    np.testing.assert_allclose(ov(x), ref, atol=1e-4)


def test_openvino_reports_the_precision_it_really_runs(exported):
    _, path = exported
    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    with pytest.warns(UserWarning, match="runs") if "FP16" not in caps else contextlib.nullcontext():
        engine = OpenVINOEngine(to_openvino(path), "fp16")
    assert engine.precision == ("fp16" if "FP16" in caps else ("bf16" if "BF16" in caps else "fp32"))
    assert engine.describe()["requested_precision"] == "fp16"


def test_latency_helper_counts_repeats():
    calls = []
    stats = median_latency_ms(calls.append, np.zeros(1), warmup=2, repeats=5)
    assert (
        len(calls) == 7 and stats["repeats"] == 5 and stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
    )


class NotExportable(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x)[0]


def test_unexportable_op_names_the_cause_and_a_way_out(tmp_path):
    with pytest.raises(ExportError, match="could not be exported to ONNX.*") as err:
        export_onnx(NotExportable(), np.zeros((1, 1, 8, 8), np.float32), tmp_path / "m.onnx", "bcyx")
    assert "model.kind: onnx" in err.value.fix


def test_keep_float_patterns_are_checked_and_applied(exported):
    from efficientbioai.compress.quantize import layer_names, quantize_int8
    from efficientbioai.config import QuantizeConfig
    from efficientbioai.errors import ConfigError

    _, path = exported
    model = to_openvino(path)
    tiles = [np.random.default_rng(i).random((1, 16, 32, 32)).astype(np.float32) for i in range(4)]
    with pytest.raises(ConfigError, match="'nothing_like_this' matches no layer"):
        quantize_int8(model, tiles, QuantizeConfig(keep_float=["nothing_like_this"]))
    names = layer_names(model)
    all_q = quantize_int8(to_openvino(path), tiles, QuantizeConfig())
    kept = quantize_int8(to_openvino(path), tiles, QuantizeConfig(keep_float=[".*"]))
    n_fq = lambda m: sum(op.get_type_name() == "FakeQuantize" for op in m.get_ops())  # noqa: E731
    assert names and n_fq(all_q) > 0
    assert n_fq(kept) < n_fq(all_q)
