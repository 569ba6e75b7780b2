"""The ONNX graph a TensorRT engine is built from, prepared at compress time (no GPU needed).

TensorRT 11 builds *strongly typed* networks only: the builder flags that let TensorRT pick reduced
precisions itself (``BuilderFlag.FP16`` / ``BF16`` / ``INT8`` / ``FP8``) were removed, and the precision
of every layer is the type it has in the ONNX graph. So the precision is decided here, on the CPU, where
the user's calibration tiles are:

* ``fp32``: the artifact's ``model.onnx`` as it is;
* ``fp16`` / ``bf16``: :func:`to_low_precision` stores the weights in that type and runs every layer in
  it, except normalisations and reductions (kept in fp32, with casts around them) and anything that
  computes a ``Resize``'s scales; inputs and outputs stay fp32;
* ``int8``: explicit quantization: NNCF's ONNX backend inserts QuantizeLinear / DequantizeLinear pairs
  calibrated on the user's tiles (:func:`quantize_qdq`). TensorRT runs only symmetric (zero point 0),
  signed int8 Q/DQ, so the ``performance`` (symmetric) preset is used and any unsigned quantizer is
  turned into a signed one (:func:`signed_int8`);
* ``fp8`` (E4M3, GPUs of compute capability ≥ 8.9): the int8 Q/DQ graph with every quantizer moved to
  FP8 E4M3 at the same clipping range (:func:`int8_to_fp8`); opset 19.

Every graph produced here also runs in ONNX Runtime on the CPU (fp32 / int8 / fp8 Q/DQ), which is how
``compress`` checks it against the original without a GPU.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai.errors import ConfigError, ExportError

TRT_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")

# Layers kept in fp32 in fp16 / bf16 graphs: their intermediate sums (variance, softmax denominators,
# powers) overflow or lose too much in 16 bits.
HIGH_PRECISION_OPS = frozenset(
    {
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "BatchNormalization",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL2",
        "ReduceLogSumExp",
        "Softmax",
        "LogSoftmax",
        "Exp",
        "Pow",
        "Sqrt",
        "Reciprocal",
        "Range",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
    }
)
# inputs that must stay fp32 whatever the layer computes in: (op type, input index)
_FLOAT32_ONLY_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}

# layers that accept any input type (no cast in front of them)
_ANY_FLOAT_INPUT = frozenset({"Cast", "Shape", "Size"})

FP8_MAX = 448.0  # largest finite FLOAT8E4M3FN value


def onnx_name(precision: str) -> str:
    """File name of the TensorRT-ready graph in the artifact (under ``tensorrt/``)."""
    return f"model.{precision}.onnx"


# ------------------------------------------------------------------------------------- profiles


def to_low_precision(model, precision: str):
    """A copy of ``model`` (an ``onnx.ModelProto``) computing in fp16 or bf16, with fp32 inputs/outputs.

    Weights are stored in the low type. Layers in :data:`HIGH_PRECISION_OPS`, and every float layer
    whose output feeds a ``Resize`` scale (which ONNX requires in fp32), stay fp32 with casts around
    them.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if precision not in ("fp16", "bf16"):
        raise ValueError(f"to_low_precision: {precision!r} is not fp16 or bf16")
    # Note: a bf16 graph is moved to opset 22 (the first whose Conv accepts bf16); ONNX Runtime has no
    # CPU kernels for it, so it is validated (ONNX checker) but only runs on the GPU.
    low = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # pragma: no cover - shape inference is best effort on exotic graphs
        inferred = model
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    inits = {i.name: i for i in g.initializer}
    for name, i in inits.items():
        types[name] = i.data_type
    producers: dict[str, Any] = {}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
        for o in n.output:
            producers[o] = n

    def is_f32(name: str) -> bool:
        return bool(name) and types.get(name) == TensorProto.FLOAT

    # Layers that stay fp32: the listed op types, and everything upstream of a fp32-only input.
    high = {id(n) for n in g.node if n.op_type in HIGH_PRECISION_OPS}
    stack = [
        n.input[i] for n in g.node for (op, i) in _FLOAT32_ONLY_INPUTS if n.op_type == op and len(n.input) > i
    ]
    # float arithmetic on shapes (Shape → Cast(float) → Mul → Cast(int)) stays fp32: fp16 holds integers
    # exactly only up to 2048
    integer = {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8}
    stack += [
        n.input[0]
        for n in g.node
        if n.op_type == "Cast" and any(a.name == "to" and a.i in integer for a in n.attribute)
    ]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        p = producers.get(t)
        if p is not None and is_f32(t):
            high.add(id(p))
            stack.extend(p.input)
    keep_f32_tensors = seen  # initializers among them stay fp32 too

    consumers_low: dict[str, bool] = {}
    for n in g.node:
        for i, t in enumerate(n.input):
            if (n.op_type, i) in _FLOAT32_ONLY_INPUTS:
                continue
            if id(n) not in high:
                consumers_low.setdefault(t, True)
            else:
                consumers_low[t] = False
    # Weights read only by low-precision layers are stored in the low type.
    converted: set[str] = set()
    for name, init in inits.items():
        if init.data_type == TensorProto.FLOAT and consumers_low.get(name) and name not in keep_f32_tensors:
            arr = numpy_helper.to_array(init).astype(np.float32)
            new = (
                numpy_helper.from_array(arr.astype(np.float16), name)
                if low == TensorProto.FLOAT16
                else helper.make_tensor(name, low, arr.shape, arr.ravel().tolist())
            )
            init.CopyFrom(new)
            converted.add(name)

    new_nodes = []
    cast_cache: dict[tuple[str, int], str] = {}

    def cast(t: str, to: int) -> str:
        key = (t, to)
        if key not in cast_cache:
            out = f"{t}__to_{'f32' if to == TensorProto.FLOAT else precision}"
            new_nodes.append(helper.make_node("Cast", [t], [out], to=to, name=f"{out}_cast"))
            cast_cache[key] = out
        return cast_cache[key]

    # tensor name -> its current element type after conversion
    now = dict(types)
    for name in converted:
        now[name] = low
    for n in g.node:
        is_high = id(n) in high
        if n.op_type == "Constant" and not is_high:
            for a in n.attribute:
                if (
                    a.name == "value"
                    and a.t.data_type == TensorProto.FLOAT
                    and n.output[0] not in keep_f32_tensors
                ):
                    arr = numpy_helper.to_array(a.t).astype(np.float32)
                    a.t.CopyFrom(
                        numpy_helper.from_array(arr.astype(np.float16), a.t.name)
                        if low == TensorProto.FLOAT16
                        else helper.make_tensor(a.t.name, low, arr.shape, arr.ravel().tolist())
                    )
                    now[n.output[0]] = low
            new_nodes.append(n)
            continue
        want = TensorProto.FLOAT if is_high else low
        for i, t in enumerate(n.input):
            if not t or (n.op_type, i) in _FLOAT32_ONLY_INPUTS or n.op_type in _ANY_FLOAT_INPUT:
                continue
            cur = now.get(t)
            if cur in (TensorProto.FLOAT, low) and cur != want:
                n.input[i] = cast(t, want)
        if n.op_type == "Cast" and not is_high:
            for a in n.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = low
        if n.op_type == "ConstantOfShape" and not is_high:
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    arr = numpy_helper.to_array(a.t).astype(np.float32)
                    a.t.CopyFrom(helper.make_tensor(a.t.name, low, arr.shape, arr.ravel().tolist()))
        new_nodes.append(n)
        for o in n.output:
            if types.get(o) == TensorProto.FLOAT:
                now[o] = want
    # fp32 graph outputs: cast back where the producer now computes in the low type
    for out in g.output:
        if now.get(out.name) == low:
            inner = f"{out.name}__{precision}"
            for n in new_nodes:
                for i, t in enumerate(n.output):
                    if t == out.name:
                        n.output[i] = inner
                for i, t in enumerate(n.input):
                    if t == out.name:
                        n.input[i] = inner
            new_nodes.append(
                helper.make_node(
                    "Cast", [inner], [out.name], to=TensorProto.FLOAT, name=f"{out.name}_cast_out"
                )
            )
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    _topological_sort(g)
    try:
        if precision == "bf16" and _opset(model) < 22:  # bf16 convolutions exist from opset 22 on
            model = onnx.version_converter.convert_version(model, 22)
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(
            f"the {precision} graph for TensorRT is not valid ONNX: {str(exc).strip().splitlines()[0][:300]}",
            "use export.tensorrt.precision fp32 or int8 for this network, or report it",
        ) from exc
    return model


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _topological_sort(g) -> None:
    """Order the graph's nodes so that every input is produced before it is read (casts were appended)."""
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    ordered = []
    while pending:
        progressed = False
        rest = []
        for n in pending:
            if all(t in available for t in n.input):
                ordered.append(n)
                available.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:  # pragma: no cover - a cycle or a dangling input: leave the order alone
            ordered.extend(rest)
            break
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


