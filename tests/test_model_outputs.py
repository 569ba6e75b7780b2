"""Models as they come: several outputs, outputs at another scale or smaller by a border, tuple returns.

Each network below is a small one of a shape real bioimage models have (foreground + boundary heads, a
half-size segmentation, 2× super-resolution, valid convolutions, a per-image style vector next to the
maps). Each goes through ``compress`` with defaults and ``infer`` on a whole image, and every output file
is compared with the original network run on the whole image.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from efficientbioai.compress import compress
from efficientbioai.config import InferConfig, validate_config
from efficientbioai.errors import EfficientBioAIError
from efficientbioai.infer import infer
from efficientbioai.io import read_image
from efficientbioai.metrics import pearson
from efficientbioai.models.outputs import OutputTensor, describe_outputs, pack_module, probe_outputs
from efficientbioai.packing import unpack, unpacked_shape

from .conftest import blobs, run_cli

# ------------------------------------------------------------------ the networks


class _Trunk(nn.Module):
    """Encoder-decoder with one 2× pooling level: tiles must be multiples of 2."""

    def __init__(self, ch: int = 8):
        super().__init__()
        self.enc = nn.Conv2d(1, ch, 3, padding=1)
        self.mid = nn.Conv2d(ch, ch, 3, padding=1)
        self.up = nn.ConvTranspose2d(ch, ch, 2, stride=2)
        self.dec = nn.Conv2d(2 * ch, ch, 3, padding=1)

    def forward(self, x):
        e = torch.relu(self.enc(x))
        m = torch.relu(self.mid(nn.functional.max_pool2d(e, 2)))
        return torch.relu(self.dec(torch.cat([self.up(m), e], 1))), m


class TwoHeads(nn.Module):
    """Foreground probability and 2-channel boundary logits, as a tuple."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.fg, self.edge = _Trunk(), nn.Conv2d(8, 1, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h, _ = self.trunk(x)
        return torch.sigmoid(self.fg(h)), self.edge(h)


class HalfAndFull(nn.Module):
    """A full-size map and a half-size segmentation (returned as a dict)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.trunk, self.full_head, self.half_head = _Trunk(), nn.Conv2d(8, 1, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h, m = self.trunk(x)
        return {"full": self.full_head(h), "half": self.half_head(m)}


class SuperRes(nn.Module):
    """2× super-resolution: one output at twice the input's size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        return nn.functional.pixel_shuffle(self.b(torch.relu(self.a(x))), 2)


class Valid(nn.Module):
    """Valid (unpadded) convolutions: the output is 4 pixels smaller on each side."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b = nn.Conv2d(1, 8, 5), nn.Conv2d(8, 1, 5)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class WithStyle(nn.Module):
    """Maps plus a per-image style vector, as Cellpose's network returns them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.trunk, self.flow = _Trunk(), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        h, m = self.trunk(x)
        return self.flow(h), m.mean(dim=(2, 3))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, image, mask):
        return self.a(torch.cat([image, mask], 1))


def make_two_heads():
    return TwoHeads()


def make_wide_two_heads():
    net = TwoHeads()
    torch.manual_seed(5)
    net.trunk, net.fg, net.edge = _Trunk(32), nn.Conv2d(32, 1, 1), nn.Conv2d(32, 2, 1)
    return net


def make_half_and_full():
    return HalfAndFull()


def make_super_res():
    return SuperRes()


def make_valid():
    return Valid()


def make_with_style():
    return WithStyle()


def make_two_inputs():
    return TwoInputs()


# ------------------------------------------------------------------ probing and packing, exactly


def _run_all(net):
    def run(x):
        with torch.inference_mode():
            out = net(torch.from_numpy(x))
        out = list(out.values()) if isinstance(out, dict) else out
        return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else [out])]

    return run


