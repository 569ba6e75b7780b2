"""Exact ONNX rewrites: a 1×1 convolution after an upsampling moves in front of it, nothing else moves."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tifffile
import torch
from onnx import TensorProto, helper, numpy_helper

from efficientbioai.compress import compress
from efficientbioai.compress.export import export_onnx, rewrite_onnx, slim_onnx
from efficientbioai.compress.rewrite import pointwise_before_upsample, transposed_conv_to_subpixel
from efficientbioai.config import validate_config
from efficientbioai.engines import OnnxRuntimeEngine, TorchEngine

from .conftest import TINY_UNET_KWARGS, blobs, tiny_unet


class UpsamplingUNet(torch.nn.Module):
    """The decoder pattern of pytorch-3dunet style U-Nets: upsample, then a 1×1 conv that narrows."""

    def __init__(self, ndim: int = 2, mode: str = "bilinear", head: int = 1, reuse: bool = False):
        super().__init__()
        conv = torch.nn.Conv2d if ndim == 2 else torch.nn.Conv3d
        pool = torch.nn.MaxPool2d if ndim == 2 else torch.nn.MaxPool3d
        if mode == "bilinear" and ndim == 3:
            mode = "trilinear"
        self.enc = conv(1, 8, 3, padding=1)
        self.pool = pool(2)
        self.mid = conv(8, 16, 3, padding=1)
        align = None if mode == "nearest" else False
        self.up = torch.nn.Upsample(scale_factor=2, mode=mode, align_corners=align)
        self.narrow = conv(16, 8, head, padding=head // 2)
        self.dec = conv(16, 8, 3, padding=1)
        self.out = conv(8, 1, 1)
        self.reuse = reuse

    def forward(self, x):
        e = torch.relu(self.enc(x))
        m = torch.relu(self.mid(self.pool(e)))
        u = self.up(m)
        n = self.narrow(u)
        if self.reuse:  # the upsampled tensor is needed elsewhere too: moving the conv saves nothing
            n = n + u[:, :8]
        return self.out(torch.relu(self.dec(torch.cat([n, e], dim=1))))


def make_upsampling_unet() -> torch.nn.Module:
    """Factory for ``model.kind: torch`` in the end-to-end test."""
    torch.manual_seed(0)
    return UpsamplingUNet(2)


def _exported(net, ndim: int, tmp_path):
    torch.manual_seed(0)
    net.eval()
    shape = (1, 1, 32, 32) if ndim == 2 else (1, 1, 16, 32, 32)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    path = export_onnx(net, x, tmp_path / "m.onnx", "bcyx" if ndim == 2 else "bczyx")
    slim_onnx(path)
    return path


def _resize_inputs(model) -> list[str]:
    """The op types that feed each Resize node."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    return [producer.get(n.input[0], "graph input") for n in model.graph.node if n.op_type == "Resize"]


@pytest.mark.parametrize(("ndim", "mode"), [(2, "bilinear"), (2, "nearest"), (3, "bilinear"), (3, "nearest")])
def test_pointwise_conv_moves_before_upsampling_and_the_output_is_unchanged(tmp_path, ndim, mode):
    torch.manual_seed(0)
    net = UpsamplingUNet(ndim, mode).eval()
    path = _exported(net, ndim, tmp_path)
    before = onnx.load(str(path))
    assert _resize_inputs(before) == ["Relu"]
    moved = rewrite_onnx(path)["pointwise_before_upsample"]
    after = onnx.load(str(path))
    onnx.checker.check_model(after, full_check=True)
    assert len(moved) == 1 and _resize_inputs(after) == ["Conv"]
    # shapes other than the export's, odd sizes included: the graph stays dynamic and exact
    shape = (2, 1, 24, 40) if ndim == 2 else (2, 1, 8, 24, 40)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with OnnxRuntimeEngine(path, threads=1) as ort:
        got = ort(x)
    np.testing.assert_allclose(got, TorchEngine(net, 1)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"head": 3}, "a 3×3 convolution mixes neighbours: it does not commute with the upsampling"),
        ({"reuse": True}, "the upsampled tensor has another consumer"),
        ({"mode": "bicubic"}, "cubic interpolation is left alone"),
    ],
)
def test_what_is_not_a_pointwise_conv_after_upsampling_is_left_alone(tmp_path, kwargs, why):
    path = _exported(UpsamplingUNet(2, **kwargs), 2, tmp_path)
    before = onnx.load(str(path)).SerializeToString()
    assert rewrite_onnx(path) == {}, why
    assert onnx.load(str(path)).SerializeToString() == before


