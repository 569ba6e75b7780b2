"""End to end: the real CLI in a subprocess, real NNCF calibration, real OpenVINO engines, real TIFFs."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from efficientbioai.artifact import read_manifest
from efficientbioai.compress import compress
from efficientbioai.config import validate_config
from efficientbioai.engines import OpenVINOEngine
from efficientbioai.errors import FidelityError
from efficientbioai.models.base import sha256
from efficientbioai.processing import apply_steps

from .conftest import TINY_UNET_KWARGS, run_cli, tiny_unet


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def monai3d(tmp_path, images3d) -> dict:
    ckpt = tmp_path / "unet3d.pt"
    torch.save(tiny_unet(3).state_dict(), ckpt)
    return {
        "model": {
            "kind": "monai",
            "name": "UNet",
            "kwargs": TINY_UNET_KWARGS,
            "checkpoint": str(ckpt),
            "axes": "bczyx",
        },
        "calibration": {"images": str(images3d / "*.tif"), "num_tiles": 8, "tile_shape": [16, 32, 32]},
        "quantize": {"precision": "int8"},
        "fidelity": {"num_tiles": 4},
        "engine": {"latency_repeats": 3},
        "output": str(tmp_path / "runs" / "unet3d_int8"),
    }


def test_cli_compresses_3d_monai_unet_to_int8(tmp_path, monai3d):
    cfg = write_config(tmp_path / "c.yaml", monai3d)
    proc = run_cli("compress", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "openvino int8" in proc.stdout and "latency / tile (1, 1, 16, 32, 32)" in proc.stdout
    out = Path(monai3d["output"])
    m = read_manifest(out).model_dump()
    assert m["precision"] == "int8"
    assert m["input"]["axes"] == "bczyx" and m["input"]["tile_step"] == [4, 4, 4]
    assert [t["step"] for t in m["transformations"]] == [
        "export_onnx",
        "onnxslim",
        "rewrite",
        "quantize_int8",
    ]
    assert (
        m["engines"]["openvino"]["precision"] == "fp32"
    )  # float parts pinned to fp32, not OpenVINO's bf16 default
    assert m["fidelity"]["pearson"] > 0.95
    for rel, digest in m["files"].items():
        assert sha256(out / rel) == digest
    assert {"torch", "openvino", "nncf", "onnx"} <= set(m["versions"])
    assert m["model"]["sha256"] == sha256(monai3d["model"]["checkpoint"])
    # the int8 IR really holds quantization nodes
    xml = (out / "openvino" / "model.xml").read_text()
    assert "FakeQuantize" in xml or 'element_type="i8"' in xml
    # and it runs on a shape it was not calibrated on
    assert OpenVINOEngine(out / "openvino" / "model.xml")(np.zeros((2, 1, 8, 24, 40), np.float32)).shape == (
        2,
        1,
        8,
        24,
        40,
    )
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_cli_2d_torchscript_bf16_with_targets(tmp_path, images2d):
    imgs, masks = images2d
    path = tmp_path / "net2d.pt"
    torch.jit.save(torch.jit.script(tiny_unet(2)), path)
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "model": {"kind": "torchscript", "path": str(path), "axes": "bcyx"},
            "calibration": {
                "images": str(imgs),
                "targets": str(masks),
                "num_tiles": 4,
                "tile_shape": [64, 64],
            },
            "quantize": {"precision": "bf16"},
            "fidelity": {"task": "semantic", "threshold": 0.0, "num_tiles": 3},
            "engine": {"latency_repeats": 2},
            "output": "runs/net2d_bf16",
        },
    )
    proc = run_cli("compress", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = read_manifest(tmp_path / "runs" / "net2d_bf16").model_dump()
    assert m["engines"]["openvino"]["requested_precision"] == "bf16"
    assert m["engines"]["openvino"]["precision"] in ("bf16", "fp32")  # what the CPU really runs
    assert m["fidelity"]["metric"] == "iou_vs_target"
    assert 0 <= m["fidelity"]["compressed_metric"] <= 1
    assert "iou_vs_target" in proc.stdout


def test_existing_output_is_kept_and_overwrite_replaces_it(tmp_path, monai3d):
    out = Path(monai3d["output"])
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    cfg = write_config(tmp_path / "c.yaml", monai3d)
    proc = run_cli("compress", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    proc = run_cli("compress", "--config", str(cfg), "--overwrite", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # --quiet: the result only (the candidates' table when more than one was built, then the summary),
    # no progress lines and no NNCF bars
    assert "UNet: openvino int8" in proc.stdout
    assert "[1/5]" not in proc.stdout + proc.stderr and "[4/5]" not in proc.stdout + proc.stderr
    assert "Statistics collection" not in proc.stdout + proc.stderr
    assert not (out / "keep.txt").exists() and (out / "manifest.yaml").is_file()


def test_the_artifact_folder_gets_the_umask_mode(tmp_path, monai3d):
    """Not mkdtemp's 0700: a lab shares artifacts the way it shares any folder it makes."""
    import os

    old = os.umask(0o022)
    try:
        proc = run_cli(
            "compress", "--config", str(write_config(tmp_path / "c.yaml", monai3d)), "--quiet", cwd=tmp_path
        )
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    assert Path(monai3d["output"]).stat().st_mode & 0o777 == 0o755


