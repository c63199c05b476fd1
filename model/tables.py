"""What `python -m model results` trains and reports: the runs, the rows of each table and
the paired claims. One place that both model.results (which computes them) and
model.report (which writes them) read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model.cascade import LIST_ESTIMATORS


@dataclass(frozen=True)
class Run:
    """One training run: a stage, its init (another run's name), config overrides."""

    name: str
    stage: str
    init: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


# the larger Gen-Reranker of the size comparison (the default bundle is d = 32, 1 + 1)
LARGE = {"d_model": 64, "n_attn_heads": 4, "enc_layers": 2, "dec_layers": 2}

RUNS: tuple[Run, ...] = (
    Run("dnn", "dnn"),
    Run("prm", "prm"),
    # the same scorers trained on GReF's label (U), not clicks: how much of GReF's lead is
    # the label rather than the method
    Run("dnn_u", "dnn", train={"scorer_label": "utility"}),
    Run("prm_u", "prm", train={"scorer_label": "utility"}),
    Run("nar4rec", "nar"),
    Run("seq2slate", "clicks", model={"omtp_heads": 1}),
    # Seq2Slate-like on exposures sorted by U (the label the value stage learns)
    Run("seq2slate_u", "clicks", model={"omtp_heads": 1}, train={"scorer_label": "utility"}),
    Run("gref_pretrain", "pretrain"),
    # the paper's recipe: DPO (one epoch; longer drifts, see TrainConfig.dpo_nll), then
    # head alignment (heads 1..n-1 learn the DPO model's own n = 1 decode)
    Run("gref", "dpo", init="gref_pretrain", train={"epochs": 1}),
    Run("gref_aligned", "distill", init="gref", train={"epochs": 2}),
    Run("gref_ln_pretrain", "pretrain", train={"lambda2": 0.0}),
    Run("gref_ln", "dpo", init="gref_ln_pretrain", train={"epochs": 1}),
    Run("gref_dpo_only", "dpo", train={"epochs": 1}),
    # the list-aware recipe: exposure pre-training, then the prefix-conditioned value stage
    Run("gref_value", "value", init="gref_pretrain"),
    Run("gref_value_only", "value"),
    # the same recipe, larger
    Run("gref_pretrain_large", "pretrain", model=LARGE),
    Run("gref_value_large", "value", init="gref_pretrain_large"),
)

# runs of the sensitivity worlds (list effects off / doubled): what their rows need
SENSITIVITY_RUNS = ("prm_u", "gref_pretrain", "gref_value")


@dataclass(frozen=True)
class Row:
    """One row: a run decoded one way. run None = no model (upstream)."""

    label: str
    run: str | None
    kind: str  # evaluate.ListPolicy kind
    table: str
    items_per_pass: int | None = None
    list_rule: str = ""  # evaluate.ListPolicy.list_rule


GREF = "GReF (pre-train + value, n=4)"  # the list-aware recipe
GREF_PAPER = "GReF, paper recipe (pre-train + DPO + head alignment, n=4)"
UPSTREAM = "Upstream order"

ROWS: tuple[Row, ...] = (
    Row(UPSTREAM, None, "upstream", "main"),
    Row("Upstream + category cap", None, "upstream", "main", list_rule="cap"),
    Row("DNN", "dnn", "dnn", "main"),
    Row("PRM", "prm", "prm", "main"),
    Row("DNN on U", "dnn_u", "dnn", "main"),
    Row("PRM on U", "prm_u", "prm", "main"),
    Row("PRM on U + category cap", "prm_u", "prm", "main", list_rule="cap"),
    Row("PRM on U + category MMR", "prm_u", "prm", "main", list_rule="mmr"),
    Row("Seq2Slate-like", "seq2slate", "gen_reranker", "main", 1),
    Row("Seq2Slate-like on U-sorted lists", "seq2slate_u", "gen_reranker", "main", 1),
    Row("NAR4Rec-like", "nar4rec", "nar4rec", "main"),
    Row(GREF_PAPER, "gref_aligned", "gen_reranker", "main", 4),
    Row(GREF, "gref_value", "gen_reranker", "main", 4),
    Row("Pre-train only", "gref_pretrain", "gen_reranker", "stages", 4),
    Row("DPO only", "gref_dpo_only", "gen_reranker", "stages", 4),
    Row("Value only", "gref_value_only", "gen_reranker", "stages", 4),
    Row("Pre-train + DPO", "gref", "gen_reranker", "stages", 4),
    Row("Pre-train + DPO + head alignment", "gref_aligned", "gen_reranker", "stages", 4),
    Row("Pre-train + value", "gref_value", "gen_reranker", "stages", 4),
    Row("L_n", "gref_ln", "gen_reranker", "omtp_loss", 4),
    Row("L_n + L_o", "gref", "gen_reranker", "omtp_loss", 4),
    Row("n = 1", "gref_aligned", "gen_reranker", "heads", 1),
    Row("n = 2", "gref_aligned", "gen_reranker", "heads", 2),
    Row("n = 4", "gref_aligned", "gen_reranker", "heads", 4),
    Row("n = 1, heads not aligned", "gref", "gen_reranker", "heads", 1),
    Row("n = 4, heads not aligned", "gref", "gen_reranker", "heads", 4),
    Row("pre-train + value, n = 1", "gref_value", "gen_reranker", "heads", 1),
    Row("pre-train + value, n = 4", "gref_value", "gen_reranker", "heads", 4),
    Row("d = 32, 1 + 1 layers, n = 1", "gref_value", "gen_reranker", "size", 1),
    Row("d = 32, 1 + 1 layers, n = 4", "gref_value", "gen_reranker", "size", 4),
    Row("d = 64, 2 + 2 layers, n = 1", "gref_value_large", "gen_reranker", "size", 1),
    Row("d = 64, 2 + 2 layers, n = 4", "gref_value_large", "gen_reranker", "size", 4),
)
SENSITIVITY_ROWS = (UPSTREAM, "PRM on U", GREF)

TABLES = {
    "main": "Table 1 — every reranker and reference row",
    "stages": "Table 2a — training stages (n = 4)",
    "omtp_loss": "Table 2b — OMTP loss of the paper recipe: L_n vs L_n + L_o "
    "(pre-train + DPO, heads not aligned)",
    "heads": "Table 2c — items per decoder pass (n), same model",
    "size": "Table 2d — model size of the list-aware recipe",
}

# the ablation claims, checked as paired differences: (a, b)
CLAIMS = (
    ("Pre-train + value", "Pre-train only"),
    ("Pre-train + value", "Value only"),
    ("Pre-train + DPO", "Pre-train only"),
    ("Pre-train + DPO + head alignment", "Pre-train + DPO"),
    ("L_n + L_o", "L_n"),
    ("pre-train + value, n = 4", "pre-train + value, n = 1"),
    ("n = 4", "n = 1"),
    ("d = 64, 2 + 2 layers, n = 4", "d = 32, 1 + 1 layers, n = 4"),
)

# utility, logged metrics, the debiased estimates, decode cost
METRICS = (
    "utility", *LIST_ESTIMATORS, "list_ips", "ips", "ndcg@10", "auc", "map@10",
    "clicks@10", "passes", "decode_ms",
)  # fmt: skip
# the offline metrics whose Kendall τ with true utility results reports
AGREEMENT_METRICS = (*LIST_ESTIMATORS, "list_ips", "ips", "ndcg@10", "auc")
EXTRA_METRICS = tuple(f"{m}@{c}" for m in ("ndcg", "map", "clicks") for c in (1, 3, 5))

# list-effect strengths of the sensitivity worlds: WorldConfig overrides
STRENGTHS: dict[str, dict[str, float]] = {
    "off": {"satiation": 0.0, "complement": 0.0},
    "default": {},
    "doubled": {"satiation": 1.2, "complement": 1.6},
}


def competitors() -> list[str]:
    """The rows GReF (the list-aware recipe) is compared against: every other main row."""
    return [r.label for r in ROWS if r.table == "main" and r.label != GREF]
