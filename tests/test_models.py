"""Model parsers on real (tiny or shipped) networks."""

import numpy as np
import pytest
import torch

from efficientbioai.config import ModelConfig
from efficientbioai.engines import OnnxRuntimeEngine, TorchEngine
from efficientbioai.errors import ConfigError, ModelLoadError
from efficientbioai.models import BaseParser, LoadedModel, load_model
from efficientbioai.processing import apply_steps

from .conftest import TINY_UNET_KWARGS, tiny_unet


class DoubleNet(torch.nn.Module):
    """Exact predictor used to check a user parser end to end: output = 2 × input."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1, bias=False)
        torch.nn.init.constant_(self.conv.weight, 2.0)

    def forward(self, x):
        return self.conv(x)


class DoubleParser(BaseParser):
    def load(self):
        return LoadedModel(module=DoubleNet(), axes="bcyx", name="double")


class SigmoidParser(BaseParser):
    """Steps written the short bioimage.io way: no kwargs, and 0.4's 'name' key."""

    def load(self):
        return LoadedModel(
            module=DoubleNet(),
            axes="bcyx",
            preprocessing=[{"name": "scale_range", "kwargs": {"max_percentile": 99}}],
            postprocessing=[{"id": "sigmoid"}],
        )


def make_double(**kwargs):
    return DoubleNet()


