"""greedy.onnx: the whole greedy decode in one onnxruntime call.

Composed from the bundle's own exported fp32 encoder (with the BOS pass folded in) and
decoder graphs, node for node, so its numbers are theirs:

    encoder nodes              -> z, bos, cross.*, first_scores, first.* (the BOS pass)
    pick(first_scores)         -> the first n items, the blocked mask
    Loop(passes):              one decoder pass per iteration, the carried state being
      decoder nodes              the last picks (the pass's tokens), the start position,
      pick(head_scores)          the blocked mask and the KV cache (past -> present)
    Concat                     -> order (B, (passes + 1) * n), scores (B, (passes + 1) * n)

`pick` is service/decoding.py's greedy pick written as graph nodes: head j, in turn, takes
its best candidate not blocked (padding, chosen by an earlier pass or an earlier head of
this pass), ties to the lowest index (ArgMax's first index, as numpy's and torch's
argmax); its score is the head's raw score there (-inf when nothing was left: the engine
turns that slot into -1). A non-finite head score (NaN or +inf, from extreme features)
is picked as numpy picks it and surfaces as a non-finite score, so the engine's
valid_lists refuses the list exactly as on the multi-call path.

Inputs: the encoder's, and `passes` () int64, the decoder passes after the BOS one:
ceil(K / n) - 1 >= 1 for lists of length K (K <= n needs no decoder pass: the encoder
call alone is the whole decode). Every pass feeds all n picks (a pass whose picks are fed
on is never the last, so it always chose n items); the engine keeps the first K slots.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract.bundle import (
    ENCODER_INPUTS,
    FIRST_SCORES,
    GREEDY_INPUTS,
    GREEDY_OUTPUTS,
    cross_names,
    first_names,
    past_names,
    present_names,
)

_OUTER = ("z", "bos", "cand_mask")  # decoder inputs the encoder already has, by name
NEG_INF = "greedy/neg_inf"  # (B, 1, 1) float32 -inf: what a pick writes into blocked


class _Nodes:
    """A node list with fresh value names under a prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.count = prefix, 0
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs: Any) -> list[str]:
        self.count += 1
        names = [f"{self.prefix}{op_type}_{self.count}_{i}" for i in range(outputs)]
        name = f"{self.prefix}{op_type}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, names, name, **attrs))
        return names

    def const(self, value: np.ndarray) -> str:
        return self.op("Constant", [], value=numpy_helper.from_array(value))[0]


def _pick(g: _Nodes, head: str, blocked: str, n: int) -> tuple[str, str, str]:
    """head (B, n, M) float32, blocked (B, 1, M) float32 (0 = available, -inf = not)
    -> picks (B, n) int64, their scores (B, n) float32, the blocked mask after them.
    Head j in turn: s = head_j + blocked; TopK(1) gives numpy's argmax (the first index
    among ties, the first NaN if any) and s there; then blocked[pick] = -inf (the outer
    scope's NEG_INF, (B, 1, 1))."""
    split = g.op("Split", [head], outputs=n, axis=1, num_outputs=n)  # (B, 1, M) each
    one = g.const(np.array([1], np.int64))
    picks, scores = [], []
    for j in range(n):
        s = g.op("Add", [split[j], blocked])[0]
        score, pick = g.op("TopK", [s, one], outputs=2, axis=2)  # (B, 1, 1) each
        scores.append(score)
        picks.append(pick)
        blocked = g.op("ScatterElements", [blocked, pick, NEG_INF], axis=2)[0]
    flat = g.const(np.array([0, n], np.int64))
    picks_bn = g.op("Reshape", [g.op("Concat", picks, axis=1)[0], flat])[0]
    scores_bn = g.op("Reshape", [g.op("Concat", scores, axis=1)[0], flat])[0]
    return picks_bn, scores_bn, blocked


def _rename(graph: onnx.GraphProto, mapping: dict[str, str], prefix: str) -> None:
    """Every value and node name of graph gets prefix, except those mapping names."""

    def new(name: str) -> str:
        if not name:
            return name
        return mapping.get(name, prefix + name)

    for node in graph.node:
        node.input[:] = [new(x) for x in node.input]
        node.output[:] = [new(x) for x in node.output]
        node.name = prefix + node.name
    for init in graph.initializer:
        init.name = new(init.name)


