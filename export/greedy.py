"""greedy.onnx: the whole greedy decode in one onnxruntime call.

Composed from the bundle's own exported fp32 encoder (with the BOS pass folded in), node
for node, and a decoder pass traced for the loop (LoopPassGraph: decoder.onnx's pass
without what only the BOS position needs, n steps a pass, so the tracer's shape
arithmetic folds away; the same float ops on every value it computes):

    encoder nodes              -> z, bos, cross.*, first_scores, first.* (the BOS pass)
    pick(first_scores)         -> the first n items, the blocked mask
    Loop(passes):              one decoder pass per iteration (its step embeddings
      loop pass nodes            chosen by the iteration number), the carried state being
      pick(head_scores)          the last picks (the pass's tokens), the blocked mask, the
                                 KV cache (past -> present) and the picks and scores so far
    Reshape                    -> order (B, (passes + 1) * n), scores (B, (passes + 1) * n)

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

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from contract.bundle import (
    ENCODER_INPUTS,
    FIRST_SCORES,
    GREEDY_INPUTS,
    GREEDY_OUTPUTS,
    cross_names,
    decoder_outputs,
    first_names,
    past_names,
    present_names,
)
from export.fused import MS_DOMAIN
from export.graphs import decode_blocks, example_inputs
from export.simplify import simplify
from model.network import GenReranker

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


def _pick(
    g: _Nodes, head: str, blocked: str, n: int, done: tuple[str, str] | None
) -> tuple[str, str, str, str]:
    """head (B, n, M) float32, blocked (B, 1, M) float32 (0 = available, -inf = not),
    done: the picks and scores of the earlier passes (B, S, 1) each, or None
    -> tokens (B, n, 1) int64 (this pass's picks), the picks so far (B, S + n, 1), their
    scores (B, S + n, 1) float32, the blocked mask after them. Head j in turn:
    s = head_j + blocked; TopK(1) gives numpy's argmax (the first index among ties, the
    first NaN if any) and s there; then blocked[pick] = -inf (the outer scope's NEG_INF,
    (B, 1, 1))."""
    split = g.op("Split", [head], outputs=n, axis=1, num_outputs=n)  # (B, 1, M) each
    one = g.const(np.array([1], np.int64))
    picks, scores = [], []
    for j in range(n):
        s = g.op("Add", [split[j], blocked])[0]
        score, pick = g.op("TopK", [s, one], outputs=2, axis=2)  # (B, 1, 1) each
        scores.append(score)
        picks.append(pick)
        blocked = g.op("ScatterElements", [blocked, pick, NEG_INF], axis=2)[0]
    tokens = g.op("Concat", picks, axis=1)[0]  # (B, n, 1): the next pass's gather index
    if done is None:
        return tokens, tokens, g.op("Concat", scores, axis=1)[0], blocked
    order = g.op("Concat", [done[0], tokens], axis=1)[0]
    return tokens, order, g.op("Concat", [done[1], *scores], axis=1)[0], blocked


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


def _loop_body(loop_pass: onnx.ModelProto, n: int, layers: int) -> onnx.GraphProto:
    """One decoder pass (loop_pass_graph) and its pick, as a Loop body: (iteration, cond,
    tokens, blocked, past..., order, scores) -> (cond, tokens, blocked, present...,
    order, scores), order and scores (B, S, 1) growing by n a pass (no scan outputs: the
    Loop's last state is the decode, read without a Transpose per output)."""
    dec = onnx.GraphProto()
    dec.CopyFrom(loop_pass.graph)
    carried = ["iter", "tokens", *past_names(layers)]
    mapping = {name: f"loop/{name}" for name in carried}
    mapping |= {name: name for name in (*_OUTER, *cross_names(layers))}  # outer scope
    _rename(dec, mapping, "pass/")
    g = _Nodes("loop/")
    g.nodes.extend(dec.node)
    head = "pass/head_scores"
    done = ("loop/order", "loop/scores")
    tokens, order, scores, blocked = _pick(g, head, "loop/blocked", n, done)
    cond = "loop/cond"  # passed through: an Identity would be one more kernel a pass
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("loop/iter", i64, []),
        helper.make_tensor_value_info("loop/cond", TensorProto.BOOL, []),
        helper.make_tensor_value_info("loop/tokens", i64, None),
        helper.make_tensor_value_info("loop/blocked", f32, None),
        *(helper.make_tensor_value_info(mapping[p], f32, None) for p in past_names(layers)),
        helper.make_tensor_value_info("loop/order", i64, None),
        helper.make_tensor_value_info("loop/scores", f32, None),
    ]
    outputs = [
        helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
        helper.make_tensor_value_info(tokens, i64, None),
        helper.make_tensor_value_info(blocked, f32, None),
        *(helper.make_tensor_value_info(f"pass/{p}", f32, None) for p in present_names(layers)),
        helper.make_tensor_value_info(order, i64, None),
        helper.make_tensor_value_info(scores, f32, None),
    ]
    return helper.make_graph(g.nodes, "greedy_pass", inputs, outputs, list(dec.initializer))