def _resize_graph(sizes: np.ndarray | None, scales: np.ndarray | None, channels_out: int = 3):
    """X (1,6,4,5) → Resize(linear) → Conv 1×1 (6→channels_out) → Y, built by hand."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((channels_out, 6, 1, 1)).astype(np.float32)
    b = rng.standard_normal(channels_out).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    resize_inputs = ["x", ""]
    if scales is not None:
        inits.append(numpy_helper.from_array(scales, "scales"))
        resize_inputs.append("scales")
    if sizes is not None:
        inits.append(numpy_helper.from_array(sizes, "sizes"))
        resize_inputs += ["", "sizes"] if scales is None else ["sizes"]
    nodes = [
        helper.make_node("Resize", resize_inputs, ["up"], mode="linear", name="resize"),
        helper.make_node("Conv", ["up", "w", "b"], ["y"], kernel_shape=[1, 1], name="conv"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]


def test_constant_sizes_get_the_convolutions_channel_count(tmp_path):
    x = np.random.default_rng(1).standard_normal((1, 6, 4, 5)).astype(np.float32)
    model = _resize_graph(np.array([1, 6, 9, 11], np.int64), None)
    ref = _run(model, x)
    assert pointwise_before_upsample(model) == ["conv"]
    assert [n.op_type for n in model.graph.node] == ["Conv", "Resize"]
    got = _run(model, x)
    assert got.shape == (1, 3, 9, 11)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_a_resize_that_scales_channels_is_left_alone():
    model = _resize_graph(None, np.array([1, 2, 2, 2], np.float32))
    assert pointwise_before_upsample(model) == []
    assert [n.op_type for n in model.graph.node] == ["Resize", "Conv"]


@pytest.fixture
def images2d(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        tifffile.imwrite(folder / f"img{i}.tif", blobs((96, 96), seed=i)[0])
    return folder


@pytest.mark.parametrize("rewrite", [True, False])
def test_compress_records_the_rewrite_and_the_engine_still_matches(tmp_path, images2d, rewrite):
    cfg = {
        "model": {"kind": "torch", "factory": "tests.test_rewrite:make_upsampling_unet", "axes": "bcyx"},
        "calibration": {"images": str(images2d / "*.tif"), "num_tiles": 4, "tile_shape": [32, 32]},
        "quantize": {"precision": "fp32"},
        "export": {"rewrite": rewrite},
        "fidelity": {"num_tiles": 2, "max_relative_l2": 1e-4},
        "engine": {"latency_repeats": 1},
        "output": str(tmp_path / "out"),
    }
    manifest = compress(validate_config(cfg), quiet=True).manifest.model_dump()
    steps = {t["step"]: t for t in manifest["transformations"]}
    if rewrite:
        assert steps["rewrite"]["pointwise_before_upsample"] == ["/narrow/Conv"]
        assert _resize_inputs(onnx.load(str(tmp_path / "out" / "model.onnx"))) == ["Conv"]
    else:
        assert "rewrite" not in steps
        assert _resize_inputs(onnx.load(str(tmp_path / "out" / "model.onnx"))) == ["Relu"]
    assert manifest["fidelity"]["relative_l2"] < 1e-4


def test_graphs_with_control_flow_are_left_alone():
    """If / Loop bodies may read outer tensors without naming them as inputs: node order must stay."""
    model = _resize_graph(np.array([1, 6, 9, 11], np.int64), None)
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(1, np.float32)))],
        "branch",
        [],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    model.graph.initializer.append(cond)
    model.graph.node.append(
        helper.make_node("If", ["cond"], ["flag"], then_branch=branch, else_branch=branch, name="if")
    )
    assert pointwise_before_upsample(model) == []
    assert [n.op_type for n in model.graph.node] == ["Resize", "Conv", "If"]


# ------------------------------------------------------------------ transposed convolution → pixel shuffle


@pytest.mark.parametrize(
    ("ndim", "kwargs"),
    [
        (3, {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1}),  # MONAI UNet's up layers
        (3, {"kernel_size": 2, "stride": 2}),
        (3, {"kernel_size": 4, "stride": 2, "padding": 1, "bias": False}),
        (2, {"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1}),
        (2, {"kernel_size": 3, "stride": (2, 1), "padding": 1, "output_padding": (1, 0)}),
        (2, {"kernel_size": 5, "stride": 3, "padding": 2, "output_padding": 2}),
        (2, {"kernel_size": 3, "stride": 2, "padding": 0}),
    ],
)
def test_narrow_transposed_conv_becomes_conv_and_pixel_shuffle(tmp_path, ndim, kwargs):
    conv_t = torch.nn.ConvTranspose2d if ndim == 2 else torch.nn.ConvTranspose3d
    torch.manual_seed(0)
    net = conv_t(6, 3, **kwargs).eval()
    shape = (1, 6, 5, 7) if ndim == 2 else (1, 6, 3, 5, 7)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    path = export_onnx(net, x, tmp_path / "m.onnx", "bcyx" if ndim == 2 else "bczyx")
    model = onnx.load(str(path))
    assert transposed_conv_to_subpixel(model) == ["/ConvTranspose"]
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "ConvTranspose" not in ops and ops.count("Conv") == 1
    used = {i for n in model.graph.node for i in n.input}
    assert all(init.name in used for init in model.graph.initializer)  # the replaced weights are gone
    # other shapes than the export's (odd sizes, batch 2): the pixel shuffle is built from the runtime shape
    other = (2, 6, 4, 9) if ndim == 2 else (2, 6, 4, 6, 9)
    x2 = np.random.default_rng(1).standard_normal(other).astype(np.float32)
    got = _run_input(model, x2)
    np.testing.assert_allclose(got, net(torch.from_numpy(x2)).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("channels_out", "kwargs", "why"),
    [
        (16, {}, "wide layers: the phase kernels' zero taps cost more than the rewrite saves"),
        (4, {"groups": 2}, "grouped"),
        (4, {"dilation": 2}, "dilated"),
        (4, {"stride": 1}, "not strided: nothing to interleave"),
    ],
)
def test_other_transposed_convs_are_left_alone(tmp_path, channels_out, kwargs, why):
    args = {"kernel_size": 3, "stride": 2, "padding": 1, **kwargs}
    net = torch.nn.ConvTranspose2d(4, channels_out, **args).eval()
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)
    model = onnx.load(str(export_onnx(net, x, tmp_path / "m.onnx", "bcyx")))
    before = model.SerializeToString()
    assert transposed_conv_to_subpixel(model) == [], why
    assert model.SerializeToString() == before


def _run_input(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]


def test_monai_unet_int8_through_compress_with_the_output_layer_rewritten(tmp_path):
    """The MONAI UNet's narrow up layers run as convolutions, in int8, and infer needs nothing new."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        tifffile.imwrite(folder / f"vol{i}.tif", blobs((24, 48, 48), seed=i)[0])
    torch.save(tiny_unet(3).state_dict(), tmp_path / "unet.pt")
    cfg = {
        "model": {
            "kind": "monai",
            "name": "UNet",
            "kwargs": TINY_UNET_KWARGS,
            "checkpoint": str(tmp_path / "unet.pt"),
            "axes": "bczyx",
        },
        "calibration": {"images": str(folder / "*.tif"), "num_tiles": 6, "tile_shape": [16, 32, 32]},
        "quantize": {"precision": "int8"},
        "fidelity": {"num_tiles": 2, "max_pearson_drop": 0.02},
        "engine": {"latency_repeats": 1},
        "output": str(tmp_path / "out"),
    }
    manifest = compress(validate_config(cfg), quiet=True).manifest.model_dump()
    step = next(t for t in manifest["transformations"] if t["step"] == "rewrite")
    assert len(step["transposed_conv_to_subpixel"]) == 2  # both up layers have ≤ 8 output channels
    ops = [n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node]
    assert "ConvTranspose" not in ops
    import openvino as ov

    compiled = ov.Core().compile_model(str(tmp_path / "out" / "openvino" / "model.xml"), "CPU")
    precisions = {
        op.get_friendly_name(): op.get_rt_info()["runtimePrecision"].astype(str)
        for op in compiled.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Convolution"
    }
    subpixel = [p for name, p in precisions.items() if "_subpixel" in name]
    # the new convs run in int8 (on AVX2 too: plain int8 is within budget there because every layer's
    # weights leave headroom against the 16-bit saturation of CPUs without VNNI, so no layer is reverted)
    assert manifest["strategy"]["chosen"] == "int8"
    quantized = next(t for t in manifest["transformations"] if t["step"] == "quantize_int8")
    assert quantized["overflow_fix"] == "all_layers"
    assert len(subpixel) == 2 and all(p in ("u8", "i8") for p in subpixel)
