"""Tables (markdown) and plots (matplotlib PNG) of `python -m model results`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from model.results import GREF

matplotlib.use("Agg")  # no screen: files only
import matplotlib.pyplot as plt

TABLES = {
    "main": "Table 1 — GReF against the baselines (test split)",
    "stages": "Table 3a — training stages (n = 4)",
    "omtp_loss": "Table 3b — OMTP loss: L_n vs L_n + L_o (both pre-train + DPO, heads not aligned)",
    "heads": "Table 3c — items per decoder pass, same GReF model (and before head alignment)",
}
COLUMNS = ("utility", "auc", "ndcg@10", "map@10", "clicks@10", "passes", "decode_ms")


def _cell(m: dict[str, float], digits: int = 4) -> str:
    if m["spread"] > 0:
        return f"{m['mean']:.{digits}f} ± {m['spread']:.{digits}f}"
    return f"{m['mean']:.{digits}f}"


def write_markdown(summary: dict[str, Any], path: Path) -> None:
    from model.results import EVALS

    rc = summary["config"]
    lines = [
        "# GReF on the simulated world",
        "",
        f"Seeds {rc['seeds']}, {rc['n_requests']} logged requests per seed (80/10/10 time split),",
        f"m = 30 candidates, k = {rc['k']}. Mean ± sample std across seeds. `utility` = true",
        "expected utility of the generated top-k under the simulator's user model (the gold);",
        "AUC / NDCG / MAP / clicks rerank the logged exposures; `decode_ms` = median time of",
        "one request (batch 1, one CPU thread, torch eager), all models in the same run.",
        f"Total run time: {summary['seconds'] / 60:.1f} min.",
        "",
    ]
    for table, title in TABLES.items():
        lines += [f"## {title}", "", "| model | " + " | ".join(COLUMNS) + " |"]
        lines.append("|---" * (len(COLUMNS) + 1) + "|")
        for label, _, _, _, t in EVALS:
            if t != table:
                continue
            m = summary["models"][label]
            cells = [_cell(m[c], 2 if c in ("passes", "decode_ms") else 4) for c in COLUMNS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _paired_lines(summary)
    room = summary["headroom"]
    lines += [
        "## Headroom of the world (true utility, mean over seeds, 5000 test requests each)",
        "",
        "| list | true utility |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in room.items()],
        "",
        *_gold_lines(summary.get("logged_vs_gold")),
        "Full metrics (NDCG/MAP/clicks at 1, 3, 5, 10) per model are in results.json.",
        "",
        "![utility by model](utility_by_model.png)",
        "![utility vs latency](utility_vs_latency.png)",
        "![training curves](training_curves.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def _gold_lines(gold: dict[str, dict[str, float]] | None) -> list[str]:
    """What logged NDCG@10 rewards here: orders of the EXPOSED items (evaluate.logged_vs_gold)."""
    if not gold:
        return []
    return [
        "## What the logged NDCG rewards in this world (the exposed items only, mean over seeds)",
        "",
        "The same exposed items of 5000 test requests per seed, in three orders, scored by",
        "NDCG@10 on the logged clicks (as the tables above) and by true utility. The clicks",
        "were drawn under the logging order's position bias: the order that is best for the",
        "users (found by a search under the true user model) scores LOWER logged NDCG.",
        "",
        "| order of the exposed items | ndcg@10 (logged clicks) | true utility |",
        "|---|---|---|",
        *[f"| {k} | {v['ndcg@10']:.4f} | {v['utility']:.4f} |" for k, v in gold.items()],
        "",
    ]


# (a, b): the claims the paper's tables make, checked as paired per-seed differences
PAIRS = (
    (GREF, "PRM"),
    (GREF, "DNN"),
    (GREF, "PRM on U"),
    (GREF, "DNN on U"),
    (GREF, "Seq2Slate-like"),
    (GREF, "NAR4Rec-like"),
    ("Pre-train + DPO", "Pre-train only"),
    ("Pre-train only", "Upstream order"),
    ("Pre-train + DPO + head alignment", "Pre-train + DPO"),
    ("L_n + L_o", "L_n"),
    ("n = 4", "n = 1"),
    ("n = 4, heads not aligned", "n = 1, heads not aligned"),
)


def _sd(x: np.ndarray) -> float:
    return float(x.std(ddof=1)) if x.size > 1 else 0.0


def _paired_lines(summary: dict[str, Any]) -> list[str]:
    """Each seed is a different world, so the across-seed spread of a model's utility is
    mostly world-to-world variation; the claims are about differences on the same world."""
    rows = [seed["rows"] for seed in summary["per_seed"]]
    lines = [
        "## Paired differences (same world and test requests; mean ± std over seeds)",
        "",
        "| a − b | Δ utility | Δ utility / b | Δ ndcg@10 | a > b on seeds |",
        "|---|---|---|---|---|",
    ]
    for a, b in PAIRS:
        du = np.array([r[a]["utility"] - r[b]["utility"] for r in rows])
        rel = np.array([r[a]["utility"] / r[b]["utility"] - 1 for r in rows])
        dn = np.array([r[a]["ndcg@10"] - r[b]["ndcg@10"] for r in rows])
        lines.append(
            f"| {a} − {b} | {du.mean():+.4f} ± {_sd(du):.4f} | {rel.mean():+.2%} "
            f"| {dn.mean():+.4f} ± {_sd(dn):.4f} | {int((du > 0).sum())}/{du.size} |"
        )
    return [*lines, ""]


def plot_results(
    summary: dict[str, Any], histories: list[dict[str, list[dict[str, Any]]]], out: Path
) -> None:
    from model.results import EVALS

    main = [label for label, *_, t in EVALS if t in ("main", "stages", "omtp_loss")]
    main = list(dict.fromkeys(main))
    means = [summary["models"][x]["utility"]["mean"] for x in main]
    spreads = [summary["models"][x]["utility"]["spread"] for x in main]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.barh(main, means, xerr=spreads, color="#4C72B0", capsize=3)
    lo = min(means) - 0.05 * (max(means) - min(means) + 1e-9) - max(spreads)
    ax.set_xlim(left=max(0.0, lo * 0.98))
    ax.invert_yaxis()
    ax.set_xlabel("true expected utility of the top-k (higher is better)")
    ax.set_title("Utility by model (test split, mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(out / "utility_by_model.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, *_ in EVALS:
        m = summary["models"][label]
        ax.errorbar(
            m["decode_ms"]["mean"], m["utility"]["mean"], yerr=m["utility"]["spread"], fmt="o"
        )
        ax.annotate(label, (m["decode_ms"]["mean"], m["utility"]["mean"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("decode latency, ms (batch 1, one CPU thread, torch eager)")
    ax.set_ylabel("true utility")
    ax.set_title("Utility vs decode latency")
    fig.tight_layout()
    fig.savefig(out / "utility_vs_latency.png", dpi=120)
    plt.close(fig)

    runs = list(histories[0])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in runs:
        for s, hist in enumerate(histories):
            h = hist.get(name, [])
            if not h:
                continue
            ep = [r["epoch"] for r in h]
            kw = {"label": name} if s == 0 else {}
            color = f"C{runs.index(name) % 10}"
            axes[0].plot(ep, [r["valid_loss"] for r in h], color=color, alpha=0.8, **kw)
            axes[1].plot(ep, [r["valid_ndcg@10"] for r in h], color=color, alpha=0.8, **kw)
    axes[0].set_title("validation loss (own objective)")
    axes[1].set_title("validation NDCG@10 (rerank exposures)")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=120)
    plt.close(fig)
