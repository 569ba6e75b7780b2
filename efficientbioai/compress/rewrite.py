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

import numpy as np

_MODES = {"nearest", "linear"}  # cubic weights also sum to one but are not worth the risk


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
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    ):
        return []  # control flow (If / Loop) may read tensors implicitly: node order is not ours to change
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
            resize.input[3] = name
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
