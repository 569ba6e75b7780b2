"""``efficientbioai export-bioimageio``: real compress → export → bioimageio.spec validation → reload.

The package is validated independently here (bioimageio.spec's ``load_description`` with file checks),
reloaded with efficientbioai's own bioimage.io loader, and its test tensors are replayed through the
package's ONNX weights and through the OpenVINO attachment.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from efficientbioai.config import ModelConfig
from efficientbioai.engines import OpenVINOEngine, reference_engine
from efficientbioai.metrics import pearson
from efficientbioai.models import load_model
from efficientbioai.processing import apply_steps

from .conftest import TINY_UNET_KWARGS, run_cli, tiny_unet

spec = pytest.importorskip("bioimageio.spec", reason='pip install "efficientbioai[bioimageio]"')


def _compress(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli("compress", "--config", str(path), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return Path(cfg["output"])


def _validate(package: Path):
    source = package / "rdf.yaml" if package.is_dir() else package
    descr = spec.load_description(source, perform_io_checks=True)
    summary = descr.validation_summary
    assert summary.status in ("passed", "valid-format"), summary.format()
    assert str(descr.format_version).startswith("0.5")
    return descr


def _replay(package: Path) -> tuple[np.ndarray, np.ndarray, object]:
    """Load the package with efficientbioai and run its test input through its weights."""
    _, loaded = load_model(ModelConfig(kind="bioimageio", path=package))
    assert loaded.source["weights"] == "onnx"
    x = np.asarray(loaded.sample_inputs[0], np.float32)
    with reference_engine(loaded) as engine:
        y = apply_steps(
            engine(apply_steps(x, loaded.preprocessing, loaded.axes)), loaded.postprocessing, loaded.axes
        )
    return y, np.asarray(loaded.sample_outputs[0], np.float32), loaded


@pytest.mark.slow
def test_real_bioimageio_model_int8_round_trip(tmp_path, shared_model):
    artifact = _compress(
        tmp_path,
        {
            "model": {"kind": "bioimageio", "path": str(shared_model)},
            "calibration": {"num_tiles": 8, "tile_shape": [256, 256]},
            "quantize": {"precision": "int8"},
            "fidelity": {"num_tiles": 4, "task": "semantic"},
            "engine": {"latency_repeats": 2},
            "output": str(tmp_path / "runs" / "unet2d_int8"),
        },
    )
    pkg = tmp_path / "unet2d_int8.zip"
    proc = run_cli("export-bioimageio", "--artifact", str(artifact), "--output", str(pkg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "valid-format" in proc.stdout or "passed" in proc.stdout
    assert "test tensors: source package" in proc.stdout

    descr = _validate(pkg)
    assert descr.weights.onnx is not None and descr.weights.torchscript is None
    assert {str(a.source).split("/")[-1] for a in descr.attachments} == {
        "openvino_int8.xml",
        "openvino_int8.bin",
        "efficientbioai_manifest.yaml",
    }
    assert descr.license == "MIT" and "efficientbioai" in descr.tags
    facts = descr.config.model_extra["efficientbioai"]
    assert facts["precision"] == "int8" and facts["fidelity"]["pearson"] > 0.999
    names = set(zipfile.ZipFile(pkg).namelist())
    assert {
        "rdf.yaml",
        "weights.onnx",
        "test_input.npy",
        "test_output.npy",
        "cover.png",
        "README.md",
    } <= names
    # the source package's test tensors, bit for bit
    with zipfile.ZipFile(pkg) as zf:
        zf.extractall(tmp_path / "unzipped")
    assert np.array_equal(
        np.load(tmp_path / "unzipped" / "test_input.npy"), np.load(shared_model / "test_input.npy")
    )
    assert np.array_equal(
        np.load(tmp_path / "unzipped" / "test_output.npy"), np.load(shared_model / "test_output.npy")
    )
    readme = (tmp_path / "unzipped" / "README.md").read_text()
    assert "quantize_int8" in readme and "Pearson r vs original" in readme

    # efficientbioai's own loader reads the exported package; its weights reproduce the test output
    y, expected, loaded = _replay(pkg)
    assert loaded.halo == [32, 32] and loaded.axes == "bcyx"
    np.testing.assert_allclose(y, expected, atol=1e-3, rtol=1e-3)
    # and the int8 attachment agrees with it
    x = apply_steps(np.asarray(loaded.sample_inputs[0], np.float32), loaded.preprocessing, loaded.axes)
    with OpenVINOEngine(tmp_path / "unzipped" / "openvino_int8.xml", "int8") as ov:
        y8 = apply_steps(ov(x), loaded.postprocessing, loaded.axes)
    assert pearson(y8, expected) > 0.999


@pytest.mark.parametrize("ndim", [2, 3])
def test_generated_model_package(tmp_path, images2d, images3d, ndim):
    ckpt = tmp_path / "unet.pt"
    torch.save(tiny_unet(ndim).state_dict(), ckpt)
    images = images2d[0] if ndim == 2 else images3d
    tile = [64, 64] if ndim == 2 else [16, 32, 32]
    artifact = _compress(
        tmp_path,
        {
            "model": {
                "kind": "monai",
                "name": "UNet",
                "kwargs": {**TINY_UNET_KWARGS, "spatial_dims": ndim},
                "checkpoint": str(ckpt),
                "axes": "bcyx" if ndim == 2 else "bczyx",
            },
            "calibration": {"images": str(images), "num_tiles": 6, "tile_shape": tile},
            "quantize": {"precision": "int8", "max_drop": None},
            "fidelity": {"num_tiles": 2},
            "engine": {"latency_repeats": 2},
            "output": str(tmp_path / "runs" / "tiny_int8"),
        },
    )
    pkg = tmp_path / "pkg"
    # no bioimage.io source: the license must be given
    proc = run_cli("export-bioimageio", "-a", str(artifact), "-o", str(pkg), cwd=tmp_path)
    assert proc.returncode == 2 and "--license" in proc.stderr and not pkg.exists()
    proc = run_cli(
        "export-bioimageio", "-a", str(artifact), "-o", str(pkg), "--license", "MIT", "--author", "A. Biologist",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "test tensors: regenerated" in proc.stdout
    descr = _validate(pkg)
    assert [a.name for a in descr.authors] == ["A. Biologist"]
    x = np.load(pkg / "test_input.npy")
    assert x.shape == (1, 1, *tile)  # a calibration tile, centre crop of the first calibration image
    y, expected, loaded = _replay(pkg)
    assert loaded.ndim == ndim
    np.testing.assert_allclose(y, expected, atol=1e-4, rtol=1e-4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pkg")]  # no temporary leftovers
    # an existing package is not replaced without --overwrite
    proc = run_cli("export-bioimageio", "-a", str(artifact), "-o", str(pkg), "--license", "MIT", cwd=tmp_path)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