@pytest.mark.parametrize(
    ("net", "step", "expect"),
    [
        (TwoHeads(), [2, 2], [(1, [1, 1], [0, 0]), (2, [1, 1], [0, 0])]),
        (HalfAndFull(), [2, 2], [(1, [1, 1], [0, 0]), (2, [Fraction(1, 2)] * 2, [0, 0])]),
        (SuperRes(), [1, 1], [(1, [2, 2], [0, 0])]),
        (Valid(), [1, 1], [(1, [1, 1], [-8, -8])]),
    ],
)
def test_probe_finds_each_outputs_scale_and_border(net, step, expect):
    got_step, sizes, shapes = probe_outputs(_run_all(net.eval()), 2, 1)
    assert got_step == step
    described = describe_outputs(shapes, sizes, [f"o{i}" for i in range(len(shapes))], 2)
    assert [(o.channels, o.scale, o.offset) for o in described] == expect


def test_a_vector_output_is_found_not_spatial():
    _, sizes, shapes = probe_outputs(_run_all(WithStyle().eval()), 2, 1)
    flow, style = describe_outputs(shapes, sizes, ["flow", "style"], 2)
    assert flow.spatial and not style.spatial and style.shape == [8]


@pytest.mark.parametrize("shape", [(1, 1, 36, 40), (2, 1, 48, 32)])
def test_pack_then_unpack_gives_every_output_back_exactly(shape):
    class All(nn.Module):
        def __init__(self):
            super().__init__()
            self.h, self.v = HalfAndFull(), Valid()
            self.s = SuperRes()

        def forward(self, x):
            d = self.h(x)
            return d["full"], d["half"], self.s(x), self.v(x)

    net = All().eval()
    _, sizes, shapes = probe_outputs(_run_all(net), 2, 1)
    described = describe_outputs(shapes, sizes, ["full", "half", "sr", "valid"], 2)
    from efficientbioai.models.outputs import records

    recs = records(described)
    packed = pack_module(net, described, [0, 1, 2, 3], 2)
    x = torch.randn(*shape)
    with torch.inference_mode():
        p = packed(x).numpy()
        want = [o.numpy() for o in net(x)]
    assert p.shape[1] == sum(r["packed_channels"][1] - r["packed_channels"][0] for r in recs)
    for r, w in zip(recs, want, strict=True):
        for b in range(shape[0]):
            got = unpack(p[b], r, 2)
            assert got.shape[1:] == w.shape[2:] and unpacked_shape(shape[2:], r) == list(w.shape[2:])
            np.testing.assert_array_equal(got, w[b])


def test_an_output_of_another_relation_names_the_problem():
    from efficientbioai.models.outputs import check_packable

    odd = OutputTensor("edges", 1, scale=[Fraction(2)] * 2, offset=[-2, -2])
    with pytest.raises(EfficientBioAIError, match="edges.*only outputs that are"):
        check_packable([odd], [])


# ------------------------------------------------------------------ compress → infer on whole images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    for i in range(2):
        tifffile.imwrite(folder / f"img{i}.tif", blobs((96, 96), seed=i)[0])
    return folder


def _compress(tmp_path, images, factory, precision="int8", **model):
    cfg = {
        "model": {"kind": "torch", "factory": f"tests.test_model_outputs:{factory}", "axes": "bcyx", **model},
        "calibration": {"images": str(images / "*.tif"), "num_tiles": 8, "tile_shape": [32, 32]},
        "quantize": {"precision": precision},
        "fidelity": {"num_tiles": 4},
        "engine": {"latency_repeats": 1},
        "output": str(tmp_path / f"art_{factory}_{precision}"),
    }
    return compress(validate_config(cfg), quiet=True)


