"""Baseline rerankers of the evaluation (design §4), on the Gen-Reranker's input encoding.

Every baseline reads the same `Inputs` through the same towers as the Gen-Reranker
(ItemTower for the static item embedding, UserTower for the user token, ListContext for
the upstream score and the learned upstream-position embedding), so a difference in the
results is a difference of architecture and training, not of features.

- `PointwiseDNN`: the classic pointwise click model (the "DNN" row of the GReF and
  LibRerank tables). An MLP over [item embedding, user embedding, upstream score,
  upstream-position embedding] scores each candidate alone; trained with BCE on the
  exposed slots' clicks; reranking sorts by the score. It sees no other candidate.
- `PRM`: Personalized Re-ranking Model (Pei et al., RecSys 2019), the one-stage
  transformer scorer. The paper's input is item features + a personalized vector +
  a position embedding, through a bidirectional transformer encoder and a per-item
  output. Here the personalized vector is the user token (a token the candidates
  attend to, as in the Gen-Reranker) and the position embedding is ListContext's.
  PRM's paper trains a softmax over the list on clicks; we use the same per-item BCE
  on exposed slots as the DNN, so the two scorers differ only in list context.
  Reranking sorts by the score.
- `NAR4Rec`: non-autoregressive generative reranking (Ren et al., KDD 2024). The
  PRM-style encoder gives candidate embeddings z; S = max_steps learned position
  queries (plus the user token) pass through self-attention among positions and
  cross-attention to z, and score[s, i] = q_s · z_i / sqrt(d) is a position ×
  candidate matching matrix produced in ONE pass. Trained with per-position cross
  entropy on a target order, without the prefix mask (each position is predicted
  independently, the non-autoregressive assumption). Decoding is one network pass
  followed by a cheap sequential assignment: positions 0..k-1 in turn take their best
  still-available candidate. The paper's unlikelihood training and contrastive
  decoding are left out: this is the "NAR4Rec-like" baseline of the design.

Seq2Slate is not here: the Seq2Slate-like baseline is the Gen-Reranker itself with
n = 1 head, trained on clicks without exposure pre-training (built with the
Gen-Reranker).

Common interface (so the training/eval harness treats all alike):
- `forward(inp) -> scores`: (B, M) logits for the scorers, (B, S, M) for NAR4Rec;
  padding candidates get the dtype's most negative value.
- `loss(inp, exposed, click, target_order) -> scalar`: each model uses what it needs.
- `rerank(inp, k) -> (order (B, k) int64, item_scores (B, M))` under no_grad: candidate
  indices, never repeated, never padding, -1 where fewer than k candidates.
- class attribute `name`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from contract.config import ModelConfig
from model.layers import ItemTower, ListContext, UserTower
from model.tensors import Inputs


def _mask_padding(scores: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
    # scores (B, ..., M), cand_mask (B, M): padding -> most negative finite value, so a
    # softmax over a row with no real candidate stays finite.
    while cand_mask.dim() < scores.dim():
        cand_mask = cand_mask.unsqueeze(1)
    return scores.masked_fill(~cand_mask, torch.finfo(scores.dtype).min)


def exposure_bce(
    logits: torch.Tensor, cand_mask: torch.Tensor, exposed: torch.Tensor, click: torch.Tensor
) -> torch.Tensor:
    """Mean BCE of candidate logits (B, M) at the exposed slots (B, K) against click (B, K).

    Slots with exposed = -1, or pointing at a padding candidate, are ignored."""
    idx = exposed.clamp(min=0)  # (B, K)
    slot = (exposed >= 0) & torch.gather(cand_mask, 1, idx)  # (B, K) bool
    slot_logits = torch.gather(logits, 1, idx)  # (B, K)
    per_slot = F.binary_cross_entropy_with_logits(
        slot_logits, click.to(slot_logits.dtype), reduction="none"
    )
    w = slot.to(per_slot.dtype)
    return (per_slot * w).sum() / w.sum().clamp(min=1.0)


def rank_by_score(scores: torch.Tensor, cand_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k candidate indices (B, k) int64 by descending score; -1 past the real candidates."""
    M = scores.shape[1]
    masked = scores.masked_fill(~cand_mask, float("-inf"))
    kk = min(k, M)
    order = masked.topk(kk, dim=1).indices  # (B, kk)
    n_real = cand_mask.sum(dim=1, keepdim=True)  # (B, 1)
    ranks = torch.arange(kk, device=scores.device)[None]  # (1, kk)
    order = order.masked_fill(ranks >= n_real, -1)
    if kk < k:
        order = F.pad(order, (0, k - kk), value=-1)
    return order


def _layer_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Pre-LN, batch-first torch transformer layers sized like the Gen-Reranker's."""
    return {
        "d_model": cfg.d_model,
        "nhead": cfg.n_attn_heads,
        "dim_feedforward": cfg.d_model * cfg.ffn_mult,
        "dropout": cfg.dropout,
        "activation": "gelu",
        "batch_first": True,
        "norm_first": True,
    }


