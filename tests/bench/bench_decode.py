"""OMTP decode: gref-serve at n = 4 vs n = 1 items per pass, beside a one-pass NAR4Rec-like
baseline of the same size, all in onnxruntime, in one process.

    python tests/bench/bench_decode.py [--bundle artifacts] [--reps 300] [--json PATH]
    pytest -m bench -s tests/bench/test_bench_decode.py      (a short run on a tiny bundle)

The paper (T4): GReF with OMTP 12.97 ms, without OMTP 24.29 ms (1.87x), NAR4Rec 12.67 ms.
Target: gref-serve's n = 4 decode at most 1.5x the one-pass baseline's process CPU, per m.

Both sides run the same way: onnxruntime on CPU with the engine's session options (ONE
intra-op thread, sequential, full graph optimization), batch 1, k = 10, m in {30, 100, 200}
padded to the engine's candidate bucket, static item embeddings given (the item tower is
excluded on BOTH sides: the cache path).
- gref n=4: the engine's n = 4 decode as it serves it without a deadline: with a bundle
  that has greedy.onnx, Engine.decode_one_call (encoder, BOS pass, every decoder pass and
  every pick in ONE onnxruntime call), else as n=4 multi;
- gref n=4 multi / n=1: Engine.encode + Engine.decode (encoder.onnx once, with the first
  decoder pass folded in when the bundle has it; decoder.onnx once per later pass; the
  numpy masking/argmax of each pass: the path under a deadline the one call does not
  fit), at items_per_pass 4 and 1;
  all on a batch prepared once, with the bundle's weights; n=4 and n=4 multi give the
  same lists (checked before timing).
- NAR4Rec-like: model.baselines.NAR4Rec built from the bundle's ModelConfig (same d_model,
  attention heads, encoder layers, feature schema; its position decoder has
  min(2, dec_layers) blocks, as the class builds it) with RANDOM weights (decode time does
  not depend on them), exported here to ONNX (dynamo=False, as export/graphs.py) with its
  item tower swapped for a pass-through, so the graph takes the same static embeddings
  (one static-shape graph per bucket, see export_nar): encoder + k position queries + the
  (k, M) position x candidate matrix, in ONE run; then
  the greedy assignment of positions 0..k-1 to the best free candidate, in numpy, inside
  the timed time (as the engine's numpy selection is inside its decode time).
Every repetition times each (m, variant) once, round-robin, so drifting machine load hits
all variants alike; each timed call comes right after an untimed call of the same variant,
so every variant is measured warm (its weights and buffers in cache, as on a server that
runs one model) and no variant inherits another's cache state; warm-up discarded; p50 and
p90 of wall time per cell. The process CPU
time of each call is recorded beside it: on a shared machine a call that is preempted
waits without running, which wall time counts and CPU time does not, so the CPU-time
ratios show what the work itself costs. Ratios, never asserted; the target reads wall p50.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from contract.config import ModelConfig  # noqa: E402
from model.baselines import NAR4Rec  # noqa: E402
from model.checkpoint import build_model  # noqa: E402
from model.tensors import Inputs  # noqa: E402

# the engine's own optimization levels and session.run fast path, so both sides run alike
from service.engine import (  # noqa: E402
    Engine,
    EngineConfig,
    open_engine,
)
from service.ort_sessions import OPT_LEVELS, fast_run  # noqa: E402
from service.settings import resolve_bundle_dir  # noqa: E402
from tests.support.inputs import synthetic_request  # noqa: E402

PAPER_MS = {"omtp": 12.97, "no_omtp": 24.29, "nar4rec": 12.67}
TARGET = 1.5  # n = 4 decode / one-pass baseline, at most
NAR_INPUTS = ["static", "upstream_score", "cand_mask", "user_id", "user_dense"]
VARIANTS = ("gref_n4", "gref_n4_multi", "gref_n1", "nar")


class StaticGiven(nn.Module):
    """Stands in for the item tower: the static embeddings come in as `item_dense`."""

    def forward(
        self, item_id: torch.Tensor, item_cat: torch.Tensor, item_dense: torch.Tensor
    ) -> torch.Tensor:
        return item_dense


class NARGraph(nn.Module):
    """static (B, M, d), upstream_score (B, M), cand_mask (B, M) bool, user_id (B,),
    user_dense (B, Fu) -> scores (B, k, M): NAR4Rec.forward for k positions, its item
    tower replaced by the given static embeddings (as encoder.onnx takes them)."""

    def __init__(self, model: NAR4Rec, k: int) -> None:
        super().__init__()
        self.model, self.k = model, k
        # in place: the model is this benchmark's own random one; NAR4Rec.forward unchanged
        self.model.encoder.items = StaticGiven()  # type: ignore[assignment]

    def forward(
        self,
        static: torch.Tensor,
        upstream_score: torch.Tensor,
        cand_mask: torch.Tensor,
        user_id: torch.Tensor,
        user_dense: torch.Tensor,
    ) -> torch.Tensor:
        unused = user_id.new_empty(0)
        inp = Inputs(
            item_id=cand_mask,  # read for its shape only (inp.m)
            item_cat=unused,
            item_dense=static,
            upstream_score=upstream_score,
            cand_mask=cand_mask,
            user_id=user_id,
            user_dense=user_dense,
        )
        return self.model(inp, self.k)


def export_nar(graph: NARGraph, bucket: int, path: Path, opset: int) -> None:
    """NARGraph for batch 1 and `bucket` candidates to `path`, STATIC shapes: torch 2.13's
    traced nn.MultiheadAttention bakes the sequence length in (q.view(tgt_len, ...) becomes
    a constant), so one graph with a dynamic candidates axis is not possible with the
    TorchScript exporter. One graph per bucket (the engine pads to buckets anyway); if
    static shapes (more constant folding in ORT) change anything, they favour the baseline."""
    d, Fu = graph.model.d_model, graph.model.encoder.user.dense.in_features
    g = torch.Generator().manual_seed(bucket)
    mask = torch.ones(1, bucket, dtype=torch.bool)
    mask[0, bucket // 2 :] = False  # values are inputs, not baked: any padding will do
    args = (
        torch.randn(1, bucket, d, generator=g),
        torch.randn(1, bucket, generator=g),
        mask,
        torch.tensor([1]),
        torch.randn(1, Fu, generator=g),
    )
    # torch's fused encoder-layer kernel (the eval fast path) has no ONNX symbolic: trace
    # the plain ops instead
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic
            torch.onnx.export(
                graph,
                args,
                str(path),
                input_names=NAR_INPUTS,
                output_names=["scores"],
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def assign(scores: np.ndarray, blocked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NAR4Rec.rerank's selection in numpy, batch 1: positions 0..k-1 in turn take their
    best still-free candidate. scores (k, M) float32, blocked (M,) 0 = free, -inf = padding
    (consumed) -> order (k,) int64, chosen scores (k,) float32."""
    k = scores.shape[0]
    order = np.empty(k, np.int64)
    chosen = np.empty(k, np.float32)
    s = np.empty_like(blocked)
    for t in range(k):
        np.add(scores[t], blocked, out=s)
        i = int(s.argmax())
        order[t], chosen[t] = i, s[i]
        blocked[i] = -np.inf
    return order, chosen


