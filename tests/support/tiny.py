"""The tiny feature schema and model config the unit tests share (fast to build and run)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from contract.config import ModelConfig
from contract.features import FeatureSchema

TINY_SCHEMA = FeatureSchema(
    item_id_buckets=97,
    user_id_buckets=13,
    item_categorical=(("category", 7), ("creator", 11)),
    item_dense=("quality", "duration", "freshness"),
    user_dense=("pref_0", "pref_1", "diversity"),
)


def tiny_config(**overrides: Any) -> ModelConfig:
    """d = 16, two layers each side, n = 3 heads (so items_per_pass 1, 2, n are three cases)."""
    base = ModelConfig(
        schema=TINY_SCHEMA,
        d_model=16,
        n_attn_heads=2,
        enc_layers=2,
        dec_layers=2,
        ffn_mult=2,
        omtp_heads=3,
        max_candidates=32,
        max_steps=16,
    )
    return replace(base, **overrides)
