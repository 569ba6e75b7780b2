"""Cellpose (model.kind cellpose): export of CPnet, compression, cellpose's own eval with our engine, AP.

Nothing is downloaded: the network is a narrow CPnet trained here for a few seconds with cellpose's own
training code (flows from generated nuclei labels). Without cellpose installed these tests skip, unless
EFFICIENTBIOAI_REQUIRE_CELLPOSE=1 (set by CI, which installs the extra) turns the skip into a failure.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from efficientbioai.config import CompressConfig, InferConfig, ModelConfig, validate_config
from efficientbioai.errors import ConfigError, EfficientBioAIError, ModelLoadError
from efficientbioai.synthetic import nuclei

from .conftest import REPO, run_cli

HAVE_CELLPOSE = importlib.util.find_spec("cellpose") is not None
if not HAVE_CELLPOSE and os.environ.get("EFFICIENTBIOAI_REQUIRE_CELLPOSE") == "1":
    raise ImportError(
        "cellpose is not installed but EFFICIENTBIOAI_REQUIRE_CELLPOSE=1: pip install -e '.[cellpose]'"
    )
needs_cellpose = pytest.mark.skipif(
    not HAVE_CELLPOSE, reason="cellpose not installed (pip install -e '.[cellpose]')"
)

NBASE = (2, 8, 16, 32, 64)  # a narrow CPnet: cellpose's is (2, 32, 64, 128, 256)
DIAM = 17.0
THREADS = 1  # one thread: robust when the machine's cores are busy (tests check results, not speed)


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    """Cellpose models set PyTorch's (global) thread count; other test modules get theirs back."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Any attempt of cellpose to fetch weights fails the test."""
    if HAVE_CELLPOSE:
        from cellpose import utils

        def refuse(*args, **kwargs):
            raise AssertionError(f"cellpose tried to download {args[:1]}")

        monkeypatch.setattr(utils, "download_url_to_file", refuse)


def _random_cpnet(nbase=NBASE, seed: int = 0):
    from cellpose.resnet_torch import CPnet

    torch.manual_seed(seed)
    net = CPnet(list(nbase), 3, sz=3, mkldnn=False, diam_mean=DIAM)
    with torch.no_grad():  # non-trivial batch-norm statistics, so that eval mode matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A cellpose model file: a narrow CPnet trained briefly by cellpose on generated nuclei."""
    pytest.importorskip("cellpose")
    from efficientbioai.cellpose import train_cpnet

    root = tmp_path_factory.mktemp("cellpose")
    data = [nuclei((192, 192), seed=s) for s in range(8)]
    return train_cpnet(
        [d[0] for d in data], [d[1] for d in data], root, nbase=NBASE, epochs=60, diam_mean=DIAM, threads=1
    )


@pytest.fixture(scope="module")
def artifact(trained, tmp_path_factory) -> Path:
    from efficientbioai.compress import compress

    root = tmp_path_factory.mktemp("cellpose_artifact")
    (root / "calib").mkdir()
    for i in range(2):
        tifffile.imwrite(root / "calib" / f"c{i}.tif", nuclei((256, 256), seed=50 + i)[0])
    cfg = validate_config(
        {
            "model": {"kind": "cellpose", "path": str(trained)},
            "calibration": {"images": str(root / "calib"), "num_tiles": 12, "tile_shape": [128, 128]},
            "fidelity": {"num_tiles": 4, "max_pearson_drop": 0.01},
            "engine": {"latency_repeats": 2, "threads": 1},
            "output": str(root / "cellpose_int8"),
        },
        CompressConfig,
    )
    compress(cfg, quiet=True)
    return root / "cellpose_int8"


# ------------------------------------------------------------------------------------ no cellpose needed


def test_missing_cellpose_names_the_extra(monkeypatch, tmp_path):
    from efficientbioai.models import load_model

    monkeypatch.setitem(__import__("sys").modules, "cellpose", None)  # import cellpose → ImportError
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelConfig(kind="cellpose", options={"model_type": "nuclei"}))
    assert "efficientbioai[cellpose]" in err.value.fix


@needs_cellpose
def test_cellpose_4_is_refused_with_a_reason(monkeypatch):
    import importlib.metadata

    from efficientbioai.models.cellpose import require_cellpose

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "4.0.6")
    with pytest.raises(ModelLoadError, match="Cellpose-SAM"):
        require_cellpose()


