"""Training throughput, one process vs data-parallel processes under torchrun, in one run.

    python tests/bench/bench_ddp.py [--rows 8192] [--epochs 2] [--reps 2] [--json PATH]
                                    [--plot PATH]
    pytest -m bench -s tests/bench/test_bench_ddp.py        (a short run on a tiny log)

Each variant trains the same pretrain run (the `fast` preset, batch 512, seed 0) on the
same simulated log (written in row groups of 512, so that ranks can share it) with
`python -m model train`:
- `1 proc x 1 thread`  the single-process reference;
- `1 proc x 2 threads` the single process given both cores (torch intra-op threads);
- `2 procs x 1 thread` `torchrun --nproc_per_node 2` (gloo), each rank its own row groups.
samples/s = epochs x training rows / the seconds train() reports (rank 0's under torchrun:
the training loop and each epoch's validation, without interpreter start and data read).
The variants run round-robin, `--reps` times each, so drifting load on a shared machine
hits them alike; the median per variant is reported, and its ratio to the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "1 proc x 1 thread": ([], 1),
    "1 proc x 2 threads": ([], 2),
    "2 procs x 1 thread": (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        1,
    ),
}
REFERENCE = "1 proc x 1 thread"


def write_log(out: Path, rows: int, valid: int) -> None:
    from contract.config import ModelConfig
    from model.log_io import write_logs
    from model.simulated_logs import generate_logs
    from model.world import WorldConfig

    _, logs = generate_logs(WorldConfig(), 0, rows + valid, progress=True)
    schema = ModelConfig().schema
    write_logs(logs.take(slice(0, rows)), out / "train.parquet", schema, 512)
    write_logs(logs.take(slice(rows, rows + valid)), out / "valid.parquet", schema, 512)


def run_variant(name: str, data: Path, out: Path, epochs: int) -> float:
    """Seconds train() reported for one variant's run (fresh: --no-resume)."""
    launcher, threads = VARIANTS[name]
    argv = [sys.executable, *launcher, "-m", "model", "train", "--stage", "pretrain",
            "--data", str(data), "--out", str(out), "--epochs", str(epochs), "--batch-size",
            "512", "--seed", "0", "--threads", str(threads), "--no-resume"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith('{"best"')]
    return float(json.loads(line)["seconds"])


def plot(path: Path, medians: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(medians)
    ax.barh(names, [medians[n] for n in names], color=["#888", "#4a7", "#37c"])
    ax.set_xlabel("training samples/s (median)")
    ax.set_xlim(0, 1.2 * max(medians.values()))
    ax.invert_yaxis()
    for i, n in enumerate(names):
        ax.text(medians[n], i, f" {medians[n] / medians[REFERENCE]:.2f}x", va="center")
    ax.set_title("pretrain, fast preset, batch 512")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8192, help="training rows")
    p.add_argument("--valid", type=int, default=1024, help="validation rows")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--plot", type=Path, help="write a bar chart (PNG) here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="gref-bench-ddp-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        write_log(data, args.rows, args.valid)
        runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for rep in range(args.reps):
            for name in VARIANTS:
                seconds = run_variant(name, data, Path(tmp) / "out", args.epochs)
                runs[name].append(args.epochs * args.rows / seconds)
                print(f"rep {rep} {name}: {runs[name][-1]:.0f} samples/s", file=sys.stderr)
    medians = {name: statistics.median(v) for name, v in runs.items()}
    print(f"| variant | samples/s (median of {args.reps}) | vs {REFERENCE} |")
    print("| --- | --- | --- |")
    for name, value in medians.items():
        print(f"| {name} | {value:.0f} | {value / medians[REFERENCE]:.2f}x |")
    if args.json:
        figures = {"rows": args.rows, "epochs": args.epochs, "runs": runs, "median": medians}
        args.json.write_text(json.dumps(figures, indent=2))
    if args.plot:
        plot(args.plot, medians)
    return 0


if __name__ == "__main__":
    sys.exit(main())
