"""The torch reference decode of a rerank body: what the service must serve for it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from contract.features import FeatureSchema, hash_ids, hash_items
from contract.ids import id_keys
from model.decode import beam_decode, greedy_decode
from model.network import GenReranker
from model.tensors import Inputs
from tests.support.tiny import TINY_SCHEMA as SCHEMA


def reference(
    model: GenReranker, body: dict[str, Any], beam: int = 1, schema: FeatureSchema = SCHEMA
) -> list[int | str]:
    """The torch decode (greedy, every head per pass; or beam search) of the same
    request, its ids keyed and hashed as training keys and hashes them; the chosen ids as
    the body has them."""
    cands = body["candidates"]
    ids = id_keys([c["item_id"] for c in cands])
    cat = np.array(
        [[c["features"].get(n, 0) for n in schema.categorical_names] for c in cands], np.int64
    )
    dense = np.array(
        [[c["features"].get(n, 0.0) for n in schema.item_dense] for c in cands], np.float32
    )
    h = hash_items(schema, ids[None], cat[None], dense[None])
    user = body["user"]
    inp = Inputs(
        item_id=torch.from_numpy(h.item_id),
        item_cat=torch.from_numpy(h.item_cat),
        item_dense=torch.from_numpy(h.item_dense),
        upstream_score=torch.tensor([[c["score"] for c in cands]], dtype=torch.float32),
        cand_mask=torch.ones((1, len(cands)), dtype=torch.bool),
        user_id=torch.from_numpy(
            hash_ids(id_keys([user["id"]]), schema.user_id_buckets, schema.hash_salt)
        ),
        user_dense=torch.tensor(
            [[user["features"].get(n, 0.0) for n in schema.user_dense]], dtype=torch.float32
        ),
    )
    if beam > 1:
        order = beam_decode(model, inp, body["k"], beam=beam).order[0].tolist()
    else:
        order = greedy_decode(model, inp, body["k"]).order[0].tolist()
    return [cands[i]["item_id"] for i in order]
