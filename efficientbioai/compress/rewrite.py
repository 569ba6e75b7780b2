"""Exact ONNX graph rewrites that make every engine faster without changing what the network computes.

``pointwise_before_upsample``: U-Net decoders often upsample a wide feature map (bilinear / nearest
``Resize``) and then mix its channels with a 1×1 convolution that narrows it. Both are linear, and the
interpolation weights of every output pixel sum to one, so the two commute exactly (the bias included):

    conv1x1(resize(x)) == resize(conv1x1(x))

Running the convolution first does its work at the low resolution (4× fewer pixels in 2D, 8× in 3D) and
interpolates the narrower tensor. The result differs from the original only by float rounding; the export's
parity check against the original network still runs after the rewrite.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

_MODES = {"nearest", "linear"}  # cubic weights also sum to one but are not worth the risk


def rewrite_summary(step: dict[str, Any]) -> str:
    """'1 1×1 convolution(s) moved before upsampling, …' for a rewrite step of the manifest."""
    what = {
        "pointwise_before_upsample": "1×1 convolution(s) moved before upsampling",
        "transposed_conv_to_subpixel": "transposed convolution(s) as convolution + pixel shuffle",
    }
    return ", ".join(f"{len(step[k])} {text}" for k, text in what.items() if step.get(k))


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _constant(graph, name: str):
    """The value of a tensor that is an initializer or a Constant node's output, else None."""
    from onnx import numpy_helper

    if not name:
        return None
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            value = _attrs(node).get("value")
            return None if value is None else numpy_helper.to_array(value)
    return None


def _pointwise_conv(graph, conv) -> int | None:
    """Output channels of ``conv`` if it is a stride-1, unpadded 1×1 (any groups) convolution, else None."""
    a = _attrs(conv)
    weight = _constant(graph, conv.input[1])
    if weight is None:
        return None
    kernel = list(a.get("kernel_shape", weight.shape[2:]))
    if any(k != 1 for k in kernel) or any(s != 1 for s in a.get("strides", [1])):
        return None
    if any(p != 0 for p in a.get("pads", [0])):
        return None
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", b"SAME_UPPER", b"SAME_LOWER"):
        return None
    return int(weight.shape[0])


def _spatial_only_resize(graph, resize) -> tuple[bool, np.ndarray | None]:
    """(resizes only spatial axes with weights summing to one, its constant ``sizes`` if it has them)."""
    a = _attrs(resize)
    if a.get("mode", b"nearest").decode() not in _MODES:
        return False, None
    if a.get("coordinate_transformation_mode", b"half_pixel") == b"tf_crop_and_resize":
        return False, None
    axes = a.get("axes")
    if axes is not None and ({0, 1} & {int(x) for x in axes} or any(int(x) < 0 for x in axes)):
        return False, None
    inputs = list(resize.input) + [""] * (4 - len(resize.input))
    scales, sizes = inputs[2], inputs[3]
    if sizes:
        value = _constant(graph, sizes)
        if value is None or axes is not None:
            return False, None
        return True, value
    value = _constant(graph, scales)
    if value is None:
        return False, None
    if axes is None and (value.size < 2 or value[0] != 1 or value[1] != 1):
        return False, None
    return True, None