def _whole(net, image):
    with torch.inference_mode():
        out = net(torch.from_numpy(image[None, None].astype(np.float32)))
    if isinstance(out, dict):
        out = list(out.values())
    return [o.numpy()[0] for o in (out if isinstance(out, (tuple, list)) else [out])]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("factory", "names", "precision"),
    [
        ("make_two_heads", ["output0", "output1"], "fp32"),
        ("make_two_heads", ["output0", "output1"], "int8"),
        ("make_half_and_full", ["full", "half"], "int8"),
        ("make_super_res", ["output"], "int8"),
        ("make_valid", ["output"], "fp32"),
    ],
)
def test_every_output_matches_the_original_on_the_whole_image(tmp_path, images, factory, names, precision):
    result = _compress(tmp_path, images, factory, precision)
    m = result.manifest
    assert m.output.packed and m.output.names() == names
    fid = m.fidelity
    if len(names) > 1:  # every output judged; the worst decides
        assert set(fid["outputs"]) == set(names) and fid["worst_output"] in names
        assert fid["pearson"] == min(v["pearson"] for v in fid["outputs"].values())
    assert 1 - fid["pearson"] <= 0.01  # the default budget held for the worst output
    out_dir = tmp_path / "pred"
    cfg = {"model": str(result.output), "input": str(images / "img0.tif"), "output": str(out_dir)}
    infer(validate_config(cfg, InferConfig), quiet=True)
    image = tifffile.imread(images / "img0.tif")
    net = globals()[factory]().eval()
    wants = _whole(net, image)
    files = [f"img0_{n}.tif" for n in names] if len(names) > 1 else ["img0.tif"]  # one output: one file
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(files)
    for file, name, want in zip(files, names, wants, strict=True):
        got = tifffile.imread(out_dir / file)
        want = want[0] if want.shape[0] == 1 else want
        assert got.shape == want.shape, name
        limit = 0.999 if precision == "fp32" else 0.99
        assert pearson(got, want) >= limit, (name, pearson(got, want))


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["make_two_heads", "make_half_and_full", "make_super_res", "make_valid"])
@pytest.mark.parametrize("fmt", ["tiff", "zarr"])
def test_out_of_core_writes_every_output_as_in_memory_to_the_bit(tmp_path, images, factory, fmt):
    art = _compress(tmp_path, images, factory, "fp32").output
    base = {"model": str(art), "input": str(images / "img1.tif"), "output_format": fmt}
    mem = {**base, "output": str(tmp_path / "mem"), "tiling": {"out_of_core": False}}
    infer(validate_config(mem, InferConfig), quiet=True)
    # a band of a few planes: the outputs are written in many slabs, each cut into every output's store
    ooc = {**base, "output": str(tmp_path / "ooc"), "tiling": {"out_of_core": True, "band_memory_mb": 0.05}}
    infer(validate_config(ooc, InferConfig), quiet=True)
    names = sorted(p.name for p in (tmp_path / "mem").iterdir())
    assert names and names == sorted(p.name for p in (tmp_path / "ooc").iterdir())  # nothing partial left
    for name in names:
        a = np.asarray(read_image(tmp_path / "mem" / name))
        b = np.asarray(read_image(tmp_path / "ooc" / name))
        assert a.shape == b.shape and np.array_equal(a, b), name


@pytest.mark.slow
def test_dask_writes_every_output_as_in_memory_to_the_bit(tmp_path, images):
    """One real LocalCluster, three networks: blocks cut into each output's store by the workers."""
    local = {"n_workers": 2, "threads_per_worker": 1, "processes": False, "block_shape": [48, 64]}
    for factory in ("make_two_heads", "make_half_and_full", "make_super_res"):
        art = _compress(tmp_path, images, factory, "fp32").output
        base = {"model": str(art), "input": str(images / "img0.tif"), "output_format": "zarr"}
        mem, dask = tmp_path / f"mem_{factory}", tmp_path / f"dask_{factory}"
        infer(
            validate_config({**base, "output": str(mem), "tiling": {"out_of_core": False}}, InferConfig),
            quiet=True,
        )
        infer(validate_config({**base, "output": str(dask), "distributed": local}, InferConfig), quiet=True)
        names = sorted(p.name for p in mem.iterdir())
        assert names and names == sorted(p.name for p in dask.iterdir())
        for name in names:
            a, b = np.asarray(read_image(mem / name)), np.asarray(read_image(dask / name))
            assert a.shape == b.shape and np.array_equal(a, b), (factory, name)


