"""The one check that the service's limits fit a model: a request valid under the served
limits must never reach a model that cannot take it (an engine error, or a 422 after a
bundle reload)."""

from __future__ import annotations

from contract.config import ModelConfig


def limits_misfit(
    cfg: ModelConfig, max_candidates: int | None, max_k: int, items_per_pass: int | None
) -> str | None:
    """Why a model of config `cfg` cannot serve these limits (None: it can), naming the
    limit and the model's bound. max_candidates / items_per_pass None: the model's own."""
    if max_candidates is not None and max_candidates > cfg.max_candidates:
        return f"max_candidates={max_candidates} > the model's max_candidates {cfg.max_candidates}"
    if max_k > cfg.max_steps:
        return f"max_k={max_k} > the model's max_steps {cfg.max_steps}"
    if items_per_pass is not None and items_per_pass > cfg.omtp_heads:
        return f"items_per_pass={items_per_pass} > the model's {cfg.omtp_heads} heads"
    return None
