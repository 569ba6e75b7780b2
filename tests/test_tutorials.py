"""Every tutorial runs as a user would run it (its run.py in a subprocess, headless), with --quick sizes.

A tutorial that no longer runs, or whose commands, configs or picture break, fails here. The quick runs
check that everything works end to end, not the numbers (the READMEs' tables come from full runs).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from .conftest import REPO

TUTORIALS = REPO / "tutorial"


def run_tutorial(name: str, workdir: Path) -> str:
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(TUTORIALS / name / "run.py"), "--quick", "--workdir", str(workdir)],
        capture_output=True, text=True, env=env, timeout=1200, cwd=workdir.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    picture = workdir / "picture.png"
    with Image.open(picture) as im:
        assert im.format == "PNG" and im.width > 3 * im.height  # a row of four panels
    assert picture.stat().st_size < 400_000  # a picture for a README, not a data dump (PNG size varies with content)
    return proc.stdout


def test_every_tutorial_is_tested_and_documented():
    folders = sorted(p.name for p in TUTORIALS.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert folders == ["01_bioimageio_nuclei", "02_monai3d_budget", "03_cellpose_nuclei", "04_custom_parser"]
    index = (TUTORIALS / "README.md").read_text()
    for name in folders:
        readme = (TUTORIALS / name / "README.md").read_text()
        assert name in index
        for f in ("compress.yaml", "infer.yaml", "run.py"):
            assert (TUTORIALS / name / f).is_file() and f in readme
        assert "efficientbioai compress --config compress.yaml" in readme
        assert "efficientbioai infer --config infer.yaml" in readme


@pytest.mark.slow
def test_tutorial_bioimageio_nuclei(tmp_path, shared_model):
    out = run_tutorial("01_bioimageio_nuclei", tmp_path / "work")
    assert "openvino int8" in out and "dice" in out
    assert (tmp_path / "work" / "runs" / "predictions" / "nuclei0.tif").is_file()
    if importlib.util.find_spec("bioimageio") is not None:
        assert "validated with bioimageio.spec" in out
        assert (tmp_path / "work" / "runs" / "unet2d_int8.bioimageio.zip").is_file()


@pytest.mark.slow
def test_tutorial_monai3d_budget(tmp_path):
    out = run_tutorial("02_monai3d_budget", tmp_path / "work")
    assert "strategy auto: budget pearson drop ≤ 0.01" in out and "prune 0.5 + int8" in out
    assert "pearson" in out and "ssim" in out  # restoration metrics against the clean volume
    assert (tmp_path / "work" / "runs" / "predictions" / "volume.zarr").is_dir()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("cellpose") is None and os.environ.get("EFFICIENTBIOAI_REQUIRE_CELLPOSE") != "1",
    reason="cellpose not installed (pip install -e '.[cellpose]')",
)
def test_tutorial_cellpose_nuclei(tmp_path):
    out = run_tutorial("03_cellpose_nuclei", tmp_path / "work")
    assert "ap50" in out and "masks vs the original's" in out
    assert (tmp_path / "work" / "runs" / "masks" / "nuclei0.tif").is_file()


@pytest.mark.slow
def test_tutorial_custom_parser(tmp_path):
    out = run_tutorial("04_custom_parser", tmp_path / "work")
    assert "mylab NucleiNet" in out and "openvino int8" in out and "dice" in out