class ListEncoder(nn.Module):
    """PRM's (and NAR4Rec's) encoder: [user token; candidates with list context] through
    `enc_layers` bidirectional transformer blocks with a key padding mask."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.max_candidates = cfg.max_candidates
        self.items = ItemTower(cfg)
        self.user = UserTower(cfg)
        self.context = ListContext(cfg)
        layer = nn.TransformerEncoderLayer(**_layer_kwargs(cfg))
        self.blocks = nn.TransformerEncoder(
            layer, cfg.enc_layers, norm=nn.LayerNorm(d), enable_nested_tensor=False
        )

    def forward(self, inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens (B, 1+M, d) (user token first) and key_padding (B, 1+M), True = ignore."""
        if inp.m > self.max_candidates:
            raise ValueError(f"{inp.m} candidates > max_candidates={self.max_candidates}")
        static = self.items(inp.item_id, inp.item_cat, inp.item_dense)  # (B, M, d)
        cands = self.context(static, inp.upstream_score)  # (B, M, d)
        user = self.user(inp.user_id, inp.user_dense)  # (B, d)
        x = torch.cat([user[:, None], cands], dim=1)  # (B, 1+M, d)
        # the user token is always real, so no query row is fully masked (even at m = 0)
        key_padding = torch.cat(
            [torch.zeros_like(inp.cand_mask[:, :1]), ~inp.cand_mask], dim=1
        )  # (B, 1+M)
        return self.blocks(x, src_key_padding_mask=key_padding), key_padding