def _loop_body(decoder: onnx.ModelProto, n: int, layers: int) -> onnx.GraphProto:
    """One decoder pass and its pick, as a Loop body: (iteration, cond, tokens, start,
    blocked, past...) -> (cond, picks, start + n, blocked, present..., picks, scores)."""
    dec = onnx.GraphProto()
    dec.CopyFrom(decoder.graph)
    carried = ["tokens", "start", *past_names(layers)]
    mapping = {name: f"loop/{name}" for name in carried}
    mapping |= {name: name for name in (*_OUTER, *cross_names(layers))}  # outer scope
    _rename(dec, mapping, "pass/")
    g = _Nodes("loop/")
    g.nodes.extend(dec.node)
    head = "pass/head_scores"
    picks, scores, blocked = _pick(g, head, "loop/blocked", n)
    start = g.op("Add", ["loop/start", g.const(np.array([n], np.int64))])[0]
    cond = g.op("Identity", ["loop/cond"])[0]
    tokens = g.op("Identity", [picks])[0]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("loop/iter", i64, []),
        helper.make_tensor_value_info("loop/cond", TensorProto.BOOL, []),
        helper.make_tensor_value_info("loop/tokens", i64, None),
        helper.make_tensor_value_info("loop/start", i64, None),
        helper.make_tensor_value_info("loop/blocked", f32, None),
        *(helper.make_tensor_value_info(mapping[p], f32, None) for p in past_names(layers)),
    ]
    outputs = [
        helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
        helper.make_tensor_value_info(tokens, i64, None),
        helper.make_tensor_value_info(start, i64, None),
        helper.make_tensor_value_info(blocked, f32, None),
        *(helper.make_tensor_value_info(f"pass/{p}", f32, None) for p in present_names(layers)),
        helper.make_tensor_value_info(picks, i64, None),
        helper.make_tensor_value_info(scores, f32, None),
    ]
    return helper.make_graph(g.nodes, "greedy_pass", inputs, outputs, list(dec.initializer))


def greedy_graph(
    encoder: onnx.ModelProto, decoder: onnx.ModelProto, n: int, layers: int
) -> onnx.ModelProto:
    """The one-call greedy decode (module docstring) from a first_pass encoder and the
    decoder of the same bundle and precision (fp32)."""
    enc_outputs = [o.name for o in encoder.graph.output]
    if FIRST_SCORES not in enc_outputs:
        raise ValueError("greedy.onnx needs an encoder that folds in the BOS pass")
    g = _Nodes("greedy/")
    g.nodes.extend(encoder.graph.node)
    # blocked (B, 1, M): 0 = available, -inf = padding; NEG_INF (B, 1, 1)
    zero, neg_inf = g.const(np.array(0, np.float32)), g.const(np.array(-np.inf, np.float32))
    blocked = g.op("Where", ["cand_mask", zero, neg_inf])[0]
    blocked = g.op("Unsqueeze", [blocked, g.const(np.array([1], np.int64))])[0]
    batch = g.op("Shape", ["cand_mask"], start=0, end=1)[0]
    b11 = g.op("Concat", [batch, g.const(np.array([1, 1], np.int64))], axis=0)[0]
    g.nodes.append(
        helper.make_node("ConstantOfShape", [b11], [NEG_INF],
                         value=numpy_helper.from_array(np.array([-np.inf], np.float32)))
    )  # fmt: skip
    picks0, scores0, blocked = _pick(g, FIRST_SCORES, blocked, n)
    body = _loop_body(decoder, n, layers)
    state = [picks0, g.const(np.array([1], np.int64)), blocked, *first_names(layers)]
    loop = g.op("Loop", ["passes", "", *state], outputs=len(state) + 2, body=body)
    loop_picks, loop_scores = loop[-2], loop[-1]  # (passes, B, n)
    flat = g.const(np.array([0, -1], np.int64))
    outs = []
    for first, scan in ((picks0, loop_picks), (scores0, loop_scores)):
        rows = g.op("Reshape", [g.op("Transpose", [scan], perm=[1, 0, 2])[0], flat])[0]
        outs.append(g.op("Concat", [first, rows], axis=1)[0])
    g.nodes.append(helper.make_node("Identity", [outs[0]], [GREEDY_OUTPUTS[0]]))
    g.nodes.append(helper.make_node("Identity", [outs[1]], [GREEDY_OUTPUTS[1]]))
    by_name = {i.name: i for i in encoder.graph.input}
    inputs = [by_name[name] for name in ENCODER_INPUTS]
    inputs.append(helper.make_tensor_value_info(GREEDY_INPUTS[-1], TensorProto.INT64, []))
    outputs = [
        helper.make_tensor_value_info(GREEDY_OUTPUTS[0], TensorProto.INT64, ["batch", "slots"]),
        helper.make_tensor_value_info(GREEDY_OUTPUTS[1], TensorProto.FLOAT, ["batch", "slots"]),
    ]
    graph = helper.make_graph(g.nodes, "greedy", inputs, outputs, list(encoder.graph.initializer))
    model = helper.make_model(graph, opset_imports=list(encoder.opset_import))
    model.ir_version = encoder.ir_version
    return model
