"""The encoder and decoder written with onnxruntime's fused contrib kernels, for export.

At this model's size (d = 32) a graph's run time is mostly onnxruntime's fixed cost per
node, so the hand-written attention of model/network.py (projection, split, reshape,
transpose, concat with the past, matmul, mask, softmax, matmul, transpose, reshape: ~15
nodes) is exported as one `com.microsoft.MultiHeadAttention` (past/present KV, causal,
the candidate padding mask and the q/k/v bias inside), and each residual Add + the next
LayerNorm as one `com.microsoft.SkipLayerNormalization` (its fourth output is the
residual sum itself). The same weights, the same math: every op below has a torch
forward (the reference the tracer runs) and an ONNX symbolic (what the graph holds), and
export/verify.py checks the exported graphs against the unfused torch model.

fp32 only (the CPU path): the fp16 graphs keep the plain ops (export/graphs.py).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from model.network import (
    DecoderBlock,
    EncoderBlock,
    GenReranker,
    attend,
    merge_heads,
    split_heads,
)

MS_DOMAIN = "com.microsoft"
_INT32 = 6  # onnx.TensorProto.INT32


def _typed(value: Any, like: Any, sizes: list[int | None]) -> Any:
    """value with like's dtype and these sizes (None: batch, steps or candidates, symbolic),
    so ONNX shape inference carries on past a contrib op (the manifest then lists e.g.
    head_scores as (batch, n, candidates))."""
    value.setType(like.type().with_sizes(sizes))
    return value


def _none(g: Any) -> Any:
    """An omitted optional input of a custom op."""
    return g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())


class _SelfAttention(torch.autograd.Function):
    """q, k, v (B, T, d) unbiased projections, bias (3d,), past key/value (B, nh, P, hd),
    nh heads of hd dims
    -> attention output (B, T, d), present key/value (B, nh, P + T, hd). Causal: step P + t
    sees keys <= P + t (model.network.SelfAttention with a past)."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
        past_k: torch.Tensor, past_v: torch.Tensor, nh: int, hd: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        bq, bk, bv = bias.chunk(3)
        q, k, v = split_heads(q + bq, nh), split_heads(k + bk, nh), split_heads(v + bv, nh)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        P, T = past_k.shape[2], q.shape[2]
        causal = torch.arange(P + T)[None, :] <= (P + torch.arange(T))[:, None]  # (T, P + T)
        return merge_heads(attend(q, k, v, causal)), k, v

    @staticmethod
    def symbolic(
        g: Any, q: Any, k: Any, v: Any, bias: Any, past_k: Any, past_v: Any, nh: int, hd: int
    ) -> Any:
        out, present_k, present_v = g.op(
            f"{MS_DOMAIN}::MultiHeadAttention",
            q, k, v, bias, _none(g), _none(g), past_k, past_v,
            num_heads_i=nh, unidirectional_i=1, outputs=3,
        )  # fmt: skip
        kv = [None, nh, None, hd]
        return (
            _typed(out, q, [None, None, nh * hd]),
            _typed(present_k, past_k, kv),
            _typed(present_v, past_v, kv),
        )


class _MaskedAttention(torch.autograd.Function):
    """q (B, T, d = nh * hd) unbiased, bias (3d,) (None: no bias); key/value (B, nh, S, hd)
    precomputed (their part of bias zero) or (B, S, d) unbiased; mask (B, S) bool, True =
    may attend -> (B, T, d). The decoder's cross-attention to z (keys/values from the
    encoder, the query's bias inside the op) and, with k/v (B, S, d), the encoder's
    self-attention."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
        mask: torch.Tensor, nh: int, hd: int,
    ) -> torch.Tensor:  # fmt: skip
        if bias is not None and k.dim() == 4:  # precomputed key/value: the query's bias
            q = q + bias.chunk(3)[0]
        elif bias is not None:
            bq, bk, bv = bias.chunk(3)
            q, k, v = q + bq, split_heads(k + bk, nh), split_heads(v + bv, nh)
        return merge_heads(attend(split_heads(q, nh), k, v, mask[:, None, None, :]))

    @staticmethod
    def symbolic(g: Any, q: Any, k: Any, v: Any, bias: Any, mask: Any, nh: int, hd: int) -> Any:
        mask_i32 = g.op("Cast", mask, to_i=_INT32)  # MHA's key_padding_mask: 1 = attend
        bias = _none(g) if bias is None or _is_none(bias) else bias
        out = g.op(f"{MS_DOMAIN}::MultiHeadAttention", q, k, v, bias, mask_i32, num_heads_i=nh)
        return _typed(out, q, [None, None, nh * hd])


class _Attention(torch.autograd.Function):
    """x (B, S, d), w (d, 3d), bias (3d,), mask (B, S) bool (True = may attend) -> (B, S, d):
    the encoder's self-attention with its q/k/v projection inside one
    `com.microsoft.Attention` kernel (where MultiHeadAttention takes a MatMul and a Split
    before it)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor,
        nh: int, hd: int,
    ) -> torch.Tensor:  # fmt: skip
        q, k, v = (x @ w).chunk(3, dim=-1)
        out: torch.Tensor = _MaskedAttention.forward(ctx, q, k, v, bias, mask, nh, hd)
        return out

    @staticmethod
    def symbolic(g: Any, x: Any, w: Any, bias: Any, mask: Any, nh: int, hd: int) -> Any:
        mask_i32 = g.op("Cast", mask, to_i=_INT32)  # a raw (B, S) mask: 1 = attend
        out = g.op(f"{MS_DOMAIN}::Attention", x, w, bias, mask_i32, num_heads_i=nh)
        return _typed(out, x, [None, None, nh * hd])


