"""`python -m model results`: every reranker on simulated worlds, compared on the gold.

Worlds come in two disjoint sets of seeds: development worlds (the recipes and their
settings were chosen on these, on the validation split) and held-out worlds (reported,
never used to choose anything). `make results` runs the held-out set. For each world:
generate it and its logs (Parquet, split by time, with the logging policy's exposure
propensities), train every run on the train split (each stage selects its epoch on the
validation split, model.train), then evaluate every row on the same test requests:
- true utility of the generated top-k under the simulator's user model (the gold), kept
  per request so that two rows can be compared request by request (model.stats);
- the debiased estimates from the logs alone (model.estimators, model.cascade): item-level
  IPS of the generated lists ("list_ips") and position-based IPS of reranking the exposed
  items ("ips"), with examination propensities harvested from the training logs, and the
  cascade model's list estimates;
- logged AUC and NDCG / MAP / clicks @ {1, 3, 5, 10} of reranking the logged exposures;
- decoder passes and decode latency (batch 1, one thread, same process, same run).
Sensitivity worlds repeat the comparison of GReF and PRM on U with the list effects
(satiation, complements) switched off and doubled (tables.STRENGTHS).
Writes results.json (per-request utilities included), results.md and PNG plots.

One idea, kept in one module at its size: the results run, from the worlds to the numbers
of its tables (run, cache and rescore the worlds; aggregate, compare, agreement,
sensitivity). The tables' definitions are in model/tables.py, their rendering in
model/report.py.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from contract.config import ModelConfig
from model.cascade import (
    LIST_ESTIMATORS,
    fit_cascade,
    fit_item_offsets,
    list_estimators,
    load_cascade,
    rerank_estimators,
    save_cascade,
)
from model.checkpoint import load_checkpoint
from model.estimators import (
    examination_propensities,
    kendall_tau,
    list_ips,
)
from model.evaluate import (
    ListPolicy,
    decode_latency_ms,
    generate_lists,
    item_ids_of,
    logged_metrics,
    logged_vs_gold,
)
from model.stats import holm, pooled
from model.tables import (
    AGREEMENT_METRICS,
    CLAIMS,
    EXTRA_METRICS,
    GREF,
    METRICS,
    ROWS,
    RUNS,
    SENSITIVITY_ROWS,
    SENSITIVITY_RUNS,
    STRENGTHS,
    UPSTREAM,
    Row,
    competitors,
)
from model.train import TrainConfig, train

log = logging.getLogger(__name__)

HELDOUT_SEEDS = (100, 101, 102, 103, 104)
DEV_SEEDS = (0, 1)


@dataclass(frozen=True)
class ResultsConfig:
    worlds: str = "heldout"  # heldout | dev: which set of world seeds
    seeds: tuple[int, ...] = HELDOUT_SEEDS
    n_requests: int = 20_000  # per world (80/10/10 split by time)
    epochs: int = 3  # per stage (at most: each stage stops early on validation)
    value_epochs: int = 6  # the value stage's (it keeps improving longer)
    k: int = 10
    n_test: int | None = 3_000  # test requests evaluated (None = the whole test split)
    latency_reps: int = 100
    threads: int = 2
    strengths: tuple[str, ...] = ("off", "doubled")  # sensitivity worlds beside default
    sensitivity_seeds: int = 3  # the first this many seeds get the sensitivity worlds
    large: bool = False  # also train the larger Gen-Reranker of Table 2d (`make results-size`)
    runs: tuple[str, ...] = ()  # only these runs (and the runs they start from); () = all

    def __post_init__(self) -> None:
        if self.worlds not in ("heldout", "dev"):
            raise ValueError(f"worlds {self.worlds!r}: heldout | dev")
        bad = [s for s in self.strengths if s not in STRENGTHS or s == "default"]
        if bad:
            raise ValueError(f"strengths {bad}: want names of {sorted(STRENGTHS)} but default")

    @classmethod
    def for_worlds(cls, worlds: str, **overrides: Any) -> ResultsConfig:
        seeds = HELDOUT_SEEDS if worlds == "heldout" else DEV_SEEDS
        return cls(worlds=worlds, seeds=seeds, **overrides)

    @classmethod
    def quick(cls, worlds: str = "heldout") -> ResultsConfig:
        """Small enough for the tests: one world of each strength, few requests."""
        seed = HELDOUT_SEEDS[0] if worlds == "heldout" else DEV_SEEDS[0]
        return cls(
            worlds=worlds,
            seeds=(seed,),
            n_requests=3_000,
            epochs=1,
            value_epochs=1,
            n_test=200,
            latency_reps=5,
            large=False,
        )


def _wanted_runs(rc: ResultsConfig, sensitivity: bool) -> set[str]:
    """The runs a world trains: rc.runs (or all; the sensitivity worlds' own set), less the
    larger model's without rc.large, plus every run one of them starts from."""
    by_name = {r.name: r for r in RUNS}
    unknown = sorted(set(rc.runs) - set(by_name))
    if unknown:
        raise ValueError(f"unknown runs {unknown} (known: {sorted(by_name)})")

    def chain(name: str) -> list[str]:  # the run and the runs it starts from
        init = by_name[name].init
        return [name, *(chain(init) if init else [])]

    def large(name: str) -> bool:
        return any("d_model" in by_name[n].model for n in chain(name))

    wanted = set(SENSITIVITY_RUNS) if sensitivity else set(rc.runs or by_name)
    return {n for w in wanted if rc.large or not large(w) for n in chain(w)}


def _decode_key(row: Row) -> tuple[Any, ...]:
    return (row.run, row.kind, row.items_per_pass, row.list_rule)


def run_world(
    rc: ResultsConfig, seed: int, strength: str, out: Path, progress: bool
) -> dict[str, Any]:
    """Everything for one world: per-row metrics, per-request utilities, side facts."""
    from model.best_lists import headroom
    from model.dataset import write_dataset
    from model.log_io import read_logs
    from model.simulated_logs import generate_logs
    from model.user_model import true_utility
    from model.world import WorldConfig

    t0 = time.perf_counter()
    tag = f"seed{seed}" if strength == "default" else f"seed{seed}-{strength}"
    data_dir = out / "data" / tag
    world_cfg = replace(WorldConfig(), **STRENGTHS[strength])
    world, logs = generate_logs(world_cfg, seed, rc.n_requests, progress=progress, propensity=True)
    model_cfg = ModelConfig.preset("fast")
    write_dataset(data_dir, logs, model_cfg.schema)
    # read back through the streaming reader: the same path users take with their own logs
    train_b, valid_b, test_b = (
        read_logs(data_dir / f"{split}.parquet") for split in ("train", "valid", "test")
    )
    if rc.n_test is not None:
        test_b = test_b.take(slice(0, rc.n_test))
    exam = examination_propensities(train_b)
    gen_seconds = time.perf_counter() - t0

    sensitivity = strength != "default"
    wanted = _wanted_runs(rc, sensitivity)
    rows = [r for r in ROWS if (r.run is None or r.run in wanted)]
    if sensitivity:
        rows = [r for r in rows if r.label in SENSITIVITY_ROWS]

    checkpoints: dict[str, Path] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    train_seconds: dict[str, float] = {}
    for run in RUNS:
        if run.name not in wanted:
            continue
        most = rc.value_epochs if run.stage == "value" else rc.epochs
        settings = {"epochs": most, **run.train}
        settings["epochs"] = min(settings["epochs"], most)
        tc = TrainConfig(stage=run.stage, seed=seed, threads=rc.threads, **settings)
        cfg = replace(model_cfg, **run.model)
        res = train(
            cfg,
            tc,
            train_b,
            valid_b,
            out / "runs" / tag / run.name,
            init_from=checkpoints[run.init] if run.init else None,
            progress=progress,
        )
        checkpoints[run.name], histories[run.name] = res.best_dir, res.history
        train_seconds[run.name] = res.seconds
        log.info("%s: trained %s in %.0f s", tag, run.name, res.seconds)

    models = {name: load_checkpoint(path)[0] for name, path in checkpoints.items()}
    orders: dict[str, np.ndarray] = {}  # first row label of each decode -> (B, k) order
    metrics_by_key: dict[tuple[Any, ...], dict[str, float]] = {}
    util_by_key: dict[tuple[Any, ...], np.ndarray] = {}
    out_rows: dict[str, dict[str, float]] = {}
    utility: dict[str, list[float]] = {}
    for row in rows:
        key = _decode_key(row)
        if key not in metrics_by_key:
            r = ListPolicy(
                row.label,
                row.kind,
                models[row.run] if row.run else None,
                items_per_pass=row.items_per_pass,
                list_rule=row.list_rule,
            )
            order, passes = generate_lists(r, test_b, model_cfg.schema, rc.k)
            util = true_utility(world, test_b.user_id, item_ids_of(test_b, order))
            m = logged_metrics(r, test_b, model_cfg.schema, exam=exam)
            m["utility"] = float(util.mean())
            m["list_ips"] = float(np.mean(list_ips(test_b, order, exam)))
            m["passes"] = float(passes)
            m["decode_ms"] = decode_latency_ms(r, test_b, model_cfg.schema, rc.k, rc.latency_reps)
            metrics_by_key[key], util_by_key[key] = m, util
            orders[row.label] = order
        out_rows[row.label] = metrics_by_key[key]
        utility[row.label] = [round(float(x), 5) for x in util_by_key[key]]
    room = headroom(world, test_b)
    gold_orders: dict[str, np.ndarray] = {}
    gold = logged_vs_gold(world, test_b, exam=exam, orders_out=gold_orders)
    save_orders(out / "worlds" / f"{tag}.orders.npz", test_b, orders, gold_orders)
    return {
        "seed": seed,
        "strength": strength,
        "rows": out_rows,
        "utility": utility,
        "headroom": {k: float(v) for k, v in room.items()},
        "logged_vs_gold": gold,
        "exam_propensity": [float(x) for x in exam],
        "histories": histories,
        "n_test": len(test_b),
        "seconds": {
            "generate": gen_seconds,
            "train": train_seconds,
            "total": time.perf_counter() - t0,
        },
    }


def save_orders(
    path: Path, test_b: Any, orders: dict[str, np.ndarray], gold: dict[str, np.ndarray]
) -> None:
    """A world's lists on its test requests, so that an offline estimator can be scored
    again without retraining (`python -m model estimators`): each decode's (B, k) candidate
    indices under the first row label that uses it, and the logged-vs-gold check's orders
    of the exposed items. One .npz of int arrays and a JSON string (nothing pickled)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"row{i}": o.astype(np.int16) for i, o in enumerate(orders.values())}
    arrays |= {f"gold{i}": o.astype(np.int16) for i, o in enumerate(gold.values())}
    meta = json.dumps({"rows": list(orders), "gold": list(gold)})
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, meta_json=np.array(meta), request_id=test_b.request_id, **arrays)
    tmp.replace(path)


def load_orders(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """save_orders' file: request ids, {row label: order}, {gold order name: order}."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta_json"]))
        rows = {lab: z[f"row{i}"].astype(np.int64) for i, lab in enumerate(meta["rows"])}
        gold = {name: z[f"gold{i}"].astype(np.int64) for i, name in enumerate(meta["gold"])}
        return z["request_id"], rows, gold


def list_estimates(out: Path, tag: str, world: dict[str, Any]) -> dict[str, Any]:
    """The list-level estimates (model.cascade.LIST_ESTIMATORS) of a saved world's rows
    and logged-vs-gold orders, from its saved lists (save_orders) and its logs alone: the
    cascade model and its item offsets are fitted on the training logs (and kept as
    worlds/<tag>.cascade.npz; one saved without the offsets gets them).
    {"rows": {label: {name: estimate}}, "gold": {order: {name: estimate}}}; every row label
    of the world gets the estimates of its decode."""
    from model.log_io import read_logs

    request_id, orders, gold = load_orders(out / "worlds" / f"{tag}.orders.npz")
    data = out / "data" / tag
    test_b = read_logs(data / "test.parquet").take(slice(0, len(request_id)))
    if not np.array_equal(test_b.request_id, request_id):
        raise ValueError(f"{tag}: the saved lists are not of its test requests")
    cascade_path = out / "worlds" / f"{tag}.cascade.npz"
    cascade = load_cascade(cascade_path) if cascade_path.exists() else None
    if cascade is None or cascade.item_ids is None:
        train_b = read_logs(data / "train.parquet")
        cascade = fit_item_offsets(cascade or fit_cascade(train_b), train_b)
        save_cascade(cascade, cascade_path)
    scorers = list_estimators(test_b, np.asarray(world["exam_propensity"]), cascade)
    by_key = {
        _decode_key(r): {n: float(np.mean(f(orders[r.label]))) for n, f in scorers.items()}
        for r in ROWS
        if r.label in orders
    }
    rows = {r.label: by_key[_decode_key(r)] for r in ROWS if r.label in world["rows"]}
    rerank = rerank_estimators(test_b, cascade)
    return {
        "rows": rows,
        "gold": {
            name: {n: float(np.mean(f(order))) for n, f in rerank.items()}
            for name, order in gold.items()
        },
    }


def with_list_estimates(out: Path, tag: str, world: dict[str, Any]) -> dict[str, Any]:
    """The world with list_estimates merged into its rows and logged-vs-gold orders."""
    est = list_estimates(out, tag, world)
    for label, vals in est["rows"].items():
        world["rows"][label] |= vals
    for name, vals in est["gold"].items():
        world["logged_vs_gold"][name] |= vals
    return world


def estimator_table(out: Path, strength: str = "default") -> dict[str, Any]:
    """Score every saved world's rows again with the offline estimators, without
    retraining: the rows' lists (save_orders), the world's logs and its true utilities.
    Returns {"worlds", "agreement": τ table, "logged_vs_gold": {order: {metric: mean}}}."""
    worlds = []
    for path in sorted((out / "worlds").glob("*.json")):
        saved = json.loads(path.read_text())["world"]
        if saved["strength"] == strength and path.with_suffix(".orders.npz").exists():
            worlds.append(with_list_estimates(out, path.stem, saved))
    return _estimator_summary(worlds)


def _estimator_summary(worlds: list[dict[str, Any]]) -> dict[str, Any]:
    gold = {
        o: {m: float(np.mean([w["logged_vs_gold"][o][m] for w in worlds])) for m in v}
        for o, v in (worlds[0]["logged_vs_gold"].items() if worlds else ())
    }
    return {
        "worlds": [w["seed"] for w in worlds],
        "agreement": agreement(worlds),
        "logged_vs_gold": gold,
    }


def rescore(out: Path) -> dict[str, Any]:
    """`python -m model estimators`: the list-level estimates of every saved world (each
    strength) computed again from its saved lists and logs and saved with the world; then,
    when out/results.json exists, results.json, results.md and the plots are written again
    from the saved worlds (nothing retrained: when a world of the report is not saved with
    its settings, the report stays as it is and "not_rewritten" says why). The default
    worlds' estimator table is written to estimators.md / estimators.json either way. Returns
    estimator_table's summary of the default worlds."""
    default = []
    for path in sorted((out / "worlds").glob("*.json")):
        if not path.with_suffix(".orders.npz").exists():
            continue
        saved = json.loads(path.read_text())
        world = with_list_estimates(out, path.stem, saved["world"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": saved["key"], "world": world}))
        tmp.replace(path)
        if world["strength"] == "default":
            default.append(world)
    table = _estimator_summary(default)
    if default:
        from model.report import write_estimator_report

        write_estimator_report(table, out / "estimators.md")
        (out / "estimators.json").write_text(json.dumps(table, indent=1))
    summary_path = out / "results.json"
    if summary_path.exists():
        cfg = json.loads(summary_path.read_text())["config"]
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
        try:
            run(ResultsConfig(**cfg), out, progress=False, reuse_only=True)
            table["rewrote"] = [str(summary_path), str(out / "results.md")]
        except RuntimeError as e:
            table["not_rewritten"] = str(e)
    return table


def aggregate(worlds: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {metric: {mean, spread}}} over worlds, spread = sample std (0 for one)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in ROWS:
        have = [w["rows"][row.label] for w in worlds if row.label in w["rows"]]
        if not have:
            continue
        out[row.label] = {}
        for metric in METRICS + EXTRA_METRICS:
            vals = np.array([h[metric] for h in have], dtype=np.float64)
            spread = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
            out[row.label][metric] = {"mean": float(vals.mean()), "spread": spread}
    return out


def _util(worlds: list[dict[str, Any]], label: str) -> list[np.ndarray]:
    return [np.asarray(w["utility"][label]) for w in worlds]


def compare(worlds: list[dict[str, Any]]) -> dict[str, Any]:
    """GReF against every other main row (pooled paired differences, Holm-corrected across
    the rows, per-world differences) and the ablation claims."""
    names = [c for c in competitors() if all(c in w["utility"] for w in worlds)]
    vs: dict[str, dict[str, Any]] = {}
    if all(GREF in w["utility"] for w in worlds):
        for c in names:
            res = pooled(_util(worlds, GREF), _util(worlds, c))
            res["per_world"] = [
                float(np.mean(np.asarray(w["utility"][GREF]) - np.asarray(w["utility"][c])))
                for w in worlds
            ]
            vs[c] = res
        for c, p in zip(vs, holm([vs[c]["p"] for c in vs]), strict=True):
            vs[c]["p_holm"] = p
    claims = {}
    for a, b in CLAIMS:
        if all(a in w["utility"] and b in w["utility"] for w in worlds):
            claims[f"{a} − {b}"] = pooled(_util(worlds, a), _util(worlds, b))
    return {"gref_vs": vs, "claims": claims}


def headroom_share(worlds: list[dict[str, Any]]) -> dict[str, float]:
    """Per row: (U_row − U_upstream) / (U_searched − U_upstream), pooled over worlds (all
    on the same test requests)."""
    up = np.mean([w["headroom"]["upstream"] for w in worlds])
    top = np.mean([w["headroom"]["searched"] for w in worlds])
    out = {}
    for row in ROWS:
        if all(row.label in w["rows"] for w in worlds):
            u = np.mean([w["rows"][row.label]["utility"] for w in worlds])
            out[row.label] = float((u - up) / (top - up))
    for oracle in ("pointwise_relevance", "pointwise_value", "searched"):
        u = np.mean([w["headroom"][oracle] for w in worlds])
        out[f"oracle: {oracle}"] = float((u - up) / (top - up))
    return out


def agreement(worlds: list[dict[str, Any]]) -> dict[str, float]:
    """Kendall τ between each offline metric and true utility over the model rows × worlds
    (distinct trained models and decodes; the upstream rows are no model), and the mean of
    the within-world τ."""
    labels, seen = [], set()
    for row in ROWS:
        if row.run is not None and _decode_key(row) not in seen:
            seen.add(_decode_key(row))
            labels.append(row.label)
    out = {}
    for metric in AGREEMENT_METRICS:
        xs, ys, within = [], [], []
        for w in worlds:
            have = [lab for lab in labels if metric in w["rows"].get(lab, {})]
            x = [w["rows"][lab][metric] for lab in have]
            y = [w["rows"][lab]["utility"] for lab in have]
            if len(have) > 2 and np.all(np.isfinite(x)):
                within.append(kendall_tau(np.array(x), np.array(y)))
            xs += x
            ys += y
        ok = np.isfinite(xs)
        out[metric] = kendall_tau(np.array(xs)[ok], np.array(ys)[ok]) if ok.sum() > 2 else np.nan
        out[f"{metric} (within world)"] = float(np.mean(within)) if within else float("nan")
        out["pairs"] = float(len(xs))
    return out


def sensitivity(by_strength: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """GReF − PRM on U, pooled over the worlds of each list-effect strength."""
    out = {}
    for strength, worlds in by_strength.items():
        if worlds and all(GREF in w["utility"] and "PRM on U" in w["utility"] for w in worlds):
            res = pooled(_util(worlds, GREF), _util(worlds, "PRM on U"))
            res["gref"] = float(np.mean([w["rows"][GREF]["utility"] for w in worlds]))
            res["prm_u"] = float(np.mean([w["rows"]["PRM on U"]["utility"] for w in worlds]))
            res["upstream"] = float(np.mean([w["rows"][UPSTREAM]["utility"] for w in worlds]))
            out[strength] = res
    return out


def _world_key(rc: ResultsConfig, seed: int, strength: str) -> str:
    """What a world's saved result depends on (the set of worlds and threads do not)."""
    other = ("seeds", "strengths", "worlds", "sensitivity_seeds", "threads")
    settings = {k: v for k, v in asdict(rc).items() if k not in other}
    return json.dumps({"seed": seed, "strength": strength, **settings}, sort_keys=True)


def _has_list_estimates(world: dict[str, Any]) -> bool:
    return all(n in r for r in world["rows"].values() for n in LIST_ESTIMATORS)


def cached_world(
    rc: ResultsConfig,
    seed: int,
    strength: str,
    out: Path,
    progress: bool,
    reuse_only: bool = False,
) -> dict[str, Any]:
    """run_world, saved as out/worlds/<tag>.json and reused by a later run with the same
    settings (an interrupted `make results` picks up where it stopped). reuse_only: a
    world that is not saved with these settings is an error (nothing is trained)."""
    tag = f"seed{seed}" if strength == "default" else f"seed{seed}-{strength}"
    path = out / "worlds" / f"{tag}.json"
    key = _world_key(rc, seed, strength)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            log.info("%s: reusing %s", tag, path)
            world = dict(saved["world"])
            if _has_list_estimates(world):
                return world
            world = with_list_estimates(out, tag, world)  # saved before the estimators
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "world": world}))
            tmp.replace(path)
            return world
        if reuse_only:
            raise RuntimeError(f"{tag}: {path} was made with other settings")
        log.info("%s: %s was made with other settings: recomputing", tag, path)
    if reuse_only:
        raise RuntimeError(f"{tag}: no saved world in {path.parent} (`python -m model results`)")
    world = with_list_estimates(out, tag, run_world(rc, seed, strength, out, progress))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "world": world}))
    tmp.replace(path)
    return world


