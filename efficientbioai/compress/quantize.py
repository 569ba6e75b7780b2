"""int8 post-training quantization with NNCF on the OpenVINO model, calibrated on the user's tiles."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np

from efficientbioai.config import QuantizeConfig
from efficientbioai.errors import ConfigError, ExportError


def layer_names(
    ov_model, types: tuple[str, ...] = ("Convolution", "ConvolutionBackpropData", "MatMul")
) -> list[str]:
    """Names of the layers NNCF can quantize, as ``quantize.keep_float`` patterns match them."""
    return [op.get_friendly_name() for op in ov_model.get_ordered_ops() if op.get_type_name() in types]


def quantize_int8(ov_model, tiles: list[np.ndarray], cfg: QuantizeConfig, quiet: bool = False):
    """Return an int8 ``openvino.Model``; ``tiles`` are preprocessed (C, *spatial) float32 arrays.

    ``quiet`` hides NNCF's progress bars (it draws them on standard output, which is the report's).
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    if not tiles:
        raise ConfigError("calibration: no tiles to calibrate the quantizer", "give calibration.images")
    names = layer_names(ov_model)
    for pattern in cfg.keep_float:
        if not any(re.fullmatch(pattern, n) for n in names):
            raise ConfigError(
                f"quantize.keep_float: '{pattern}' matches no layer",
                f"patterns are regular expressions over the full layer names, e.g. '.*{names[0]}.*'; "
                f"the layers are: {', '.join(names[:12])}{' …' if len(names) > 12 else ''}"
                if names
                else "this model has no quantizable layers",
            )
    ignored = nncf.IgnoredScope(
        patterns=list(cfg.keep_float), types=list(cfg.keep_float_types), validate=False
    )
    advanced = AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(per_channel=cfg.per_channel)
    )
    dataset = nncf.Dataset(tiles, lambda t: np.ascontiguousarray(t[np.newaxis], dtype=np.float32))
    silence = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
    try:
        with silence:
            return nncf.quantize(
                ov_model,
                dataset,
                preset=nncf.QuantizationPreset(cfg.preset),
                subset_size=len(tiles),
                fast_bias_correction=cfg.fast_bias_correction,
                ignored_scope=ignored,
                advanced_parameters=advanced,
            )
    except Exception as exc:
        raise ExportError(
            f"NNCF int8 quantization failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}",
            "keep the failing layer in float with quantize.keep_float, or use precision bf16",
        ) from exc
