"""`python -m model {generate,train,results,logged-vs-gold,convert-avito}` — the offline half
of gref-serve."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.distributed import World


def _generate(args: argparse.Namespace) -> int:
    from contract.config import ModelConfig
    from model.best_lists import headroom
    from model.dataset import write_dataset
    from model.simulated_logs import generate_logs
    from model.world import WorldConfig

    world, logs = generate_logs(
        WorldConfig(), args.seed, args.n_requests, progress=True, propensity=not args.no_propensity
    )
    out = Path(args.out)
    items = (world.item_id, world.item_cat, world.item_dense)
    write_dataset(out, logs, ModelConfig().schema, items=items, string_ids=args.string_ids)
    world.save(out / "world.npz")
    room = headroom(world, logs.take(slice(0, 5000)))
    print(json.dumps({"out": str(out), "requests": len(logs), "headroom": room}, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    """Alone, or one rank of `torchrun --nproc_per_node N -m model train ...`: each rank
    reads its own row groups of the logs (model/distributed.py)."""
    from model import distributed

    world = distributed.init()
    try:
        return _train_rank(args, world)
    finally:
        distributed.shutdown()


def _train_rank(args: argparse.Namespace, world: World) -> int:
    from contract.config import ModelConfig
    from model.distributed import read_shard
    from model.log_format import read_schema
    from model.train import TrainConfig, train

    data = Path(args.data)
    schema = read_schema(data / "train.parquet")
    cfg = ModelConfig.preset(args.preset, schema=schema)
    if args.heads is not None:
        cfg = replace(cfg, omtp_heads=args.heads)
    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    tc = TrainConfig(**overrides)
    res = train(
        cfg,
        tc,
        read_shard(data / "train.parquet", schema, world),
        read_shard(data / "valid.parquet", schema, world),
        args.out,
        init_from=args.init,
        resume=not args.no_resume,
    )
    if world.is_main:
        print(json.dumps({"best": str(res.best_dir), "seconds": round(res.seconds, 1)}))
    return 0


def _results(args: argparse.Namespace) -> int:
    from model.results import ResultsConfig, run

    rc = ResultsConfig.quick(args.worlds) if args.quick else ResultsConfig.for_worlds(args.worlds)
    if args.seeds:
        rc = replace(rc, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.strengths is not None:
        rc = replace(rc, strengths=tuple(s for s in args.strengths.split(",") if s))
    if args.runs:
        rc = replace(rc, runs=tuple(args.runs.split(",")))
    if args.large:
        rc = replace(rc, large=True)
    if args.threads:
        rc = replace(rc, threads=args.threads)
    if args.n_requests:
        rc = replace(rc, n_requests=args.n_requests)
    if args.epochs:
        rc = replace(rc, epochs=args.epochs)
    if args.value_epochs:
        rc = replace(rc, value_epochs=args.value_epochs)
    if args.worlds_only is not None:  # compute and save worlds only (a later run reports)
        from model.results import cached_world

        strengths = [s for s in args.worlds_only.split(",") if s]
        for i, seed in enumerate(rc.seeds):
            for strength in strengths:
                if strength != "default" and i >= rc.sensitivity_seeds:
                    continue
                cached_world(rc, seed, strength, Path(args.out), not args.no_progress)
        return 0
    summary = run(rc, args.out, progress=not args.no_progress)
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {args.out}/results.json, results.md and plots in {summary['seconds']:.0f} s")
    return 0


def _logged_vs_gold(args: argparse.Namespace) -> int:
    from model.evaluate import logged_vs_gold
    from model.log_io import read_logs
    from model.world import World

    data = Path(args.data)
    world = World.load(data / "world.npz")
    batch = read_logs(data / f"{args.split}.parquet")
    gold = logged_vs_gold(world, batch.take(slice(0, args.requests)))
    n = min(args.requests, len(batch))
    info = {"data": str(data), "split": args.split, "requests": n, "orders": gold}
    print(json.dumps(info, indent=2))
    return 0


def _estimators(args: argparse.Namespace) -> int:
    from model.results import rescore

    table = rescore(Path(args.out))
    print(json.dumps(table, indent=1))
    return 0


def _convert_avito(args: argparse.Namespace) -> int:
    from model.avito import convert_avito

    stats = convert_avito(args.search_stream, args.search_info, args.out, ads_info=args.ads_info)
    print(json.dumps(stats, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="simulate a world and write its logs (Parquet)")
    g.add_argument("--out", default="data/sim")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--n-requests", type=int, default=200_000)
    g.add_argument(
        "--no-propensity",
        action="store_true",
        help="do not log the logging policy's exposure propensities (their column is optional)",
    )
    g.add_argument(
        "--string-ids",
        action="store_true",
        help="write user and item ids as strings (u-<n>, sku-<n>), as many catalogs have "
        "them; the gold metrics (world.npz) need the integer ids",
    )
    g.set_defaults(fn=_generate)

    t = sub.add_parser("train", help="train one stage on logs in the Parquet schema")
    t.add_argument(
        "--stage",
        required=True,
        choices=["pretrain", "value", "dpo", "distill", "clicks", "dnn", "prm", "nar"],
        help="value: the list-aware stage (prefix-conditioned value model, --init a "
        "pre-trained checkpoint); distill: align the OMTP heads of a DPO model (--init) to "
        "its n = 1 decode",
    )
    t.add_argument("--data", required=True, help="directory with train/valid.parquet")
    t.add_argument("--out", required=True, help="checkpoint directory")
    t.add_argument("--init", help="checkpoint to start from (dpo: pre-trained; distill: DPO)")
    t.add_argument("--preset", default="fast", choices=["fast", "paper"])
    t.add_argument("--heads", type=int, help="OMTP heads n (default: the preset's)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", dest="batch_size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--lambda2", type=float, help="L_o weight; 0 = L_n only")
    t.add_argument("--beta", type=float)
    t.add_argument("--dpo-nll", dest="dpo_nll", type=float, help="NLL weight on Y_w in DPO")
    t.add_argument("--dpo-heads", dest="dpo_heads", type=int, help="heads DPO trains (0=all)")
    t.add_argument(
        "--scorer-label",
        dest="scorer_label",
        choices=["click", "utility"],
        help="dnn/prm BCE target and clicks' sort key",
    )
    t.add_argument("--select-on", dest="select_on", help="validation metric choosing the epoch")
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int)
    t.add_argument("--no-resume", action="store_true")
    t.set_defaults(fn=_train)

    r = sub.add_parser("results", help="train everything and write results/ (tables, plots)")
    r.add_argument(
        "--worlds",
        default="heldout",
        choices=["heldout", "dev"],
        help="held-out world seeds (reported) or development ones (for choosing settings)",
    )
    r.add_argument("--seeds", help="comma-separated world seeds instead of the set's own")
    r.add_argument(
        "--strengths",
        help="comma-separated sensitivity worlds beside default (off,doubled; '' = none)",
    )
    r.add_argument("--large", action="store_true", help="also train the larger Gen-Reranker")
    r.add_argument("--runs", help="comma-separated runs to train (and what they start from)")
    r.add_argument(
        "--worlds-only",
        metavar="STRENGTHS",
        help="only compute and save the worlds of these strengths (default,off,doubled), no "
        "report: a later `results` with the same settings reuses them",
    )
    r.add_argument("--threads", type=int, help="torch threads for training")
    r.add_argument("--quick", action="store_true", help="small version (minutes), one world")
    r.add_argument("--out", default="results")
    r.add_argument("--n-requests", type=int)
    r.add_argument("--epochs", type=int)
    r.add_argument("--value-epochs", dest="value_epochs", type=int)
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(fn=_results)

    v = sub.add_parser(
        "logged-vs-gold",
        help="logged NDCG@10 and true utility of the exposed items in the logging order, the "
        "best order under the true user model and by true relevance (a simulated world)",
    )
    v.add_argument("--data", default="data/default", help="logs + world.npz (`generate`)")
    v.add_argument("--split", default="test", choices=["train", "valid", "test"])
    v.add_argument("--requests", type=int, default=5000)
    v.set_defaults(fn=_logged_vs_gold)

    e = sub.add_parser(
        "estimators",
        help="score the saved worlds' rows again with the offline estimators (Kendall τ with "
        "true utility, logged-vs-gold) without retraining, and write results.json / "
        "results.md again from the saved worlds",
    )
    e.add_argument("--out", default="results", help="a `results` directory with worlds/")
    e.set_defaults(fn=_estimators)

    a = sub.add_parser("convert-avito", help="Avito Context Ad Clicks TSVs -> our log schema")
    a.add_argument("--search-stream", required=True)
    a.add_argument("--search-info", required=True)
    a.add_argument("--ads-info")
    a.add_argument("--out", required=True)
    a.set_defaults(fn=_convert_avito)

    args = p.parse_args(argv)
    # under torchrun every rank logs; the rank says which one
    rank = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {rank}%(name)s: %(message)s",
    )
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
