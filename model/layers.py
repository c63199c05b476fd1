"""Building blocks shared by the Gen-Reranker and the baselines."""

from __future__ import annotations

import torch
from torch import nn

from contract.config import ModelConfig


class ItemTower(nn.Module):
    """Static item embedding: hashed id + categorical features + dense features -> d.

    Depends only on the item (no user, no list), so it can be precomputed for the
    whole item table and cached (design §7)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        s, d = cfg.schema, cfg.d_model
        self.id_emb = nn.Embedding(s.item_id_buckets, d, padding_idx=0)
        self.cat_embs = nn.ModuleList(
            nn.Embedding(b, d, padding_idx=0) for b in s.categorical_buckets
        )
        self.dense = nn.Linear(len(s.item_dense), d)
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.id_emb.weight, std=0.02)
        for e in self.cat_embs:
            nn.init.normal_(e.weight, std=0.02)

    def forward(
        self, item_id: torch.Tensor, item_cat: torch.Tensor, item_dense: torch.Tensor
    ) -> torch.Tensor:
        # item_id (...,), item_cat (..., Fc), item_dense (..., Fd) -> (..., d)
        x = self.id_emb(item_id) + self.dense(item_dense)
        for f, emb in enumerate(self.cat_embs):
            x = x + emb(item_cat[..., f])
        return self.norm(x)


class UserTower(nn.Module):
    """User token: hashed user id + dense user features -> d."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        s, d = cfg.schema, cfg.d_model
        self.id_emb = nn.Embedding(s.user_id_buckets, d, padding_idx=0)
        self.dense = nn.Linear(len(s.user_dense), d)
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.id_emb.weight, std=0.02)

    def forward(self, user_id: torch.Tensor, user_dense: torch.Tensor) -> torch.Tensor:
        # (B,), (B, Fu) -> (B, d)
        return self.norm(self.id_emb(user_id) + self.dense(user_dense))


class ListContext(nn.Module):
    """Adds list context to static embeddings: upstream position (learned) + upstream score."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pos_emb = nn.Embedding(cfg.max_candidates, cfg.d_model)
        self.score = nn.Linear(1, cfg.d_model)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, static: torch.Tensor, upstream_score: torch.Tensor) -> torch.Tensor:
        # static (B, M, d), upstream_score (B, M): candidates arrive in upstream order,
        # so candidate j's upstream position is j.
        M = static.shape[1]
        pos = torch.arange(M, device=static.device)
        return static + self.pos_emb(pos)[None] + self.score(upstream_score.unsqueeze(-1))
