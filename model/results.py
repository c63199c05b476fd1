"""`python -m model results`: the paper's tables on the simulated world, in one run.

For each seed: generate the world and its logs (Parquet, split by time), train every
model on the train split (early stopping on valid), then evaluate all of them on the
test split side by side:
- true utility of the generated top-k under the simulator's user model (the gold),
- AUC and NDCG / MAP / clicks @ {1, 3, 5, 10} of reranking the logged exposures,
- decoder passes and decode latency (batch 1, one thread, same process, same run).
Seeds are aggregated as mean and spread (sample std across seeds). Writes
results/results.json, results/results.md and PNG plots.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from contract.config import ModelConfig
from model.checkpoint import load_checkpoint
from model.evaluate import (
    Reranker,
    decode_latency_ms,
    generate_lists,
    item_ids_of,
    logged_metrics,
    logged_vs_gold,
)
from model.train import TrainConfig, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """One training run: a stage, its init (another run's name), config overrides."""

    name: str
    stage: str
    init: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


RUNS: tuple[Run, ...] = (
    Run("dnn", "dnn"),
    Run("prm", "prm"),
    # the same scorers trained on GReF's label (U), not clicks: how much of GReF's lead is
    # the label rather than the method
    Run("dnn_u", "dnn", train={"scorer_label": "utility"}),
    Run("prm_u", "prm", train={"scorer_label": "utility"}),
    Run("nar4rec", "nar"),
    Run("seq2slate", "clicks", model={"omtp_heads": 1}),
    Run("gref_pretrain", "pretrain"),
    # DPO: one epoch (longer drifts; see TrainConfig.dpo_nll)
    Run("gref", "dpo", init="gref_pretrain", train={"epochs": 1}),
    # head alignment: heads 1..n-1 learn the DPO model's own n = 1 decode (TrainConfig)
    Run("gref_aligned", "distill", init="gref", train={"epochs": 2}),
    Run("gref_ln_pretrain", "pretrain", train={"lambda2": 0.0}),
    Run("gref_ln", "dpo", init="gref_ln_pretrain", train={"epochs": 1}),
    Run("gref_dpo_only", "dpo", train={"epochs": 1}),
)

# (row label, run name or None for upstream, kind, items_per_pass, table)
GREF = "GReF (pre-train + DPO + head alignment, n=4)"
EVALS: tuple[tuple[str, str | None, str, int | None, str], ...] = (
    ("Upstream order", None, "upstream", None, "main"),
    ("DNN", "dnn", "dnn", None, "main"),
    ("PRM", "prm", "prm", None, "main"),
    ("DNN on U", "dnn_u", "dnn", None, "main"),
    ("PRM on U", "prm_u", "prm", None, "main"),
    ("Seq2Slate-like", "seq2slate", "gen_reranker", 1, "main"),
    ("NAR4Rec-like", "nar4rec", "nar4rec", None, "main"),
    (GREF, "gref_aligned", "gen_reranker", 4, "main"),
    ("Pre-train only", "gref_pretrain", "gen_reranker", 4, "stages"),
    ("DPO only", "gref_dpo_only", "gen_reranker", 4, "stages"),
    ("Pre-train + DPO", "gref", "gen_reranker", 4, "stages"),
    ("Pre-train + DPO + head alignment", "gref_aligned", "gen_reranker", 4, "stages"),
    ("L_n", "gref_ln", "gen_reranker", 4, "omtp_loss"),
    ("L_n + L_o", "gref", "gen_reranker", 4, "omtp_loss"),
    ("n = 1", "gref_aligned", "gen_reranker", 1, "heads"),
    ("n = 2", "gref_aligned", "gen_reranker", 2, "heads"),
    ("n = 4", "gref_aligned", "gen_reranker", 4, "heads"),
    ("n = 1, heads not aligned", "gref", "gen_reranker", 1, "heads"),
    ("n = 4, heads not aligned", "gref", "gen_reranker", 4, "heads"),
)

METRICS = ("utility", "auc", "ndcg@10", "map@10", "clicks@10", "passes", "decode_ms")
EXTRA_METRICS = tuple(f"{m}@{c}" for m in ("ndcg", "map", "clicks") for c in (1, 3, 5))


@dataclass(frozen=True)
class ResultsConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    n_requests: int = 100_000  # per seed; 3 seeds of everything fit in an hour on 2 cores
    epochs: int = 4
    k: int = 10
    n_test: int | None = None  # None = the whole test split
    latency_reps: int = 200
    threads: int = 2

    @classmethod
    def quick(cls, seed: int) -> ResultsConfig:
        return cls(seeds=(seed,), n_requests=8_000, epochs=2, latency_reps=30)


def run_seed(rc: ResultsConfig, seed: int, out: Path, progress: bool) -> dict[str, Any]:
    """Everything for one seed; returns {row label: metrics} and side facts."""
    from model.logs import read_logs, write_dataset
    from model.world import WorldConfig, generate_logs, headroom, true_utility

    t0 = time.perf_counter()
    data_dir = out / "data" / f"seed{seed}"
    world, logs = generate_logs(WorldConfig(), seed, rc.n_requests, progress=progress)
    model_cfg = ModelConfig.preset("fast")
    write_dataset(data_dir, logs, model_cfg.schema)
    # read back through the streaming reader: the same path users take with their own logs
    train_b, valid_b, test_b = (
        read_logs(data_dir / f"{split}.parquet") for split in ("train", "valid", "test")
    )
    if rc.n_test is not None:
        test_b = test_b.take(slice(0, rc.n_test))
    gen_seconds = time.perf_counter() - t0

    checkpoints: dict[str, Path] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    train_seconds: dict[str, float] = {}
    for run in RUNS:
        settings = {"epochs": rc.epochs, **run.train}
        settings["epochs"] = min(settings["epochs"], rc.epochs)
        tc = TrainConfig(stage=run.stage, seed=seed, threads=rc.threads, **settings)
        cfg = replace(model_cfg, **run.model)
        res = train(
            cfg,
            tc,
            train_b,
            valid_b,
            out / "runs" / f"seed{seed}" / run.name,
            init_from=checkpoints[run.init] if run.init else None,
            progress=progress,
        )
        checkpoints[run.name], histories[run.name] = res.best_dir, res.history
        train_seconds[run.name] = res.seconds
        log.info("seed %d: trained %s in %.0f s", seed, run.name, res.seconds)

    models = {name: load_checkpoint(path)[0] for name, path in checkpoints.items()}
    rows: dict[str, dict[str, float]] = {}
    per_request_utility: dict[str, np.ndarray] = {}
    for label, run_name, kind, ipp, _ in EVALS:
        r = Reranker(label, kind, models[run_name] if run_name else None, items_per_pass=ipp)
        order, passes = generate_lists(r, test_b, model_cfg.schema, rc.k)
        util = true_utility(world, test_b.user_id, item_ids_of(test_b, order))
        per_request_utility[label] = util
        metrics = logged_metrics(r, test_b, model_cfg.schema)
        metrics["utility"] = float(util.mean())
        metrics["passes"] = float(passes)
        metrics["decode_ms"] = decode_latency_ms(r, test_b, model_cfg.schema, rc.k, rc.latency_reps)
        rows[label] = metrics
    room = headroom(world, test_b.take(slice(0, 5000)))
    gold = logged_vs_gold(world, test_b.take(slice(0, 5000)))
    return {
        "logged_vs_gold": gold,
        "rows": rows,
        "histories": histories,
        "headroom": {k: float(v) for k, v in room.items()},
        "utility_sem_within_seed": {
            k: float(v.std(ddof=1) / np.sqrt(v.size)) for k, v in per_request_utility.items()
        },
        "n_test": len(test_b),
        "seconds": {"generate": gen_seconds, "train": train_seconds},
    }


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {metric: {mean, spread}}}, spread = sample std across seeds (0 for one seed)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, *_ in EVALS:
        out[label] = {}
        for metric in METRICS + EXTRA_METRICS:
            vals = np.array([s["rows"][label][metric] for s in per_seed], dtype=np.float64)
            spread = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
            out[label][metric] = {"mean": float(vals.mean()), "spread": spread}
    return out


def run(rc: ResultsConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed = [run_seed(rc, seed, out, progress) for seed in rc.seeds]
    summary = {
        "config": asdict(rc),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "seconds": time.perf_counter() - t0,
        "models": aggregate(per_seed),
        "headroom": {
            k: float(np.mean([s["headroom"][k] for s in per_seed])) for k in per_seed[0]["headroom"]
        },
        "logged_vs_gold": {
            order: {
                m: float(np.mean([s["logged_vs_gold"][order][m] for s in per_seed]))
                for m in ("ndcg@10", "utility")
            }
            for order in per_seed[0]["logged_vs_gold"]
        },
        "per_seed": [{k: v for k, v in s.items() if k != "histories"} for s in per_seed],
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    from model.report import plot_results, write_markdown

    write_markdown(summary, out / "results.md")
    plot_results(summary, [s["histories"] for s in per_seed], out)
    return summary
