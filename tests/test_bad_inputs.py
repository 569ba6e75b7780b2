"""Bad input gives a clear message or a correct result, never a silently wrong one (issue 22, items 2, 4, 5).

Packages and artifacts that were tampered with are in ``test_bad_packages.py``. Each case here asserts
the exit code, that the message names the problem and the fix, and that nothing was written or lost.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from efficientbioai.config import InferConfig, validate_config
from efficientbioai.errors import EfficientBioAIError
from efficientbioai.infer import infer
from efficientbioai.io.provenance import read_provenance
from tests.conftest import blobs, run_cli

UNET = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 1,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "num_res_units": 1,
}


def _compress_cfg(root: Path, output: str, **kw) -> dict:
    return {
        "model": {
            "kind": "monai",
            "name": "UNet",
            "kwargs": UNET,
            "checkpoint": str(root / "unet.pt"),
            "axes": "bcyx",
        },
        "calibration": {"images": str(root / "calib"), "num_tiles": 8, "tile_shape": [64, 64]},
        "fidelity": {"num_tiles": 2},
        "engine": {"latency_repeats": 1},
        "quantize": {"max_drop": None},  # values do not matter here; no budget to miss on some CPU
        "output": output,
        **kw,
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    import torch
    from monai.networks.nets import UNet

    from efficientbioai.compress import compress
    from efficientbioai.config import CompressConfig

    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    torch.save(UNet(**UNET).state_dict(), root / "unet.pt")
    (root / "calib").mkdir()
    for i in range(2):
        tifffile.imwrite(root / "calib" / f"c{i}.tif", blobs((128, 128), seed=i)[0])
    for name in ("art", "art2"):  # two artifacts of different models
        torch.manual_seed(1 if name == "art2" else 0)
        if name == "art2":
            torch.save(UNet(**UNET).state_dict(), root / "unet2.pt")
        cfg = _compress_cfg(root, str(root / name))
        if name == "art2":
            cfg["model"]["checkpoint"] = str(root / "unet2.pt")
        compress(validate_config(cfg, CompressConfig), quiet=True)
    return root


def _nan_image(path: Path) -> None:
    im = blobs((150, 200), seed=3)[0]
    im[40:80, 50:90] = np.nan
    im[5, 5] = np.inf
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, im)


def _infer(root: Path, tmp_path: Path, **kw):
    cfg = {
        "model": str(root / "art"),
        "input": str(tmp_path / "in"),
        "output": str(tmp_path / "pred"),
        "energy": False,
    }
    return infer(validate_config({**cfg, **kw}, InferConfig), quiet=True)


def test_nan_input_is_refused_with_count_and_place(root, tmp_path):
    _nan_image(tmp_path / "in" / "a.tif")
    with pytest.raises(EfficientBioAIError) as err:
        _infer(root, tmp_path)
    assert "1,600 NaN and 1 inf" in err.value.problem and "y 5-79, x 5-89" in err.value.problem
    assert "nonfinite: fill" in err.value.fix
    assert not list((tmp_path / "pred").glob("*.tif"))


def test_filled_input_is_marked_nan_and_every_merger_agrees(root, tmp_path):
    _nan_image(tmp_path / "in" / "a.tif")
    outs = []
    for name, extra in [
        ("mem", {"tiling": {"out_of_core": "false"}}),
        ("ooc", {"tiling": {"out_of_core": "true"}}),
        ("dask", {"tiling": {"out_of_core": "true"}, "distributed": {"n_workers": 1, "processes": False}}),
    ]:
        _infer(root, tmp_path, nonfinite="fill", output=str(tmp_path / name), **extra)
        out = tifffile.imread(tmp_path / name / "a.tif")
        outs.append(out)
        bad = ~np.isfinite(tifffile.imread(tmp_path / "in" / "a.tif"))
        assert np.array_equal(np.isnan(out), bad)  # exactly the filled voxels are marked
        assert read_provenance(tmp_path / name / "a.tif")["filled_nonfinite"] == 1601
    assert np.array_equal(outs[0], outs[1], equal_nan=True) and np.array_equal(
        outs[0], outs[2], equal_nan=True
    )


def test_existing_output_is_skipped_only_when_written_the_same_way(root, tmp_path):
    tifffile.imwrite((tmp_path / "in").mkdir() or tmp_path / "in" / "a.tif", blobs((96, 96), seed=5)[0])
    _infer(root, tmp_path)
    out = tmp_path / "pred" / "a.tif"
    stamp = out.stat().st_mtime_ns
    assert [im.status for im in _infer(root, tmp_path).images] == ["exists"]
    for kw, words in [
        ({"model": str(root / "art2")}, "another model"),
        ({"tiling": {"overlap": 0.5}}, "overlap: 0.25 then, 0.5 now"),
    ]:
        with pytest.raises(EfficientBioAIError) as err:
            _infer(root, tmp_path, **kw)
        assert words in err.value.problem and "--overwrite" in err.value.fix
        assert out.stat().st_mtime_ns == stamp  # nothing lost
    assert _infer(root, tmp_path, tiling={"overlap": 0.5}, overwrite=True).images[0].status == "done"


@pytest.mark.parametrize("damage", ["no-provenance", "truncated", "garbage"])
def test_existing_output_that_cannot_be_trusted_is_refused(root, tmp_path, damage):
    tifffile.imwrite((tmp_path / "in").mkdir() or tmp_path / "in" / "a.tif", blobs((96, 96), seed=5)[0])
    _infer(root, tmp_path)
    out = tmp_path / "pred" / "a.tif"
    if damage == "no-provenance":
        tifffile.imwrite(out, np.ones((96, 96), np.float32))
    elif damage == "truncated":
        tifffile.imwrite(out, np.ones((3, 96, 96), np.float32), metadata={"axes": "ZYX"})
        out.write_bytes(out.read_bytes()[:20000])
    else:
        out.write_bytes(b"not a tiff")
    before = out.read_bytes()
    with pytest.raises(EfficientBioAIError) as err:
        _infer(root, tmp_path)
    words = {
        "no-provenance": "records no provenance",
        "truncated": "cannot be read",
        "garbage": "cannot be read",
    }
    assert words[damage] in err.value.problem and "overwrite" in err.value.fix
    assert out.read_bytes() == before


def test_nan_calibration_image_is_named(root, tmp_path):
    _nan_image(tmp_path / "cal" / "bad.tif")
    cfg = _compress_cfg(root, str(tmp_path / "out"))
    cfg["calibration"]["images"] = str(tmp_path / "cal")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli("compress", "--config", str(tmp_path / "c.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "bad.tif holds non-finite values: 1,600 NaN" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["compress", "infer", "doctor"])
@pytest.mark.parametrize("kind", ["binary", "folder"])
def test_config_that_is_not_yaml(tmp_path, command, kind):
    path = tmp_path / "c.yaml"
    if kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)))
    else:
        path.mkdir()
    proc = run_cli(command, "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "not a text file" if kind == "binary" else "is a folder"
    ) in proc.stderr and "how to fix" in proc.stderr


def test_compress_output_that_cannot_be_written_is_refused_before_work(root, tmp_path):
    (tmp_path / "afile").write_text("x")
    cfg = _compress_cfg(root, str(tmp_path / "afile" / "sub" / "art"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli("compress", "--config", str(tmp_path / "c.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "output: cannot create the folder" in proc.stderr
    assert "[1/5]" not in proc.stderr  # refused before the model was loaded


def test_infer_output_that_cannot_be_written_is_refused(root, tmp_path):
    tifffile.imwrite((tmp_path / "in").mkdir() or tmp_path / "in" / "a.tif", blobs((96, 96), seed=5)[0])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(EfficientBioAIError, match="output: cannot create the folder"):
        _infer(root, tmp_path, output=str(tmp_path / "afile" / "pred"))


def test_cellpose_section_with_another_model_is_refused(root, tmp_path):
    tifffile.imwrite((tmp_path / "in").mkdir() or tmp_path / "in" / "a.tif", blobs((96, 96), seed=5)[0])
    with pytest.raises(EfficientBioAIError) as err:
        _infer(root, tmp_path, cellpose={"diameter": 30})
    assert "not a Cellpose one" in err.value.problem and "remove the cellpose section" in err.value.fix


def test_disk_full_during_compress_says_so(root, tmp_path):
    """The real limit a full disk imposes, as RLIMIT_FSIZE (no root, no tmpfs needed): writes fail."""
    cfg = _compress_cfg(root, str(tmp_path / "out"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write over the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    proc = subprocess.run(
        [sys.executable, "-m", "efficientbioai", "compress", "--config", str(tmp_path / "c.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=limit,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr
    assert "file grew over the size limit" in proc.stderr and "free some disk space" in proc.stderr
    assert "opset" not in proc.stderr and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no half-written artifact


def test_interrupted_out_of_core_run_says_what_it_kept(root, tmp_path):
    """SIGINT in the middle of an out-of-core run: the .partial store is named, and a rerun resumes."""
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "v.tif", blobs((1024, 128), seed=2)[0])
    cfg = {
        "model": str(root / "art"),
        "input": str(tmp_path / "in"),
        "output": str(tmp_path / "pred"),
        "energy": False,
        "tiling": {"out_of_core": "true", "band_memory_mb": 0.01},
    }
    (tmp_path / "i.yaml").write_text(yaml.safe_dump(cfg))
    code = (
        "import signal, sys\n"
        "from efficientbioai.infer import predict\n"
        "calls = [0]\n"
        "real = predict.Predictor._check\n"
        "def check(self, out, grid):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 12: signal.raise_signal(signal.SIGINT)\n"
        "    return real(self, out, grid)\n"
        "predict.Predictor._check = check\n"
        "from efficientbioai.cli import main\n"
        f"sys.exit(main(['infer', '--config', {str(tmp_path / 'i.yaml')!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 130, proc.stderr
    assert "kept for resuming" in proc.stderr and ".v.tif.partial-" in proc.stderr
    assert not (tmp_path / "pred" / "v.tif").exists()
    again = run_cli("infer", "--config", str(tmp_path / "i.yaml"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr and "resumed" in again.stdout
    shutil.rmtree(tmp_path / "pred")
