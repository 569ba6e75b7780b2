"""Image writing (atomic TIFF / zarr / npy), zarr and OME-Zarr reading, axes metadata and path listing."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from efficientbioai.errors import EfficientBioAIError
from efficientbioai.io import (
    expand_paths,
    output_path,
    partial_outputs,
    read_axes,
    read_image,
    remove_partials,
    to_model_layout,
    write_image,
)
from efficientbioai.io import write as io_write

CASES = [
    ((40, 50), np.float32, "yx"),
    ((6, 40, 50), np.uint16, "zyx"),
    ((2, 6, 40, 50), np.float32, "czyx"),
    ((3, 40, 50), np.uint16, "cyx"),
]


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 60000, shape).astype(dtype)
    return rng.random(shape).astype(dtype)


def _zarr_json_attrs(store):
    return json.loads((store / ".zattrs").read_text())


@pytest.mark.parametrize("suffix", [".tif", ".zarr", ".npy"])
@pytest.mark.parametrize("shape, dtype, axes", CASES)
def test_round_trip(tmp_path, suffix, shape, dtype, axes):
    a = _data(shape, dtype)
    out = write_image(tmp_path / "sub" / f"img{suffix}", a, axes=axes)  # parent folder is created
    assert out == tmp_path / "sub" / f"img{suffix}" and out.exists()
    back = read_image(out)
    assert back.shape == a.shape and back.dtype == a.dtype
    np.testing.assert_array_equal(np.asarray(back), a)
    assert read_axes(out) == (None if suffix == ".npy" else axes)
    assert partial_outputs(out.parent) == []


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_round_trip_without_axes_keeps_shape(tmp_path, suffix):
    a = _data((2, 3, 20, 30), np.uint16)
    out = write_image(tmp_path / f"img{suffix}", a)
    np.testing.assert_array_equal(np.asarray(read_image(out)), a)
    assert read_axes(out) is None


def test_zarr_read_is_lazy_and_feeds_the_model_layout(tmp_path):
    a = _data((2, 8, 40, 50), np.float32)
    out = write_image(tmp_path / "img.zarr", a, axes="czyx")
    back = read_image(out)
    assert isinstance(back, zarr.Array) and not isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back[1, 3:5, :10], a[1, 3:5, :10])
    y = to_model_layout(back, read_axes(out), "bczyx")
    assert isinstance(y, np.ndarray) and y.shape == (2, 8, 40, 50)
    np.testing.assert_array_equal(y, a)


def test_zarr_output_is_ome_zarr_v2_with_default_chunks(tmp_path):
    out = write_image(tmp_path / "big.zarr", np.zeros((2, 100, 700, 90), np.uint16), axes="czyx")
    assert (out / ".zgroup").is_file() and (out / "0" / ".zarray").is_file()
    ms = _zarr_json_attrs(out)["multiscales"][0]
    assert ms["version"] == "0.4" and ms["datasets"][0]["path"] == "0"
    assert [ax["name"] for ax in ms["axes"]] == list("czyx")
    assert [ax["type"] for ax in ms["axes"]] == ["channel", "space", "space", "space"]
    assert read_image(out).chunks == (2, 64, 64, 64)
    out2 = write_image(tmp_path / "flat.zarr", np.zeros((3, 1000, 300), np.uint8), axes="cyx")
    assert read_image(out2).chunks == (3, 512, 300)
    out3 = write_image(tmp_path / "custom.zarr", np.zeros((100, 100), np.uint8), chunks=(10, 200))
    assert read_image(out3).chunks == (10, 100)
    with pytest.raises(EfficientBioAIError, match="chunks"):
        write_image(tmp_path / "bad.zarr", np.zeros((100, 100), np.uint8), chunks=(10,))


def test_zarr_axes_outside_ome_order_use_array_dimensions(tmp_path):
    a = _data((20, 30, 3), np.uint16)
    out = write_image(tmp_path / "rgb.zarr", a, axes="yxc")
    assert "multiscales" not in _zarr_json_attrs(out)
    assert read_axes(out) == "yxc"
    assert to_model_layout(read_image(out), read_axes(out), "bcyx").shape == (3, 20, 30)


def _write_ome_zarr_v04(store, levels, axes="czyx"):
    root = zarr.open_group(store=str(store), mode="w", zarr_format=2)
    for i, level in enumerate(levels):
        arr = root.create_array(str(i), shape=level.shape, dtype=level.dtype, chunks=level.shape)
        arr[:] = level
    root.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [{"name": n, "type": "channel" if n == "c" else "space"} for n in axes],
            "datasets": [
                {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1.0] * len(axes)}]}
                for i in range(len(levels))
            ],
        }
    ]


def test_ome_zarr_v04_reads_full_resolution_and_axes(tmp_path):
    full = _data((2, 4, 32, 32), np.float32)
    half = full[:, :, ::2, ::2].copy()
    store = tmp_path / "ome.zarr"
    _write_ome_zarr_v04(store, [half, full][::-1])
    assert json.loads((store / ".zattrs").read_text())["multiscales"][0]["datasets"][0]["path"] == "0"
    back = read_image(store)
    assert isinstance(back, zarr.Array) and back.shape == full.shape
    np.testing.assert_array_equal(back[:], full)
    assert read_axes(store) == "czyx"


def test_ome_zarr_first_dataset_need_not_be_named_0(tmp_path):
    store = tmp_path / "odd.zarr"
    root = zarr.open_group(store=str(store), mode="w", zarr_format=2)
    root.create_array("hi", shape=(8, 8), dtype="u1")[:] = 7
    root.create_array("lo", shape=(4, 4), dtype="u1")[:] = 1
    root.attrs["multiscales"] = [
        {"version": "0.4", "axes": ["y", "x"], "datasets": [{"path": "hi"}, {"path": "lo"}]}
    ]
    assert read_image(store).shape == (8, 8) and int(read_image(store)[0, 0]) == 7
    assert read_axes(store) == "yx"


def test_ome_zarr_v05_zarr_json(tmp_path):
    store = tmp_path / "v05.zarr"
    full = _data((3, 16, 16), np.uint16)
    root = zarr.open_group(store=str(store), mode="w", zarr_format=3)
    root.create_array("s0", shape=full.shape, dtype=full.dtype)[:] = full
    root.create_array("s1", shape=(3, 8, 8), dtype=full.dtype)
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [{"name": "z"}, {"name": "y"}, {"name": "x"}],
                "datasets": [{"path": "s0"}, {"path": "s1"}],
            }
        ],
    }
    assert (store / "zarr.json").is_file() and not (store / ".zattrs").exists()
    np.testing.assert_array_equal(read_image(store)[:], full)
    assert read_axes(store) == "zyx"


def test_bioformats2raw_layout_opens_series_0(tmp_path):
    store = tmp_path / "converted.zarr"
    _write_ome_zarr_v04(store / "0", [_data((5, 12, 12), np.uint16)], axes="zyx")
    top = zarr.open_group(store=str(store), mode="a", zarr_format=2)
    top.attrs["bioformats2raw.layout"] = 3
    assert read_image(store).shape == (5, 12, 12)
    assert read_axes(store) == "zyx"


def test_plain_zarr_array_and_single_array_group(tmp_path):
    a = _data((10, 12), np.float32)
    arr = zarr.open_array(store=str(tmp_path / "plain.zarr"), mode="w", shape=a.shape, dtype=a.dtype)
    arr[:] = a
    np.testing.assert_array_equal(read_image(tmp_path / "plain.zarr")[:], a)
    assert read_axes(tmp_path / "plain.zarr") is None
    g = zarr.open_group(store=str(tmp_path / "one.zarr"), mode="w")
    g.create_array("data", shape=a.shape, dtype=a.dtype, dimension_names=["y", "x"])[:] = a
    np.testing.assert_array_equal(read_image(tmp_path / "one.zarr")[:], a)
    assert read_axes(tmp_path / "one.zarr") == "yx"


def test_ambiguous_or_broken_zarr_is_explained(tmp_path):
    g = zarr.open_group(store=str(tmp_path / "two.zarr"), mode="w", zarr_format=2)
    g.create_array("a", shape=(4, 4), dtype="u1")
    g.create_array("b", shape=(4, 4), dtype="u1")
    with pytest.raises(EfficientBioAIError, match=r"two.zarr.*holds 2 arrays \(a, b\)") as err:
        read_image(tmp_path / "two.zarr")
    assert "two.zarr/a" in err.value.fix
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(EfficientBioAIError, match="could not open .*empty.zarr as a zarr store"):
        read_image(tmp_path / "empty.zarr")
    (tmp_path / "folder").mkdir()
    with pytest.raises(EfficientBioAIError, match="is a folder, not an image"):
        read_image(tmp_path / "folder")
    (tmp_path / "zipped.zarr").write_bytes(b"PK")
    with pytest.raises(EfficientBioAIError, match="zarr stores are folders"):
        read_image(tmp_path / "zipped.zarr")


def test_ome_tiff_and_imagej_axes(tmp_path):
    a = _data((4, 20, 30), np.uint16)
    tifffile.imwrite(tmp_path / "a.ome.tif", a, metadata={"axes": "ZYX"})
    assert read_axes(tmp_path / "a.ome.tif") == "zyx"
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, metadata={"axes": "CYX"})
    assert read_axes(tmp_path / "ij.tif") == "cyx"
    tifffile.imwrite(tmp_path / "rgb.tif", _data((20, 30, 3), np.uint8), photometric="rgb")
    assert read_axes(tmp_path / "rgb.tif") == "yxc"  # samples count as channels
    tifffile.imwrite(tmp_path / "q.tif", _data((2, 3, 20, 30), np.uint8), photometric="minisblack")
    assert read_axes(tmp_path / "q.tif") is None  # tifffile says 'QQYX': unknown leading axes
    tifffile.imwrite(tmp_path / "q3.tif", a, photometric="minisblack")
    assert read_axes(tmp_path / "q3.tif") is None  # 'QYX'
    tifffile.imwrite(tmp_path / "i3.tif", a, photometric="minisblack", metadata=None)
    assert read_axes(tmp_path / "i3.tif") is None  # 'IYX': a plain page sequence
    rgb_channels = _data((2, 20, 30, 3), np.uint8)
    tifffile.imwrite(
        tmp_path / "ijrgb.tif", rgb_channels, imagej=True, photometric="rgb", metadata={"axes": "CYXS"}
    )
    assert read_axes(tmp_path / "ijrgb.tif") is None  # C and S would both be the channel axis
    np.save(tmp_path / "a.npy", a)
    assert read_axes(tmp_path / "a.npy") is None
    with pytest.raises(EfficientBioAIError, match="image not found"):
        read_axes(tmp_path / "missing.tif")


def test_write_ome_tiff(tmp_path):
    a = _data((2, 4, 20, 30), np.float32)
    out = write_image(tmp_path / "o.ome.tif", a, axes="czyx")
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome
    np.testing.assert_array_equal(np.asarray(read_image(out)), a)
    assert read_axes(out) == "czyx"
    with pytest.raises(EfficientBioAIError, match="y and x as the last axes"):
        write_image(tmp_path / "bad.ome.tif", _data((20, 30, 3), np.uint8), axes="yxc")
    assert not (tmp_path / "bad.ome.tif").exists()


def test_to_model_layout_drops_size_one_time_and_z(tmp_path):
    a = _data((1, 2, 1, 20, 30), np.float32)
    assert to_model_layout(a, "tczyx", "bcyx").shape == (2, 20, 30)
    assert to_model_layout(a, "tczyx", "bczyx").shape == (2, 1, 20, 30)
    with pytest.raises(EfficientBioAIError, match="3 time points"):
        to_model_layout(np.zeros((3, 20, 30)), "tyx", "bcyx")
    with pytest.raises(EfficientBioAIError, match="do not match"):
        to_model_layout(np.zeros((2, 20, 30)), "zyx", "bcyx")


def test_expand_paths_with_zarr(tmp_path):
    d = tmp_path / "data"
    write_image(d / "b.tif", np.zeros((4, 4), np.uint8))
    write_image(d / "a.zarr", np.zeros((4, 4), np.uint8))
    write_image(d / "c.zarr", np.zeros((4, 4), np.uint8))
    np.save(d / "d.npy", np.zeros((4, 4)))
    (d / "notes.txt").write_text("x")
    (d / "sub").mkdir()
    (d / "._b.tif").write_bytes(b"macos fork")
    (d / ".b.tif.partial-0123456789abcdef").write_bytes(b"leftover")
    assert [p.name for p in expand_paths(d)] == ["a.zarr", "b.tif", "c.zarr", "d.npy"]
    assert [p.name for p in expand_paths(d / "*.zarr")] == ["a.zarr", "c.zarr"]
    assert [p.name for p in expand_paths(str(d) + "/*")] == [
        "a.zarr",
        "b.tif",
        "c.zarr",
        "d.npy",
        "notes.txt",
    ]
    assert expand_paths(d / "a.zarr") == [d / "a.zarr"]  # a store is one image, not a folder
    assert expand_paths(d / "a.zarr" / "0") == [d / "a.zarr" / "0"]  # an array inside a store
    np.testing.assert_array_equal(read_image(d / "a.zarr" / "0")[:], np.zeros((4, 4)))
    with pytest.raises(EfficientBioAIError, match="nothing found"):
        expand_paths(d / "*.ome.zarr")


def _fail(*args, **kwargs):
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize("suffix", [".tif", ".zarr", ".npy"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, suffix):
    a = np.ones((8, 8), np.uint16)
    seen = []

    def fail_after_creating_temp(tmp, *args, **kwargs):
        (tmp.mkdir() if suffix == ".zarr" else tmp.write_bytes(b"half"))
        seen.append(tmp)
        raise RuntimeError("disk on fire")

    if suffix == ".tif":
        monkeypatch.setattr(io_write, "_write_tiff", fail_after_creating_temp)
    elif suffix == ".zarr":
        monkeypatch.setattr(io_write, "_write_zarr", fail_after_creating_temp)
    else:
        monkeypatch.setattr(np, "save", lambda fh, *a, **k: (fh.write(b"half"), _fail()))
    with pytest.raises(
        EfficientBioAIError, match=rf"could not write .*out{suffix} \(RuntimeError: disk on fire"
    ):
        write_image(tmp_path / f"out{suffix}", a)
    assert not (tmp_path / f"out{suffix}").exists()
    assert sorted(os.listdir(tmp_path)) == []
    assert all(not t.exists() for t in seen)


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_failed_overwrite_keeps_the_old_output(tmp_path, monkeypatch, suffix):
    old = np.full((8, 8), 3, np.uint16)
    out = write_image(tmp_path / f"out{suffix}", old)
    real = zarr.Array.__setitem__

    def half_then_fail(self, key, value):
        real(self, key, value)
        raise RuntimeError("killed")

    monkeypatch.setattr(zarr.Array, "__setitem__", half_then_fail)
    monkeypatch.setattr(tifffile, "imwrite", lambda tmp, *a, **k: (Path(tmp).write_bytes(b"II*"), _fail()))
    with pytest.raises(EfficientBioAIError, match="was left as it was"):
        write_image(out, np.zeros((8, 8), np.uint16))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asarray(read_image(out)), old)
    assert os.listdir(tmp_path) == [out.name]


def test_interrupt_is_cleaned_up_and_reraised(tmp_path, monkeypatch):
    def interrupted(tmp, *args, **kwargs):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(io_write, "_write_tiff", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_image(tmp_path / "out.tif", np.zeros((4, 4)))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("first, second", [(".zarr", ".zarr"), (".tif", ".tif"), (".npy", ".npy")])
def test_overwrite_replaces_output(tmp_path, first, second):
    out = write_image(tmp_path / f"o{first}", np.full((2, 70, 70), 1, np.uint16), axes="cyx")
    new = np.full((30, 40), 2, np.float32)
    write_image(tmp_path / f"o{second}", new)
    back = read_image(tmp_path / f"o{second}")
    assert back.shape == (30, 40) and back.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(back), new)
    assert os.listdir(tmp_path) == [out.name]
    if second == ".zarr":
        assert read_axes(out) is None and "multiscales" not in _zarr_json_attrs(out)


def test_failed_swap_of_a_store_restores_it(tmp_path, monkeypatch):
    store = write_image(tmp_path / "out.zarr", np.full((4, 4), 5, np.uint8))
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).parent == tmp_path and Path(src).name.startswith(".out.zarr.partial-"):
            raise OSError("rename failed")  # moving the finished temporary in fails
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(EfficientBioAIError, match="rename failed"):
        write_image(store, np.zeros((4, 4), np.uint8))
    monkeypatch.undo()
    np.testing.assert_array_equal(read_image(store)[:], np.full((4, 4), 5))
    assert os.listdir(tmp_path) == ["out.zarr"]


def test_store_is_moved_aside_swapped_and_deleted(tmp_path, monkeypatch):
    store = write_image(tmp_path / "out.zarr", np.full((4, 4), 5, np.uint8))
    moves = []
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).parent == tmp_path:  # zarr renames its own files inside the store too
            moves.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_image(store, np.full((4, 4), 6, np.uint8))
    assert len(moves) == 2
    assert moves[0][0] == "out.zarr" and moves[0][1].startswith(".out.zarr.replaced-")  # old aside first
    assert moves[1][0].startswith(".out.zarr.partial-") and moves[1][1] == "out.zarr"
    assert int(read_image(store)[0, 0]) == 6
    assert os.listdir(tmp_path) == ["out.zarr"]  # the old store was deleted


def test_refuses_to_replace_a_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "out.zarr").mkdir()
    (tmp_path / "out.zarr" / "precious.txt").write_text("keep me")
    with pytest.raises(EfficientBioAIError, match="not a zarr store; refusing to replace it"):
        write_image(tmp_path / "out.zarr", np.zeros((4, 4)))
    assert (tmp_path / "out.zarr" / "precious.txt").read_text() == "keep me"
    assert partial_outputs(tmp_path) == []


def test_partial_outputs_listing_and_removal(tmp_path):
    write_image(tmp_path / "done.zarr", np.zeros((4, 4)))
    (tmp_path / ".a.tif.partial-0123456789abcdef").write_bytes(b"x")
    (tmp_path / ".b.zarr.partial-fedcba9876543210").mkdir()
    (tmp_path / ".b.zarr.partial-fedcba9876543210" / ".zgroup").write_text("{}")
    (tmp_path / ".c.zarr.replaced-00000000aaaaaaaa").mkdir()
    (tmp_path / ".hidden").write_text("not ours")
    (tmp_path / "x.partial-0123456789abcdef").write_text("not hidden: not ours")
    expected = [
        tmp_path / ".a.tif.partial-0123456789abcdef",
        tmp_path / ".b.zarr.partial-fedcba9876543210",
        tmp_path / ".c.zarr.replaced-00000000aaaaaaaa",
    ]
    assert partial_outputs(tmp_path) == expected
    assert remove_partials(tmp_path) == expected
    assert partial_outputs(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == [".hidden", "done.zarr", "x.partial-0123456789abcdef"]
    assert partial_outputs(tmp_path / "missing") == []


@pytest.mark.parametrize(
    "name, fmt, expected",
    [
        ("cells.ome.tif", "tiff", "cells.ome.tif"),  # OME-TIFF in, OME-TIFF out (pixel sizes kept)
        ("cells.OME.TIFF", "zarr", "cells.zarr"),
        ("cells.tiff", "tif", "cells.tif"),
        ("cells.tif", "zarr", "cells.zarr"),
        ("cells.npy", "tiff", "cells.tif"),
        ("cells.ome.zarr", "tiff", "cells.tif"),
        ("cells.zarr", "zarr", "cells.zarr"),
        ("v1.2.tif", "tiff", "v1.2.tif"),
        ("noext", "zarr", "noext.zarr"),
    ],
)
def test_output_path_naming(tmp_path, name, fmt, expected):
    assert output_path(tmp_path / "in" / name, tmp_path / "out", fmt) == tmp_path / "out" / expected


def test_output_path_refuses_bad_format_and_overwriting_the_input(tmp_path):
    with pytest.raises(EfficientBioAIError, match="unknown output format 'png'"):
        output_path(tmp_path / "a.tif", tmp_path / "out", "png")
    with pytest.raises(EfficientBioAIError, match="would overwrite the input"):
        output_path(tmp_path / "a.tif", tmp_path, "tiff")
    assert output_path(tmp_path / "a.tif", tmp_path, "zarr") == tmp_path / "a.zarr"


def test_write_rejects_bad_axes_formats_and_shapes(tmp_path):
    with pytest.raises(EfficientBioAIError, match="axes 'zyx' do not describe"):
        write_image(tmp_path / "a.tif", np.zeros((4, 4)), axes="zyx")
    with pytest.raises(EfficientBioAIError, match="cannot tell the image format"):
        write_image(tmp_path / "a.png", np.zeros((4, 4)))
    with pytest.raises(EfficientBioAIError, match="format asked for is 'zarr'"):
        write_image(tmp_path / "a.tif", np.zeros((4, 4)), fmt="zarr")
    with pytest.raises(EfficientBioAIError, match=r"shape \(4,\)"):
        write_image(tmp_path / "a.npy", np.zeros(4))
    assert write_image(tmp_path / "a.dat", np.ones((4, 4)), fmt="npy") == tmp_path / "a.dat"
    np.testing.assert_array_equal(np.load(tmp_path / "a.dat"), np.ones((4, 4)))
    assert sorted(os.listdir(tmp_path)) == ["a.dat"]


def test_zarr_write_copies_a_lazy_source_slab_by_slab(tmp_path):
    src = write_image(tmp_path / "src.zarr", _data((130, 20, 20), np.uint16), axes="zyx")
    lazy = read_image(src)
    reads = []

    class Spy:
        shape, dtype, ndim = lazy.shape, lazy.dtype, lazy.ndim

        def __getitem__(self, key):
            reads.append(key)
            return lazy[key]

    out = write_image(tmp_path / "copy.zarr", Spy(), axes="zyx")
    np.testing.assert_array_equal(read_image(out)[:], lazy[:])
    assert reads == [slice(0, 64), slice(64, 128), slice(128, 192)]