class _Scorer(nn.Module):
    """Shared loss/rerank of the per-candidate click scorers (DNN, PRM)."""

    name: ClassVar[str]

    def loss(
        self,
        inp: Inputs,
        exposed: torch.Tensor,
        click: torch.Tensor,
        target_order: torch.Tensor,
    ) -> torch.Tensor:
        """BCE on the exposed slots' clicks; target_order is unused."""
        return exposure_bce(self(inp), inp.cand_mask, exposed, click)

    @torch.no_grad()
    def rerank(self, inp: Inputs, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sort by click logit -> order (B, k) int64 (-1 padded), item_scores (B, M)."""
        scores = self(inp)  # (B, M), padding already most negative
        return rank_by_score(scores, inp.cand_mask, k), scores


class PointwiseDNN(_Scorer):
    """MLP click model over one candidate at a time (no list context beyond its own
    upstream score and position)."""

    name: ClassVar[str] = "dnn"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, h = cfg.d_model, cfg.d_model * cfg.ffn_mult
        self.items = ItemTower(cfg)
        self.user = UserTower(cfg)
        self.pos_emb = nn.Embedding(cfg.max_candidates, d)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.mlp = nn.Sequential(
            nn.Linear(3 * d + 1, h),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(h, h),
            nn.ReLU(),
            nn.Linear(h, 1),
        )

    def forward(self, inp: Inputs) -> torch.Tensor:
        """-> click logits (B, M)."""
        B, M = inp.item_id.shape
        max_m = self.pos_emb.num_embeddings
        if inp.m > max_m:
            raise ValueError(f"{inp.m} candidates > max_candidates={max_m}")
        item = self.items(inp.item_id, inp.item_cat, inp.item_dense)  # (B, M, d)
        user = self.user(inp.user_id, inp.user_dense)[:, None].expand(-1, M, -1)  # (B, M, d)
        pos = self.pos_emb(torch.arange(M, device=item.device))[None].expand(B, -1, -1)
        score = inp.upstream_score.unsqueeze(-1)  # (B, M, 1)
        x = torch.cat([item, user, score, pos], dim=-1)  # (B, M, 3d+1)
        return _mask_padding(self.mlp(x).squeeze(-1), inp.cand_mask)


class PRM(_Scorer):
    """One-stage transformer scorer (Pei et al. 2019): each candidate's click logit from
    its context-aware embedding."""

    name: ClassVar[str] = "prm"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.encoder = ListEncoder(cfg)
        self.head = nn.Sequential(
            nn.Linear(d, d * cfg.ffn_mult), nn.GELU(), nn.Linear(d * cfg.ffn_mult, 1)
        )

    def forward(self, inp: Inputs) -> torch.Tensor:
        """-> click logits (B, M)."""
        tokens, _ = self.encoder(inp)  # (B, 1+M, d)
        return _mask_padding(self.head(tokens[:, 1:]).squeeze(-1), inp.cand_mask)


class NAR4Rec(nn.Module):
    """Non-autoregressive reranker (Ren et al. 2024): one pass yields a position ×
    candidate score matrix; decoding assigns positions in order to the best free item."""

    name: ClassVar[str] = "nar4rec"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.d_model = d
        self.max_steps = cfg.max_steps
        self.encoder = ListEncoder(cfg)
        self.pos_queries = nn.Embedding(cfg.max_steps, d)
        nn.init.normal_(self.pos_queries.weight, std=0.02)
        layer = nn.TransformerDecoderLayer(**_layer_kwargs(cfg))
        # one or two blocks: the point of NAR4Rec is a cheap single pass
        self.blocks = nn.TransformerDecoder(
            layer, min(2, max(1, cfg.dec_layers)), norm=nn.LayerNorm(d)
        )
        self.query_proj = nn.Linear(d, d)

    def forward(self, inp: Inputs, positions: int | None = None) -> torch.Tensor:
        """-> position × candidate logits (B, S, M), S = positions (default max_steps).
        Only the positions that will be used are computed: k of them, not max_steps."""
        S = self.max_steps if positions is None else min(positions, self.max_steps)
        tokens, key_padding = self.encoder(inp)  # (B, 1+M, d), (B, 1+M)
        user = tokens[:, :1]  # (B, 1, d) context-aware user token
        queries = self.pos_queries.weight[None, :S] + user  # (B, S, d)
        # no tgt_mask: positions see each other (non-autoregressive); memory includes the
        # user token, so a request with no candidates still has one key to attend to
        q = self.blocks(queries, tokens, memory_key_padding_mask=key_padding)  # (B, S, d)
        q = self.query_proj(q)
        z = tokens[:, 1:]  # (B, M, d)
        scores = q @ z.transpose(1, 2) / math.sqrt(self.d_model)  # (B, S, M)
        return _mask_padding(scores, inp.cand_mask)

    def loss(
        self,
        inp: Inputs,
        exposed: torch.Tensor,
        click: torch.Tensor,
        target_order: torch.Tensor,
    ) -> torch.Tensor:
        """Per-position cross entropy on target_order (B, K): position s's target is
        target_order[:, s]; -1 targets and positions past S are ignored. exposed and click
        are unused (the harness chooses the target order)."""
        K = min(target_order.shape[1], self.max_steps)
        scores = self(inp, K)  # (B, K, M)
        target = target_order[:, :K]  # (B, K)
        logp = F.log_softmax(scores[:, :K], dim=-1)  # (B, K, M)
        valid = target >= 0  # (B, K)
        picked = torch.gather(logp, 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, K)
        w = valid.to(picked.dtype)
        return -(picked * w).sum() / w.sum().clamp(min=1.0)

    @torch.no_grad()
    def rerank(self, inp: Inputs, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass, then greedy assignment of positions 0..k-1 to the best still-free
        candidate -> order (B, k) int64 (-1 padded), item_scores (B, M).

        item_scores (for AUC) follow the generated order: k - rank for the chosen items
        (k .. 1), and sigmoid(best position logit) - 1 in (-1, 0) for the rest."""
        if k > self.max_steps:
            raise ValueError(f"k={k} > max_steps={self.max_steps} positions of NAR4Rec")
        scores = self(inp, k)  # (B, k, M)
        B, M = inp.item_id.shape
        free = inp.cand_mask.clone()  # (B, M)
        order = torch.full((B, k), -1, dtype=torch.long, device=scores.device)
        rows = torch.arange(B, device=scores.device)
        for t in range(k):
            best = scores[:, t].masked_fill(~free, float("-inf")).argmax(dim=1)  # (B,)
            has_free = free.any(dim=1)  # (B,)
            order[:, t] = torch.where(has_free, best, -1)
            free[rows, best] &= ~has_free

        # rest: ordered among themselves by how much any position wants them, in (-1, 0)
        rest = torch.sigmoid(scores.max(dim=1).values) - 1.0  # (B, M)
        rank_score = k - torch.arange(k, device=scores.device, dtype=rest.dtype)  # (k,)
        # unfilled slots (-1) write into a spare column M that is dropped
        slot_idx = torch.where(order >= 0, order, M)  # (B, k)
        item_scores = torch.cat([rest, rest.new_zeros(B, 1)], dim=1)  # (B, M+1)
        item_scores.scatter_(1, slot_idx, rank_score[None].expand(B, -1))
        item_scores = item_scores[:, :M]
        item_scores = item_scores.masked_fill(~inp.cand_mask, torch.finfo(item_scores.dtype).min)
        return order, item_scores


Baseline = PointwiseDNN | PRM | NAR4Rec
BASELINES: dict[str, type[Baseline]] = {m.name: m for m in (PointwiseDNN, PRM, NAR4Rec)}


def build_baseline(name: str, cfg: ModelConfig) -> Baseline:
    """A baseline by its `name` (dnn | prm | nar4rec)."""
    try:
        cls = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r} ({' | '.join(BASELINES)})") from None
    return cls(cfg)
