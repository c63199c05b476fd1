"""Random model inputs and engine requests for the tiny schema (torch and numpy sides)."""

from __future__ import annotations

import numpy as np
import torch

from contract.config import ModelConfig
from contract.features import HashedItems
from model.network import GenReranker
from model.tensors import Inputs
from service.engine import RerankRequest
from tests.support.tiny import TINY_SCHEMA, tiny_config

CFG = tiny_config()  # the unit tests' model (max_candidates 32, max_steps 16)


def make_inputs(B: int, M: int, m: torch.Tensor | None = None, seed: int = 0) -> Inputs:
    """Random hashed inputs; request b has m[b] real candidates (the first ones)."""
    g = torch.Generator().manual_seed(seed)
    if m is None:
        m = torch.randint(1, M + 1, (B,), generator=g)
    mask = torch.arange(M)[None] < m[:, None]  # (B, M)
    s = CFG.schema
    item_id = torch.randint(1, s.item_id_buckets, (B, M), generator=g)
    item_cat = torch.stack(
        [torch.randint(1, b, (B, M), generator=g) for b in s.categorical_buckets], dim=-1
    )
    # padding as model/tensors.py makes it: bucket 0, zero dense and score
    return Inputs(
        item_id=item_id.masked_fill(~mask, 0),
        item_cat=item_cat.masked_fill(~mask[..., None], 0),
        item_dense=torch.randn(B, M, len(s.item_dense), generator=g).masked_fill(
            ~mask[..., None], 0.0
        ),
        upstream_score=torch.randn(B, M, generator=g).masked_fill(~mask, 0.0),
        cand_mask=mask,
        user_id=torch.randint(1, s.user_id_buckets, (B,), generator=g),
        user_dense=torch.randn(B, len(s.user_dense), generator=g),
    )


def make_model(seed: int = 0, cfg: ModelConfig = CFG) -> GenReranker:
    torch.manual_seed(seed)
    return GenReranker(cfg).eval()


def random_orders(inp: Inputs, K: int, seed: int = 0) -> torch.Tensor:
    """(B, K) distinct real candidates per request, -1 past each request's m."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(inp.cand_mask.shape, generator=g).masked_fill(~inp.cand_mask, 2.0)
    order = noise.argsort(dim=1)[:, :K]
    real = inp.cand_mask.gather(1, order)
    return torch.where(real, order, -1)


def random_inputs(ms: list[int], seed: int = 0) -> Inputs:
    """Hashed random requests with m[b] real candidates, padded to max(m)."""
    s, rng = TINY_SCHEMA, np.random.default_rng(seed)
    B, M = len(ms), max(ms)
    mask = np.arange(M)[None, :] < np.array(ms)[:, None]
    cat = np.stack([rng.integers(1, b, (B, M)) for b in s.categorical_buckets], axis=-1)
    dense = rng.standard_normal((B, M, len(s.item_dense))).astype(np.float32)
    return Inputs(
        item_id=torch.from_numpy(np.where(mask, rng.integers(1, s.item_id_buckets, (B, M)), 0)),
        item_cat=torch.from_numpy(np.where(mask[..., None], cat, 0)),
        item_dense=torch.from_numpy(np.where(mask[..., None], dense, 0).astype(np.float32)),
        upstream_score=torch.from_numpy(
            np.where(mask, rng.standard_normal((B, M)), 0).astype(np.float32)
        ),
        cand_mask=torch.from_numpy(mask),
        user_id=torch.from_numpy(rng.integers(1, s.user_id_buckets, B)),
        user_dense=torch.from_numpy(rng.standard_normal((B, len(s.user_dense)), np.float32)),
    )


def synthetic_request(cfg: ModelConfig, m: int, k: int, rng: np.random.Generator) -> RerankRequest:
    """A request of m candidates with a descending upstream score and random static
    embeddings (the cache's role): what the engine benchmarks time."""
    return RerankRequest(
        upstream_score=np.sort(rng.standard_normal(m)).astype(np.float32)[::-1].copy(),
        user_id=int(rng.integers(1, cfg.schema.user_id_buckets)),
        user_dense=rng.standard_normal(len(cfg.schema.user_dense)).astype(np.float32),
        k=k,
        static=rng.standard_normal((m, cfg.d_model)).astype(np.float32),
    )


def requests_of(
    model: GenReranker | None, inp: Inputs, ks: list[int], static: bool = True
) -> list[RerankRequest]:
    """One RerankRequest per row, with item features; static embeddings from the model's
    torch item tower (the cache's role) unless static=False (the engine embeds every
    candidate; no model needed)."""
    emb = None
    if static:
        assert model is not None, "static embeddings come from the model's item tower"
        with torch.no_grad():
            emb = model.embed_items(inp).numpy()  # (B, M, d)
    out = []
    for b, k in enumerate(ks):
        m = int(inp.cand_mask[b].sum())
        items = HashedItems(
            inp.item_id[b, :m].numpy(), inp.item_cat[b, :m].numpy(), inp.item_dense[b, :m].numpy()
        )
        out.append(
            RerankRequest(
                upstream_score=inp.upstream_score[b, :m].numpy(),
                user_id=int(inp.user_id[b]),
                user_dense=inp.user_dense[b].numpy(),
                k=k,
                static=None if emb is None else emb[b, :m],
                items=items,
            )
        )
    return out
