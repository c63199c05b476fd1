"""Frozen configs of the offline stages. Every artifact carries the config that made it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from model.features import FeatureSchema


@dataclass(frozen=True)
class ModelConfig:
    """Gen-Reranker (and the baselines' shared sizes)."""

    schema: FeatureSchema = field(default_factory=FeatureSchema)
    d_model: int = 32  # small: the default preset targets sub-millisecond CPU decode at m = 30
    n_attn_heads: int = 2
    enc_layers: int = 1
    dec_layers: int = 1
    ffn_mult: int = 2
    omtp_heads: int = 4  # n: items proposed per decoder pass (paper: 4)
    max_candidates: int = 256  # size of the upstream-position embedding
    max_steps: int = 64  # longest generated list (decoder position embedding)
    dropout: float = 0.0

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name == "fast":
            base = cls()
        elif name == "paper":  # paper defaults: 4 encoder + 4 decoder layers, n = 4
            base = cls(d_model=64, n_attn_heads=4, enc_layers=4, dec_layers=4, omtp_heads=4)
        else:
            raise ValueError(f"unknown preset {name!r} (fast | paper)")
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema"] = self.schema.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["schema"] = FeatureSchema.from_dict(d["schema"])
        return cls(**d)
