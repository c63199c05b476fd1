"""Tables (markdown) and plots (matplotlib PNG) of `python -m model results`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from model.cascade import LIST_ESTIMATORS
from model.tables import AGREEMENT_METRICS, GREF, ROWS, STRENGTHS, TABLES

matplotlib.use("Agg")  # no screen: files only
import matplotlib.pyplot as plt

LEAD = LIST_ESTIMATORS[0]  # the debiased list estimate the main tables show
COLUMNS = ("utility", LEAD, "list_ips", "ips", "ndcg@10", "auc", "passes", "decode_ms")
WORLDS = {"heldout": "held-out", "dev": "development"}


def _cell(m: dict[str, float], digits: int = 4) -> str:
    if m["spread"] > 0:
        return f"{m['mean']:.{digits}f} ± {m['spread']:.{digits}f}"
    return f"{m['mean']:.{digits}f}"


def _pct(x: float) -> str:
    return f"{x:+.2%}" if np.isfinite(x) else "–"


def write_markdown(summary: dict[str, Any], path: Path) -> None:
    rc = summary["config"]
    which = WORLDS[rc["worlds"]]
    share = summary["headroom_share"]
    lines = [
        f"# GReF on the simulated world ({which} worlds)",
        "",
        f"World seeds {list(rc['seeds'])} ({which}: "
        + (
            "never used to choose a recipe or a setting"
            if rc["worlds"] == "heldout"
            else "the recipes and their settings were chosen on these"
        )
        + f"), {rc['n_requests']} logged requests per world (80/10/10 split by time), "
        f"m = 30 candidates, k = {rc['k']}, {rc['n_test'] or 'all'} test requests per world, "
        f"at most {rc['epochs']} epochs per stage.",
        "",
        "- `utility`: true expected utility of the generated top-k under the simulator's user",
        "  model (the gold), mean ± sample std across worlds.",
        "- `share`: share of the headroom captured, (U − U_upstream) / (U_searched −",
        "  U_upstream), pooled over worlds.",
        f"- `{LEAD}`: the lead estimate of the generated list's utility from the logs alone.",
        "  A cascade click model of the displayed prefix fitted on the training logs",
        "  (category satiation and complements, abandonment, like / long view after a click)",
        "  gives each slot's expected feedback value given the items above it; each item's",
        "  relevance gets an offset from its own clicks in the training logs (what the",
        "  features do not show). `cascade_dm_items` is that direct method; `cascade_dr_items`",
        "  adds each shown logged item's residual, carried to its new slot by the model's",
        "  ratio and weighted by the logging policy's exposure propensity (doubly robust);",
        "  `cascade_blend` adds half the residual term. `cascade_dm` / `cascade_dr`: the same",
        "  without the item offsets (all in results.json and the τ table below).",
        "- `list_ips`: item-level IPS estimate of the generated list's utility from the logs",
        "  alone (examination propensities harvested from the training logs, the logging",
        "  policy's exposure propensities); `ips`: position-based IPS of reranking the exposed",
        "  items. These two drive epoch selection (model.train). No estimator reads the user",
        "  model.",
        "- `ndcg@10`, `auc`: logged metrics of reranking the exposed items (logged clicks).",
        "- `decode_ms`: median time of one request (batch 1, one CPU thread, torch eager),",
        "  all models in the same run.",
        "",
        f"Compute: {summary.get('world_seconds', summary['seconds']) / 60:.1f} min summed over "
        f"the worlds (generate, train, evaluate; {len(summary['worlds'])} worlds); this "
        f"report's run took {summary['seconds'] / 60:.1f} min (saved worlds are reused).",
        "",
    ]
    for table, title in TABLES.items():
        labels = [r.label for r in ROWS if r.table == table and r.label in summary["models"]]
        if not labels:
            continue
        cols = ("share", *COLUMNS)
        lines += [f"## {title}", "", "| model | " + " | ".join(cols) + " |"]
        lines.append("|---" * (len(cols) + 1) + "|")
        for label in labels:
            m = summary["models"][label]
            cells = [f"{share.get(label, float('nan')):.1%}"]
            cells += [_cell(m[c], 2 if c in ("passes", "decode_ms") else 4) for c in COLUMNS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _paired_lines(summary)
    lines += _claim_lines(summary)
    lines += _sensitivity_lines(summary)
    lines += _agreement_lines(summary)
    lines += _headroom_lines(summary)
    lines += _world_lines(summary)
    lines += [
        "Per-request true utilities of every row (each world's test requests) and full",
        "metrics (NDCG/MAP/clicks at 1, 3, 5, 10) are in results.json.",
        "",
        "![paired differences](paired_differences.png)",
        "![utility by model](utility_by_model.png)",
        "![utility vs latency](utility_vs_latency.png)",
        "![training curves](training_curves.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def _paired_lines(summary: dict[str, Any]) -> list[str]:
    vs = summary["paired"]["gref_vs"]
    if not vs:
        return []
    lines = [
        f"## {GREF} against every row (paired, same test requests)",
        "",
        "Δ = U(GReF) − U(row) per request; pooled = mean of the worlds' mean Δ, SE from the",
        "per-request SEs; 95% normal interval; p two-sided, Holm-corrected across the rows.",
        "",
        "| row | Δ utility | Δ / row | 95% interval | Holm p | GReF wins on worlds |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in vs.items():
        lines.append(
            f"| {label} | {r['diff']:+.4f} ± {r['se']:.4f} | {_pct(r['rel'])} "
            f"| [{r['lo']:+.4f}, {r['hi']:+.4f}] | {r['p_holm']:.2g} "
            f"| {int(r['wins'])}/{int(r['worlds'])} |"
        )
    return [*lines, ""]


def _claim_lines(summary: dict[str, Any]) -> list[str]:
    claims = summary["paired"]["claims"]
    if not claims:
        return []
    lines = [
        "## Ablations (paired, pooled over worlds)",
        "",
        "| a − b | Δ utility | Δ / b | 95% interval | a > b on worlds |",
        "|---|---|---|---|---|",
    ]
    for name, r in claims.items():
        lines.append(
            f"| {name} | {r['diff']:+.4f} ± {r['se']:.4f} | {_pct(r['rel'])} "
            f"| [{r['lo']:+.4f}, {r['hi']:+.4f}] | {int(r['wins'])}/{int(r['worlds'])} |"
        )
    return [*lines, ""]


def _sensitivity_lines(summary: dict[str, Any]) -> list[str]:
    sens = summary["sensitivity"]
    if len(sens) < 2:
        return []
    lines = [
        "## Sensitivity to list effects: GReF − PRM on U",
        "",
        "The same worlds with satiation and complements switched off, at default strength and",
        "doubled (WorldConfig overrides: "
        + "; ".join(f"{k}: {v or 'none'}" for k, v in STRENGTHS.items())
        + "). A method that models list effects widens its margin as they grow.",
        "",
        "| list effects | upstream | PRM on U | GReF | Δ (GReF − PRM on U) | Δ / PRM on U "
        "| 95% interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for strength in STRENGTHS:
        if strength in sens:
            r = sens[strength]
            lines.append(
                f"| {strength} | {r['upstream']:.4f} | {r['prm_u']:.4f} | {r['gref']:.4f} "
                f"| {r['diff']:+.4f} ± {r['se']:.4f} | {_pct(r['rel'])} "
                f"| [{r['lo']:+.4f}, {r['hi']:+.4f}] |"
            )
    return [*lines, ""]


def _agreement_lines(summary: dict[str, Any]) -> list[str]:
    gold = summary.get("logged_vs_gold") or {}
    agree = summary["agreement"]
    lines = [
        "## What the offline metrics reward",
        "",
        "The exposed items of each world's test requests in three orders, scored by NDCG@10 on",
        "the logged clicks, by the position-based IPS utility, by the cascade estimators (no",
        "exposure propensity: the same items) and by true utility",
        "(mean over worlds). The clicks were drawn under the logging order's position bias.",
        "",
        "| order of the exposed items | ndcg@10 (logged clicks) | IPS utility | "
        + " | ".join(LIST_ESTIMATORS)
        + " | true utility |",
        "|---" * (len(LIST_ESTIMATORS) + 4) + "|",
        *[
            f"| {k} | {v['ndcg@10']:.4f} | {v.get('ips', float('nan')):.4f} | "
            + " | ".join(f"{v.get(n, float('nan')):.4f}" for n in LIST_ESTIMATORS)
            + f" | {v['utility']:.4f} |"
            for k, v in gold.items()
        ],
        "",
        f"Kendall τ between each offline metric and true utility over the "
        f"{int(agree.get('pairs', 0))} (model row, world) pairs, and the mean τ within a world:",
        "",
        "| metric | τ over rows × worlds | mean τ within a world |",
        "|---|---|---|",
    ]
    for metric in AGREEMENT_METRICS:
        if metric not in agree:
            continue
        lines.append(
            f"| {metric} | {agree[metric]:.3f} | {agree[f'{metric} (within world)']:.3f} |"
        )
    return [*lines, ""]


def write_estimator_report(table: dict[str, Any], path: Path) -> None:
    """estimators.md: the offline metrics against true utility on the saved default-strength
    worlds (`python -m model estimators`), written whether or not the whole report could be
    written again, so the estimators' agreement is readable as soon as those worlds are."""
    worlds = ", ".join(str(w) for w in table["worlds"])
    lines = [
        "# Offline estimators against true utility",
        "",
        f"Saved worlds (default list-effect strength): {worlds}. Written by "
        "`python -m model estimators --out DIR` from each world's saved lists and logs.",
        "",
        *_agreement_lines(table),
    ]
    path.write_text("\n".join(lines))


