"""`efficientbioai infer` end to end: a real int8 OpenVINO engine compressed from a real (tiny, trained)
U-Net, real TIFF / zarr / NPY files on disk, the real CLI in a subprocess."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from efficientbioai.compress import compress
from efficientbioai.config import InferConfig, validate_config
from efficientbioai.errors import ConfigError, EfficientBioAIError
from efficientbioai.infer import infer
from efficientbioai.infer.predict import Predictor
from efficientbioai.io import partial_outputs, write_image
from efficientbioai.synthetic import nuclei

from .conftest import run_cli

KWARGS = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 1,
    "channels": [8, 16, 32],
    "strides": [2, 2],
    "num_res_units": 1,
}


def _train_tiny_unet(steps: int = 150):
    """A tiny 2D U-Net trained for a few seconds to find nuclei (logits > 0 = foreground)."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(**KWARGS)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    im, lab = nuclei((256, 256), seed=7)
    x = torch.from_numpy(im)[None, None]
    y = torch.from_numpy((lab > 0).astype(np.float32))[None, None]
    # one thread: the same network whatever thread count earlier tests left behind (reductions summed in
    # another order drift apart over 150 steps at this learning rate)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("artifact")
    ckpt = root / "unet.pt"
    torch.save(_train_tiny_unet().state_dict(), ckpt)
    (root / "calib").mkdir()
    for i in range(2):
        tifffile.imwrite(root / "calib" / f"c{i}.tif", nuclei((256, 256), seed=20 + i)[0])
    cfg = validate_config(
        {
            "model": {
                "kind": "monai",
                "name": "UNet",
                "kwargs": KWARGS,
                "checkpoint": str(ckpt),
                "axes": "bcyx",
            },
            "calibration": {"images": str(root / "calib"), "num_tiles": 24, "tile_shape": [64, 64]},
            "fidelity": {"num_tiles": 4, "task": "semantic", "threshold": 0.0},
            "engine": {"latency_repeats": 2},
            "output": str(root / "unet2d_int8"),
        }
    )
    compress(cfg, quiet=True)
    return root / "unet2d_int8"


@pytest.fixture
def data(tmp_path) -> tuple[Path, Path]:
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    for i, shape in enumerate([(150, 211), (97, 64)]):
        im, lab = nuclei(shape, seed=40 + i)
        tifffile.imwrite(imgs / f"img{i}.tif", im)
        tifffile.imwrite(masks / f"img{i}.tif", (lab > 0).astype(np.uint8))
    return imgs, masks


def _cfg(artifact: Path, tmp_path: Path, **kw) -> dict:
    return {"model": str(artifact), "output": str(tmp_path / "pred"), "threshold": 0.0, **kw}


def test_cli_infer_writes_predictions_and_compares_with_original(tmp_path, artifact, data):
    imgs, masks = data
    cfg = _cfg(
        artifact,
        tmp_path,
        input=str(imgs / "*.tif"),
        targets=str(masks),
        task="semantic",
        compare_with_original=True,
        tiling={"overlap": 0.25, "batch_size": 2},
    )
    path = tmp_path / "i.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli("infer", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "openvino int8" in out and "torch fp32 (original)" in out
    assert "dice" in out and "iou" in out and "(estimated)" in out
    assert "faster than torch fp32 (original)" in out
    for i, shape in enumerate([(150, 211), (97, 64)]):
        pred = tifffile.imread(tmp_path / "pred" / f"img{i}.tif")
        assert pred.shape == shape and pred.dtype == np.float32
        mask = tifffile.imread(masks / f"img{i}.tif") > 0
        dice = 2 * ((pred > 0) & mask).sum() / ((pred > 0).sum() + mask.sum())
        assert dice > 0.8  # a trained network, stitched correctly
    assert not partial_outputs(tmp_path / "pred")


