"""The decode policy's ladder level by level: what each level buys (true utility) and what it
costs (decoder passes, engine decode time).

    python -m model results --worlds dev --strengths '' --runs gref_value --out results/dev-ladder
    python tests/bench/bench_ladder_quality.py --results results/dev-ladder [--bundle artifacts
                                         [--data data/default]] [--reps 100] [--json PATH]

Quality, on the development worlds only (model.results.DEV_SEEDS; a held-out seed is
refused: this chooses a setting): each world's `gref_value` run (pre-train + value, the
default recipe), trained by `model results` above, decodes that world's test requests (the
ones `model results` evaluates: the first n_test of the test split) at every level of the
ladder -- beam 3, beam 2, greedy n = 1, 2, 4 items per pass -- with the torch reference
decode, k = 10 (model.decode.beam_decode / greedy_decode through model.evaluate; the
engine's decode loops in service/decoding.py reproduce both, tests/unit/test_engine.py).
Each list's true utility under the world's user model (the simulator's ground truth), then
each level against greedy n = 1 paired per request, pooled over the worlds
(model.stats.pooled: the mean of the worlds' mean differences and its standard error; 95%
interval = diff +- 1.96 SE).

With --data (the `model generate` data the --bundle's model was trained on, a development
world's): the same comparison through the engine's own decode (service/decoding.py, the
bundle's item tower and greedy.onnx), paired against n = 1 on that world's test requests.

Cost, on the served bundle: the engine as the service runs it (onnxruntime, one intra-op
thread), one request of m = 30, 100, 200 candidates (random static embeddings: the cache
path), k = 10, Engine.rerank at each level without a deadline (so n = 4 decodes in one
greedy.onnx call when the bundle has it, as served), round-robin over levels per
repetition, each timed call right after an untimed one of the same level; p50 / p90 wall ms
of the engine call (encode + decode). Nothing else should run on the
cores meanwhile for figures worth comparing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from contract.config import ModelConfig  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.evaluate import ListPolicy, generate_lists, item_ids_of  # noqa: E402
from model.log_io import read_logs  # noqa: E402
from model.results import DEV_SEEDS, HELDOUT_SEEDS, ResultsConfig  # noqa: E402
from model.stats import paired, pooled  # noqa: E402
from model.tables import STRENGTHS  # noqa: E402
from model.tensors import to_inputs  # noqa: E402
from model.user_model import true_utility  # noqa: E402
from model.world import World, WorldConfig  # noqa: E402
from service.engine import EngineConfig, open_engine  # noqa: E402
from service.settings import resolve_bundle_dir  # noqa: E402
from tests.support.inputs import requests_of, synthetic_request  # noqa: E402

RUN = "gref_value"
# (name, items per pass, beam width), most quality first, as service/policy.ladder orders them
LEVELS: tuple[tuple[str, int, int], ...] = (
    ("beam3", 1, 3),
    ("beam2", 1, 2),
    ("n1", 1, 1),
    ("n2", 2, 1),
    ("n4", 4, 1),
)
BASE = "n1"


def world_utilities(results: Path, seed: int, k: int) -> tuple[dict[str, np.ndarray], dict]:
    """One development world: each level's per-request true utility and its passes."""
    if seed in HELDOUT_SEEDS:
        raise SystemExit(f"seed {seed} is a held-out world: choose settings on {DEV_SEEDS}")
    tag = f"seed{seed}"
    ckpt = results / "runs" / tag / RUN / "best"
    if not ckpt.is_dir():
        raise SystemExit(f"{ckpt}: missing (train it: see this script's docstring)")
    world = World.generate(replace(WorldConfig(), **STRENGTHS["default"]), seed)
    schema = ModelConfig.preset("fast").schema
    test_b = read_logs(results / "data" / tag / "test.parquet")
    n_test = ResultsConfig.for_worlds("dev").n_test
    if n_test is not None:
        test_b = test_b.take(slice(0, n_test))
    model = load_checkpoint(ckpt)[0]
    util: dict[str, np.ndarray] = {}
    passes: dict[str, int] = {}
    torch.set_num_threads(1)
    for name, p, w in LEVELS:
        policy = ListPolicy(name, "gen_reranker", model, items_per_pass=p, beam=w)
        order, passes[name] = generate_lists(policy, test_b, schema, k)
        util[name] = true_utility(world, test_b.user_id, item_ids_of(test_b, order))
    m = test_b.item_id.shape[1]
    return util, {"seed": seed, "requests": len(test_b), "m": int(m), "passes": passes}