def _hoist(body: onnx.GraphProto) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Loop-invariant code motion: the body's nodes that read only outer-scope values,
    initializers and constants (e.g. the transposed z of the heads' product, the cast
    candidate mask of the cross-attention) move out, to run once before the loop; the
    initializers and Constant nodes they read move with them (the body then reads those
    from the outer scope). -> (nodes, initializers) for the outer graph, in order."""
    produced = {o for node in body.node for o in node.output}
    inits = {t.name: t for t in body.initializer}
    loop_inputs = {v.name for v in body.input}
    const_nodes = {node.output[0]: node for node in body.node if node.op_type == "Constant"}

    def invariant(name: str) -> bool:
        if not name or name in inits or name in const_nodes:
            return True
        return name not in produced and name not in loop_inputs  # outer scope

    hoisted: list[onnx.NodeProto] = []
    moved_inits: dict[str, onnx.TensorProto] = {}
    moved_consts: dict[str, onnx.NodeProto] = {}
    done: set[str] = set()
    for node in body.node:
        subgraph = any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute)
        if node.op_type == "Constant" or subgraph:
            continue
        if all(invariant(x) or x in done for x in node.input):
            for x in node.input:
                if x in inits:
                    moved_inits[x] = inits[x]
                elif x in const_nodes:
                    moved_consts[x] = const_nodes[x]
            hoisted.append(node)
            done.update(node.output)
    gone = {id(n) for n in hoisted} | {id(n) for n in moved_consts.values()}
    keep = [onnx.NodeProto.FromString(n.SerializeToString()) for n in body.node
            if id(n) not in gone]  # fmt: skip
    out_nodes = [onnx.NodeProto.FromString(n.SerializeToString())
                 for n in [*moved_consts.values(), *hoisted]]  # fmt: skip
    out_inits = [onnx.TensorProto.FromString(t.SerializeToString())
                 for t in moved_inits.values()]  # fmt: skip
    kept_inits = [onnx.TensorProto.FromString(t.SerializeToString())
                  for t in body.initializer if t.name not in moved_inits]  # fmt: skip
    del body.node[:]
    body.node.extend(keep)
    del body.initializer[:]
    body.initializer.extend(kept_inits)
    return out_nodes, out_inits


def greedy_graph(
    encoder: onnx.ModelProto, loop_pass: onnx.ModelProto, n: int, layers: int
) -> onnx.ModelProto:
    """The one-call greedy decode (module docstring) from a first_pass fp32 encoder and the
    same model's loop pass (loop_pass_graph; decoder.onnx works too, a few nodes more)."""
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
    tokens, order, scores, blocked = _pick(g, FIRST_SCORES, blocked, n, None)
    body = _loop_body(loop_pass, n, layers)
    hoisted, hoisted_inits = _hoist(body)
    g.nodes.extend(hoisted)
    state = [tokens, blocked, *first_names(layers), order, scores]
    loop = g.op("Loop", ["passes", "", *state], outputs=len(state), body=body)
    flat = g.const(np.array([0, -1], np.int64))
    for name, last in zip(GREEDY_OUTPUTS, loop[-2:], strict=True):  # (B, slots, 1)
        g.nodes.append(helper.make_node("Reshape", [last, flat], [name]))
    by_name = {i.name: i for i in encoder.graph.input}
    inputs = [by_name[name] for name in ENCODER_INPUTS]
    inputs.append(helper.make_tensor_value_info(GREEDY_INPUTS[-1], TensorProto.INT64, []))
    outputs = [
        helper.make_tensor_value_info(GREEDY_OUTPUTS[0], TensorProto.INT64, ["batch", "slots"]),
        helper.make_tensor_value_info(GREEDY_OUTPUTS[1], TensorProto.FLOAT, ["batch", "slots"]),
    ]
    initializers = [*encoder.graph.initializer, *hoisted_inits]
    graph = helper.make_graph(g.nodes, "greedy", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=list(encoder.opset_import))
    model.ir_version = encoder.ir_version
    return model