def test_engine_agrees_with_original_on_whole_image_and_reports_metrics(tmp_path, artifact, data):
    imgs, masks = data
    cfg = validate_config(
        _cfg(
            artifact,
            tmp_path,
            input=str(imgs),
            targets=str(masks),
            task="semantic",
            compare_with_original=True,
        ),
        InferConfig,
    )
    result = infer(cfg, quiet=True)
    assert [im.status for im in result.images] == ["done", "done"]
    for im in result.images:
        assert im.agreement["pearson"] > 0.99
        eng, orig = im.runs
        assert eng.engine == "openvino int8" and orig.engine.startswith("torch")
        # 97 x 64 is a small image: 0.02 of dice is about a dozen boundary pixels (measured: 0.0013 and
        # 0.0216 with this network; a broken engine or stitching costs far more)
        assert abs(eng.metrics["dice"] - orig.metrics["dice"]) < 0.03
        assert eng.energy.method in ("estimated", "measured") and eng.energy.joules > 0
        assert eng.seconds > 0 and eng.tiles >= 1
    d = result.as_dict()
    assert d["task"] == "semantic" and d["images"][0]["runs"][0]["voxels_per_second"] > 0


def test_rerun_skips_finished_outputs_unless_overwrite(tmp_path, artifact, data):
    imgs, masks = data
    raw = _cfg(artifact, tmp_path, input=str(imgs), targets=str(masks), task="semantic", energy=False)
    infer(validate_config(raw, InferConfig), quiet=True)
    first = tmp_path / "pred" / "img0.tif"
    stamp = first.stat().st_mtime_ns
    again = infer(validate_config(raw, InferConfig), quiet=True)
    assert [im.status for im in again.images] == ["exists", "exists"]
    assert first.stat().st_mtime_ns == stamp
    assert again.images[0].runs[0].metrics["dice"] > 0.8  # metrics still come from the existing output
    over = infer(validate_config({**raw, "overwrite": True}, InferConfig), quiet=True)
    assert [im.status for im in over.images] == ["done", "done"] and first.stat().st_mtime_ns != stamp


def test_interrupted_run_leaves_no_complete_looking_file_and_resumes(tmp_path, artifact, data, monkeypatch):
    imgs, _ = data
    raw = _cfg(artifact, tmp_path, input=str(imgs), energy=False)
    original_call = Predictor.__call__
    calls = {"n": 0}

    def interrupted(self, image, progress=None):
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C while the second image runs
            raise KeyboardInterrupt
        return original_call(self, image, progress)

    monkeypatch.setattr(Predictor, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        infer(validate_config(raw, InferConfig), quiet=True)
    monkeypatch.setattr(Predictor, "__call__", original_call)
    out = tmp_path / "pred"
    assert (out / "img0.tif").is_file() and not (out / "img1.tif").exists()
    assert not partial_outputs(out)
    result = infer(validate_config(raw, InferConfig), quiet=True)
    assert [im.status for im in result.images] == ["exists", "done"]
    assert tifffile.imread(out / "img1.tif").shape == (97, 64)


def test_zarr_in_zarr_out_and_npy_with_batch_axis(tmp_path, artifact):
    im, _ = nuclei((130, 90), seed=3)
    write_image(tmp_path / "in" / "scan.zarr", im, axes="yx")
    result = infer(
        validate_config(_cfg(artifact, tmp_path, input=str(tmp_path / "in"), energy=False), InferConfig)
    )
    out = result.images[0].output
    assert out.name == "scan.zarr" and out.is_dir()
    from efficientbioai.io import read_image

    pred = np.asarray(read_image(out))
    assert pred.shape == (130, 90)
    # the same image through a TIFF gives the same prediction
    (tmp_path / "t").mkdir()
    tifffile.imwrite(tmp_path / "t" / "scan.tif", im)
    tif = infer(
        validate_config(_cfg(artifact, tmp_path / "tt", input=str(tmp_path / "t"), energy=False), InferConfig)
    )
    np.testing.assert_allclose(tifffile.imread(tif.images[0].output), pred, rtol=1e-5, atol=1e-5)
    # a stack of two images with a batch axis
    batch = np.stack([im, im[::-1]])
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "b" / "pair.npy", batch)
    res = infer(
        validate_config(
            _cfg(artifact, tmp_path / "bb", input=str(tmp_path / "b"), axes="byx", energy=False), InferConfig
        )
    )
    both = tifffile.imread(res.images[0].output)
    assert both.shape == (2, 130, 90)
    np.testing.assert_allclose(both[0], pred, rtol=1e-5, atol=1e-5)
    assert not np.allclose(both[1], pred)


