"""Configuration files: pydantic schemas that are the validation, the defaults and the documentation.

- :mod:`~efficientbioai.config.compress`: ``efficientbioai compress`` (model, calibration, prune, quantize,
  export, fidelity, engine);
- :mod:`~efficientbioai.config.infer`: ``efficientbioai infer`` (tiling, localisation, Dask, GPU, instances,
  Cellpose);
- :mod:`~efficientbioai.config.loading`: reading YAML files and validating them with clear errors;
- :mod:`~efficientbioai.config.base`: what every section shares (unknown keys are errors).

Relative paths in a config are read from the current working directory, as on the command line.
"""

from efficientbioai.config.base import AXES_HELP, StrictConfig
from efficientbioai.config.compress import (
    AUTO_PRUNE_RATIOS,
    DEFAULT_MAX_DROP,
    CalibrationConfig,
    CompressConfig,
    EngineConfig,
    ExportConfig,
    FidelityConfig,
    FineTuneConfig,
    MaxDropConfig,
    ModelConfig,
    PruneConfig,
    QuantizeConfig,
    TensorRTExportConfig,
)
from efficientbioai.config.infer import (
    BACKENDS,
    GPU_BACKENDS,
    JOBQUEUE_CLUSTERS,
    BackgroundConfig,
    CellposeInferConfig,
    DistributedConfig,
    GpuConfig,
    InferConfig,
    InstanceConfig,
    LocalizeConfig,
    TilingConfig,
)
from efficientbioai.config.loading import load_config, read_config_file, validate_config

__all__ = [
    "AUTO_PRUNE_RATIOS",
    "AXES_HELP",
    "BACKENDS",
    "DEFAULT_MAX_DROP",
    "GPU_BACKENDS",
    "JOBQUEUE_CLUSTERS",
    "BackgroundConfig",
    "CalibrationConfig",
    "CellposeInferConfig",
    "CompressConfig",
    "DistributedConfig",
    "EngineConfig",
    "ExportConfig",
    "FidelityConfig",
    "FineTuneConfig",
    "GpuConfig",
    "InferConfig",
    "InstanceConfig",
    "LocalizeConfig",
    "MaxDropConfig",
    "ModelConfig",
    "PruneConfig",
    "QuantizeConfig",
    "StrictConfig",
    "TensorRTExportConfig",
    "TilingConfig",
    "load_config",
    "read_config_file",
    "validate_config",
]
