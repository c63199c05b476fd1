"""The three ONNX graphs of the bundle: small wrapper modules around GenReranker, and the
exporter call.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`, on purpose.
- torch 2.13's default (dynamo=True, torch.export + onnxscript) needs `onnxscript`, which is
  not a dependency of this project (not in the venv either).
- More to the point, the decoder's first pass runs with an EMPTY past (P = 0) and often one
  step (T = 1); torch.export specializes dimensions it sees at size 0 or 1, so an
  explicit-KV graph exported that way needs example inputs and constraints chosen around
  that, or it silently becomes static. The tracer records the shape arithmetic
  (Shape/Gather/Range) instead, so batch, candidates, steps and past all stay symbolic; the
  parity tests run it at P = 0 and P > 0, T = 1..n, several B and M.
Example inputs use distinct sizes (B=2, M=5, T=3, P=4) so no two axes are confused.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from contract.bundle import (
    FIRST_SCORES,
    ITEM_TOWER_INPUTS,
    ITEM_TOWER_OUTPUTS,
    cross_names,
    first_names,
    io_names,
    past_names,
    present_names,
)
from export import fused
from export.simplify import simplify
from model.network import GenReranker
from model.tensors import Inputs

# the dtype of the tensors that only travel between graphs (z, bos, keys/values); the
# service-facing inputs and outputs (features, static embeddings, head scores) stay float32
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # only when it changes something: the tracer records even a no-op .to() as a Cast node
    return x if x.dtype == dtype else x.to(dtype)


def _cast(model: GenReranker, precision: str) -> GenReranker:
    # a copy: the caller's fp32 model stays the parity reference
    return model if precision == "fp32" else copy.deepcopy(model).to(_DTYPES[precision])


class ItemTowerGraph(nn.Module):
    """item_id (N,), item_cat (N, Fc), item_dense (N, Fd) -> static (N, d) float32."""

    def __init__(self, model: GenReranker, precision: str) -> None:
        super().__init__()
        self.model = _cast(model, precision)
        self.dtype = _DTYPES[precision]

    def forward(
        self, item_id: torch.Tensor, item_cat: torch.Tensor, item_dense: torch.Tensor
    ) -> torch.Tensor:
        static = self.model.item_tower(item_id, item_cat, _to(item_dense, self.dtype))
        return _to(static, torch.float32)


class EncoderGraph(nn.Module):
    """static (B, M, d), upstream_score (B, M), cand_mask (B, M), user_id (B,),
    user_dense (B, Fu) -> z (B, M, d), bos (B, d), cross.{i}.key/value (B, nh, M, hd)
    and, with first_pass, the decoder's BOS pass folded in (decode_pass at tokens = BOS,
    start = 0, an empty past): first_scores (B, n, M) float32, first.{i}.key/value
    (B, nh, 1, hd). The service then starts decoding at the second pass: one onnxruntime
    call per batch less, the same numbers as the decoder graph's BOS pass."""

    def __init__(
        self, model: GenReranker, precision: str, first_pass: bool = True, fused_ops: bool = False
    ) -> None:
        super().__init__()
        self.model = _cast(model, precision)
        self.dtype = _DTYPES[precision]
        self.first_pass = first_pass
        self.fused_ops = fused_ops

    def forward(
        self,
        static: torch.Tensor,
        upstream_score: torch.Tensor,
        cand_mask: torch.Tensor,
        user_id: torch.Tensor,
        user_dense: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        unused = user_id.new_empty(0)  # encode() reads no item features: static replaces them
        inp = Inputs(
            item_id=unused,
            item_cat=unused,
            item_dense=unused,
            upstream_score=_to(upstream_score, self.dtype),
            cand_mask=cand_mask,
            user_id=user_id,
            user_dense=_to(user_dense, self.dtype),
        )
        if self.fused_ops:
            z, bos, *kv = fused.encode(self.model, _to(static, self.dtype), inp)
            cross_kv = [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]
        else:
            enc = self.model.encode(_to(static, self.dtype), inp)
            z, bos, cross_kv = enc.z, enc.bos, list(enc.cross_kv)
        outs = (z, bos, *(t for kv in cross_kv for t in kv))
        if not self.first_pass:
            return outs
        if self.fused_ops:
            scores, present = fused.first_pass(self.model, bos, z, cand_mask, cross_kv)
            return (*outs, _to(scores, torch.float32), *present)
        cfg, B = self.model.cfg, static.shape[0]
        hd = cfg.d_model // cfg.n_attn_heads
        empty = z.new_zeros((B, cfg.n_attn_heads, 0, hd))
        bos_tokens = user_id.new_full((B, 1), -1)  # (B, 1) int64: BOS
        scores, present = decode_pass(
            self.model, bos_tokens, user_id.new_zeros(1), z, bos, cand_mask,
            cross_kv, [(empty, empty)] * cfg.dec_layers, self.fused_ops,
        )  # fmt: skip
        return (*outs, scores, *present)


def step_inputs(
    m: GenReranker, tokens: torch.Tensor, start: torch.Tensor, z: torch.Tensor, bos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's input steps, as GenReranker.decode embeds them, before the step
    embedding is added: tokens (B, T) at absolute positions start + t (BOS = -1 at position
    0) -> (the items or BOS (B, T, d), their step embeddings (T, d))."""
    T = tokens.shape[1]
    pos = start + torch.arange(T, device=tokens.device)  # (T,) absolute step positions
    items = z.gather(1, tokens.clamp(min=0).unsqueeze(-1).expand(-1, -1, z.shape[-1]))
    return torch.where((pos == 0)[:, None], bos[:, None, :], items), m.step_emb(pos)


def embed_steps(
    m: GenReranker, tokens: torch.Tensor, start: torch.Tensor, z: torch.Tensor, bos: torch.Tensor
) -> torch.Tensor:
    """step_inputs summed: x (B, T, d)."""
    x, steps = step_inputs(m, tokens, start, z, bos)
    return x + steps


def decode_pass(
    m: GenReranker,
    tokens: torch.Tensor,
    start: torch.Tensor,
    z: torch.Tensor,
    bos: torch.Tensor,
    cand_mask: torch.Tensor,
    cross: list[tuple[torch.Tensor, torch.Tensor]],
    past: list[tuple[torch.Tensor, torch.Tensor]],
    fused_ops: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """GenReranker.decode, step for step, with explicit KV tensors and the OMTP heads read
    at the LAST position only (decoding consumes nothing else, and it saves the
    (B, T*n, d) x (B, d, M) product of the other steps) -> head scores (B, n, M) float32,
    present keys/values per layer (B, nh, P + T, hd). fused_ops: the blocks as
    export/fused.py writes them (onnxruntime's fused attention and LayerNorm kernels)."""
    x, steps = step_inputs(m, tokens, start, z, bos)
    return decode_blocks(m, x, z, cand_mask, cross, past, fused_ops, steps)


def decode_blocks(
    m: GenReranker,
    x: torch.Tensor,
    z: torch.Tensor,
    cand_mask: torch.Tensor,
    cross: list[tuple[torch.Tensor, torch.Tensor]],
    past: list[tuple[torch.Tensor, torch.Tensor]],
    fused_ops: bool = False,
    steps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """decode_pass after the embedding: x (B, T, d) the embedded steps, or with steps
    (T, d) the items whose step embeddings are still to be added (the fused graphs add
    them in the first LayerNorm's kernel) -> head scores at the last position (B, n, M)
    float32, present keys/values per layer (B, nh, P + T, hd)."""
    if fused_ops:
        scores, kv = fused.decode_blocks(m, x, z, cand_mask, cross, past, steps)
        return _to(scores, torch.float32), kv
    if steps is not None:
        x = x + steps
    B, T = x.shape[:2]
    P = past[0][0].shape[2]
    keys = torch.arange(P + T, device=x.device)
    causal = keys[None, :] <= (P + torch.arange(T, device=x.device))[:, None]  # (T, P + T)
    cand_visible = cand_mask[:, None, None, :]  # (B, 1, 1, M)
    present: list[torch.Tensor] = []
    for i, block in enumerate(m.dec_blocks):
        x, (k, v) = block(x, causal, past[i], cross[i], cand_visible)
        present += [k, v]
    h = m.dec_ln(x[:, -1])  # (B, d): the last position only
    n, d = m.cfg.omtp_heads, m.cfg.d_model
    q = m.heads(h).view(B, n, d)  # (B, n, d): W_1 h .. W_n h
    scores = (q @ z.transpose(1, 2)) * (1.0 / math.sqrt(d))  # (B, n, M)
    return _to(scores, torch.float32), present


class DecoderGraph(nn.Module):
    """One decode pass with explicit KV tensors (decode_pass).

    tokens (B, T) int64, start (1,) int64 (absolute position of tokens[:, 0]; 0 = BOS),
    z (B, M, d), bos (B, d), cand_mask (B, M) bool, then cross.{i}.key/value (B, nh, M, hd)
    and past_key_values.{i}.key/value (B, nh, P, hd) for every layer
    -> head_scores (B, n, M) float32, present.{i}.key/value (B, nh, P + T, hd)."""

    def __init__(self, model: GenReranker, precision: str, fused_ops: bool = False) -> None:
        super().__init__()
        self.model = _cast(model, precision)
        self.layers = model.cfg.dec_layers
        self.fused_ops = fused_ops

    def forward(
        self,
        tokens: torch.Tensor,
        start: torch.Tensor,
        z: torch.Tensor,
        bos: torch.Tensor,
        cand_mask: torch.Tensor,
        *kv: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        L = self.layers
        cross = [(kv[2 * i], kv[2 * i + 1]) for i in range(L)]
        past = [(kv[2 * L + 2 * i], kv[2 * L + 2 * i + 1]) for i in range(L)]
        scores, present = decode_pass(
            self.model, tokens, start, z, bos, cand_mask, cross, past, self.fused_ops
        )
        return scores, *present


def example_inputs(model: GenReranker, precision: str) -> dict[str, tuple[torch.Tensor, ...]]:
    """Tracing inputs per graph, with distinct sizes on every dynamic axis."""
    cfg, s = model.cfg, model.cfg.schema
    B, M, T, P, N = 2, 5, 3, 4, 7
    d, nh, L = cfg.d_model, cfg.n_attn_heads, cfg.dec_layers
    hd, dt = d // nh, _DTYPES[precision]
    g = torch.Generator().manual_seed(0)
    item = (
        torch.randint(1, s.item_id_buckets, (N,), generator=g),
        torch.stack([torch.randint(1, b, (N,), generator=g) for b in s.categorical_buckets], 1)
        if s.categorical_buckets
        else torch.zeros(N, 0, dtype=torch.long),
        torch.randn(N, len(s.item_dense), generator=g),
    )
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1, 3:] = False
    encoder = (
        torch.randn(B, M, d, generator=g),
        torch.randn(B, M, generator=g),
        mask,
        torch.randint(1, s.user_id_buckets, (B,), generator=g),
        torch.randn(B, len(s.user_dense), generator=g),
    )
    cross = tuple(torch.randn(B, nh, M, hd, generator=g).to(dt) for _ in range(2 * L))
    past = tuple(torch.randn(B, nh, P, hd, generator=g).to(dt) for _ in range(2 * L))
    decoder = (
        torch.randint(0, 3, (B, T), generator=g),
        torch.tensor([P], dtype=torch.long),
        torch.randn(B, M, d, generator=g).to(dt),
        torch.randn(B, d, generator=g).to(dt),
        mask,
        *cross,
        *past,
    )
    return {"item_tower": item, "encoder": encoder, "decoder": decoder}


def _dynamic_axes(graph: str, layers: int) -> dict[str, dict[int, str]]:
    bm = {0: "batch", 1: "candidates"}
    kv_m = {0: "batch", 2: "candidates"}
    if graph == "item_tower":
        return {name: {0: "items"} for name in ITEM_TOWER_INPUTS + ITEM_TOWER_OUTPUTS}
    if graph == "encoder":
        axes = {"static": bm, "upstream_score": bm, "cand_mask": bm, "z": bm}
        axes |= {"user_id": {0: "batch"}, "user_dense": {0: "batch"}, "bos": {0: "batch"}}
        axes |= {FIRST_SCORES: {0: "batch", 2: "candidates"}}
        axes |= {name: {0: "batch"} for name in first_names(layers)}
        return axes | dict.fromkeys(cross_names(layers), kv_m)
    axes = {"tokens": {0: "batch", 1: "steps"}, "z": bm, "bos": {0: "batch"}, "cand_mask": bm}
    axes |= dict.fromkeys(cross_names(layers), kv_m)
    axes |= {name: {0: "batch", 2: "past"} for name in past_names(layers)}
    axes |= {name: {0: "batch", 2: "past_plus_steps"} for name in present_names(layers)}
    return axes | {"head_scores": {0: "batch", 2: "candidates"}}


def graph_module(
    graph: str, model: GenReranker, precision: str, first_pass: bool = True, fused_ops: bool = False
) -> nn.Module:
    """fused_ops: the encoder and decoder with onnxruntime's fused kernels (export/fused.py),
    fp32 only: the fp16 (GPU) graphs keep the plain ops."""
    fused_ops = fused_ops and precision == "fp32"
    if graph == "encoder":
        return EncoderGraph(model, precision, first_pass, fused_ops).eval()
    if graph == "decoder":
        return DecoderGraph(model, precision, fused_ops).eval()
    return ItemTowerGraph(model, precision).eval()


def export_graph(
    graph: str,
    model: GenReranker,
    precision: str,
    path: Path,
    opset: int,
    metadata: dict[str, str],
    simplify_shapes: bool = True,
    first_pass: bool = True,
    fused_ops: bool = False,
) -> onnx.ModelProto:
    """Trace one graph to `path`, add the metadata (model config, ...), check it.
    first_pass: the encoder folds in the decoder's BOS pass (EncoderGraph); fused_ops:
    see graph_module."""
    module = graph_module(graph, model, precision, first_pass, fused_ops)
    args = example_inputs(model, precision)[graph]
    inputs, outputs = io_names(graph, model.cfg.dec_layers, first_pass)
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings about Python ints from shapes are expected: the shape arithmetic
        # is recorded as ONNX ops, which the dynamic-axes parity tests cover
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=_dynamic_axes(graph, model.cfg.dec_layers),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
            custom_opsets={fused.MS_DOMAIN: 1},
        )
    proto = onnx.load(str(path))
    if simplify_shapes:
        proto = simplify(proto)
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))
    return proto


def describe(proto: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Inputs/outputs of a graph as the manifest lists them: name, dtype, shape (symbolic
    axes by name)."""

    def one(v: onnx.ValueInfoProto) -> dict[str, Any]:
        t = v.type.tensor_type
        shape = [dim.dim_param or dim.dim_value for dim in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": shape}  # fmt: skip

    return {
        "inputs": [one(v) for v in proto.graph.input],
        "outputs": [one(v) for v in proto.graph.output],
    }


def metadata_props(config_json: str, graph: str, precision: str, version: str) -> dict[str, str]:
    return {
        "gref.model_config": config_json,
        "gref.graph": graph,
        "gref.precision": precision,
        "gref.version": version,
        "gref.exporter": json.dumps({"torch": torch.__version__, "dynamo": False}),
    }