# ----------------------------------------------------------------------------------- int8 / fp8


def quantize_qdq(
    model,
    tiles: list[np.ndarray],
    *,
    per_channel: bool = True,
    fast_bias_correction: bool = True,
    ignored: Sequence[str] = (),
    quiet: bool = True,
):
    """int8 Q/DQ graph (NNCF's ONNX backend), calibrated on preprocessed (C, *spatial) tiles.

    Symmetric ``performance`` preset (TensorRT runs zero-point-0 int8 only); unsigned quantizers are
    made signed afterwards.
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    if not tiles:
        raise ConfigError("calibration: no tiles to calibrate the int8 quantizers", "give calibration.images")
    name = model.graph.input[0].name
    dataset = nncf.Dataset(tiles, lambda t: {name: np.ascontiguousarray(t[np.newaxis], dtype=np.float32)})
    silence = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
    try:
        with silence:
            q = nncf.quantize(
                model,
                dataset,
                preset=nncf.QuantizationPreset.PERFORMANCE,
                subset_size=len(tiles),
                fast_bias_correction=fast_bias_correction,
                ignored_scope=nncf.IgnoredScope(patterns=list(ignored), validate=False),
                advanced_parameters=AdvancedQuantizationParameters(
                    weights_quantization_params=QuantizationParameters(per_channel=per_channel)
                ),
            )
    except Exception as exc:
        raise ExportError(
            f"NNCF could not insert int8 Q/DQ into the ONNX graph: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:300]}",
            "keep the failing layer in float with quantize.keep_float, or use export.tensorrt.precision fp16",
        ) from exc
    signed_int8(q)
    return q


def _q_dq_nodes(model):
    return [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def signed_int8(model) -> int:
    """Turn unsigned (uint8, zero point 0) Q/DQ pairs into signed int8 ones in place; returns how many.

    An unsigned quantizer with scale ``s`` covers [0, 255 s]; the signed one covers the same maximum
    with scale ``255 s / 127`` (one bit of resolution less on those non-negative activations).
    """
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    changed: set[tuple[str, str]] = set()
    for n in _q_dq_nodes(model):
        if len(n.input) < 3 or n.input[2] not in inits:
            continue
        zp = inits[n.input[2]]
        if zp.data_type != TensorProto.UINT8:
            continue
        if np.any(numpy_helper.to_array(zp) != 0):
            raise ExportError(
                "the int8 graph has an asymmetric quantizer (non-zero zero point), which TensorRT cannot run",
                "use quantize.preset: performance (symmetric) for TensorRT",
            )
        changed.add((n.input[1], n.input[2]))
    for scale_name, zp_name in changed:
        s = inits[scale_name]
        s.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(s) * (255.0 / 127.0), scale_name))
        z = inits[zp_name]
        z.CopyFrom(numpy_helper.from_array(np.zeros(numpy_helper.to_array(z).shape, np.int8), zp_name))
    if changed:  # the recorded uint8 types of the quantized tensors are stale
        del model.graph.value_info[:]
    return len(changed)


def int8_to_fp8(model):
    """An FP8 (E4M3) Q/DQ copy of a symmetric int8 Q/DQ graph, at opset 19.

    Activation quantizers keep their clipping range (scale × 127 becomes scale' × 448). Weights stored
    as int8 are dequantized and re-quantized to FP8 with their per-channel range likewise.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    if _opset(model) < 19:
        try:
            model = onnx.version_converter.convert_version(model, 19)
        except Exception as exc:
            raise ExportError(
                f"the int8 graph could not be moved to ONNX opset 19 (FP8 Q/DQ needs it): {exc}",
                "use export.tensorrt.precision int8",
            ) from exc
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    ratio = 127.0 / FP8_MAX
    rescaled: set[str] = set()
    zps: set[str] = set()
    weights: dict[str, tuple[str, str, int | None]] = {}
    for n in _q_dq_nodes(model):
        if len(n.input) < 3 or n.input[2] not in inits:
            raise ExportError(
                f"{n.name}: a Q/DQ node without an explicit zero point cannot be moved to FP8",
                "use export.tensorrt.precision int8",
            )
        axis = next((a.i for a in n.attribute if a.name == "axis"), None)
        if (
            n.op_type == "DequantizeLinear"
            and n.input[0] in inits
            and inits[n.input[0]].data_type == TensorProto.INT8
        ):
            weights[n.input[0]] = (n.input[1], n.input[2], axis)
        rescaled.add(n.input[1])
        zps.add(n.input[2])
    for wname, (sname, _zname, axis) in weights.items():
        w = numpy_helper.to_array(inits[wname]).astype(np.float32)
        s = numpy_helper.to_array(inits[sname]).astype(np.float32)
        if s.ndim == 1 and axis is not None:
            shape = [1] * w.ndim
            shape[axis] = -1
            s = s.reshape(shape)
        real = w * s
        q = real / (s * ratio)
        inits[wname].CopyFrom(
            helper.make_tensor(wname, TensorProto.FLOAT8E4M3FN, w.shape, q.ravel().tolist())
        )
    for sname in rescaled:
        s = numpy_helper.to_array(inits[sname]).astype(np.float32)
        inits[sname].CopyFrom(numpy_helper.from_array((s * ratio).astype(np.float32), sname))
    for zname in zps:
        z = numpy_helper.to_array(inits[zname])
        if np.any(z.astype(np.float32) != 0):
            raise ExportError(
                "FP8 needs symmetric quantizers (zero point 0)", "use quantize.preset: performance"
            )
        inits[zname].CopyFrom(
            helper.make_tensor(
                zname, TensorProto.FLOAT8E4M3FN, z.shape, np.zeros(z.size, np.float32).tolist()
            )
        )
    del g.value_info[:]
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ExportError(
            f"the FP8 graph is not valid ONNX: {str(exc).splitlines()[0][:300]}", "use int8"
        ) from exc
    return model


# ------------------------------------------------------------------------------------- in one go


def prepare_onnx(
    onnx_path: Path,
    precision: str,
    out_dir: Path,
    tiles: list[np.ndarray] | None = None,
    *,
    per_channel: bool = True,
    fast_bias_correction: bool = True,
    ignored: Sequence[str] = (),
    quiet: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Write the TensorRT-ready graph for ``precision`` into ``out_dir``; returns its path and a step record."""
    import onnx

    if precision not in TRT_PRECISIONS:
        raise ConfigError(
            f"export.tensorrt.precision: {precision!r} is not one of {', '.join(TRT_PRECISIONS)}",
            "use fp16 (any recent NVIDIA GPU), int8, or fp8 (compute capability ≥ 8.9)",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / onnx_name(precision)
    model = onnx.load(str(onnx_path))
    step: dict[str, Any] = {"step": "tensorrt_onnx", "precision": precision, "file": f"tensorrt/{path.name}"}
    if precision in ("fp16", "bf16"):
        model = to_low_precision(model, precision)
        step["tool"] = "efficientbioai cast (weights and layers in the low type; normalisations in fp32)"
        step["layers_kept_fp32"] = sorted(
            {n.op_type for n in model.graph.node if n.op_type in HIGH_PRECISION_OPS}
        )
    elif precision in ("int8", "fp8"):
        model = quantize_qdq(
            model,
            tiles or [],
            per_channel=per_channel,
            fast_bias_correction=fast_bias_correction,
            ignored=ignored,
            quiet=quiet,
        )
        step.update(
            tool="nncf (ONNX backend, explicit Q/DQ)",
            preset="performance",
            calibration_tiles=len(tiles or []),
            quantizers=sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear"),
        )
        if precision == "fp8":
            model = int8_to_fp8(model)
            step["fp8"] = "E4M3, int8 clipping ranges kept (scale × 127 / 448), opset 19"
    onnx.save(model, str(path))
    return path, step


# ------------------------------------------------------------------------ the artifact's tensorrt/