def test_torchscript_loads_and_probes_tile_step(tmp_path):
    net = tiny_unet(2)
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(net), path)
    _, loaded = load_model(ModelConfig(kind="torchscript", path=path, axes="bcyx"))
    assert loaded.tile_step == [4, 4]  # two stride-2 levels
    assert loaded.in_channels == 1
    x = np.random.default_rng(0).random((1, 1, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(
        TorchEngine(loaded.module)(x), net(torch.from_numpy(x)).detach().numpy(), atol=1e-5
    )


def test_state_dict_is_not_torchscript(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(tiny_unet(2).state_dict(), path)
    with pytest.raises(ModelLoadError, match="is not a TorchScript file.*|use kind 'torch'"):
        load_model(ModelConfig(kind="torchscript", path=path, axes="bcyx"))


def test_monai_checkpoint_round_trip_and_mismatch(tmp_path):
    net = tiny_unet(3)
    ckpt = tmp_path / "w.pt"
    torch.save(net.state_dict(), ckpt)
    _, loaded = load_model(
        ModelConfig(kind="monai", name="UNet", kwargs=TINY_UNET_KWARGS, checkpoint=ckpt, axes="bczyx")
    )
    x = torch.rand(1, 1, 16, 32, 32)
    torch.testing.assert_close(loaded.module(x), net(x))
    assert loaded.source["sha256"] and loaded.tile_step == [4, 4, 4]
    wrong = dict(TINY_UNET_KWARGS, channels=[8, 16, 32])
    with pytest.raises(ModelLoadError, match="does not fit the monai UNet architecture.*size mismatch"):
        load_model(ModelConfig(kind="monai", name="UNet", kwargs=wrong, checkpoint=ckpt, axes="bczyx"))
    with pytest.raises(ModelLoadError, match="MONAI has no network 'UNett'"):
        load_model(ModelConfig(kind="monai", name="UNett", axes="bczyx"))


def test_torch_factory_and_user_parser_plug_in():
    _, loaded = load_model(ModelConfig(kind="torch", factory="tests.test_models:make_double", axes="bcyx"))
    assert loaded.tile_step == [1, 1]
    _, loaded = load_model(ModelConfig(kind="tests.test_models:DoubleParser"))
    assert loaded.name == "double"
    with pytest.raises(ConfigError, match="not a BaseParser subclass"):
        load_model(ModelConfig(kind="tests.test_models:make_double"))


def test_user_parser_steps_are_normalised():
    from efficientbioai.processing import apply_steps

    _, loaded = load_model(ModelConfig(kind="tests.test_models:SigmoidParser"))
    assert loaded.postprocessing == [{"id": "sigmoid", "kwargs": {}}]
    assert loaded.preprocessing == [{"id": "scale_range", "kwargs": {"max_percentile": 99}}]
    out = apply_steps(np.zeros((1, 1, 4, 4), np.float32), loaded.postprocessing, loaded.axes)
    np.testing.assert_allclose(out, 0.5)
    with pytest.raises(ConfigError, match="unknown kind 'tensorflow'"):
        load_model(ModelConfig(kind="tensorflow"))


def test_bioimageio_package_reproduces_its_test_output(shared_model):
    _, loaded = load_model(ModelConfig(kind="bioimageio", path=shared_model))
    assert loaded.axes == "bcyx" and loaded.source["weights"] == "torchscript"
    assert loaded.halo == [32, 32] and loaded.tile_step == [8, 8]
    assert [s["id"] for s in loaded.preprocessing] == [
        "ensure_dtype",
        "zero_mean_unit_variance",
        "ensure_dtype",
    ]
    x = apply_steps(loaded.sample_inputs[0], loaded.preprocessing, loaded.axes)
    y = apply_steps(TorchEngine(loaded.module)(x), loaded.postprocessing, loaded.axes)
    np.testing.assert_allclose(y, loaded.sample_outputs[0], atol=1e-4)


def test_bioimageio_fixed_shape_onnx_weights_become_dynamic(shared_model):
    _, loaded = load_model(ModelConfig(kind="bioimageio", path=shared_model, weights="onnx"))
    assert loaded.module is None and loaded.tile_step == [8, 8]
    x = apply_steps(loaded.sample_inputs[0], loaded.preprocessing, loaded.axes)
    with OnnxRuntimeEngine(loaded.onnx_path) as ort:
        full = apply_steps(ort(x), loaded.postprocessing, loaded.axes)
        np.testing.assert_allclose(full, loaded.sample_outputs[0], atol=1e-4)
        assert ort(x[..., :256, :320]).shape == (1, 1, 256, 320)


def test_bioimageio_zip_and_missing_weights(shared_model, tmp_path):
    import shutil

    archive = shutil.make_archive(str(tmp_path / "pkg"), "zip", shared_model)
    _, loaded = load_model(ModelConfig(kind="bioimageio", path=archive))
    assert loaded.name == "UNet 2D Nuclei Broad"
    with pytest.raises(ModelLoadError, match="pytorch_state_dict: weights file .* is not in the package"):
        load_model(ModelConfig(kind="bioimageio", path=shared_model, weights="pytorch_state_dict"))


def test_onnx_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(ModelLoadError, match="is not an ONNX model"):
        load_model(ModelConfig(kind="onnx", path=bad, axes="bcyx"))


ARCH_PY = """
import torch


class TinyNet(torch.nn.Module):
    def __init__(self, channels=4):
        super().__init__()
        self.a = torch.nn.Conv2d(1, channels, 3, padding=1)
        self.b = torch.nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))
"""


def test_bioimageio_state_dict_package_with_architecture_source(tmp_path):
    """A format-0.5 package whose only weights are a state dict with the architecture in the package."""
    import importlib.util

    import yaml

    (tmp_path / "tiny_arch.py").write_text(ARCH_PY)
    spec = importlib.util.spec_from_file_location("tiny_arch", tmp_path / "tiny_arch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.TinyNet(channels=3)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    rdf = {
        "format_version": "0.5.4",
        "type": "model",
        "name": "tiny",
        "inputs": [
            {
                "id": "raw",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["raw"]},
                    {"type": "space", "id": "y", "size": {"min": 16, "step": 8}},
                    {"type": "space", "id": "x", "size": {"min": 16, "step": 8}},
                ],
                "preprocessing": [{"id": "scale_linear", "kwargs": {"gain": 2.0, "offset": 0.0}}],
            }
        ],
        "outputs": [
            {
                "id": "out",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["p"]},
                    {"type": "space", "id": "y", "halo": 2, "size": {"tensor_id": "raw", "axis_id": "y"}},
                    {"type": "space", "id": "x", "halo": 2, "size": {"tensor_id": "raw", "axis_id": "x"}},
                ],
                "postprocessing": [{"id": "sigmoid"}],
            }
        ],
        "weights": {
            "pytorch_state_dict": {
                "source": "weights.pt",
                "architecture": {"source": "tiny_arch.py", "callable": "TinyNet", "kwargs": {"channels": 3}},
            }
        },
    }
    (tmp_path / "bioimageio.yaml").write_text(yaml.safe_dump(rdf))
    _, loaded = load_model(ModelConfig(kind="bioimageio", path=tmp_path))
    assert loaded.source["weights"] == "pytorch_state_dict"
    assert loaded.tile_min == [16, 16] and loaded.tile_step == [8, 8] and loaded.halo == [2, 2]
    assert [s["id"] for s in loaded.postprocessing] == ["sigmoid"]
    x = torch.rand(1, 1, 24, 24)
    torch.testing.assert_close(loaded.module(x), net(x))
