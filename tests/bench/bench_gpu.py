"""Engine throughput and latency, CPU vs GPU at equal load (the same batches on both).

    python tests/bench/bench_gpu.py [--bundle DIR] [--batches 1 2 4 ... 256] [--seconds S]
    pytest -m bench -s tests/bench/test_bench_gpu.py

Only where onnxruntime has the CUDA execution provider (onnxruntime-gpu on a machine with
a GPU); elsewhere it prints "GPU: not measured (no CUDA execution provider)" and exits 0,
so `make bench` does not fail for want of a GPU.

Requests: m = 30 candidates, k = 10, static embeddings given (the cache's path: encode +
decoder passes), items per pass = every head; the batch is handed to Engine.rerank whole,
as the micro-batcher would. Engines on the same bundle (--bundle, default artifacts/ if
artifacts/latest exists, else a random fast-preset model exported with --fp16 into a
temporary directory; decode time does not depend on the weights):

  cpu           device=cpu, fp32, --cpu-threads intra-op threads (1: the service default)
  gpu           device=cuda, precision auto (fp16 when the bundle has it), IO binding on
  gpu unbound   the same with IO binding off (session.run: KV cache through the host)

Per batch size: every engine warmed up on that size, then batches back to back for about
--seconds each, in alternating blocks (drifting load hits all alike). reranks/s = requests
/ wall time; p99 = the 99th percentile of one batch's latency. Lists are compared with the
CPU engine's (fp16 may flip near-ties: reported, not asserted). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from service.engine import (  # noqa: E402
    Engine,
    EngineConfig,
    EngineError,
    RerankRequest,
    open_engine,
)
from service.settings import resolve_bundle_dir  # noqa: E402
from tests.support.inputs import synthetic_request  # noqa: E402

NOT_MEASURED = "GPU: not measured (no CUDA execution provider)"
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Cell:
    engine: str
    batch: int
    latencies: list[float]  # seconds per batch
    wall_s: float
    agree: float  # fraction of lists equal to the CPU engine's

    @property
    def reranks_per_s(self) -> float:
        return self.batch * len(self.latencies) / self.wall_s

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies, 99)) * 1e3

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(self.latencies, 50)) * 1e3


def has_cuda() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def make_requests(engine: Engine, B: int, m: int, k: int, seed: int) -> list[RerankRequest]:
    cfg, rng = engine.model_config, np.random.default_rng(seed)
    return [synthetic_request(cfg, m, k, rng) for _ in range(B)]


def measure(
    engines: dict[str, Engine], batches: tuple[int, ...], m: int, k: int, seconds: float
) -> list[Cell]:
    """Every engine on the same batches; alternating blocks of about seconds / 5 each."""
    cells = []
    reference = next(iter(engines))
    for B in batches:
        reqs = make_requests(engines[reference], B, m, k, seed=B)
        for engine in engines.values():
            for _ in range(3):  # warm-up: this batch size's buffers, kernels, arena
                engine.rerank(reqs)
        want = [r.order for r in engines[reference].rerank(reqs)]
        lat: dict[str, list[float]] = {name: [] for name in engines}
        wall = dict.fromkeys(engines, 0.0)
        for _ in range(5):
            for name, engine in engines.items():
                t_end = time.perf_counter() + seconds / 5
                t_block = time.perf_counter()
                while True:
                    t0 = time.perf_counter()
                    engine.rerank(reqs)
                    t1 = time.perf_counter()
                    lat[name].append(t1 - t0)
                    if t1 >= t_end:
                        break
                wall[name] += time.perf_counter() - t_block
        for name, engine in engines.items():
            got = [r.order for r in engine.rerank(reqs)]
            agree = float(np.mean([np.array_equal(a, b) for a, b in zip(got, want, strict=True)]))
            cells.append(Cell(name, B, lat[name], wall[name], agree))
    return cells


def table(cells: list[Cell], what: str) -> str:
    names = list(dict.fromkeys(c.engine for c in cells))
    by = {(c.engine, c.batch): c for c in cells}
    head = "| batch |" + "".join(f" {n} reranks/s | {n} p99 ms |" for n in names)
    head += "".join(f" {n} / {names[0]} |" for n in names[1:])
    head += f" lists = {names[0]}'s ({', '.join(names[1:])}) |"
    cols = head.count("|") - 1
    lines = [what, "", head, "|" + "---:|" * cols]
    for B in dict.fromkeys(c.batch for c in cells):
        row = [f"| {B:5d} |"]
        row += [f" {by[n, B].reranks_per_s:12.0f} | {by[n, B].p99_ms:9.3f} |" for n in names]
        base = by[names[0], B].reranks_per_s
        row += [f" {by[n, B].reranks_per_s / base:7.2f}x |" for n in names[1:]]
        row.append(" " + " ".join(f"{by[n, B].agree:.0%}" for n in names[1:]) + " |")
        lines.append("".join(row))
    return "\n".join(lines)


def default_bundle(workdir: Path) -> tuple[Path, str]:
    artifacts = ROOT / "artifacts"
    if (artifacts / "latest").is_file():
        return resolve_bundle_dir(artifacts), "bundle artifacts/ (latest)"
    import torch

    from contract.config import ModelConfig
    from export.build import build_bundle
    from export.config import ExportConfig
    from model.checkpoint import save_checkpoint
    from model.network import GenReranker

    cfg = ModelConfig.preset("fast")
    torch.manual_seed(0)
    save_checkpoint(workdir / "ckpt", GenReranker(cfg).eval(), cfg)
    ec = ExportConfig(label="bench", fp16=True)
    return build_bundle(workdir / "ckpt", workdir / "artifacts", ec), "random fast-preset model"


def run(
    bundle: Path | None = None,
    batches: tuple[int, ...] = BATCHES,
    m: int = 30,
    k: int = 10,
    seconds: float = 2.0,
    cpu_threads: int = 1,
) -> str:
    if not has_cuda():
        return NOT_MEASURED
    with tempfile.TemporaryDirectory() as tmp:
        if bundle is None:
            path, what = default_bundle(Path(tmp))
        else:
            path, what = resolve_bundle_dir(bundle), f"bundle {bundle}"
        cpu = open_engine(
            str(path), EngineConfig(device="cpu", intra_op_threads=cpu_threads, io_binding="off")
        )
        try:  # listed is not usable: the engine refuses device=cuda when CUDA did not start
            gpu = open_engine(str(path), EngineConfig(device="cuda"))
        except EngineError as e:
            return f"GPU: not measured ({e})"
        unbound = open_engine(str(path), EngineConfig(device="cuda", io_binding="off"))
        engines = {"cpu": cpu, "gpu": gpu, "gpu unbound": unbound}
        k = min(k, cpu.model_config.max_steps)
        cells = measure(engines, batches, m, k, seconds)
    header = (
        f"engine throughput, CPU vs GPU at equal load: {what} ({gpu.version}), m = {m}, "
        f"k = {k}, items per pass = {gpu.heads}; cpu: {cpu_threads} intra-op thread(s), "
        f"fp32; gpu: {gpu.providers[0]}, {gpu.precision}, IO binding {gpu.io_binding}; "
        f"about {seconds:g} s per cell; p99 of one batch's latency"
    )
    return table(cells, header)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="bundle or artifacts dir (default: artifacts/)")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--m", type=int, default=30)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seconds", type=float, default=2.0, help="per engine and batch size")
    p.add_argument("--cpu-threads", type=int, default=1)
    args = p.parse_args(argv)
    print(run(args.bundle, tuple(args.batches), args.m, args.k, args.seconds, args.cpu_threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