def _has_control_flow(graph) -> bool:
    """If / Loop / Scan bodies may read outer tensors without naming them: node order is not ours to change."""
    import onnx

    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in kinds for n in graph.node for a in n.attribute)


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` so that every node comes after the producers of its inputs (stable)."""
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output}
    deps = defaultdict(set)
    users = defaultdict(set)
    for i, node in enumerate(graph.node):
        for name in node.input:
            j = produced_by.get(name)
            if j is not None and j != i:
                deps[i].add(j)
                users[j].add(i)
    ready = sorted(i for i in range(len(graph.node)) if not deps[i])
    order: list[int] = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for u in sorted(users[i]):
            deps[u].discard(i)
            if not deps[u]:
                ready.append(u)
        ready.sort()
    if len(order) != len(graph.node):
        raise RuntimeError("the ONNX graph has a cycle after rewriting")
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def pointwise_before_upsample(model) -> list[str]:
    """Move every 1×1 convolution that directly follows an upsampling ``Resize`` in front of it.

    Only a ``Resize`` whose single consumer is the convolution is rewritten (otherwise the upsampled
    tensor is needed anyway). Edits ``model`` in place; returns the names of the moved convolutions.
    """
    from onnx import numpy_helper

    graph = model.graph
    if _has_control_flow(graph):
        return []
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}
    moved = []
    for resize in list(graph.node):
        if resize.op_type != "Resize" or resize.output[0] in graph_outputs:
            continue
        users = consumers[resize.output[0]]
        if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != resize.output[0]:
            continue
        conv = users[0]
        if resize.output[0] in conv.input[1:]:
            continue
        out_channels = _pointwise_conv(graph, conv)
        ok, sizes = _spatial_only_resize(graph, resize)
        if out_channels is None or not ok:
            continue
        if sizes is not None:
            new_sizes = sizes.copy()
            new_sizes[1] = out_channels
            name = f"{resize.name or resize.output[0]}_sizes_after_pointwise"
            graph.initializer.append(numpy_helper.from_array(new_sizes.astype(sizes.dtype), name))
            old_sizes, resize.input[3] = resize.input[3], name
            _drop_unused_initializers(graph, [old_sizes])
        low = f"{conv.output[0]}_before_upsample"
        x, upsampled, out = resize.input[0], resize.output[0], conv.output[0]
        conv.input[0], conv.output[0] = x, low
        resize.input[0], resize.output[0] = low, out
        stale = {upsampled, out}
        kept = [v for v in graph.value_info if v.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        moved.append(conv.name or out)
    if moved:
        _topological_sort(graph)
    return moved


def _drop_unused_initializers(graph, names) -> None:
    """Remove the initializers among ``names`` that no node reads any more (weights a rewrite replaced)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    used |= {i.name for i in graph.input}  # old IR versions list initializers as inputs too: keep those
    stale = [init for init in graph.initializer if init.name in set(names) - used]
    for init in stale:
        graph.initializer.remove(init)


def _int_const(graph, name: str, values) -> str:
    """Add an int64 initializer and return its name."""
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
    return name


def _subpixel_weights(w: np.ndarray, strides: list[int]) -> tuple[np.ndarray, list[int]]:
    """ConvTranspose weights [Cin, Cout, *k] → Conv weights [Cout · prod(s), Cin, *J], J = ceil(k / s).

    Phase r (per axis) of the transposed convolution's output is an ordinary correlation of the input
    with taps w[r + s·j] at input offset −j; output channel c · prod(s) + phase holds phase ``phase``
    (row-major over the axes) of channel c.
    """
    cin, cout, *k = w.shape
    j = [-(-kk // s) for kk, s in zip(k, strides, strict=True)]
    phases = list(np.ndindex(*strides))
    out = np.zeros((cout, len(phases), cin, *j), w.dtype)
    for p, r in enumerate(phases):
        for t in np.ndindex(*j):  # kernel position t holds tap j = J − 1 − t (the kernel is flipped)
            kk = [ri + si * (ji - 1 - ti) for ri, si, ji, ti in zip(r, strides, j, t, strict=True)]
            if all(0 <= a < b for a, b in zip(kk, k, strict=True)):
                out[(slice(None), p, slice(None), *t)] = w[(slice(None), slice(None), *kk)].T
    return out.reshape(cout * len(phases), cin, *j), j


def transposed_conv_to_subpixel(model, max_out_channels: int = 8) -> list[str]:
    """Replace narrow strided ``ConvTranspose`` layers by an ordinary convolution and a pixel shuffle.

    A transposed convolution with stride s is s^d interleaved ordinary convolutions (one per output
    phase). Computed as one convolution with Cout · s^d output channels, followed by a reshape/transpose
    that interleaves the phases and a crop, it gives the same result up to float rounding. CPU
    engines run narrow transposed convolutions (the output layer of a MONAI UNet has one channel) far
    below their convolution speed and OpenVINO keeps them out of int8; the convolution form runs in int8.
    Only layers with at most ``max_out_channels`` output channels are rewritten: for wide layers the
    zero taps of the phase kernels (k=3, s=2: 2.4× the multiply-accumulates) cost more than they save.
    Edits ``model`` in place; returns the names of the rewritten layers.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    if _has_control_flow(graph):
        return []
    done = []
    for node in list(graph.node):
        if node.op_type != "ConvTranspose":
            continue
        a = _attrs(node)
        w = _constant(graph, node.input[1])
        b = _constant(graph, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if w is None or w.ndim not in (4, 5) or (len(node.input) > 2 and node.input[2] and b is None):
            continue
        nd = w.ndim - 2
        k = list(w.shape[2:])
        s = list(a.get("strides", [1] * nd))
        pads = list(a.get("pads", [0] * 2 * nd))
        out_pad = list(a.get("output_padding", [0] * nd))
        if (
            a.get("group", 1) != 1
            or any(d != 1 for d in a.get("dilations", [1] * nd))
            or "output_shape" in a
            or a.get("auto_pad", b"NOTSET") not in (b"NOTSET",)
            or all(si == 1 for si in s)
            or w.shape[1] > max_out_channels
            or list(a.get("kernel_shape", k)) != k
        ):
            continue
        cin, cout = w.shape[:2]
        weights, j = _subpixel_weights(w, s)
        p_begin, p_end = pads[:nd], pads[nd:]
        # the phase grid covers (L + J − 1) · s positions; keep [p_begin, L_out + p_begin)
        crop_end = [
            ji * si - ki + pe - op for ji, si, ki, pe, op in zip(j, s, k, p_end, out_pad, strict=True)
        ]
        if any(c < 0 for c in crop_end) or any(op >= si for op, si in zip(out_pad, s, strict=True)):
            continue
        base = (node.name or node.output[0]).strip("/").replace("/", "_") + "_subpixel"
        wname = f"{base}_w"
        graph.initializer.append(numpy_helper.from_array(weights.astype(w.dtype), wname))
        conv_inputs = [node.input[0], wname]
        if b is not None:
            bname = f"{base}_b"
            graph.initializer.append(
                numpy_helper.from_array(np.repeat(b, int(np.prod(s))).astype(b.dtype), bname)
            )
            conv_inputs.append(bname)
        phases_out = f"{base}_phases"
        new = [
            helper.make_node(
                "Conv",
                conv_inputs,
                [phases_out],
                kernel_shape=j,
                pads=[ji - 1 for ji in j] * 2,
                name=f"{base}/Conv",
            )
        ]
        # [N, Cout·S, *M] → [N, Cout, *s, *M] → [N, Cout, M0, s0, M1, s1, …] → [N, Cout, *(M·s)]
        shape = f"{base}_shape"
        new.append(helper.make_node("Shape", [phases_out], [shape], name=f"{base}/Shape"))
        n_dim, m_dims = f"{base}_n", f"{base}_m"
        new.append(helper.make_node("Gather", [shape, _int_const(graph, f"{base}_i0", [0])], [n_dim], axis=0))
        new.append(
            helper.make_node(
                "Gather", [shape, _int_const(graph, f"{base}_im", list(range(2, 2 + nd)))], [m_dims], axis=0
            )
        )
        split_shape = f"{base}_split_shape"
        new.append(
            helper.make_node(
                "Concat", [n_dim, _int_const(graph, f"{base}_cs", [cout, *s]), m_dims], [split_shape], axis=0
            )
        )
        split = f"{base}_split"
        new.append(helper.make_node("Reshape", [phases_out, split_shape], [split]))
        perm = [0, 1] + [i for d in range(nd) for i in (2 + nd + d, 2 + d)]
        interleaved = f"{base}_interleaved"
        new.append(helper.make_node("Transpose", [split], [interleaved], perm=perm))
        full = f"{base}_full"
        new.append(helper.make_node("Mul", [m_dims, _int_const(graph, f"{base}_s", s)], [full]))
        merged_shape = f"{base}_merged_shape"
        new.append(
            helper.make_node(
                "Concat", [n_dim, _int_const(graph, f"{base}_c", [cout]), full], [merged_shape], axis=0
            )
        )
        merged = f"{base}_merged"
        new.append(helper.make_node("Reshape", [interleaved, merged_shape], [merged]))
        big = np.iinfo(np.int64).max
        starts = _int_const(graph, f"{base}_starts", p_begin)
        ends = _int_const(graph, f"{base}_ends", [-c if c else big for c in crop_end])
        axes = _int_const(graph, f"{base}_axes", list(range(2, 2 + nd)))
        new.append(
            helper.make_node("Slice", [merged, starts, ends, axes], [node.output[0]], name=f"{base}/Crop")
        )
        index = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, n in enumerate(new):
            graph.node.insert(index + offset, n)
        _drop_unused_initializers(graph, node.input[1:])
        done.append(node.name or node.output[0])
    return done