def test_fidelity_limit_fails_cleanly_and_writes_nothing(tmp_path, monai3d):
    cfg = dict(monai3d, fidelity={"num_tiles": 4, "max_relative_l2": 1e-9})
    proc = run_cli("compress", "--config", str(write_config(tmp_path / "c.yaml", cfg)), cwd=tmp_path)
    assert proc.returncode == 2
    assert "fidelity.max_relative_l2" in proc.stderr and "how to fix" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not Path(monai3d["output"]).exists()
    assert not list(Path(monai3d["output"]).parent.iterdir())


def test_invalid_tile_shape_names_a_valid_one(tmp_path, monai3d):
    cfg = dict(monai3d, calibration={**monai3d["calibration"], "tile_shape": [15, 32, 30]})
    proc = run_cli("compress", "--config", str(write_config(tmp_path / "c.yaml", cfg)), cwd=tmp_path)
    assert proc.returncode == 2
    assert "use tile_shape: [16, 32, 32]" in proc.stderr


def test_bioimageio_int8_matches_original_on_its_test_input(shared_model, tmp_path):
    cfg = validate_config(
        {
            "model": {"kind": "bioimageio", "path": str(shared_model)},
            "calibration": {"num_tiles": 16, "tile_shape": [256, 256]},
            "quantize": {"precision": "int8"},
            "fidelity": {"task": "semantic", "max_pearson_drop": 0.01},
            "engine": {"latency_repeats": 2},
            "output": str(tmp_path / "unet2d_int8"),
        }
    )
    with pytest.warns(UserWarning, match="own test tensors"):
        result = compress(cfg, quiet=True)
    m = result.manifest.model_dump()
    # the whole 512×512 test input through the int8 engine vs the original TorchScript model
    engine = OpenVINOEngine(result.output / m["engines"]["openvino"]["path"], "int8")
    from efficientbioai.models import load_model

    _, loaded = load_model(cfg.model)
    x = apply_steps(loaded.sample_inputs[0], m["input"]["preprocessing"], "bcyx")
    ref = apply_steps(
        loaded.module(torch.from_numpy(x)).detach().numpy(), m["output"]["postprocessing"], "bcyx"
    )
    out = apply_steps(engine(x), m["output"]["postprocessing"], "bcyx")
    from efficientbioai.metrics import iou, pearson

    assert pearson(out, ref) >= 0.99
    assert iou(out > 0.5, ref > 0.5) >= 0.97
    assert m["package_test"]["original_max_abs_diff_to_package_output"] < 1e-4
    assert m["package_test"]["compressed_pearson_to_original"] >= 0.99


def test_fidelity_error_is_raised_by_the_library(tmp_path, monai3d):
    cfg = validate_config(
        dict(monai3d, fidelity={"num_tiles": 2, "max_pearson_drop": 0.0}, quantize={"precision": "int8"})
    )
    with pytest.raises(FidelityError, match="Pearson drop"):
        compress(cfg, quiet=True)


def test_onnx_file_with_fixed_shapes_is_quantized_on_the_openvino_side(tmp_path, images2d):
    imgs, _ = images2d
    net = tiny_unet(2)
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(net, (torch.zeros(1, 1, 96, 96),), str(path), opset_version=17, dynamo=False)
    cfg = validate_config(
        {
            "model": {"kind": "onnx", "path": str(path), "axes": "bcyx"},
            "calibration": {"images": str(imgs), "num_tiles": 4, "tile_shape": [48, 64]},
            "fidelity": {"num_tiles": 2, "max_pearson_drop": 0.05},
            "engine": {"latency_repeats": 2},
            "output": str(tmp_path / "onnx_int8"),
        }
    )
    result = compress(cfg, quiet=True)
    m = result.manifest.model_dump()
    assert m["model"]["weights"] == "onnx" and m["input"]["tile_step"] == [4, 4]
    assert m["latency"]["original"]["backend"] == "onnxruntime"
    assert [t["step"] for t in m["transformations"]][0] == "onnx_dynamic_axes"
    assert m["fidelity"]["pearson"] > 0.95
