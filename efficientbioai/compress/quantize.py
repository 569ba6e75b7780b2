"""int8 post-training quantization with NNCF on the OpenVINO model, calibrated on the user's tiles."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from efficientbioai.config import QuantizeConfig
from efficientbioai.errors import ConfigError, ExportError

OVERFLOW_FIX = {"all_layers": "enable", "first_layer": "first_layer_only", "none": "disable"}
"""``quantize.overflow_fix`` → NNCF's ``OverflowFix`` value."""


def layer_names(
    ov_model, types: tuple[str, ...] = ("Convolution", "ConvolutionBackpropData", "MatMul")
) -> list[str]:
    """Names of the layers NNCF can quantize, as ``quantize.keep_float`` patterns match them."""
    return [op.get_friendly_name() for op in ov_model.get_ordered_ops() if op.get_type_name() in types]


def _common(ov_model, tiles: list[np.ndarray], cfg: QuantizeConfig):
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
        QuantizationParameters,
    )

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
    return {
        "calibration_dataset": nncf.Dataset(
            tiles, lambda t: np.ascontiguousarray(t[np.newaxis], dtype=np.float32)
        ),
        "preset": nncf.QuantizationPreset(cfg.preset),
        "subset_size": len(tiles),
        "fast_bias_correction": cfg.fast_bias_correction,
        "ignored_scope": nncf.IgnoredScope(
            patterns=list(cfg.keep_float), types=list(cfg.keep_float_types), validate=False
        ),
        "advanced": AdvancedQuantizationParameters(
            overflow_fix=OverflowFix(OVERFLOW_FIX[cfg.overflow_fix]),
            weights_quantization_params=QuantizationParameters(per_channel=cfg.per_channel),
        ),
    }


def _failed(exc: Exception) -> ExportError:
    return ExportError(
        f"NNCF int8 quantization failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}",
        "keep the failing layer in float with quantize.keep_float, or use precision bf16",
    )


def quantize_int8(ov_model, tiles: list[np.ndarray], cfg: QuantizeConfig, quiet: bool = False):
    """Return an int8 ``openvino.Model``; ``tiles`` are preprocessed (C, *spatial) float32 arrays.

    ``quiet`` hides NNCF's progress bars (it draws them on standard output, which is the report's).
    """
    import nncf

    c = _common(ov_model, tiles, cfg)
    silence = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
    try:
        with silence:
            return nncf.quantize(
                ov_model,
                c["calibration_dataset"],
                preset=c["preset"],
                subset_size=c["subset_size"],
                fast_bias_correction=c["fast_bias_correction"],
                ignored_scope=c["ignored_scope"],
                advanced_parameters=c["advanced"],
            )
    except Exception as exc:
        raise _failed(exc) from exc


def quantize_int8_accuracy_control(
    ov_model,
    tiles: list[np.ndarray],
    cfg: QuantizeConfig,
    validation_items: list,
    validation_fn: Callable[[np.ndarray, Any], float],
    per_item_fn: Callable[[np.ndarray, Any], float],
    max_drop: float,
    quiet: bool = False,
) -> tuple[Any, list[str]]:
    """int8 with NNCF's accuracy control: layers are reverted to float until the metric drops ≤ ``max_drop``.

    ``validation_items`` are ``(input (1, C, *tile), reference)`` pairs; ``validation_fn(outputs,
    references)`` scores the stacked outputs of all items (higher is better), ``per_item_fn`` one item
    (NNCF ranks layers by it). Returns the model and the names of the layers kept in float.
    """
    import nncf

    c = _common(ov_model, tiles, cfg)

    def validate(compiled, items) -> tuple[float, list[float]]:
        items = list(items)
        outs = [np.asarray(compiled(x)[compiled.output(0)], np.float32) for x, _ in items]
        refs = [r for _, r in items]
        return float(validation_fn(outs, refs)), [
            float(per_item_fn(o, r)) for o, r in zip(outs, refs, strict=True)
        ]

    silence = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
    log = logging.getLogger("nncf")
    level = log.level
    try:
        if quiet:
            log.setLevel(logging.ERROR)
        with silence:
            q = nncf.quantize_with_accuracy_control(
                ov_model,
                c["calibration_dataset"],
                nncf.Dataset(validation_items),
                validate,
                max_drop=max_drop,
                drop_type=nncf.DropType.ABSOLUTE,
                preset=c["preset"],
                subset_size=c["subset_size"],
                fast_bias_correction=c["fast_bias_correction"],
                ignored_scope=c["ignored_scope"],
                advanced_quantization_parameters=c["advanced"],
            )
    except Exception as exc:
        raise _failed(exc) from exc
    finally:
        log.setLevel(level)
    return q, float_layers(q)


def float_layers(ov_model) -> list[str]:
    """Quantizable layers (convolutions, matmuls) whose weights are not int8 in a quantized model."""
    out = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "ConvolutionBackpropData", "MatMul"):
            continue
        producers = {op.input_value(i).get_node().get_type_name() for i in range(op.get_input_size())}
        if "FakeQuantize" not in producers and "FakeConvert" not in producers:
            chain = [op.input_value(1).get_node()]
            # int8 weights arrive as Constant(i8) → Convert → (Subtract) → Multiply
            seen_int8 = False
            for _ in range(4):
                node = chain[-1]
                if node.get_type_name() == "Constant" and str(node.get_element_type()) in ("i8", "u8"):
                    seen_int8 = True
                    break
                if node.get_input_size() == 0:
                    break
                chain.append(node.input_value(0).get_node())
            if not seen_int8:
                out.append(op.get_friendly_name())
    return out
