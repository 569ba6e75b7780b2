"""The benchmark config: variants deep-merged into compress configs, clear errors, the shipped configs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from efficientbioai.benchmark.config import check_benchmark_config, deep_merge, variant_configs
from efficientbioai.benchmark.images import MARKER, prepare_output
from efficientbioai.benchmark.rows import resolve_devices
from efficientbioai.cli import main
from efficientbioai.errors import ConfigError

from .conftest import REPO, SHARED_MODEL
from .manifests import manifest_stub

BASE = {
    "model": {
        "kind": "monai",
        "name": "UNet",
        "axes": "bcyx",
        "kwargs": {
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 1,
            "channels": [4, 8],
            "strides": [2],
        },
    },
    "train": {"steps": 5},
    "images": {"generate": "nuclei", "shape": [64, 64]},
    "task": "semantic",
    "compress": {"calibration": {"num_tiles": 4}, "quantize": {"preset": "mixed"}},
    "variants": [{"name": "fp32", "quantize": {"precision": "fp32"}}, {"name": "int8"}],
    "output": "runs/b",
}


def _cfg(**changes):
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [3]}, "e": 2}) == {"a": {"b": 1, "c": [3]}, "d": 1, "e": 2}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # not modified


def test_variants_are_compress_configs_merged_into_the_shared_part(tmp_path):
    cfg = check_benchmark_config(_cfg())
    (n1, c1), (n2, c2) = variant_configs(cfg, tmp_path / "artifacts")
    assert (n1, n2) == ("fp32", "int8")
    assert c1.quantize.precision == "fp32" and c1.quantize.preset == "mixed"  # shared key kept
    assert c2.quantize.precision == "int8" and c2.calibration.num_tiles == 4
    assert c1.output == tmp_path / "artifacts" / "fp32" and c1.overwrite
    assert c1.model.kind == "monai" and c1.engine.latency_repeats == 3


def test_a_misspelled_variant_key_is_named_with_the_variant():
    with pytest.raises(ConfigError) as e:
        check_benchmark_config(_cfg(variants=[{"name": "int8", "quantise": {"precision": "int8"}}]))
    assert "variants[0] 'int8'" in e.value.problem and "quantise" in e.value.problem
    assert "did you mean 'quantize'" in e.value.problem
    with pytest.raises(ConfigError) as e:
        check_benchmark_config(_cfg(variants=[{"name": "x", "quantize": {"precision": "int4"}}]))
    assert "variants[0] 'x'" in e.value.problem and "quantize.precision" in e.value.problem


@pytest.mark.parametrize(
    "variants, words",
    [
        ([{"quantize": {"precision": "int8"}}], "needs a `name:`"),
        ([{"name": "a b"}], "needs a `name:`"),
        ([{"name": "a"}, {"name": "a"}], "used twice"),
        ([{"name": "original"}], "taken by the original"),
        ([{"name": "a", "output": "x"}], "cannot be set in a variant"),
        ([{"name": "a", "model": {"kind": "onnx"}}], "cannot be set in a variant"),
        ([], "at least 1"),
    ],
)
def test_bad_variants_are_refused(variants, words):
    with pytest.raises(ConfigError) as e:
        check_benchmark_config(_cfg(variants=variants))
    assert words in e.value.problem


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"compress": {"output": "x"}}, "cannot be set here"),
        ({"images": {"generate": "nuclei", "shape": [16, 64, 64]}}, "is 3D but model.axes 'bcyx' is 2D"),
        ({"images": {"generate": "nuclei", "shape": [4, 64]}}, "at least 8"),
        ({"task": None}, "task is needed"),
        ({"images": "data/*.tif"}, "train: needs generated images"),
        ({"images": [{"path": "a.tif"}, {"path": "b.tif"}], "axes": "yx", "train": None}, "one path"),
        ({"devices": ["tpu"]}, "devices"),
        ({"runs": {"repeats": 0}}, "runs.repeats"),
        ({"imagse": "x"}, "did you mean 'images'"),
        (
            {"images": [{"path": "x", "axis": "yx"}], "train": None},
            "images.0.axis: unknown key; did you mean 'axes'",
        ),
        ({"images": {"generate": "nuclei"}}, "images.0.shape: required key is missing"),
        ({"model": {"kind": "cellpose"}, "train": None}, "not supported by `benchmark`"),
    ],
)
def test_bad_benchmark_settings_are_explained(changes, words):
    with pytest.raises(ConfigError) as e:
        check_benchmark_config(_cfg(**changes))
    assert words in e.value.problem


def test_image_sources_take_several_forms():
    cfg = check_benchmark_config(
        _cfg(
            train=None,
            images=["a.tif", {"path": "b/*.npy", "axes": "bcyx", "targets": "m/*.npy"}, BASE["images"]],
        )
    )
    paths = cfg.source_paths()
    assert [p.path for p in paths] == ["a.tif", "b/*.npy"] and paths[1].axes == "bcyx"
    assert len(cfg.generated()) == 1
    single = check_benchmark_config(_cfg(train=None, images="x/*.tif", axes="zyx", targets="y/*.tif"))
    assert single.source_paths()[0].axes == "zyx" and single.source_paths()[0].targets == "y/*.tif"


def test_a_prune_variant_is_a_compress_config(tmp_path):
    cfg = check_benchmark_config(_cfg(variants=[{"name": "p", "prune": {"ratio": 0.5}, "quantize": {}}]))
    ((_, c),) = variant_configs(cfg, tmp_path)
    assert c.prune.ratio == 0.5


def test_output_folder_is_only_replaced_when_it_holds_a_benchmark(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.docx").write_text("precious")
    with pytest.raises(ConfigError, match="not a benchmark folder"):
        prepare_output(other, overwrite=True)
    assert (other / "thesis.docx").is_file()
    out = tmp_path / "b"
    prepare_output(out, overwrite=False)
    (out / "report.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a benchmark"):
        prepare_output(out, overwrite=False)
    prepare_output(out, overwrite=True)
    assert (out / MARKER).is_file() and not (out / "report.json").exists()


def test_gpu_rows_need_a_gpu():
    cfg = check_benchmark_config(_cfg(devices=["cpu", "gpu"]))
    gpu = {"available": False, "devices": [], "note": "no CUDA device"}
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_devices(cfg.devices, gpu, [])
    notes: list[str] = []
    assert resolve_devices(check_benchmark_config(_cfg()).devices, gpu, notes) == ["cpu"]
    assert notes and "no GPU rows" in notes[0]
    gpu_here = {"available": True, "devices": [{"name": "X"}], "note": None}
    assert resolve_devices(check_benchmark_config(_cfg()).devices, gpu_here, []) == ["cpu", "gpu"]


def test_gpu_rows_are_the_original_and_autocast_variants():
    from efficientbioai.benchmark.rows import Row, gpu_rows

    def variant(name, precision, steps=()):
        manifest = manifest_stub(precision=precision, transformations=[{"step": "export_onnx"}, *steps])
        return Row(name, name, "cpu", "variant", artifact=Path(name), manifest=manifest)

    rows = [
        variant("fp32", "fp32"),
        variant("bf16", "bf16"),
        variant("fp16", "fp16"),
        variant("int8", "int8"),
        variant("p-bf16", "bf16", [{"step": "prune", "ratio": 0.5}]),
        Row("bad", "bad", "cpu", "variant", status="failed"),
    ]
    notes: list[str] = []
    gpu = gpu_rows(rows, notes)
    assert [(r.id, r.precision, r.device) for r in gpu] == [
        ("original@gpu", "fp32", "gpu"),
        ("bf16@gpu", "bf16", "gpu"),
        ("fp16@gpu", "fp16", "gpu"),
    ]
    assert gpu[0].kind == "original" and gpu[0].artifact == Path("fp32")
    assert len(notes) == 1 and "fp32, int8, p-bf16" in notes[0] and "TensorRT" in notes[0]


def test_cli_reports_config_errors_without_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(_cfg(variants=[{"name": "int8", "quantise": {}}])))
    assert main(["benchmark", "--config", "b.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: b.yaml: variants[0] 'int8'") and "Traceback" not in err
    assert main(["benchmark", "--config", "missing.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["schema", "benchmark"]) == 0
    assert '"variants"' in capsys.readouterr().out


def _shipped(name: str) -> dict:
    data = yaml.safe_load((REPO / "configs" / name).read_text())
    return data


@pytest.mark.parametrize(
    "name", ["benchmark_restoration3d.yaml", "benchmark_semantic3d.yaml", "benchmark_nuclei2d.yaml"]
)
def test_shipped_configs_are_valid(name, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # their relative paths are read from the repository root
    data = _shipped(name)
    if data["model"]["kind"] == "bioimageio" and not (SHARED_MODEL / "bioimageio.yaml").is_file():
        pytest.skip("../shared/models/unet2d_nuclei_broad is not present")
    cfg = check_benchmark_config(data, source=name)
    names = [n for n, _ in variant_configs(cfg, Path(tmp_path))]
    assert {"fp32", "bf16", "int8"} <= set(names)
    assert cfg.task is not None and cfg.runs.repeats >= 3
    assert not Path(data["output"]).is_absolute()


def test_images_of_every_form_load_in_the_model_layout(tmp_path):
    """TIFF, a batch-axis NPY (one entry per sample) and a zarr store all come out as (C, *spatial)."""
    import numpy as np
    import tifffile

    from efficientbioai.benchmark.images import load_image, resolve_images
    from efficientbioai.io import write_image

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((40, 48), np.float32))
    np.save(tmp_path / "b.npy", np.stack([np.full((1, 40, 48), k, np.float32) for k in range(2)]))
    write_image(tmp_path / "c.zarr", np.ones((40, 48), np.float32), axes="yx")
    cfg = check_benchmark_config(
        _cfg(
            train=None,
            task=None,
            images=[
                str(tmp_path / "a.tif"),
                {"path": str(tmp_path / "b.npy"), "axes": "bcyx"},
                str(tmp_path / "c.zarr"),
            ],
        )
    )
    entries = resolve_images(cfg, tmp_path / "out")
    assert [e.name for e in entries] == ["a", "b_b0", "b_b1", "c"]
    arrays = [load_image(e.spec(), "bcyx") for e in entries]
    assert all(isinstance(a, np.ndarray) and a.shape == (1, 40, 48) for a in arrays)
    assert arrays[2].mean() == 1 and arrays[3].mean() == 1