def quality(results: Path, seeds: tuple[int, ...], k: int) -> dict[str, Any]:
    per_world = [world_utilities(results, s, k) for s in seeds]
    utils = [u for u, _ in per_world]
    out: dict[str, Any] = {"worlds": [info for _, info in per_world], "levels": {}}
    for name, _, _ in LEVELS:
        row: dict[str, Any] = {"utility": float(np.mean([u[name].mean() for u in utils]))}
        if name != BASE:
            row["vs_n1"] = pooled([u[name] for u in utils], [u[BASE] for u in utils])
        row["passes"] = [info["passes"][name] for _, info in per_world]
        out["levels"][name] = row
    beam3, n4 = [u["beam3"] for u in utils], [u["n4"] for u in utils]
    out["beam3_vs_n4"] = pooled(beam3, n4)
    return out


def serving_quality(bundle: Path, data: Path, n: int, k: int) -> dict[str, Any]:
    """The served bundle through the engine's own decode (service/decoding.py; n = 4 in one
    greedy.onnx call when the bundle has it), no deadline, on the first n test requests of
    the `model generate` data it was trained on (world.npz: the simulator's ground truth),
    candidates embedded by the bundle's item tower; each level against n = 1, paired."""
    engine = open_engine(str(resolve_bundle_dir(bundle)), EngineConfig(device="cpu"))
    world = World.load(data / "world.npz")
    if world.seed in HELDOUT_SEEDS:
        raise SystemExit(f"{data}: world seed {world.seed} is held out")
    test_b = read_logs(data / "test.parquet").take(slice(0, n))
    inp = to_inputs(test_b, engine.model_config.schema)
    reqs = requests_of(None, inp, [k] * len(test_b), static=False)
    util: dict[str, np.ndarray] = {}
    passes: dict[str, float] = {}
    for name, p, w in LEVELS:
        order = np.full((len(reqs), k), -1, np.int64)
        ran = []
        for s in range(0, len(reqs), 32):
            for i, r in enumerate(engine.rerank(reqs[s : s + 32], items_per_pass=p, beam=w)):
                order[s + i, : len(r.order)] = r.order
                ran.append(r.passes)
        util[name] = true_utility(world, test_b.user_id, item_ids_of(test_b, order))
        passes[name] = float(np.mean(ran))
    levels = {
        name: {
            "utility": float(util[name].mean()),
            "passes": passes[name],
            **({"vs_n1": paired(util[name], util[BASE])} if name != BASE else {}),
        }
        for name, _, _ in LEVELS
    }
    return {"bundle": engine.version, "data": str(data), "seed": world.seed,
            "requests": len(reqs), "levels": levels}  # fmt: skip


def cost(bundle: Path, ms: tuple[int, ...], k: int, reps: int, warmup: int) -> dict[str, Any]:
    engine = open_engine(str(resolve_bundle_dir(bundle)), EngineConfig(device="cpu"))
    cfg = engine.model_config
    engine.warmup()
    calls = {}
    for m in ms:
        rng = np.random.default_rng(m)
        req = synthetic_request(cfg, m, k, rng)
        for name, p, w in LEVELS:
            calls[(m, name)] = lambda r=req, p=p, w=w: engine.rerank([r], items_per_pass=p, beam=w)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[tuple[int, str], list[float]] = {key: [] for key in calls}
    keys = list(calls)
    for rep in range(reps):
        for j in range(len(keys)):
            key = keys[(rep + j) % len(keys)]
            calls[key]()
            t0 = time.perf_counter()
            calls[key]()
            times[key].append(time.perf_counter() - t0)
    table: dict[str, Any] = {}
    for (m, name), xs in times.items():
        table.setdefault(str(m), {})[name] = {
            "p50_ms": float(np.percentile(xs, 50)) * 1e3,
            "p90_ms": float(np.percentile(xs, 90)) * 1e3,
        }
    return {"bundle": engine.version, "reps": reps, "by_m": table}