@dataclass
class Cell:
    m: int
    bucket: int
    passes: dict[str, int]
    times: dict[str, list[float]]  # wall seconds per request, per variant
    cpu: dict[str, list[float]]  # process CPU seconds per request, per variant


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1e3  # ms


def nar_session(path: Path, config: EngineConfig) -> ort.InferenceSession:
    """The engine's session options (threads, sequential, optimization level)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = config.intra_op_threads
    opts.inter_op_num_threads = config.inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = OPT_LEVELS[config.optimization]
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


RunFn = Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]


def make_cell(
    engine: Engine, nar: NARGraph, nar_for: Callable[[int], RunFn], m: int, k: int
) -> tuple[Cell, dict[str, Callable[[], Any]]]:
    """One candidate set of size m, padded once to the engine's bucket; a timed callable per
    variant. The exported baseline is checked against its torch module first."""
    cfg = engine.model_config
    rng = np.random.default_rng(m)
    request = synthetic_request(cfg, m, k, rng)
    batch = engine.prepare([request])  # (1, bucket, d): the engine's padding and mask
    bucket = int(batch.static.shape[1])
    nar_feeds = {
        "static": batch.static,
        "upstream_score": batch.upstream_score,
        "cand_mask": batch.cand_mask,
        "user_id": batch.user_id,
        "user_dense": batch.user_dense,
    }
    padding = np.where(batch.cand_mask[0], np.float32(0), np.float32(-np.inf))  # (bucket,)
    nar_run = nar_for(bucket)

    def gref(p: int) -> Callable[[], Any]:
        def run() -> Any:
            return engine.decode(engine.encode(batch), batch.k, p)

        return run

    one_call_passes = engine.one_call_passes(k, 4)

    def gref_n4() -> Any:
        if not one_call_passes:
            return engine.decode(engine.encode(batch), batch.k, 4)
        return engine.decode_one_call(batch, one_call_passes)

    def nar_rerank() -> tuple[np.ndarray, np.ndarray]:
        scores = nar_run(["scores"], nar_feeds)[0][0]  # (k, bucket)
        return assign(scores, padding.copy())

    runners = {"gref_n4": gref_n4, "gref_n4_multi": gref(4), "gref_n1": gref(1),
               "nar": nar_rerank}  # fmt: skip
    passes = {v: runners[v]().passes for v in ("gref_n4", "gref_n4_multi", "gref_n1")}
    passes["nar"] = 1
    one, multi = runners["gref_n4"](), runners["gref_n4_multi"]()
    if not (np.array_equal(one.order, multi.order) and np.array_equal(one.scores, multi.scores)):
        raise AssertionError(f"m={m}: one-call list {one.order} != multi-call {multi.order}")
    with torch.no_grad():
        ref = nar(*(torch.from_numpy(v) for v in nar_feeds.values()))[0].numpy()  # (k, bucket)
    got = nar_run(["scores"], nar_feeds)[0][0]
    err = float(np.abs(got[:, :m] - ref[:, :m]).max())
    if err > 1e-4:
        raise AssertionError(f"m={m}: NAR4Rec ONNX scores differ from torch by {err:.2e}")
    order = nar_rerank()[0]
    if not np.array_equal(order, assign(ref, padding.copy())[0]):
        raise AssertionError(f"m={m}: NAR4Rec ONNX order {order} != its torch order")
    return Cell(m, bucket, passes, {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}), runners


def run(
    bundle: Path = ROOT / "artifacts",
    reps: int = 300,
    warmup: int = 30,
    ms: tuple[int, ...] = (30, 100, 200),
    k: int = 10,
) -> tuple[str, dict[str, Any]]:
    """-> (the printed table, the figures as a JSON-ready dict). bundle: a bundle dir or an
    artifacts dir with a `latest` file."""
    path = resolve_bundle_dir(bundle)
    config = EngineConfig(device="cpu", intra_op_threads=1, inter_op_threads=1)
    engine = open_engine(str(path), config)
    cfg: ModelConfig = engine.model_config
    if cfg.omtp_heads < 4:
        raise SystemExit(f"{path}: {cfg.omtp_heads} OMTP heads; this benchmark needs n >= 4")
    if k > cfg.max_steps or max(ms) > cfg.max_candidates:
        raise SystemExit(f"{path}: k={k} or m={max(ms)} beyond the model's range")
    engine.warmup()
    opset = int(engine.bundle.manifest["opset"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        nar_model = build_model("nar4rec", cfg).eval()
        if not isinstance(nar_model, NAR4Rec):
            raise TypeError(f"build_model('nar4rec') gave a {type(nar_model).__name__}")
        nar = NARGraph(nar_model, k).eval()
        sessions: dict[int, RunFn] = {}
        with tempfile.TemporaryDirectory() as tmp:

            def nar_for(bucket: int) -> RunFn:
                if bucket not in sessions:
                    onnx_path = Path(tmp) / f"nar4rec.{bucket}.onnx"
                    export_nar(nar, bucket, onnx_path, opset)
                    sessions[bucket] = fast_run(nar_session(onnx_path, config))
                return sessions[bucket]

            cells, runners = [], []
            for m in ms:
                cell, fns = make_cell(engine, nar, nar_for, m, k)
                cells.append(cell)
                runners.append(fns)
    finally:
        torch.set_num_threads(threads)
    for fns in runners:
        for fn in fns.values():
            for _ in range(warmup):
                fn()
    for rep in range(reps):  # round-robin: every (m, variant) once per repetition
        for cell, fns in zip(cells, runners, strict=True):
            for j in range(len(VARIANTS)):
                variant = VARIANTS[(rep + j) % len(VARIANTS)]  # rotate who goes first
                fn = fns[variant]
                fn()  # untimed: the timed call below finds this variant's state in cache
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                t1, c1 = time.perf_counter(), time.process_time()
                cell.times[variant].append(t1 - t0)
                cell.cpu[variant].append(c1 - c0)
    nar_blocks = len(nar_model.blocks.layers)
    what = {
        "bundle": f"{engine.version} ({path})",
        "gref": f"bundle weights; d_model={cfg.d_model}, {cfg.n_attn_heads} attention heads, "
        f"enc_layers={cfg.enc_layers}, dec_layers={cfg.dec_layers}, n={cfg.omtp_heads}",
        "nar": f"RANDOM weights (timing only); d_model={cfg.d_model}, "
        f"{cfg.n_attn_heads} attention heads, enc_layers={cfg.enc_layers}, "
        f"position blocks={nar_blocks}, same feature schema",
        "n4": "one call (greedy.onnx)" if engine.one_call else "multi-call (no greedy.onnx)",
    }
    return table(cells, what, reps, warmup, k), figures(cells, what, reps, warmup, k)


def figures(
    cells: list[Cell], what: dict[str, str], reps: int, warmup: int, k: int
) -> dict[str, Any]:
    rows = []
    for c in cells:
        p50 = {v: pct(c.times[v], 50) for v in VARIANTS}
        cpu = {v: pct(c.cpu[v], 50) for v in VARIANTS}
        rows.append(
            {
                "m": c.m,
                "bucket": c.bucket,
                "passes": c.passes,
                "p50_ms": p50,
                "p90_ms": {v: pct(c.times[v], 90) for v in VARIANTS},
                "cpu_p50_ms": cpu,
                "n4_over_nar": p50["gref_n4"] / p50["nar"],
                "cpu_multi_over_n4": cpu["gref_n4_multi"] / cpu["gref_n4"],
                "n1_over_n4": p50["gref_n1"] / p50["gref_n4"],
                "cpu_n4_over_nar": cpu["gref_n4"] / cpu["nar"],
                "cpu_n1_over_n4": cpu["gref_n1"] / cpu["gref_n4"],
                "target_met": cpu["gref_n4"] / cpu["nar"] <= TARGET,
            }
        )
    return {
        "benchmark": "bench_decode",
        "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "setup": {
            "batch": 1,
            "k": k,
            "intra_op_threads": 1,
            "reps": reps,
            "warmup": warmup,
            "item_tower": "excluded on both sides (static embeddings given)",
            "n4_path": what["n4"],
            **what,
        },
        "paper_ms": PAPER_MS,
        "target_n4_over_nar_max": TARGET,
        "rows": rows,
    }


def table(cells: list[Cell], what: dict[str, str], reps: int, warmup: int, k: int) -> str:
    lines = [
        f"OMTP decode vs one-pass NAR4Rec-like: onnxruntime CPU, 1 thread, batch 1, k = {k}, "
        f"{reps} reps round-robin (each timed call after an untimed one of the same variant) "
        f"after {warmup} warm-up; item tower excluded on both sides; times in ms",
        f"  bundle: {what['bundle']}",
        f"  gref-serve: {what['gref']}",
        f"  NAR4Rec-like: {what['nar']}",
        f"  n=4: {what['n4']}",
        "",
        "|   m | bucket | passes n4/multi/n1/NAR | n=4 p50 | n=4 p90 | n=1 p50 | n=1 p90 "
        "| NAR p50 | NAR p90 | n4 / NAR | n1 / n4 |",
        "|----:|-------:|-----------------------:|--------:|--------:|--------:|--------:"
        "|--------:|--------:|---------:|--------:|",
    ]
    verdicts = []
    for c in cells:
        p50 = {v: pct(c.times[v], 50) for v in VARIANTS}
        p90 = {v: pct(c.times[v], 90) for v in VARIANTS}
        passes = "/".join(str(c.passes[v]) for v in VARIANTS)
        n4_nar, n1_n4 = p50["gref_n4"] / p50["nar"], p50["gref_n1"] / p50["gref_n4"]
        cpu_n4_nar = pct(c.cpu["gref_n4"], 50) / pct(c.cpu["nar"], 50)
        lines.append(
            f"| {c.m:3d} | {c.bucket:6d} | {passes:>22} | {p50['gref_n4']:7.3f} "
            f"| {p90['gref_n4']:7.3f} | {p50['gref_n1']:7.3f} | {p90['gref_n1']:7.3f} "
            f"| {p50['nar']:7.3f} | {p90['nar']:7.3f} | {n4_nar:7.2f}x | {n1_n4:6.2f}x |"
        )
        verdicts.append(
            f"  m = {c.m:3d}: n=4 / NAR process CPU {cpu_n4_nar:.2f}x (goal <= {TARGET}x): "
            f"{'met' if cpu_n4_nar <= TARGET else 'MISSED'}; wall {n4_nar:.2f}x; "
            f"n=1 / n=4 {n1_n4:.2f}x"
        )
    lines += [
        "",
        "process CPU time, p50 (what the work costs, without the waits of a preempted call):",
        "",
        "|   m | n=4 cpu | n=4 multi cpu | n=1 cpu | NAR cpu | n4 / NAR | n4 multi / NAR "
        "| n4 multi / n4 | n1 / n4 |",
        "|----:|--------:|--------------:|--------:|--------:|---------:|---------------:"
        "|--------------:|--------:|",
    ]
    for c in cells:
        cpu = {v: pct(c.cpu[v], 50) for v in VARIANTS}
        n4, multi, nar = cpu["gref_n4"], cpu["gref_n4_multi"], cpu["nar"]
        lines.append(
            f"| {c.m:3d} | {n4:7.3f} | {multi:13.3f} | {cpu['gref_n1']:7.3f} | {nar:7.3f} "
            f"| {n4 / nar:7.2f}x | {multi / nar:13.2f}x | {multi / n4:12.2f}x "
            f"| {cpu['gref_n1'] / n4:6.2f}x |"
        )
    paper = PAPER_MS
    lines += [
        "",
        f"paper (T4, m unstated): OMTP / NAR4Rec {paper['omtp'] / paper['nar4rec']:.2f}x, "
        f"without / with OMTP {paper['no_omtp'] / paper['omtp']:.2f}x",
        *verdicts,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--bundle",
        type=Path,
        default=ROOT / "artifacts",
        help="bundle dir, or artifacts dir with a `latest` (default: artifacts)",
    )
    p.add_argument("--reps", type=int, default=300, help="timed repetitions per cell")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps >= 1 and --warmup >= 0")
    try:
        resolve_bundle_dir(args.bundle)
    except ValueError as e:
        p.error(f"{e} (`make bundle` builds the default one)")
    text, data = run(args.bundle, args.reps, args.warmup)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
