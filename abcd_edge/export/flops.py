"""FLOPs of an ONNX graph, counted from its shapes: Conv, ConvTranspose, MatMul, Gemm.

Convention (the manifest's ``flops_convention``): FLOPs = 2 x MACs; attention
counts as its MatMuls (QK^T and AV, plus the projections); bias adds, norms,
activations, softmax and resizes are not counted. This is the convention of
``torch.utils.flop_counter.FlopCounterMode``, which the exporter cross-checks.

Shapes come from ``onnx.shape_inference`` (with data propagation) after fixing
the dynamic batch axis to ``batch``; where that leaves a counted node's shapes
unknown (reshapes computed from ``Shape`` ops, as in attention), ONNX Runtime's
symbolic shape inference fills them in. A node whose shapes stay unknown is an
error, never a silent zero.
"""
from __future__ import annotations

import math
import os

COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


class FlopCountError(RuntimeError):
    """A counted node's shapes could not be inferred."""


def _fix_batch(model, batch: int) -> None:
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch


def _shape_table(model) -> dict[str, list]:
    table = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        table[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in model.graph.initializer:
        table[init.name] = list(init.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    table[node.output[0]] = list(a.t.dims)
    return table


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _node_macs(node, shapes: dict) -> int | None:
    """MACs of one node, or None when a needed shape is unknown."""
    op = node.op_type
    get = shapes.get
    if op == "Conv":
        w, y = get(node.input[1]), get(node.output[0])
        if not (_known(w) and _known(y)):
            return None
        # y [N, M, *out], w [M, C/g, *k]: every output element is a dot product of length C/g * prod(k)
        return math.prod(y) * math.prod(w[1:])
    if op == "ConvTranspose":
        x, w = get(node.input[0]), get(node.input[1])
        if not (_known(x) and _known(w)):
            return None
        # x [N, C, *in], w [C, M/g, *k]: every input element is scattered to M/g * prod(k) outputs
        return math.prod(x) * math.prod(w[1:])
    if op == "MatMul":
        a, b = get(node.input[0]), get(node.input[1])
        if not (_known(a) and _known(b)):
            return None
        a, b = list(a), list(b)
        if len(a) == 1:
            a = [1] + a
        if len(b) == 1:
            b = b + [1]
        n, k, m = a[-2], a[-1], b[-1]
        batch_a, batch_b = a[:-2], b[:-2]
        nb = max(len(batch_a), len(batch_b))
        batch_a = [1] * (nb - len(batch_a)) + batch_a
        batch_b = [1] * (nb - len(batch_b)) + batch_b
        batch = math.prod(max(x, y) for x, y in zip(batch_a, batch_b))
        return batch * n * k * m
    if op == "Gemm":
        a, b = get(node.input[0]), get(node.input[1])
        if not (_known(a) and _known(b)):
            return None
        attrs = {at.name: at.i for at in node.attribute}
        m_, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return m_ * k * n
    return 0


def count_flops(model, batch: int = 1) -> dict:
    """FLOPs (2 x MACs) of ``model`` (an ``onnx.ModelProto`` or a path) at ``batch``.

    Returns {"total", "by_op": {op: flops, "attention": flops}, "nodes": count,
    "shape_inference": "onnx" | "onnx+ort-symbolic", "batch"}. ``attention`` is the part
    of MatMul whose both operands are activations (QK^T and AV), already inside
    ``by_op["MatMul"]``. External weights are not loaded (shapes only).
    """
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    else:
        m2 = onnx.ModelProto()
        m2.CopyFrom(model)
        model = m2
    _fix_batch(model, batch)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = _shape_table(inferred)
    method = "onnx"
    counted = [n for n in inferred.graph.node if n.op_type in COUNTED_OPS]
    if any(_node_macs(n, shapes) is None for n in counted):
        try:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            sym = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
            sym_shapes = _shape_table(sym)
            for k, v in sym_shapes.items():
                if not _known(shapes.get(k)) and _known(v):
                    shapes[k] = v
            method = "onnx+ort-symbolic"
        except Exception as exc:  # noqa: BLE001 - reported below as unknown shapes
            method = f"onnx (ort symbolic inference failed: {exc.__class__.__name__})"
    initializers = {i.name for i in inferred.graph.initializer}
    constants = {n.output[0] for n in inferred.graph.node if n.op_type == "Constant"}
    by_op = {op: 0 for op in COUNTED_OPS}
    by_op["attention"] = 0
    for node in counted:
        macs = _node_macs(node, shapes)
        if macs is None:
            raise FlopCountError(f"cannot infer the shapes of {node.op_type} node {node.name or node.output[0]!r} "
                                 f"(inputs {list(node.input)}; shape inference: {method})")
        by_op[node.op_type] += 2 * macs
        if node.op_type == "MatMul" and not any(i in initializers or i in constants for i in node.input[:2]):
            by_op["attention"] += 2 * macs
    total = sum(by_op[op] for op in COUNTED_OPS)
    return {"total": int(total), "by_op": {k: int(v) for k, v in by_op.items()}, "nodes": len(counted),
            "shape_inference": method, "batch": batch}