def test_dask_refuses_what_it_cannot_write_by_blocks(tmp_path, images):
    art = _compress(tmp_path, images, "make_valid", "fp32").output
    cfg = {
        "model": str(art),
        "input": str(images / "img0.tif"),
        "output": str(tmp_path / "o"),
        "distributed": {},
    }
    with pytest.raises(EfficientBioAIError, match="smaller than the input by a border"):
        infer(validate_config(cfg, InferConfig), quiet=True)
    art = _compress(tmp_path, images, "make_half_and_full", "fp32").output
    cfg = {**cfg, "model": str(art), "distributed": {"block_shape": [47, 96]}}
    with pytest.raises(EfficientBioAIError, match="not a multiple of 2"):
        infer(validate_config(cfg, InferConfig), quiet=True)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_pruning_keeps_every_heads_channels(tmp_path, images):
    from efficientbioai.compress.prune import output_layers

    net = make_wide_two_heads().eval()
    heads = output_layers(net, torch.zeros(1, 1, 32, 32))
    assert heads == [net.fg, net.edge] or heads == [net.edge, net.fg]  # both heads, not only the last run
    cfg = {
        "model": {"kind": "torch", "factory": "tests.test_model_outputs:make_wide_two_heads", "axes": "bcyx"},
        "calibration": {"images": str(images / "*.tif"), "num_tiles": 8, "tile_shape": [32, 32]},
        "quantize": {"precision": "fp32", "max_drop": None},
        "prune": {"ratio": 0.5, "finetune": {"steps": 2}},
        "engine": {"latency_repeats": 1},
        "output": str(tmp_path / "pruned"),
    }
    m = compress(validate_config(cfg), quiet=True).manifest
    step = next(t for t in m.transformations if t["step"] == "prune")
    assert step["parameters_after"] < step["parameters_before"]
    assert m.output.channels == 3 and m.output.names() == ["output0", "output1"]
    infer(
        validate_config(
            {
                "model": str(tmp_path / "pruned"),
                "input": str(images / "img0.tif"),
                "output": str(tmp_path / "p"),
            },
            InferConfig,
        ),
        quiet=True,
    )
    assert tifffile.imread(tmp_path / "p" / "img0_output1.tif").shape == (2, 96, 96)


def test_a_style_vector_is_refused_by_name_and_can_be_dropped(tmp_path, images):
    with pytest.raises(EfficientBioAIError) as err:
        _compress(tmp_path, images, "make_with_style", "fp32")
    assert "output1" in err.value.problem and "not spatial" in err.value.problem
    assert "drop_outputs: [output1]" in err.value.fix
    result = _compress(
        tmp_path, images, "make_with_style", "fp32", outputs=["flow", "style"], drop_outputs=["style"]
    )
    assert result.manifest.output.names() == ["flow"]
    assert result.manifest.output.outputs[0]["channels"] == 3


def test_two_inputs_are_refused_with_what_to_do(tmp_path, images):
    with pytest.raises(EfficientBioAIError) as err:
        _compress(tmp_path, images, "make_two_inputs", "fp32")
    assert "2 inputs" in err.value.problem and "image, mask" in err.value.problem


@pytest.mark.slow
def test_cli_writes_a_file_per_output_and_export_refuses_them(tmp_path, images):
    art = _compress(tmp_path, images, "make_two_heads", "int8").output
    raw = {"model": str(art), "input": str(images / "*.tif"), "output": str(tmp_path / "pred")}
    import yaml

    (tmp_path / "i.yaml").write_text(yaml.safe_dump(raw))
    proc = run_cli("infer", "--config", str(tmp_path / "i.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [
        "img0_output0.tif",
        "img0_output1.tif",
        "img1_output0.tif",
        "img1_output1.tif",
    ]
    assert tifffile.imread(tmp_path / "pred" / "img0_output1.tif").shape == (2, 96, 96)
    # a second run finds every output and skips the image
    again = run_cli("infer", "--config", str(tmp_path / "i.yaml"), cwd=tmp_path)
    assert again.returncode == 0 and "exists, skipped" in again.stderr
    # a bioimage.io package cannot hold them yet either
    pkg = tmp_path / "pkg"
    proc = run_cli("export-bioimageio", "-a", str(art), "-o", str(pkg), "--license", "MIT", cwd=tmp_path)
    assert proc.returncode == 2 and "several outputs" in proc.stderr and not pkg.exists()
