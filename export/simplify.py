"""Fold the tracer's shape arithmetic out of an exported graph (export-time only).

The TorchScript tracer records every `x.view(B, T, nh, d // nh)` as Shape -> Gather ->
Unsqueeze -> Concat -> Reshape, even where the dims are static (d, nh) or are just "keep
this axis" (B, T). A decode pass at batch 1 is ~100 tiny kernels, and onnxruntime spends
a fixed cost per node whatever its size, so these dominate. With symbolic shapes (onnxruntime's
symbolic shape inference), this pass
- evaluates small int64 shape subgraphs: a value whose elements are all known becomes an
  initializer (e.g. the Slice bounds of qkv.chunk(3), d // nh);
- rewrites Reshape targets with ONNX's own conventions: 0 = copy the input's dim at the
  same index (B, T kept), -1 = infer (at most one);
- drops the nodes nothing reads any more;
- gives a graph output the static sizes inference found for it.
The math is untouched; the parity tests (varying B, M, T, P, including P = 0) check it.
If shape inference fails, the graph is returned as is (correct, only slower).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

Elem = int | str | None  # a known int, a symbolic dim, or unknown
_MAX_FOLD = 16  # only small int vectors are shape arithmetic


def _symbolic_dims(model: onnx.ModelProto) -> dict[str, list[Elem]] | None:
    try:  # needs sympy (a torch dependency, so present wherever export runs)
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError as e:
        log.warning("no symbolic shape inference (%s): graph left as exported", e)
        return None
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # on failure the tool saves a debug model into the working directory
        try:
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        except Exception as e:
            log.warning("symbolic shape inference failed (%s): graph left as exported", e)
            return None
        finally:
            os.chdir(cwd)
    g = inferred.graph
    dims: dict[str, list[Elem]] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            dims[vi.name] = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in t.shape.dim
            ]
    return dims


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Values:
    """Partially known small int64 tensors: name -> (rank 0 | 1, elements)."""

    def __init__(self, model: onnx.ModelProto, dims: dict[str, list[Elem]]) -> None:
        self.dims = dims
        self.v: dict[str, tuple[int, list[Elem]]] = {}
        for init in model.graph.initializer:
            self._const(init.name, numpy_helper.to_array(init))

    def _const(self, name: str, arr: np.ndarray) -> None:
        if arr.dtype.kind == "i" and arr.ndim <= 1 and arr.size <= _MAX_FOLD:
            self.v[name] = (arr.ndim, [int(x) for x in arr.reshape(-1)])

    def get(self, name: str) -> tuple[int, list[Elem]] | None:
        return self.v.get(name)

    def visit(self, node: onnx.NodeProto) -> None:
        op, ins, out = node.op_type, node.input, node.output[0] if node.output else ""
        args = [self.v.get(i) for i in ins]
        if op == "Constant":
            value = _attr(node, "value")
            if value is not None:
                self._const(out, numpy_helper.to_array(value))
        elif op == "Shape" and ins[0] in self.dims:
            d = self.dims[ins[0]]
            start, end = _attr(node, "start", 0), _attr(node, "end", len(d))
            self.v[out] = (1, list(d[start:end]))
        elif op in ("Identity", "Cast") and args[0] is not None:
            if op == "Identity" or _attr(node, "to") == onnx.TensorProto.INT64:
                self.v[out] = args[0]
        elif op == "Gather" and args[0] and args[1] and _attr(node, "axis", 0) == 0:
            (_, data), (rank, idx) = args[0], args[1]
            ints = [i for i in idx if isinstance(i, int)]
            if len(ints) == len(idx):
                self.v[out] = (rank, [data[i] for i in ints])
        elif op == "Unsqueeze" and args[0] and args[0][0] == 0:
            self.v[out] = (1, args[0][1])
        elif op == "Squeeze" and args[0] and len(args[0][1]) == 1:
            self.v[out] = (0, args[0][1])
        elif op == "Concat" and all(a is not None and a[0] == 1 for a in args):
            self.v[out] = (1, [e for a in args if a for e in a[1]])
        elif op in ("Add", "Sub", "Mul", "Div") and args[0] and args[1]:
            self.v[out] = _arith(op, args[0], args[1])


def _arith(op: str, a: tuple[int, list[Elem]], b: tuple[int, list[Elem]]) -> tuple[int, list[Elem]]:
    (ra, xa), (rb, xb) = a, b
    n = max(len(xa), len(xb))
    xa, xb = (xa * n if len(xa) == 1 else xa), (xb * n if len(xb) == 1 else xb)
    out: list[Elem] = []
    for x, y in zip(xa, xb, strict=True):
        if not (isinstance(x, int) and isinstance(y, int)):
            out.append(None)
        elif op == "Add":
            out.append(x + y)
        elif op == "Sub":
            out.append(x - y)
        elif op == "Mul":
            out.append(x * y)
        else:
            out.append(x // y if y else None)  # int64 Div truncates; shapes are >= 0
    return max(ra, rb), out


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with static shape arithmetic folded and Reshapes rewritten."""
    dims = _symbolic_dims(model)
    if dims is None:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    values = _Values(out, dims)
    keep: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    graph_outputs = {o.name for o in g.output}
    folded = reshaped = 0
    for node in g.node:
        values.visit(node)
        known = [k for k in (values.get(o) for o in node.output) if k is not None]
        if (
            node.op_type != "Constant"
            and node.output
            and len(known) == len(node.output)
            and not graph_outputs.intersection(node.output)
            and all(isinstance(e, int) for _, elems in known for e in elems)
        ):
            for name, (rank, elems) in zip(node.output, known, strict=True):
                arr = np.array(elems, np.int64).reshape(() if rank == 0 else (-1,))
                new_inits.append(numpy_helper.from_array(arr, name))
            folded += 1
            continue
        if node.op_type == "Reshape" and not _attr(node, "allowzero", 0):
            target = _reshape_target(node, values, dims)
            if target is not None:
                name = f"{node.output[0]}__shape"
                new_inits.append(numpy_helper.from_array(np.array(target, np.int64), name))
                node.input[1] = name
                reshaped += 1
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    removed = _prune(g)
    _static_output_dims(g, dims)
    log.info("simplify: %d shape nodes folded, %d reshapes rewritten, %d dead nodes dropped",
             folded, reshaped, removed)  # fmt: skip
    return out