def test_cellpose_section_of_the_infer_config(tmp_path):
    (tmp_path / "manifest.yaml").write_text("manifest_version: 1\n")
    cfg = validate_config(
        {
            "model": str(tmp_path),
            "input": "x.tif",
            "output": "o",
            "cellpose": {"diameter": 30, "channels": [2, 3]},
        },
        InferConfig,
    )
    assert cfg.cellpose.diameter == 30 and cfg.cellpose.bsize == 224 and cfg.cellpose.flow_threshold == 0.4
    with pytest.raises(ConfigError, match="cellpose.diamter"):
        validate_config(
            {"model": str(tmp_path), "input": "x", "output": "o", "cellpose": {"diamter": 3}}, InferConfig
        )
    with pytest.raises(ConfigError, match="cellpose.bsize"):
        validate_config(
            {"model": str(tmp_path), "input": "x", "output": "o", "cellpose": {"bsize": 100}}, InferConfig
        )


def test_input_images_for_cellpose():
    from efficientbioai.cellpose.infer import image_for_cellpose

    img = np.zeros((1, 3, 40, 50), np.float32)
    arr, ch = image_for_cellpose(img, "zcyx", "x")
    assert arr.shape == (3, 40, 50) and ch == 0
    assert image_for_cellpose(np.zeros((40, 50, 2)), None, "x")[1] == 2
    assert image_for_cellpose(np.zeros((1, 40, 50)), None, "x")[1] is None
    with pytest.raises(EfficientBioAIError, match="2D images"):
        image_for_cellpose(np.zeros((5, 40, 50)), "zyx", "x")
    with pytest.raises(EfficientBioAIError, match="set `axes:`"):
        image_for_cellpose(np.zeros((6, 40, 50)), None, "x")


def test_example_configs_are_valid(tmp_path, monkeypatch):
    import yaml

    from efficientbioai.config import load_config

    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / "cellpose_nuclei_int8.yaml", CompressConfig)
    assert cfg.model.kind == "cellpose" and cfg.quantize.precision == "int8"
    data = yaml.safe_load((REPO / "configs" / "cellpose_nuclei_infer.yaml").read_text())
    (tmp_path / "manifest.yaml").write_text("manifest_version: 1\n")  # stands in for `compress`'s artifact
    cfg = validate_config({**data, "model": str(tmp_path)}, InferConfig)
    assert cfg.cellpose.channels == [0, 0] and cfg.compare_with_original


# ---------------------------------------------------------------------------------------- the network