def _is_none(x: Any) -> bool:
    return bool(x.node().mustBeNone()) if hasattr(x, "node") else x is None


class _SkipLN(torch.autograd.Function):
    """LayerNorm(x + skip + bias) and the sum itself (the residual stream)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, skip: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
        bias: torch.Tensor, eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        s = x + (skip + bias)
        return nn.functional.layer_norm(s, (s.shape[-1],), gamma, beta, eps), s

    @staticmethod
    def symbolic(g: Any, x: Any, skip: Any, gamma: Any, beta: Any, bias: Any, eps: float) -> Any:
        y, _, _, s = g.op(f"{MS_DOMAIN}::SkipLayerNormalization", x, skip, gamma, beta, bias,
                          epsilon_f=eps, outputs=4)  # fmt: skip
        d = gamma.type().sizes()[0]  # a weight: its size is known
        return _typed(y, x, [None, None, d]), _typed(s, x, [None, None, d])


class _BiasGelu(torch.autograd.Function):
    """GELU (tanh) of x + bias: onnxruntime's FastGelu with its bias input, one kernel
    (onnxruntime fuses Add + Gelu this way in the main graph, not inside a Loop body)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x + bias, approximate="tanh")

    @staticmethod
    def symbolic(g: Any, x: Any, bias: Any) -> Any:
        return _typed(g.op(f"{MS_DOMAIN}::FastGelu", x, bias), x, x.type().sizes())


def _mlp_act(mlp: Any, h: torch.Tensor) -> torch.Tensor:
    """mlp.act(mlp.fc(h)): one FastGelu with the bias when the activation is the tanh GELU."""
    act = mlp.act
    if isinstance(act, nn.GELU) and act.approximate == "tanh":
        out: torch.Tensor = _BiasGelu.apply(_mm(h, mlp.fc), mlp.fc.bias)
        return out
    fallback: torch.Tensor = act(mlp.fc(h))
    return fallback