def run(
    rc: ResultsConfig, out: str | Path, progress: bool = True, reuse_only: bool = False
) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    by_strength: dict[str, list[dict[str, Any]]] = {"default": []}
    for i, seed in enumerate(rc.seeds):
        by_strength["default"].append(cached_world(rc, seed, "default", out, progress, reuse_only))
        for strength in rc.strengths if i < rc.sensitivity_seeds else ():
            by_strength.setdefault(strength, []).append(
                cached_world(rc, seed, strength, out, progress, reuse_only)
            )
    worlds = by_strength["default"]
    summary = {
        "config": asdict(rc),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "seconds": time.perf_counter() - t0,
        # every world's own time (generate, train, evaluate), also when it was reused
        "world_seconds": float(
            sum(w["seconds"]["total"] for ws in by_strength.values() for w in ws)
        ),
        "models": aggregate(worlds),
        "paired": compare(worlds),
        "headroom": {
            k: float(np.mean([w["headroom"][k] for w in worlds])) for k in worlds[0]["headroom"]
        },
        "headroom_share": headroom_share(worlds),
        "agreement": agreement(worlds),
        "sensitivity": sensitivity(by_strength),
        "logged_vs_gold": {
            order: {
                m: float(np.mean([w["logged_vs_gold"][order][m] for w in worlds]))
                for m in worlds[0]["logged_vs_gold"][order]
            }
            for order in worlds[0]["logged_vs_gold"]
        },
        "worlds": [
            {k: v for k, v in w.items() if k != "histories"}
            for ws in by_strength.values()
            for w in ws
        ],
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    from model.report import plot_results, write_markdown

    write_markdown(summary, out / "results.md")
    plot_results(summary, [w["histories"] for w in worlds], out)
    return summary
