"""`efficientbioai infer` end to end with sample localisation and physical pixel sizes: the real int8
OpenVINO engine of test_infer_e2e (a tiny trained 2D U-Net), real TIFF / OME-TIFF / OME-Zarr files
written by tifffile and zarr, the real CLI in a subprocess."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tifffile
import yaml

from efficientbioai.config import InferConfig, validate_config
from efficientbioai.infer import infer
from efficientbioai.io import read_image, read_pixel_size, write_image
from efficientbioai.synthetic import nuclei

from .conftest import run_cli
from .test_infer_e2e import _cfg, artifact  # noqa: F401  (the module-scoped artifact fixture)

UM = "micrometer"


def _sparse_slide(shape=(384, 448), seed=11):
    """Nuclei in one region of a slide (about a quarter of it), empty noisy glass elsewhere; the image
    and the nuclei mask."""
    rng = np.random.default_rng(seed)
    img = (0.06 + 0.005 * rng.standard_normal(shape)).astype(np.float32)
    mask = np.zeros(shape, bool)
    tissue, labels = nuclei((200, 220), seed=seed)
    img[150:350, 200:420] = tissue + 0.05
    mask[150:350, 200:420] = labels > 0
    return img, mask


def test_cli_localize_skips_tiles_and_keeps_the_sample_exact(tmp_path, artifact):  # noqa: F811
    (tmp_path / "in").mkdir()
    image, nuclei_mask = _sparse_slide()
    tifffile.imwrite(tmp_path / "in" / "slide.tif", image)
    raw = {
        name: _cfg(
            artifact,
            tmp_path / name,
            input=str(tmp_path / "in"),
            energy=False,
            tiling={"tile_shape": [64, 64], "overlap": 0.25, "localize": localize},
        )
        for name, localize in (("full", {}), ("local", {"enabled": True}))
    }
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(raw["local"]))
    proc = run_cli("infer", "--config", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    full_run = infer(validate_config(raw["full"], InferConfig), quiet=True).as_dict()["images"][0]["runs"][0]
    record = infer(validate_config({**raw["local"], "overwrite": True}, InferConfig), quiet=True)
    local_run = json.loads(json.dumps(record.as_dict()))["images"][0]["runs"][0]  # the JSON record
    assert full_run["skipped_tiles"] == 0 and full_run["skipped_voxel_fraction"] == 0.0
    assert local_run["tiles"] == full_run["tiles"] and local_run["skipped_tiles"] > local_run["tiles"] / 3
    fraction = local_run["skipped_voxel_fraction"]
    assert 0.3 < fraction < 0.8
    assert "voxels skipped" in proc.stdout and f"{fraction:.1%}" in proc.stdout  # the CLI's table
    assert re.search(r"sample in \d+ region\(s\).*tiles skipped", proc.stderr)  # the log line
    full = tifffile.imread(tmp_path / "full" / "pred" / "slide.tif")
    local = tifffile.imread(tmp_path / "local" / "pred" / "slide.tif")
    np.testing.assert_array_equal(local[nuclei_mask], full[nuclei_mask])  # the real int8 engine, bit for bit
    # outside, far from the sample: one background value (the engine's output on empty glass)
    # (a value the engine gives on glass: within the spread of the full run's output there; the fixture's
    # artifact is built under the default accuracy budget, so which engine it is can change)
    glass = full[:90, :140]
    assert np.ptp(local[:90, :140]) < 1e-5
    assert np.percentile(glass, 5) < local[0, 0] < np.percentile(glass, 95)
    assert (local != full).mean() == pytest.approx(fraction, abs=0.15)


def test_localize_zarr_3d_axes_error_and_nothing_found(tmp_path, artifact):  # noqa: F811
    # a flat image: Otsu finds nothing, so everything runs and nothing is skipped
    (tmp_path / "flat").mkdir()
    tifffile.imwrite(tmp_path / "flat" / "f.tif", np.full((100, 90), 0.1, np.float32))
    cfg = _cfg(
        artifact,
        tmp_path,
        input=str(tmp_path / "flat"),
        energy=False,
        tiling={"localize": {"enabled": True, "downsample": [2, 2, 2]}},
    )
    from efficientbioai.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"tiling.localize.downsample: \[2, 2, 2\] has 3 values for a 2D image"
    ):
        infer(validate_config(cfg, InferConfig), quiet=True)
    cfg["tiling"]["localize"]["downsample"] = "auto"
    run = infer(validate_config(cfg, InferConfig), quiet=True).images[0].runs[0]
    assert run.skipped == 0 and run.skipped_fraction == 0.0


PIXELS = {"y": (0.325, UM), "x": (0.25, UM)}


@pytest.mark.parametrize(
    ("name", "write", "output_format", "out_name"),
    [
        ("imagej", "imagej", None, "scan.tif"),  # TIFF (Fiji) -> TIFF
        ("ome_tiff", "ome", None, "scan.ome.tif"),  # OME-TIFF -> OME-TIFF
        ("ome_zarr", "zarr", None, "scan.zarr"),  # OME-Zarr -> OME-Zarr
        ("tiff_to_zarr", "imagej", "zarr", "scan.zarr"),  # TIFF -> OME-Zarr
    ],
)
def test_infer_carries_pixel_sizes_to_the_output(tmp_path, artifact, name, write, output_format, out_name):  # noqa: F811
    im, _ = nuclei((120, 100), seed=4)
    folder = tmp_path / "in"
    folder.mkdir()
    if write == "imagej":  # as Fiji saves a calibrated image
        tifffile.imwrite(
            folder / "scan.tif",
            im,
            imagej=True,
            resolution=(1 / 0.25, 1 / 0.325),
            metadata={"unit": "micron"},
        )
    elif write == "ome":
        tifffile.imwrite(
            folder / "scan.ome.tif",
            im,
            ome=True,
            metadata={"axes": "YX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.325, "PhysicalSizeXUnit": "µm"},
        )
    else:
        write_image(folder / "scan.zarr", im, axes="yx", pixel_size=PIXELS)
    (source,) = list(folder.iterdir())
    got = read_pixel_size(source)
    assert got.keys() == {"y", "x"} and [got[a][0] for a in "yx"] == pytest.approx([0.325, 0.25])
    cfg = _cfg(artifact, tmp_path, input=str(folder), energy=False, output_format=output_format)
    if name == "ome_tiff":  # through the CLI once; the library call is what it runs
        path = tmp_path / "i.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = run_cli("infer", "--config", str(path), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    else:
        infer(validate_config(cfg, InferConfig), quiet=True)
    out = tmp_path / "pred" / out_name
    assert out.exists() and read_image(out).shape == (120, 100)
    # read back with the libraries themselves, not only with our reader
    if out.suffix == ".zarr":
        attrs = json.loads((out / ".zattrs").read_text())["multiscales"][0]
        assert attrs["datasets"][0]["coordinateTransformations"][0]["scale"] == pytest.approx([0.325, 0.25])
        assert [a["unit"] for a in attrs["axes"]] == [UM, UM]
    else:
        with tifffile.TiffFile(out) as tif:
            if name == "ome_tiff":
                assert tif.is_ome
                pixels = tif.ome_metadata
                assert 'PhysicalSizeX="0.25"' in pixels and 'PhysicalSizeY="0.325"' in pixels
                assert 'PhysicalSizeXUnit="µm"' in pixels
            else:
                assert tif.is_imagej and tif.imagej_metadata["unit"] == "micron"
                num, den = tif.pages.first.tags["XResolution"].value
                assert den / num == pytest.approx(0.25)
    back = read_pixel_size(out)
    assert {a: (pytest.approx(s), u) for a, (s, u) in back.items()} == {"y": (0.325, UM), "x": (0.25, UM)}