@needs_cellpose
def test_flows_wrapper_is_cpnet_and_exports_for_every_tile_shape(tmp_path):
    """The style's global mean replaces the input-sized avg_pool: same outputs, an ONNX valid at any size."""
    import openvino as ov

    from efficientbioai.cellpose.network import CellposeFlows
    from efficientbioai.compress.export import export_onnx
    from efficientbioai.engines import OnnxRuntimeEngine

    net = _random_cpnet()
    flows = CellposeFlows(net).eval()
    for shape in [(2, 2, 64, 64), (1, 2, 96, 160)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(flows(x), net(x)[0], rtol=1e-4, atol=1e-5)
    onnx_path = export_onnx(
        flows, np.random.rand(1, 2, 64, 64).astype(np.float32), tmp_path / "m.onnx", "bcyx"
    )
    x = np.random.rand(3, 2, 96, 160).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x))[0].numpy()
    with OnnxRuntimeEngine(onnx_path, THREADS) as ort:
        np.testing.assert_allclose(ort(x), ref, rtol=1e-3, atol=1e-4)
    compiled = ov.Core().compile_model(
        ov.convert_model(str(onnx_path)),
        "CPU",
        {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": THREADS},
    )
    np.testing.assert_allclose(compiled(x)[0], ref, rtol=1e-3, atol=1e-4)


@needs_cellpose
def test_empty_nucleus_channel_is_folded_in():
    from efficientbioai.cellpose.network import CellposeFlows

    net = _random_cpnet()
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(
            CellposeFlows(net, in_channels=1)(x), net(torch.cat([x, torch.zeros_like(x)], 1))[0]
        )


@needs_cellpose
def test_model_type_is_read_from_cellposes_folder_never_downloaded(tmp_path, monkeypatch):
    from cellpose import models

    from efficientbioai.models import load_model

    monkeypatch.setattr(models, "MODEL_DIR", tmp_path)
    torch.save(_random_cpnet((2, 8, 16, 32, 64)).state_dict(), tmp_path / "nucleitorch_0")
    _, loaded = load_model(ModelConfig(kind="cellpose", options={"model_type": "nuclei"}))
    spec = loaded.source["cellpose"]
    assert spec["diam_mean"] == 17.0 and spec["builtin"] and spec["in_channels"] == 1
    assert loaded.in_channels == 1 and loaded.tile_step == [8, 8] and loaded.preferred_tile == [224, 224]
    with pytest.raises(ModelLoadError, match="downloads nothing") as err:
        load_model(ModelConfig(kind="cellpose", options={"model_type": "cyto3"}))
    assert "model_type='cyto3'" in err.value.fix
    with pytest.raises(ConfigError, match="not a cellpose model"):
        load_model(ModelConfig(kind="cellpose", options={"model_type": "nucleii"}))


@needs_cellpose
def test_wrong_files_and_options_are_explained(tmp_path):
    from efficientbioai.models import load_model

    cp4 = tmp_path / "cpsam"
    torch.save({"W2": torch.zeros(1), "encoder.x": torch.zeros(1)}, cp4)
    with pytest.raises(ModelLoadError, match="Cellpose-SAM"):
        load_model(ModelConfig(kind="cellpose", path=cp4))
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(1, 1, 3, 3)}, other)
    with pytest.raises(ModelLoadError, match="not a cellpose CPnet"):
        load_model(ModelConfig(kind="cellpose", path=other))
    good = tmp_path / "good"
    torch.save(_random_cpnet().state_dict(), good)
    with pytest.raises(ConfigError, match="unknown option"):
        load_model(ModelConfig(kind="cellpose", path=good, options={"diameter": 30}))
    with pytest.raises(ConfigError, match="exactly one of"):
        load_model(ModelConfig(kind="cellpose", path=good, options={"model_type": "nuclei"}))
    with pytest.raises(ConfigError, match="channels pair"):
        load_model(ModelConfig(kind="cellpose", path=good, options={"channels": [0]}))
    _, loaded = load_model(ModelConfig(kind="cellpose", path=good, options={"channels": [2, 3]}))
    assert loaded.in_channels == 2 and loaded.source["cellpose"]["diam_mean"] == DIAM


@needs_cellpose
def test_average_precision_is_cellposes():
    from efficientbioai.cellpose import average_precision

    _, lab = nuclei((128, 128), seed=3)
    assert average_precision(lab, lab) == {"ap50": 1.0, "ap75": 1.0, "ap90": 1.0}
    assert average_precision(np.zeros_like(lab), np.zeros_like(lab))["ap50"] == 1.0
    half = np.where(lab % 2 == 1, lab, 0)  # every other object missed
    found = len(np.unique(half)) - 1  # TP = found, FP = 0, FN = the others
    assert average_precision(lab, half)["ap50"] == pytest.approx(found / lab.max())


# ------------------------------------------------------------------------ compress, then run cellpose


@needs_cellpose
@pytest.mark.slow
def test_compress_writes_a_cellpose_artifact(artifact):
    import yaml

    m = yaml.safe_load((artifact / "manifest.yaml").read_text())
    assert m["model"]["kind"] == "cellpose" and m["precision"] == "int8"
    assert m["input"]["channels"] == 1 and m["output"]["channels"] == 3
    assert m["model"]["cellpose"]["nbase"] == list(NBASE)
    assert m["fidelity"]["pearson"] > 0.99
    assert (artifact / "openvino" / "model.xml").is_file()


@needs_cellpose
@pytest.mark.slow
def test_engine_masks_agree_with_the_original_and_the_truth(artifact):
    from efficientbioai.cellpose import average_precision, engine_model, original_model, segment

    image, truth = nuclei((256, 320), seed=100)
    eng, orig = (
        engine_model(artifact, threads=THREADS),
        original_model(artifact, threads=THREADS, mkldnn=False),
    )
    a = segment(eng, image, channels=[0, 0], diameter=DIAM)
    b = segment(orig, image, channels=[0, 0], diameter=DIAM)
    assert a.masks.shape == truth.shape and a.tiles == b.tiles > 0
    assert a.engine_seconds > 0 and a.network_seconds >= a.engine_seconds and a.masks_seconds > 0
    assert a.seconds >= a.network_seconds + a.masks_seconds
    ap_orig, ap_eng = average_precision(truth, b.masks), average_precision(truth, a.masks)
    assert ap_orig["ap50"] > 0.6, ap_orig  # the briefly trained network finds the nuclei
    assert ap_eng["ap50"] > ap_orig["ap50"] - 0.05, (ap_eng, ap_orig)
    assert average_precision(b.masks, a.masks)["ap50"] > 0.9
    # cellpose's own eval, called directly, gives the same masks
    masks, flows, _ = eng.eval(image, channels=[0, 0], diameter=DIAM)
    np.testing.assert_array_equal(masks, a.masks)


