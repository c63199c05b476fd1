"""Gen-Reranker: a bidirectional encoder over the candidates and a causal decoder whose
state is matched against the encoded candidates (dynamic matching, design §1).

Reads bottom-up: attention -> MLP -> encoder block -> decoder block -> model.
Attention is written by hand (matmul + softmax) so the ONNX export has explicit KV
tensors: `past_key_values.{i}.key/value` in, `present.{i}.key/value` out.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from contract.config import ModelConfig
from model.layers import ItemTower, ListContext, UserTower
from model.tensors import Inputs

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each (B, nh, S, hd)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """Scaled dot-product attention. q (B, nh, T, hd), k/v (B, nh, S, hd), visible: bool
    broadcastable to (B, nh, T, S), True = may attend. Returns (B, nh, T, hd)."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, S)
    # a finite fill (not -inf): a row with nothing visible becomes uniform instead of NaN
    att = att.masked_fill(~visible, torch.finfo(att.dtype).min)
    return att.softmax(dim=-1) @ v


def split_heads(x: torch.Tensor, nh: int) -> torch.Tensor:
    B, T, d = x.shape
    return x.view(B, T, nh, d // nh).transpose(1, 2)  # (B, T, d) -> (B, nh, T, hd)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    B, nh, T, hd = y.shape
    return y.transpose(1, 2).reshape(B, T, nh * hd)  # (B, nh, T, hd) -> (B, T, d)


class SelfAttention(nn.Module):
    """Multi-head self-attention; with `past` it is the decoder's cached causal attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nh = cfg.n_attn_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(
        self, x: torch.Tensor, visible: torch.Tensor, past: KV | None = None
    ) -> tuple[torch.Tensor, KV]:
        # x (B, T, d); visible broadcastable to (B, nh, T, P + T); past (B, nh, P, hd) x 2
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, T, d) each
        q, k, v = (split_heads(t, self.nh) for t in (q, k, v))  # (B, nh, T, hd)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, P + T, hd)
            v = torch.cat([past[1], v], dim=2)
        return self.proj(merge_heads(attend(q, k, v, visible))), (k, v)


class CrossAttention(nn.Module):
    """Decoder -> encoded candidates. Keys/values come precomputed (`project_kv`, once per
    request), so a decode pass only projects its queries."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.nh = cfg.n_attn_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def project_kv(self, z: torch.Tensor) -> KV:
        k, v = self.kv(z).chunk(2, dim=-1)  # (B, M, d) each
        return split_heads(k, self.nh), split_heads(v, self.nh)  # (B, nh, M, hd) each

    def forward(self, x: torch.Tensor, kv: KV, visible: torch.Tensor) -> torch.Tensor:
        # x (B, T, d); visible (B, 1, 1, M)
        q = split_heads(self.q(x), self.nh)  # (B, nh, T, hd)
        return self.proj(merge_heads(attend(q, kv[0], kv[1], visible)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ffn_mult * cfg.d_model)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's GELU; exact erf is ~3x slower on CPU
        self.proj = nn.Linear(cfg.ffn_mult * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class EncoderBlock(nn.Module):
    """Pre-LN bidirectional block over [user, candidates]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), visible)[0])
        return x + self.drop(self.mlp(self.ln_2(x)))


class DecoderBlock(nn.Module):
    """Pre-LN causal self-attention (KV cache) -> cross-attention to z -> MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.cross = CrossAttention(cfg)
        self.ln_3 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        causal: torch.Tensor,
        past: KV | None,
        cross_kv: KV,
        cand_visible: torch.Tensor,
    ) -> tuple[torch.Tensor, KV]:
        a, present = self.attn(self.ln_1(x), causal, past)
        x = x + self.drop(a)
        x = x + self.drop(self.cross(self.ln_2(x), cross_kv, cand_visible))
        return x + self.drop(self.mlp(self.ln_3(x))), present


class Encoded(NamedTuple):
    """Everything the decoder needs from one encoder run (computed once per request)."""

    z: torch.Tensor  # (B, M, d) contextual candidate embeddings
    bos: torch.Tensor  # (B, d) decoder input at step 0: learned BOS + encoded user token
    cross_kv: tuple[KV, ...]  # per decoder layer: keys, values over z, (B, nh, M, hd) each
    cand_mask: torch.Tensor  # (B, M) bool, True = real candidate


class GenReranker(nn.Module):
    """Encoder over candidates + user token; causal decoder with n OMTP heads whose
    scores over the candidates are dot products with z (no vocabulary-sized layer)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if d % cfg.n_attn_heads:
            raise ValueError(f"d_model={d} is not a multiple of n_attn_heads={cfg.n_attn_heads}")
        self.item_tower = ItemTower(cfg)
        self.user_tower = UserTower(cfg)
        self.list_context = ListContext(cfg)
        self.enc_blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.enc_layers))
        self.enc_ln = nn.LayerNorm(d)
        self.bos = nn.Parameter(torch.randn(d) * 0.02)
        self.step_emb = nn.Embedding(cfg.max_steps, d)
        self.dec_blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.dec_layers))
        self.dec_ln = nn.LayerNorm(d)
        self.heads = nn.Linear(d, cfg.omtp_heads * d, bias=False)  # W_1..W_n stacked
        nn.init.normal_(self.step_emb.weight, std=0.02)

    def embed_items(self, inp: Inputs) -> torch.Tensor:
        """Static (cacheable) candidate embeddings, (B, M, d)."""
        return self.item_tower(inp.item_id, inp.item_cat, inp.item_dense)

    def encode(self, static: torch.Tensor, inp: Inputs) -> Encoded:
        B = static.shape[0]
        x = self.list_context(static, inp.upstream_score)  # (B, M, d)
        user = self.user_tower(inp.user_id, inp.user_dense)  # (B, d)
        x = torch.cat([user.unsqueeze(1), x], dim=1)  # (B, 1 + M, d)
        visible = torch.cat([inp.cand_mask.new_ones(B, 1), inp.cand_mask], dim=1)  # (B, 1 + M)
        visible = visible[:, None, None, :]  # (B, 1, 1, 1 + M): keys only; user always visible
        for block in self.enc_blocks:
            x = block(x, visible)
        x = self.enc_ln(x)
        z = x[:, 1:]  # (B, M, d)
        cross_kv = tuple(block.cross.project_kv(z) for block in self.dec_blocks)
        return Encoded(z=z, bos=self.bos + x[:, 0], cross_kv=cross_kv, cand_mask=inp.cand_mask)

    def decode(
        self,
        enc: Encoded,
        tokens: torch.Tensor,
        past: list[KV] | None = None,
        start: int | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """One decoder pass over T new steps.

        tokens (B, T) int64 candidate indices; the step at absolute position 0 is BOS
        (pass -1 there), any other negative index (padding) embeds as candidate 0.
        past: per decoder layer (key, value), each (B, nh, P, hd); None = no past.
        start: absolute position of tokens[:, 0] (default P), for the step embedding.
        Returns raw scores (B, T, n, M) and present = past + the new steps, per layer.
        """
        B, T = tokens.shape
        P = 0 if past is None else past[0][0].shape[2]
        start = P if start is None else start
        steps = torch.arange(T, device=tokens.device)
        pos = start + steps  # (T,) absolute step positions
        items = enc.z.gather(1, tokens.clamp(min=0).unsqueeze(-1).expand(-1, -1, enc.z.shape[-1]))
        x = torch.where((pos == 0)[None, :, None], enc.bos[:, None, :], items)  # (B, T, d)
        x = x + self.step_emb(pos)[None]
        keys = torch.arange(P + T, device=tokens.device)
        causal = keys[None, :] <= (P + steps)[:, None]  # (T, P + T): step P + t sees keys <= it
        cand_visible = enc.cand_mask[:, None, None, :]  # (B, 1, 1, M)
        present = []
        for i, block in enumerate(self.dec_blocks):
            x, kv = block(
                x, causal, None if past is None else past[i], enc.cross_kv[i], cand_visible
            )
            present.append(kv)
        h = self.dec_ln(x)  # (B, T, d)
        n, d = self.cfg.omtp_heads, self.cfg.d_model
        q = self.heads(h)  # (B, T, n * d): W_1 h_t .. W_n h_t
        scores = q.view(B, T * n, d) @ enc.z.transpose(1, 2)  # (B, T * n, M): (W_j h_t) . z_i
        return scores.view(B, T, n, -1) * (1.0 / math.sqrt(d)), present  # (B, T, n, M)

    def forward(self, inp: Inputs, order: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. order (B, K) candidate indices (-1 = padding) -> scores (B, K, n, M):
        position t has consumed order[:, :t] and head j predicts order[:, t + j]."""
        enc = self.encode(self.embed_items(inp), inp)
        tokens = torch.cat([order.new_full((order.shape[0], 1), -1), order[:, :-1]], dim=1)
        return self.decode(enc, tokens)[0]  # decoder inputs [BOS, y_1 .. y_{K-1}]
