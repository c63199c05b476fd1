"""ListBatch (numpy, raw ids) -> model inputs (torch, hashed ids)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from contract.features import FeatureSchema, hash_ids, hash_items
from model.data import ListBatch


@dataclass
class Inputs:
    """What every reranker in model/ consumes. Shapes: B requests, M candidates."""

    item_id: torch.Tensor  # (B, M) int64 hashed bucket, 0 = padding
    item_cat: torch.Tensor  # (B, M, Fc) int64 hashed buckets
    item_dense: torch.Tensor  # (B, M, Fd) float32
    upstream_score: torch.Tensor  # (B, M) float32
    cand_mask: torch.Tensor  # (B, M) bool, True = real candidate
    user_id: torch.Tensor  # (B,) int64 hashed bucket
    user_dense: torch.Tensor  # (B, Fu) float32

    @property
    def batch_size(self) -> int:
        return int(self.item_id.shape[0])

    @property
    def m(self) -> int:
        return int(self.item_id.shape[1])


def to_inputs(batch: ListBatch, schema: FeatureSchema) -> Inputs:
    items = hash_items(schema, batch.item_id, batch.item_cat, batch.item_dense)
    return Inputs(
        item_id=torch.from_numpy(items.item_id),
        item_cat=torch.from_numpy(items.item_cat),
        item_dense=torch.from_numpy(items.item_dense),
        upstream_score=torch.from_numpy(
            np.where(batch.cand_mask, batch.upstream_score, 0.0).astype(np.float32)
        ),
        cand_mask=torch.from_numpy(batch.cand_mask.astype(bool)),
        user_id=torch.from_numpy(hash_ids(batch.user_id, schema.user_id_buckets, schema.hash_salt)),
        user_dense=torch.from_numpy(batch.user_dense.astype(np.float32)),
    )