def _headroom_lines(summary: dict[str, Any]) -> list[str]:
    room = summary["headroom"]
    names = ("logged", "upstream", "pointwise_relevance", "pointwise_value", "searched")
    return [
        "## Headroom of the world (true utility of oracle lists, mean over worlds)",
        "",
        "| list | true utility |",
        "|---|---|",
        *[f"| {k} | {room[k]:.4f} |" for k in names if k in room],
        "",
    ]


def _world_lines(summary: dict[str, Any]) -> list[str]:
    worlds = [w for w in summary["worlds"] if w["strength"] == "default"]
    labels = [r.label for r in ROWS if r.table == "main" and r.label in summary["models"]]
    lines = [
        "## Per world (true utility of the main rows)",
        "",
        "| row | " + " | ".join(f"seed {w['seed']}" for w in worlds) + " |",
        "|---" * (len(worlds) + 1) + "|",
    ]
    for label in labels:
        cells = [f"{w['rows'][label]['utility']:.4f}" for w in worlds]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot_results(
    summary: dict[str, Any], histories: list[dict[str, list[dict[str, Any]]]], out: Path
) -> None:
    _plot_paired(summary, out / "paired_differences.png")
    main = [r.label for r in ROWS if r.table in ("main", "stages", "omtp_loss")]
    main = [x for x in dict.fromkeys(main) if x in summary["models"]]
    means = [summary["models"][x]["utility"]["mean"] for x in main]
    spreads = [summary["models"][x]["utility"]["spread"] for x in main]
    fig, ax = plt.subplots(figsize=(9, 6))
    colors = ["#C44E52" if x == GREF else "#4C72B0" for x in main]
    ax.barh(main, means, xerr=spreads, color=colors, capsize=3)
    room = summary["headroom"]
    for name, style in (("pointwise_value", ":"), ("searched", "--")):
        ax.axvline(room[name], color="k", ls=style, lw=1, label=f"oracle: {name}")
    lo = min(means) - max(spreads) - 0.05
    ax.set_xlim(left=max(0.0, lo))
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("true expected utility of the top-k (higher is better)")
    ax.set_title("Utility by model (test split, mean ± std over worlds)")
    fig.tight_layout()
    fig.savefig(out / "utility_by_model.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, m in summary["models"].items():
        ax.errorbar(
            m["decode_ms"]["mean"], m["utility"]["mean"], yerr=m["utility"]["spread"], fmt="o"
        )
        ax.annotate(label, (m["decode_ms"]["mean"], m["utility"]["mean"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("decode latency, ms (batch 1, one CPU thread, torch eager)")
    ax.set_ylabel("true utility")
    ax.set_title("Utility vs decode latency")
    fig.tight_layout()
    fig.savefig(out / "utility_vs_latency.png", dpi=120)
    plt.close(fig)

    runs = list(histories[0]) if histories else []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in runs:
        for s, hist in enumerate(histories):
            h = hist.get(name, [])
            if not h:
                continue
            ep = [r["epoch"] for r in h]
            kw = {"label": name} if s == 0 else {}
            color = f"C{runs.index(name) % 10}"
            key = "valid_list_ips" if "valid_list_ips" in h[0] else "valid_ips"
            axes[0].plot(ep, [r["valid_loss"] for r in h], color=color, alpha=0.8, **kw)
            axes[1].plot(ep, [r[key] for r in h], color=color, alpha=0.8, **kw)
    axes[0].set_title("validation loss (own objective)")
    axes[0].set_yscale("symlog")
    axes[1].set_title("validation list IPS utility (selection metric)")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=120)
    plt.close(fig)


def _plot_paired(summary: dict[str, Any], path: Path) -> None:
    vs = summary["paired"]["gref_vs"]
    fig, ax = plt.subplots(figsize=(11, 5))
    if vs:
        labels = list(vs)
        rel = np.array([vs[x]["rel"] for x in labels]) * 100
        lo = np.array([vs[x]["rel_lo"] for x in labels]) * 100
        short = [x.split(" (")[0] for x in labels]  # "GReF, paper recipe (...)" -> its name
        ax.errorbar(rel, short, xerr=rel - lo, fmt="o", color="#C44E52", capsize=3)
        ax.axvline(0, color="k", lw=1)
        ax.axvline(2, color="k", lw=1, ls=":", label="+2%")
        ax.invert_yaxis()
        ax.legend(fontsize=7)
    ax.set_xlabel("GReF − row, % of the row's true utility (pooled, 95% interval)")
    ax.set_title(f"{GREF} against every row", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def readme_table(summary: dict[str, Any]) -> list[str]:
    """The README's one table: every main row's true utility, headroom share, the debiased
    list estimate, and GReF's paired difference against it (pooled, 95% interval, wins)."""
    vs = summary["paired"]["gref_vs"]
    share = summary["headroom_share"]
    lines = [
        "| row | true utility | headroom share | list IPS | GReF − row (95% interval) "
        "| GReF wins |",
        "|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        if row.table != "main" or row.label not in summary["models"]:
            continue
        m = summary["models"][row.label]
        cells = [f"{m['utility']['mean']:.3f}", f"{share[row.label]:.1%}"]
        cells.append(f"{m['list_ips']['mean']:.3f}")
        if row.label in vs:
            r = vs[row.label]
            cells.append(f"{_pct(r['rel'])} [{r['rel_lo']:+.2%}, {r['rel_hi']:+.2%}]")
            cells.append(f"{int(r['wins'])}/{int(r['worlds'])}")
        else:
            cells += ["", ""]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return lines