def test_background_skipping_is_reported(tmp_path, artifact):
    im, _ = nuclei((256, 256), seed=5)
    im[:, 96:] = 0.08 + 0.002 * np.random.default_rng(0).standard_normal((256, 160))  # empty field
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "half.tif", im)
    cfg = _cfg(
        artifact,
        tmp_path,
        input=str(tmp_path / "in"),
        energy=False,
        tiling={"tile_shape": [64, 64], "overlap": 0.0, "background": {"skip": True}},
    )
    result = infer(validate_config(cfg, InferConfig), quiet=True)
    run = result.images[0].runs[0]
    assert run.tiles == 16 and 4 <= run.skipped <= 10
    assert f"16 ({run.skipped})" in result.table()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"axes": "zyx"}, r"axes 'zyx' do not describe an array of shape \(150, 211\)"),
        ({"tiling": {"tile_shape": [62, 62]}}, r"use tiling.tile_shape: \[64, 64\]"),
        ({"input": "nothing/*.tif"}, "nothing found"),
        ({"targets": "masks_wrong"}, "has shape"),
        ({"input": "notes"}, "unsupported image format"),
    ],
)
def test_bad_input_is_reported_clearly(tmp_path, artifact, data, change, message):
    imgs, _ = data
    (tmp_path / "masks_wrong").mkdir()
    for i in range(2):
        tifffile.imwrite(tmp_path / "masks_wrong" / f"img{i}.tif", np.zeros((10, 10), np.uint8))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    raw = {**_cfg(artifact, tmp_path, input=str(imgs), energy=False), **change}
    if change.get("input") == "notes":
        raw["input"] = str(tmp_path / "notes" / "*.txt")
    if "targets" in change:
        raw["targets"] = str(tmp_path / "masks_wrong")
    with pytest.raises(EfficientBioAIError, match=message):
        infer(validate_config(raw, InferConfig), quiet=True)


def test_cli_bad_config_exits_2_without_traceback(tmp_path, artifact):
    path = tmp_path / "i.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path), "input": "x.tif", "output": "o", "tilling": {}}))
    proc = run_cli("infer", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "tilling: unknown key; did you mean 'tiling'?" in proc.stderr
    assert "not an artifact directory" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ConfigError):
        validate_config(
            {"model": str(artifact), "input": "x", "output": "o", "tiling": {"overlap": 1.5}}, InferConfig
        )


@pytest.mark.slow
def test_demo_cli_runs_with_no_files(tmp_path):
    """The README's first command: trains, compresses, infers and prints the comparison (~1.5 min)."""
    proc = run_cli("demo", "--output", str(tmp_path / "demo"), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "openvino int8" in out and "torch fp32 (original)" in out and "faster than" in out
    dice = [float(line.split()[-2]) for line in out.splitlines() if line.startswith("nuclei_2048.tif ")]
    assert len(dice) == 2 and min(dice) > 0.9  # the trained demo network finds the nuclei, both engines
    assert (tmp_path / "demo" / "predictions" / "nuclei_2048.tif").is_file()


def test_other_backends_and_tensorrt_message(tmp_path, artifact):
    im, _ = nuclei((100, 120), seed=9)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", im)
    outs = {}
    for backend in ("onnxruntime", "torch"):
        raw = _cfg(artifact, tmp_path / backend, input=str(tmp_path / "in"), energy=False, backend=backend)
        result = infer(validate_config(raw, InferConfig), quiet=True)
        assert result.images[0].runs[0].engine.startswith(backend)
        outs[backend] = tifffile.imread(result.images[0].output)
    # both run the fp32 network: the exported ONNX graph and PyTorch agree on the stitched image
    np.testing.assert_allclose(outs["onnxruntime"], outs["torch"], rtol=1e-3, atol=1e-3)
    raw = _cfg(artifact, tmp_path / "trt", input=str(tmp_path / "in"), backend="tensorrt")
    # compressed without export.targets tensorrt: the error names the missing engine
    with pytest.raises(ConfigError, match="has no TensorRT engine"):
        infer(validate_config(raw, InferConfig), quiet=True)