def _vs(vs: dict[str, float] | None) -> str:
    if not vs:
        return "(reference)"
    return (
        f"{vs['diff']:+.4f} +- {vs['se']:.4f} ({100 * vs['rel']:+.2f}%)   "
        f"[{vs['lo']:+.4f}, {vs['hi']:+.4f}]"
    )


def render(q: dict[str, Any] | None, s: dict[str, Any] | None, c: dict[str, Any] | None) -> str:
    lines = []
    if q is not None:
        worlds = ", ".join(
            f"seed {w['seed']} ({w['requests']} req, m = {w['m']})" for w in q["worlds"]
        )
        lines += [
            f"true utility, {RUN}, k = 10, development worlds: {worlds}",
            "level   utility   passes   vs n = 1 (pooled, paired)        95% interval",
        ]
        for name, _, _ in LEVELS:
            row = q["levels"][name]
            passes = "/".join(str(p) for p in row["passes"])
            lines.append(f"{name:<7} {row['utility']:.4f}   {passes:<7}  {_vs(row.get('vs_n1'))}")
        b = q["beam3_vs_n4"]
        lines.append(
            f"beam3 vs n4: {b['diff']:+.4f} +- {b['se']:.4f} ({100 * b['rel']:+.2f}%) "
            f"[{b['lo']:+.4f}, {b['hi']:+.4f}]"
        )
    if s is not None:
        lines += [
            "",
            f"true utility, the served bundle {s['bundle']} through the engine's decode, "
            f"{s['requests']} test requests of {s['data']} (world seed {s['seed']})",
            "level   utility   passes   vs n = 1 (paired)               95% interval",
        ]
        for name, _, _ in LEVELS:
            row = s["levels"][name]
            lines.append(
                f"{name:<7} {row['utility']:.4f}   {row['passes']:<7.1f}  {_vs(row.get('vs_n1'))}"
            )
    if c is not None:
        lines += ["", f"engine call (encode + decode), batch 1, k = 10, {c['bundle']}, "
                  f"{c['reps']} reps: p50 / p90 ms"]  # fmt: skip
        lines.append("m     " + "".join(f"{n:>15}" for n, _, _ in LEVELS))
        for m, row in c["by_m"].items():
            cells = "".join(
                f"{row[n]['p50_ms']:>8.2f} /{row[n]['p90_ms']:>5.2f}" for n, _, _ in LEVELS
            )
            lines.append(f"{m:<6}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--results", type=Path, help="a `model results --worlds dev` output dir")
    ap.add_argument("--seeds", default=",".join(map(str, DEV_SEEDS)))
    ap.add_argument("--bundle", type=Path, help="a bundle (or artifacts dir) to time")
    ap.add_argument("--data", type=Path, help="`model generate` data of --bundle's model")
    ap.add_argument("--requests", type=int, default=2000, help="test requests of --data")
    ap.add_argument("--ms", default="30,100,200")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.results is None and a.bundle is None:
        ap.error("give --results (quality), --bundle (cost) or both")
    seeds = tuple(int(s) for s in a.seeds.split(",") if s)
    q = quality(a.results, seeds, a.k) if a.results else None
    c = None
    if a.bundle is not None and a.reps > 0:
        c = cost(a.bundle, tuple(int(m) for m in a.ms.split(",")), a.k, a.reps, a.warmup)
    s = None
    if a.data is not None:
        if a.bundle is None:
            ap.error("--data needs --bundle")
        s = serving_quality(a.bundle, a.data, a.requests, a.k)
    print(render(q, s, c))
    if a.json:
        a.json.write_text(json.dumps({"quality": q, "serving": s, "cost": c}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