def _static_output_dims(g: onnx.GraphProto, dims: dict[str, list[Elem]]) -> None:
    """An output axis the exporter left symbolic but inference knows (after a contrib op,
    whose shapes torch's exporter cannot infer: the heads axis of head_scores) gets its
    size, so the manifest states it."""
    for out in g.output:
        known = dims.get(out.name)
        shape = out.type.tensor_type.shape
        if known is None or len(known) != len(shape.dim):
            continue
        for dim, size in zip(shape.dim, known, strict=True):
            if isinstance(size, int) and dim.HasField("dim_param"):
                dim.dim_value = size


def _reshape_target(
    node: onnx.NodeProto, values: _Values, dims: dict[str, list[Elem]]
) -> list[int] | None:
    shape = values.get(node.input[1])
    data = dims.get(node.input[0])
    if shape is None or data is None:
        return None
    target: list[int] = []
    for i, e in enumerate(shape[1]):
        if isinstance(e, int):
            target.append(e if e != 0 else -2)  # a literal 0-sized dim: leave this reshape
        elif e is not None and i < len(data) and data[i] == e:
            target.append(0)  # the same symbolic dim as the input's at this index
        else:
            target.append(-1)
    if -2 in target or target.count(-1) > 1:
        return None
    return target


def _prune(g: onnx.GraphProto) -> int:
    """Drop nodes whose outputs nobody reads, then unused initializers."""
    removed = 0
    while True:
        used = {o.name for o in g.output} | {i for n in g.node for i in n.input}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
        removed += len(dead)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    unused = [t for t in g.initializer if t.name not in used]
    for t in unused:
        g.initializer.remove(t)
    return removed
