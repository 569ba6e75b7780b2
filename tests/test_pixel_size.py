"""Physical pixel sizes: read from OME-TIFF / ImageJ TIFF / OME-Zarr written by other tools, written back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from efficientbioai.errors import EfficientBioAIError
from efficientbioai.io import read_axes, read_image, read_pixel_size, write_image
from efficientbioai.pixel_size import unit_name

UM = "micrometer"


def _data(shape, dtype=np.float32):
    return np.arange(int(np.prod(shape))).reshape(shape).astype(dtype)


def _zattrs(store):
    return json.loads((store / ".zattrs").read_text())


def test_read_ome_tiff_imagej_tiff_and_plain_tiff(tmp_path):
    a = _data((3, 16, 20))
    tifffile.imwrite(
        tmp_path / "a.ome.tif",
        a,
        ome=True,
        metadata={
            "axes": "ZYX",
            "PhysicalSizeX": 0.5,
            "PhysicalSizeY": 0.25,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeZ": 2.0,
        },
    )  # OME's default unit is µm (Y, Z here)
    assert read_pixel_size(tmp_path / "a.ome.tif") == {
        "z": (2.0, UM),
        "y": (0.25, UM),
        "x": (0.5, "nanometer"),
    }
    # as Fiji writes it: unit and z spacing in the description, x / y as pixels per unit
    tifffile.imwrite(
        tmp_path / "ij.tif",
        a,
        imagej=True,
        resolution=(1 / 0.4, 1 / 0.3),
        metadata={"axes": "ZYX", "spacing": 1.5, "unit": "micron"},
    )
    got = read_pixel_size(tmp_path / "ij.tif")
    assert got.keys() == {"z", "y", "x"} and all(u == UM for _, u in got.values())
    assert [got[k][0] for k in "zyx"] == pytest.approx([1.5, 0.3, 0.4])
    # ImageJ without calibration, a plain tifffile TIFF and a .npy say nothing
    tifffile.imwrite(tmp_path / "raw.tif", a, imagej=True)
    tifffile.imwrite(tmp_path / "plain.tif", a)
    np.save(tmp_path / "a.npy", a)
    for name in ("raw.tif", "plain.tif", "a.npy"):
        assert read_pixel_size(tmp_path / name) == {}
    # resolution tags in centimetres (other software)
    tifffile.imwrite(tmp_path / "cm.tif", a[0], resolution=(1e4, 2e4), resolutionunit="CENTIMETER")
    got = read_pixel_size(tmp_path / "cm.tif")
    assert got["x"][0] == pytest.approx(1e-4) and got["y"] == (pytest.approx(5e-5), "centimeter")


def test_read_ome_zarr_from_ome_zarr_library(tmp_path):
    """A store written by the ome-zarr package (a third-party writer), with units and a multiscale."""
    from ome_zarr.writer import write_image as ome_write

    store = tmp_path / "v.ome.zarr"
    ome_write(
        _data((4, 32, 32)),
        str(store),
        axes="zyx",
        scale_factors=[2],
        scale={"z": 2.0, "y": 0.3, "x": 0.3},
        axes_units={"z": "micrometer", "y": "micrometer", "x": "micrometer"},
    )
    assert read_pixel_size(store) == {"z": (2.0, UM), "y": (0.3, UM), "x": (0.3, UM)}


def test_write_and_read_back_every_format(tmp_path):
    px = {"z": (2.0, "µm"), "y": (0.3, "micrometer"), "x": (300.0, "nm")}
    want = {"z": (2.0, UM), "y": (0.3, UM), "x": (300.0, "nanometer")}
    a = _data((3, 16, 20))
    # OME-Zarr: scale and units
    z = write_image(tmp_path / "o.zarr", a, axes="zyx", pixel_size=px)
    ms = _zattrs(z)["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": [2.0, 0.3, 300.0]}]
    assert [ax.get("unit") for ax in ms["axes"]] == [UM, UM, "nanometer"]
    assert read_pixel_size(z) == want
    # OME-TIFF: PhysicalSize* with OME symbols
    o = write_image(tmp_path / "o.ome.tif", a, axes="zyx", pixel_size=px)
    with tifffile.TiffFile(o) as tif:
        assert 'PhysicalSizeXUnit="nm"' in tif.ome_metadata and 'PhysicalSizeZ="2.0"' in tif.ome_metadata
    assert read_pixel_size(o) == want
    # plain TIFF in ImageJ's order: an ImageJ hyperstack in one unit (x's: z and y converted to nm)
    t = write_image(tmp_path / "o.tif", a, axes="zyx", pixel_size=px)
    with tifffile.TiffFile(t) as tif:
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "nm"
        assert tif.imagej_metadata["spacing"] == pytest.approx(2000.0)
    got = read_pixel_size(t)
    assert [got[k][0] for k in "zyx"] == pytest.approx([2000.0, 300.0, 300.0])
    assert {u for _, u in got.values()} == {"nanometer"}
    assert read_axes(t) == "zyx" and np.array_equal(read_image(t), a)
    # not ImageJ-compatible (channel before z): shaped TIFF, sizes in its description, X/Y tags in cm
    c = write_image(tmp_path / "c.tif", _data((2, 3, 8, 8)), axes="czyx", pixel_size=px)
    with tifffile.TiffFile(c) as tif:
        assert not tif.is_imagej and int(tif.pages.first.tags["ResolutionUnit"].value) == 3
    assert read_pixel_size(c) == want and read_axes(c) == "czyx"
    # a 2D output of a 3D-calibrated input keeps y and x only
    two = write_image(tmp_path / "two.zarr", a[0], axes="yx", pixel_size=px)
    assert read_pixel_size(two) == {"y": (0.3, UM), "x": (300.0, "nanometer")}
    # without pixel sizes: scale 1 and no units, read back as nothing known
    plain = write_image(tmp_path / "p.zarr", a, axes="zyx")
    assert (
        _zattrs(plain)["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0] * 3
    )
    assert read_pixel_size(plain) == {}


@pytest.mark.parametrize(
    ("pixel_size", "message"),
    [
        ({"x": (0.0, "micrometer")}, "not a positive number"),
        ({"x": (0.3, "furlongs")}, "unknown unit 'furlongs'"),
        ({"q": 1.0}, "unknown axis 'q'"),
    ],
)
def test_bad_pixel_size_is_named(tmp_path, pixel_size, message):
    with pytest.raises(EfficientBioAIError, match=message):
        write_image(tmp_path / "x.zarr", _data((8, 8)), axes="yx", pixel_size=pixel_size)
    assert not (tmp_path / "x.zarr").exists()


def test_unit_spellings():
    assert unit_name("µm") == unit_name("μm") == unit_name("um") == unit_name("micron") == UM
    assert unit_name("Å") == "angstrom" and unit_name("nm") == "nanometer" and unit_name("pixel") is None
