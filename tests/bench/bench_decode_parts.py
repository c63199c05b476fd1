"""What each part of a batch-1 decode costs: the encoder call, one decoder pass, the Python
between passes, encode + greedy decode, and (bundles with greedy.onnx) the same decode in
one call, for the bundle and, with --plain, a bundle of the same checkpoint with plain
ops (`python -m export build --no-fused-ops`), and the floor of any onnxruntime call (a
9-input identity graph).

    python tests/bench/bench_decode_parts.py --bundle artifacts [--plain PLAIN_BUNDLE_DIR]

m = 30, k = 10, n = 4, one thread; every part of both bundles timed in turn, interleaved,
1500 rounds after 100 warm-up; process CPU p50 and p25 in µs. Ratios, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from service.decoding import Deadlines, greedy  # noqa: E402
from service.engine import Engine, EngineConfig, RerankRequest, open_engine  # noqa: E402
from service.ort_sessions import fast_run  # noqa: E402
from service.settings import resolve_bundle_dir  # noqa: E402


class _Replay:
    """Decoder passes that hand back recorded head scores: the loop's Python alone."""

    def __init__(self, heads: list[np.ndarray]) -> None:
        self.heads, self.i = heads, 0

    def step(self, tokens: np.ndarray) -> np.ndarray:
        self.i += 1
        return self.heads[self.i - 1]


def parts(engine: Engine, m: int = 30, k: int = 10) -> dict[str, Callable[[], Any]]:
    cfg = engine.model_config
    rng = np.random.default_rng(m)
    request = RerankRequest(
        upstream_score=np.sort(rng.standard_normal(m)).astype(np.float32)[::-1].copy(),
        user_id=3,
        user_dense=rng.standard_normal(len(cfg.schema.user_dense)).astype(np.float32),
        k=k,
        static=rng.standard_normal((m, cfg.d_model)).astype(np.float32),
    )
    batch = engine.prepare([request])
    enc = engine.encode(batch)
    if enc.first is None:
        raise SystemExit("a bundle with the BOS pass folded into the encoder is needed")
    first_scores, first_kv = enc.first
    tokens = np.arange(1, 5, dtype=np.int64)[None, :]  # (1, 4)
    heads: list[np.ndarray] = []
    passes = engine.passes(enc)

    def record(t: np.ndarray) -> np.ndarray:
        heads.append(passes.step(t))
        return heads[-1]

    recorder = type("Recorder", (), {"step": staticmethod(record)})()
    greedy(recorder, first_scores, batch.cand_mask, batch.k, 4, Deadlines(None, 0.0))
    fns: dict[str, Callable[[], Any]] = {
        "encoder call": lambda: engine.encode(batch),
        "decoder pass": lambda: engine.decode_pass(enc, tokens, first_kv),
        "Python between passes": lambda: greedy(
            _Replay(heads), first_scores, batch.cand_mask, batch.k, 4, Deadlines(None, 0.0)
        ),
        "encode + decode": lambda: engine.decode(engine.encode(batch), batch.k, 4),
    }
    if engine.one_call:  # greedy.onnx: encode + every pass + every pick in one call
        trips = engine.one_call_passes(k, 4)
        fns["one call (greedy.onnx)"] = lambda: engine.decode_one_call(batch, trips)
    return fns


def identity_call() -> Callable[[], Any]:
    """A graph of 9 float inputs and 3 Identity outputs: what any call costs."""
    ins = [helper.make_tensor_value_info(f"i{j}", TensorProto.FLOAT, None) for j in range(9)]
    outs = [helper.make_tensor_value_info(f"o{j}", TensorProto.FLOAT, None) for j in range(3)]
    nodes = [helper.make_node("Identity", [f"i{j}"], [f"o{j}"]) for j in range(3)]
    model = helper.make_model(
        helper.make_graph(nodes, "identity", ins, outs),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    run = fast_run(ort.InferenceSession(model.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"]))  # fmt: skip
    feeds = {f"i{j}": np.zeros((1, 2, 4, 16), np.float32) for j in range(9)}
    return lambda: run(["o0", "o1", "o2"], feeds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=ROOT / "artifacts", help="fused bundle")
    p.add_argument("--plain", type=Path, help="a --no-fused-ops bundle, to time beside")
    p.add_argument("--rounds", type=int, default=1500)
    args = p.parse_args(argv)
    config = EngineConfig(device="cpu", intra_op_threads=1, inter_op_threads=1)
    fns: dict[str, Callable[[], Any]] = {}
    bundles = [("fused", args.bundle)] + ([("plain", args.plain)] if args.plain else [])
    for label, path in bundles:
        engine = open_engine(str(resolve_bundle_dir(path)), config)
        engine.warmup()
        fns |= {f"{label}: {name}": fn for name, fn in parts(engine).items()}
    fns["identity call (9 inputs)"] = identity_call()
    cpu: dict[str, list[int]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(100):
            fn()
    for _ in range(args.rounds):
        for name, fn in fns.items():
            c0 = time.process_time_ns()
            fn()
            cpu[name].append(time.process_time_ns() - c0)
    print(f"process CPU per call, µs ({args.rounds} interleaved rounds)")
    for name, xs in cpu.items():
        print(
            f"  {name:32s} p25 {np.percentile(xs, 25) / 1e3:7.1f}  p50 {np.median(xs) / 1e3:7.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