class LoopPassGraph(nn.Module):
    """A decode pass inside the loop: tokens (B, n, 1) int64 (the previous pass's picks, all
    real candidates), iter () int64 (the Loop's iteration: pass iter + 1, its steps at
    positions 1 + iter * n .. (iter + 1) * n), z (B, M, d), cand_mask (B, M),
    cross.{i}.key/value, past_key_values.{i}.key/value -> head_scores (B, n, M),
    present.{i}.key/value. export.graphs.decode_pass at T = n without its BOS select
    (torch.where(pos == 0, bos, items): items at every position >= 1), so the same values;
    the step embeddings of a pass are one row of a (passes, n, d) copy of step_emb (one
    Gather by the iteration, where positions from a carried start cost three nodes)."""

    def __init__(self, model: GenReranker, fused_ops: bool) -> None:
        super().__init__()
        self.model, self.fused_ops = model, fused_ops
        self.layers, self.n = model.cfg.dec_layers, model.cfg.omtp_heads
        passes = (model.cfg.max_steps - 1) // self.n  # the passes whose steps all fit
        if passes < 1:
            raise ValueError(f"greedy.onnx needs max_steps > n ({model.cfg.max_steps} <= {self.n})")
        rows = model.step_emb.weight.detach()[1 : 1 + passes * self.n]
        self.steps: torch.Tensor
        self.register_buffer("steps", rows.reshape(passes, self.n, -1).clone())

    def forward(
        self, tokens: torch.Tensor, it: torch.Tensor, z: torch.Tensor,
        cand_mask: torch.Tensor, *kv: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        L, m = self.layers, self.model
        cross = [(kv[2 * i], kv[2 * i + 1]) for i in range(L)]
        past = [(kv[2 * L + 2 * i], kv[2 * L + 2 * i + 1]) for i in range(L)]
        # the index broadcast by adding zeros: two nodes, where expand(-1, -1, d) traces to 7
        index = tokens + torch.zeros(1, 1, z.shape[-1], dtype=torch.long)
        items = z.gather(1, index)  # (B, n, d)
        steps = self.steps[it]  # (n, d): step_emb at this pass's positions
        scores, present = decode_blocks(m, items, z, cand_mask, cross, past, self.fused_ops, steps)
        return scores, *present


def loop_pass_graph(model: GenReranker, opset: int, fused_ops: bool) -> onnx.ModelProto:
    """LoopPassGraph traced (dynamo=False, as export/graphs.py) and simplified, fp32."""
    L, n = model.cfg.dec_layers, model.cfg.omtp_heads
    _tokens, _start, z, _bos, mask, *kv = example_inputs(model, "fp32")["decoder"]
    tokens = (torch.arange(n).repeat(z.shape[0], 1) % z.shape[1])[..., None]  # (B, n, 1)
    it = torch.tensor(1, dtype=torch.long)  # the second loop pass
    inputs = ["tokens", "iter", "z", "cand_mask", *cross_names(L), *past_names(L)]
    outputs = decoder_outputs(L)
    bm, kv_m = {0: "batch", 1: "candidates"}, {0: "batch", 2: "candidates"}
    axes: dict[str, dict[int, str]] = {"tokens": {0: "batch"}, "z": bm, "cand_mask": bm}
    axes |= dict.fromkeys(cross_names(L), kv_m)
    axes |= {name: {0: "batch", 2: "past"} for name in past_names(L)}
    axes |= {name: {0: "batch", 2: "past_plus_steps"} for name in present_names(L)}
    axes |= {"head_scores": {0: "batch", 2: "candidates"}}
    module = LoopPassGraph(model, fused_ops).eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings: see export/graphs.py
        path = Path(tmp) / "loop_pass.onnx"
        torch.onnx.export(
            module, (tokens, it, z, mask, *kv), str(path), input_names=inputs,
            output_names=outputs, dynamic_axes=axes, opset_version=opset,
            do_constant_folding=True, dynamo=False, custom_opsets={MS_DOMAIN: 1},
        )  # fmt: skip
        return simplify(onnx.load(str(path)))
