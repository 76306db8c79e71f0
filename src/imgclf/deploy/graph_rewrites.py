"""Rewrites of an ONNX graph that give the same results and let ONNX Runtime run the int8 model on uint8
from end to end (in place; each returns how many places it changed)."""
from __future__ import annotations

import numpy as np


def relu_before_maxpool(model) -> int:
    """Rewrite MaxPool -> Relu as Relu -> MaxPool in an ONNX graph (in place; returns how many).

    Max-pooling commutes with any non-decreasing function, so the result is identical. Models pool before
    the ReLU to save training time (seed-cnn), but int8 needs ReLU first: a quantized Conv+ReLU then feeds
    MaxPool with one scale, ORT runs the pool on uint8 in NHWC, and the float round trips and layout
    reorders around every pool disappear (seed-cnn: int8 went from ~0.5x to >1x the speed of fp32)."""
    return _pool_first_swapped(model, "Relu", lambda node, consts: True)


def bn_before_maxpool(model) -> int:
    """Rewrite MaxPool -> BatchNormalization as BatchNormalization -> MaxPool (in place; returns how many),
    where every channel's BatchNorm scale is positive: then BatchNorm is an increasing map per channel and
    commutes with max-pooling, so the result is the same up to float rounding. The BatchNorm then follows
    the convolution and ORT folds it into the conv's weights (FastNet pools between the two: its int8 model
    ran 680 -> 806 img/s, fp32 lost a separate BatchNorm pass too)."""
    def positive_scale(bn, consts) -> bool:
        return all(n in consts for n in bn.input[1:5]) and bool(np.all(consts[bn.input[1]] > 0))
    return _pool_first_swapped(model, "BatchNormalization", positive_scale)


def _constants(graph) -> dict[str, np.ndarray]:
    """Values known in the graph: initializers, Constant nodes, and Identity copies of those."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Identity" and n.input[0] in consts:
            consts[n.output[0]] = consts[n.input[0]]
        elif n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return consts


def _pool_first_swapped(model, op_type: str, allowed) -> int:
    """Move each ``op_type`` node that alone consumes a MaxPool's output in front of that MaxPool, where
    ``allowed(node, constants)`` says the two commute."""
    import onnx

    g = model.graph
    consts = _constants(g)
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in g.node]
    users: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            users.setdefault(name, []).append(n)
    outputs = {o.name for o in g.output}
    moved: set[str] = set()
    for k, pool in enumerate(nodes):
        if pool.op_type != "MaxPool" or len(pool.output) != 1 or pool.output[0] in outputs:
            continue
        after = users.get(pool.output[0], [])
        if len(after) != 1 or after[0].op_type != op_type or not allowed(after[0], consts):
            continue
        op = after[0]
        x, mid, y = pool.input[0], pool.output[0], op.output[0]
        op.input[0], op.output[0], pool.input[0], pool.output[0] = x, mid, mid, y
        j = nodes.index(op)
        nodes[k], nodes[j] = op, pool  # keep the node list topologically sorted
        moved.add(mid)
    if moved:
        del g.node[:]
        g.node.extend(nodes)
        kept = [v for v in g.value_info if v.name not in moved]  # `mid` changed shape: drop its old one
        del g.value_info[:]
        g.value_info.extend(kept)
    return len(moved)


def output_layers(model) -> list[str]:
    """Names of the Gemm/MatMul/Conv nodes that write a graph output (the classifier head), directly or
    through elementwise arithmetic with constants (FastNet's head divides its logits by a scale)."""
    g = model.graph
    consts = _constants(g)
    producer = {o: n for n in g.node for o in n.output}
    found = []
    for out in g.output:
        node = producer.get(out.name)
        while node is not None and node.op_type in ("Div", "Mul", "Add", "Sub", "Identity"):
            inputs = [i for i in node.input if i not in consts]
            node = producer.get(inputs[0]) if len(inputs) == 1 else None
        if node is not None and node.op_type in ("Gemm", "MatMul", "Conv"):
            found.append(node.name)
    return found
