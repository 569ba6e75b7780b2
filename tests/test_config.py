import json

import pytest

from efficientbioai.config import CompressConfig, load_config, validate_config
from efficientbioai.errors import ConfigError

from .conftest import run_cli


def test_misspelled_key_is_named_with_suggestion(tmp_path):
    with pytest.raises(ConfigError) as err:
        validate_config({"model": {"kind": "onnx", "pth": "x"}, "output": "o"})
    assert "model.pth: unknown key; did you mean 'path'?" in str(err.value)


def test_wrong_type_missing_file_and_missing_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        validate_config(
            {
                "model": {"kind": "torchscript", "path": str(tmp_path / "nope.pt"), "axes": "bcyx"},
                "calibration": {"num_tiles": "many"},
            }
        )
    msg = str(err.value)
    assert "model.path: file not found" in msg
    assert "calibration.num_tiles" in msg
    assert "output: required key is missing" in msg


def test_kind_requirements_and_tensorrt_target(tmp_path):
    with pytest.raises(ConfigError, match="kind 'monai' needs 'model.name'"):
        validate_config({"model": {"kind": "monai", "axes": "bczyx"}, "output": "o"})
    model = {"kind": "monai", "name": "UNet", "axes": "bczyx"}
    # TensorRT is built beside a CPU engine; its own precision is export.tensorrt.precision
    with pytest.raises(ConfigError, match="export.tensorrt.precision"):
        validate_config({"model": model, "output": "o", "export": {"targets": ["tensorrt"]}})
    cfg = validate_config(
        {
            "model": model,
            "output": "o",
            "quantize": {"precision": "fp32"},
            "export": {"targets": ["onnx", "tensorrt"], "tensorrt": {"precision": "int8"}},
        }
    )
    assert cfg.export.tensorrt.precision == "int8"


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_config_errors_without_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  kindd: monai\noutput: out\n")
    proc = run_cli("compress", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    assert "model.kindd: unknown key; did you mean 'kind'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_schema_and_help(tmp_path):
    proc = run_cli("schema", "compress", cwd=tmp_path)
    schema = json.loads(proc.stdout)
    assert schema == CompressConfig.model_json_schema()
    assert "max_pearson_drop" in proc.stdout
    helptext = run_cli("compress", "--help", cwd=tmp_path).stdout
    assert "--config" in helptext and "precision" in helptext


def test_metric_limit_without_targets_is_rejected_before_any_work():
    with pytest.raises(ConfigError, match="max_metric_drop needs a task metric"):
        validate_config(
            {
                "model": {"kind": "monai", "name": "UNet", "axes": "bczyx"},
                "output": "o",
                "fidelity": {"max_metric_drop": 0.01},
            }
        )


def test_example_configs_are_valid(tmp_path, shared_model, monkeypatch):
    """The configs in configs/ that the README points users to validate against the schemas."""
    import yaml

    from efficientbioai.config import CompressConfig, InferConfig, load_config, validate_config

    from .conftest import REPO

    monkeypatch.chdir(REPO)  # their relative paths are read from the repository root
    assert (
        load_config(REPO / "configs" / "unet2d_nuclei_int8.yaml", CompressConfig).model.kind == "bioimageio"
    )
    data = yaml.safe_load((REPO / "configs" / "unet2d_nuclei_infer.yaml").read_text())
    (tmp_path / "manifest.yaml").write_text("manifest_version: 1\n")  # stands in for `compress`'s artifact
    cfg = validate_config({**data, "model": str(tmp_path)}, InferConfig)
    assert cfg.compare_with_original and cfg.tiling.tile_shape == [256, 256]
    data = yaml.safe_load((REPO / "configs" / "unet2d_nuclei_infer_dask.yaml").read_text())
    cfg = validate_config({**data, "model": str(tmp_path)}, InferConfig)
    assert cfg.distributed.scheduler == "local" and cfg.distributed.n_workers == 2