def skip_ln(
    x: torch.Tensor, skip: torch.Tensor, ln: nn.LayerNorm, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln(x + skip + bias), x + skip + bias): a residual add and the next LayerNorm."""
    out: tuple[torch.Tensor, torch.Tensor] = _SkipLN.apply(
        x, skip, ln.weight, ln.bias, bias, ln.eps
    )
    return out


def _enc_blocks(model: GenReranker) -> list[EncoderBlock]:
    return [cast(EncoderBlock, b) for b in model.enc_blocks]


def _dec_blocks(model: GenReranker) -> list[DecoderBlock]:
    return [cast(DecoderBlock, b) for b in model.dec_blocks]


def _mm(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """x @ W^T without the bias: the bias goes into the fused op that follows."""
    return x @ linear.weight.t()


class _FirstRows(torch.autograd.Function):
    """weight[:M] for like (B, M, ...): a Shape and a Slice (the tracer's shape arithmetic
    for the same slice leaves eight nodes after onnxruntime's own passes)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return weight[: like.shape[1]]

    @staticmethod
    def symbolic(g: Any, weight: Any, like: Any) -> Any:
        rows = g.op("Shape", like, start_i=1, end_i=2)
        zero = g.op("Constant", value_t=torch.tensor([0], dtype=torch.long))
        out = g.op("Slice", weight, zero, rows, zero)
        return _typed(out, weight, [None, weight.type().sizes()[1]])


def encode(model: GenReranker, static: torch.Tensor, inp: Any) -> tuple[torch.Tensor, ...]:
    """GenReranker.encode with fused blocks -> z (B, M, d), bos (B, d), cross keys/values
    per decoder layer (B, nh, M, hd)."""
    lc = model.list_context  # its forward, the position rows taken in two nodes, not eight
    pos = _FirstRows.apply(lc.pos_emb.weight, static)  # (M, d)
    x = static + pos + lc.score(inp.upstream_score.unsqueeze(-1))  # (B, M, d)
    user = model.user_tower(inp.user_id, inp.user_dense)  # (B, d)
    x = torch.cat([user.unsqueeze(1), x], dim=1)  # (B, 1 + M, d)
    visible = nn.functional.pad(inp.cand_mask, (1, 0), value=True)  # (B, 1 + M), user first
    blocks = _enc_blocks(model)
    h = blocks[0].ln_1(x)
    for i, block in enumerate(blocks):
        qkv, nh = block.attn.qkv, block.attn.nh
        a = _Attention.apply(h, qkv.weight.t(), qkv.bias, visible, nh, model.cfg.d_model // nh)
        h, x = skip_ln(x, _mm(a, block.attn.proj), block.ln_2, block.attn.proj.bias)
        mlp = block.mlp
        m = _mm(_mlp_act(mlp, h), mlp.proj)
        nxt = blocks[i + 1].ln_1 if i + 1 < len(blocks) else model.enc_ln
        h, x = skip_ln(x, m, nxt, mlp.proj.bias)
    z = h[:, 1:]  # (B, M, d): enc_ln(x) of the candidates
    cross = [t for blk in _dec_blocks(model) for t in blk.cross.project_kv(z)]
    return (z, model.bos + h[:, 0], *cross)


def _after_self_attention(
    model: GenReranker,
    i: int,
    x: torch.Tensor,
    a: torch.Tensor,
    cross: tuple[torch.Tensor, torch.Tensor],
    cand_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder block i after its self-attention output a (B, T, d): the residual, the
    cross-attention, the MLP, and the next block's ln_1 (dec_ln after the last block)
    -> (that LayerNorm's output, the residual stream), each (B, T, d)."""
    blocks = _dec_blocks(model)
    block = blocks[i]
    attn, cr, mlp = block.attn, block.cross, block.mlp
    h, x = skip_ln(x, _mm(a, attn.proj), block.ln_2, attn.proj.bias)
    hd = model.cfg.d_model // cr.nh
    q_bias = torch.cat([cr.q.bias, cr.q.bias.new_zeros(2 * cr.q.bias.shape[0])])  # (3d,)
    c = _MaskedAttention.apply(_mm(h, cr.q), cross[0], cross[1], q_bias, cand_mask, cr.nh, hd)
    h, x = skip_ln(x, _mm(c, cr.proj), block.ln_3, cr.proj.bias)
    m = _mm(_mlp_act(mlp, h), mlp.proj)
    nxt = blocks[i + 1].ln_1 if i + 1 < len(blocks) else model.dec_ln
    return skip_ln(x, m, nxt, mlp.proj.bias)


def _heads(model: GenReranker, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The OMTP heads' scores at the last step: h (B, T, d) after dec_ln -> (B, n, M)."""
    n, d = model.cfg.omtp_heads, model.cfg.d_model
    q = model.heads(h[:, -1]).view(h.shape[0], n, d)  # (B, n, d): W_1 h .. W_n h
    return (q @ z.transpose(1, 2)) * (1.0 / math.sqrt(d))  # (B, n, M)


def decode_blocks(
    model: GenReranker,
    x: torch.Tensor,
    z: torch.Tensor,
    cand_mask: torch.Tensor,
    cross: list[tuple[torch.Tensor, torch.Tensor]],
    past: list[tuple[torch.Tensor, torch.Tensor]],
    steps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The decoder blocks, dec_ln and the OMTP heads at the last position, fused: x (B, T, d)
    the embedded steps, or with steps (T, d) the items whose step embeddings the first
    LayerNorm adds (one SkipLayerNormalization for the Add and the LayerNorm) -> head
    scores (B, n, M), present KV per layer (B, nh, P + T, hd)."""
    ln_1 = _dec_blocks(model)[0].ln_1
    if steps is None:
        h = ln_1(x)
    else:
        h, x = skip_ln(x, steps, ln_1, torch.zeros_like(ln_1.bias))
    present: list[torch.Tensor] = []
    for i, block in enumerate(_dec_blocks(model)):
        attn = block.attn
        # split by a constant size: one Split node (chunk traces to three Slices here)
        q, k, v = _mm(h, attn.qkv).split(model.cfg.d_model, dim=-1)  # (B, T, d) each
        nh, hd = attn.nh, model.cfg.d_model // attn.nh
        a, pk, pv = _SelfAttention.apply(q, k, v, attn.qkv.bias, *past[i], nh, hd)
        present += [pk, pv]
        h, x = _after_self_attention(model, i, x, a, cross[i], cand_mask)
    return _heads(model, h, z), present


def first_pass(
    model: GenReranker,
    bos: torch.Tensor,
    z: torch.Tensor,
    cand_mask: torch.Tensor,
    cross: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The BOS pass (one step at position 0, empty past), as decode_blocks computes it, in
    fewer nodes: self-attention over a single key returns that key's value exactly (the
    softmax of one score is 1), so no attention op runs. bos (B, d) -> head scores
    (B, n, M), present KV per layer (B, nh, 1, hd)."""
    B, d = bos.shape
    ln_1 = _dec_blocks(model)[0].ln_1  # BOS + its step embedding inside the LayerNorm
    h, x = skip_ln(bos[:, None, :], model.step_emb.weight[:1], ln_1, torch.zeros_like(ln_1.bias))
    present: list[torch.Tensor] = []
    for i, block in enumerate(_dec_blocks(model)):
        qkv, nh = block.attn.qkv, block.attn.nh
        k, v = (h @ qkv.weight[d:].t() + qkv.bias[d:]).chunk(2, dim=-1)  # (B, 1, d) each
        present += [k.reshape(B, nh, 1, d // nh), v.reshape(B, nh, 1, d // nh)]  # T = 1
        h, x = _after_self_attention(model, i, x, v, cross[i], cand_mask)
    return _heads(model, h, z), present