@needs_cellpose
@pytest.mark.slow
def test_diameter_rescales_as_in_cellpose(artifact):
    """Objects twice as large with diameter 2×: the network sees the image at half size, masks at full size."""
    from scipy import ndimage

    from efficientbioai.cellpose import average_precision, engine_model, segment

    image, truth = nuclei((160, 160), seed=101)
    big, big_truth = ndimage.zoom(image, 2, order=1), ndimage.zoom(truth, 2, order=0)
    eng = engine_model(artifact, threads=THREADS)
    seen: list[tuple[int, ...]] = []
    run = eng.net.engine.__call__
    eng.net.engine = lambda x: (seen.append(x.shape), run(x))[1]
    at_scale = segment(eng, big, diameter=2 * DIAM)
    assert at_scale.masks.shape == big.shape
    assert max(s[-1] for s in seen) <= 160 + 32  # half of 320, plus cellpose's padding
    seen.clear()
    unscaled = segment(eng, big, diameter=DIAM)
    assert max(s[-1] for s in seen) > 224 or unscaled.tiles > at_scale.tiles
    assert average_precision(big_truth, at_scale.masks)["ap50"] > 0.5
    assert (
        average_precision(big_truth, at_scale.masks)["ap50"]
        > average_precision(big_truth, unscaled.masks)["ap50"]
    )


@needs_cellpose
@pytest.mark.slow
def test_channels_as_in_cellpose(artifact):
    """channels=[2, 0] segments the green channel of an RGB image; a nucleus channel is refused."""
    from efficientbioai.cellpose import engine_model, segment

    image, _ = nuclei((192, 192), seed=102)
    noise = np.random.default_rng(0).random((192, 192), dtype=np.float32)
    rgb = np.stack([noise, image, noise[::-1]], axis=-1)
    eng = engine_model(artifact, threads=THREADS)
    green = segment(eng, rgb, channels=[2, 0], channel_axis=-1, diameter=DIAM)
    gray = segment(eng, image, channels=[0, 0], diameter=DIAM)
    np.testing.assert_array_equal(green.masks, gray.masks)
    assert gray.count > 5
    with pytest.raises(EfficientBioAIError, match="one channel"):
        segment(eng, rgb, channels=[2, 1], channel_axis=-1, diameter=DIAM)


@needs_cellpose
@pytest.mark.slow
def test_infer_cli_writes_masks_and_scores_them(artifact, tmp_path):
    import yaml

    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    image, truth = nuclei((200, 240), seed=103)
    tifffile.imwrite(tmp_path / "img" / "a.tif", image)
    tifffile.imwrite(tmp_path / "lab" / "a.tif", truth)
    cfg = {
        "model": str(artifact),
        "input": str(tmp_path / "img"),
        "targets": str(tmp_path / "lab"),
        "output": str(tmp_path / "out"),
        "compare_with_original": True,
        "threads": THREADS,
        "energy": False,
        "cellpose": {"diameter": DIAM, "channels": [0, 0]},
    }
    (tmp_path / "infer.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli("infer", "--config", str(tmp_path / "infer.yaml"), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "openvino int8" in out and "torch fp32 (original)" in out and "ap50" in out and "ap90" in out
    assert "faster than torch fp32 (original)" in out and "masks vs the original's: AP@0.5" in out
    masks = tifffile.imread(tmp_path / "out" / "a.tif")
    assert masks.shape == truth.shape and masks.dtype == np.uint16 and masks.max() > 5
    # a nucleus channel on a one-channel engine is a config error, before anything runs
    cfg["cellpose"]["channels"] = [1, 2]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli("infer", "--config", str(tmp_path / "bad.yaml"), "--overwrite", cwd=tmp_path)
    assert proc.returncode == 2 and "cellpose.channels" in proc.stderr
