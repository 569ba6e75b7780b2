"""`infer` with a `distributed:` section: a real Dask LocalCluster running a real int8 OpenVINO engine
(compressed from a tiny 3D U-Net) over zarr volumes; results equal the single-process run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from efficientbioai.compress import compress
from efficientbioai.config import InferConfig, validate_config
from efficientbioai.errors import ConfigError
from efficientbioai.infer import infer
from efficientbioai.infer.distributed import blocks, check_block
from efficientbioai.io import partial_outputs, read_image, write_image

from .conftest import TINY_UNET_KWARGS, blobs, tiny_unet


@pytest.fixture(scope="module")
def artifact3d(tmp_path_factory) -> Path:
    import tifffile

    root = tmp_path_factory.mktemp("artifact3d")
    ckpt = root / "unet3d.pt"
    torch.save(tiny_unet(3).state_dict(), ckpt)
    (root / "calib").mkdir()
    for i in range(2):
        tifffile.imwrite(root / "calib" / f"v{i}.tif", blobs((24, 64, 64), n=8, seed=i)[0])
    cfg = validate_config(
        {
            "model": {
                "kind": "monai",
                "name": "UNet",
                "kwargs": TINY_UNET_KWARGS,
                "checkpoint": str(ckpt),
                "axes": "bczyx",
            },
            "calibration": {"images": str(root / "calib"), "num_tiles": 8, "tile_shape": [16, 32, 32]},
            "quantize": {"precision": "int8"},
            "fidelity": {"num_tiles": 2},
            "engine": {"latency_repeats": 1},
            "output": str(root / "unet3d_int8"),
        }
    )
    compress(cfg, quiet=True)
    return root / "unet3d_int8"


@pytest.fixture
def volumes(tmp_path) -> Path:
    folder = tmp_path / "in"
    for i, shape in enumerate([(21, 70, 90), (18, 45, 61)]):
        write_image(
            folder / f"vol{i}.zarr", blobs(shape, n=10, seed=30 + i)[0], axes="zyx", chunks=(8, 32, 32)
        )
    return folder


def _cfg(artifact, tmp_path, name, **kw):
    raw = {
        "model": str(artifact),
        "input": str(tmp_path / "in"),
        "output": str(tmp_path / name),
        "energy": False,
        "threads": 1,
        "tiling": {"tile_shape": [16, 32, 32], "overlap": 0.25},
    }
    raw.update(kw)
    return validate_config(raw, InferConfig)


LOCAL = {"scheduler": "local", "n_workers": 2, "threads_per_worker": 1, "processes": False}


def test_dask_local_cluster_equals_single_process(tmp_path, artifact3d, volumes):
    single = infer(
        _cfg(artifact3d, tmp_path, "single", tiling={"tile_shape": [16, 32, 32], "out_of_core": False})
    )
    # blocks much smaller than the volume: many block edges, tiles straddling them run in two tasks
    dist = infer(
        _cfg(artifact3d, tmp_path, "dask", distributed={**LOCAL, "block_shape": [8, 32, 32]}), quiet=True
    )
    assert [im.status for im in dist.images] == ["done", "done"]  # two images, one task stream
    for a, b in zip(single.images, dist.images, strict=True):
        ref = np.asarray(read_image(a.output))
        got = np.asarray(read_image(b.output))
        assert got.shape == ref.shape and float(ref.std()) > 0
        assert np.abs(got - ref).max() <= 1e-5
        assert b.output.suffix == ".zarr" and "dask" in b.runs[0].engine
    assert not partial_outputs(tmp_path / "dask")
    # TIFF output too (written from the finished store, page by page)
    tif = infer(
        _cfg(
            artifact3d,
            tmp_path,
            "dask_tif",
            output_format="tiff",
            distributed={**LOCAL, "block_shape": [16, 40, 40]},
        ),
        quiet=True,
    )
    np.testing.assert_allclose(
        np.asarray(read_image(tif.images[0].output)),
        np.asarray(read_image(single.images[0].output)),
        atol=1e-5,
    )


def test_instance_labels_are_written_consistently_by_every_path(tmp_path, artifact3d, volumes):
    """task instance + instance.write_labels: in memory, out of core and on Dask (blocks much smaller than
    the volume) give the same objects as labelling the whole stitched prediction at once."""
    from efficientbioai.infer.images import labels_path
    from efficientbioai.metrics import instances_from_probability

    tiling = {"tile_shape": [16, 32, 32], "overlap": 0.25}
    probe = infer(_cfg(artifact3d, tmp_path, "probe", tiling={**tiling, "out_of_core": False}), quiet=True)
    probs = [np.asarray(read_image(im.output)) for im in probe.images]
    threshold = float(np.quantile(probs[0], 0.7))
    common = {"task": "instance", "threshold": threshold, "instance": {"write_labels": True, "min_size": 3}}
    runs = {
        "memory": _cfg(artifact3d, tmp_path, "m", tiling={**tiling, "out_of_core": False}, **common),
        "out_of_core": _cfg(
            artifact3d, tmp_path, "o", output_format="tiff", tiling={**tiling, "out_of_core": True}, **common
        ),
        "dask": _cfg(artifact3d, tmp_path, "d", distributed={**LOCAL, "block_shape": [8, 32, 32]}, **common),
    }
    for name, cfg in runs.items():
        result = infer(cfg, quiet=True)
        for im, prob in zip(result.images, probs, strict=True):
            expected = instances_from_probability(prob, threshold, "components", min_size=3)
            assert expected.max() >= 2
            got = np.asarray(read_image(labels_path(im.output)))
            assert got.dtype == np.int32 and got.max() == expected.max(), name
            assert _same_partition(got, expected), name


def test_infer_interrupted_mid_volume_resumes_from_finished_chunks(
    tmp_path, artifact3d, volumes, monkeypatch
):
    """`infer` out of core, interrupted after most tiles: no output looks complete; the same command
    again computes only the missing chunks and gives the uninterrupted result."""
    from efficientbioai.tiling import TileGrid

    read = TileGrid.read
    state = {"n": 0, "fail_after": None}

    def counting_read(self, image, tile):
        state["n"] += 1
        if state["fail_after"] is not None and state["n"] > state["fail_after"]:
            raise KeyboardInterrupt("interrupted mid-volume")
        return read(self, image, tile)

    monkeypatch.setattr(TileGrid, "read", counting_read)
    # a volume 3 slabs deep: slabs of 16 planes of 40 x 50 fit a band of 0.25 MiB with a 16-plane tile
    write_image(tmp_path / "deep" / "deep.zarr", blobs((48, 40, 50), n=10, seed=9)[0], axes="zyx")
    tiling = {"tile_shape": [16, 32, 32], "overlap": 0.25, "out_of_core": True, "band_memory_mb": 0.25}
    one = str(tmp_path / "deep" / "deep.zarr")
    full = infer(_cfg(artifact3d, tmp_path, "full", input=one, tiling=tiling), quiet=True)
    n_full = state["n"]
    cfg = _cfg(artifact3d, tmp_path, "out", input=one, tiling=tiling)
    state.update(n=0, fail_after=int(n_full * 0.8))
    with pytest.raises(KeyboardInterrupt):
        infer(cfg, quiet=True)
    assert not (tmp_path / "out" / "deep.zarr").exists() and len(partial_outputs(tmp_path / "out")) == 1
    state.update(n=0, fail_after=None)
    again = infer(cfg, quiet=True)
    assert 0 < state["n"] < n_full  # finished chunks were not computed again
    assert not partial_outputs(tmp_path / "out")
    np.testing.assert_array_equal(
        np.asarray(read_image(again.images[0].output)), np.asarray(read_image(full.images[0].output))
    )


def test_blocks_cover_the_image_once():
    spatial = (21, 70, 90)
    block = check_block([8, 32, 32], spatial)
    cover = np.zeros(spatial, int)
    for region in blocks(spatial, block):
        cover[region] += 1
    assert (cover == 1).all()
    with pytest.raises(ConfigError, match="block_shape"):
        check_block([8, 32], spatial)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"scheduler": "nonsense"}, "distributed.scheduler: 'nonsense' is not a scheduler"),
        ({"n_workers": 0}, "distributed.n_workers"),
        ({"cluster_kwargs": {"cores": 4}}, "cluster_kwargs are for dask-jobqueue clusters"),
        ({"schedular": "local"}, "did you mean 'scheduler'"),
        ({"block_shape": [0, 64, 64]}, "block_shape needs one positive size"),
    ],
)
def test_bad_distributed_config_is_named(tmp_path, artifact3d, section, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(artifact3d, tmp_path, "x", distributed=section)


def test_jobqueue_schedulers_validate_with_their_kwargs(tmp_path, artifact3d, volumes):
    cfg = _cfg(
        artifact3d,
        tmp_path,
        "x",
        distributed={"scheduler": "SLURM", "cluster_kwargs": {"cores": 4, "memory": "8GB"}},
    )
    assert cfg.distributed.scheduler == "slurm"
    with pytest.raises(ConfigError, match="compare_with_original"):
        infer(_cfg(artifact3d, tmp_path, "x", distributed=LOCAL, compare_with_original=True), quiet=True)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same objects (numbered in any order)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.mark.parametrize("use_client", [False, True])
def test_instance_labels_are_consistent_across_block_edges(tmp_path, use_client):
    from scipy import ndimage as ndi

    from efficientbioai.infer.labels import label_blocks
    from efficientbioai.io import create_zarr
    from efficientbioai.metrics import instances_from_probability

    smooth = ndi.gaussian_filter(np.random.default_rng(5).random((20, 64, 80)), 1.5)
    prob = (smooth - np.quantile(smooth, 0.35)) / (np.quantile(smooth, 0.9) - np.quantile(smooth, 0.35)) / 2
    prob = np.clip(prob, 0, 1).astype(np.float32)  # ~10% of the voxels above 0.5, in many objects
    # a thin diagonal object that crosses block edges only through corner (26-connected) neighbours
    for i in range(14):
        prob[3 + i, 10 + i, 40 + i] = 1.0
    write_image(tmp_path / "prob.zarr", prob[None], axes="czyx", chunks=(1, 8, 16, 16))
    block = (8, 16, 16)
    regions = blocks(prob.shape, block)
    expected = instances_from_probability(prob, threshold=0.5, method="components", min_size=5)
    assert expected.max() > 10
    crossing = sum(len(np.unique(expected[r])) for r in regions) - len(np.unique(expected))
    assert crossing > 10  # many objects are cut by block edges

    create_zarr(tmp_path / "labels.zarr", prob.shape, np.int32, "zyx", block, "labels")
    client = cluster = None
    if use_client:
        from dask.distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
        client = Client(cluster)
    try:
        n = label_blocks(
            tmp_path / "prob.zarr",
            tmp_path / "labels.zarr",
            regions,
            prob_index=(0,),
            min_size=5,
            client=client,
        )
    finally:
        if client is not None:
            client.close()
            cluster.close()
    got = np.asarray(read_image(tmp_path / "labels.zarr"))
    assert n == expected.max() and got.max() == n
    assert _same_partition(got, expected)
