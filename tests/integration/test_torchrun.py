"""Data-parallel training: `torchrun --nproc_per_node 2 -m model train` (two CPU processes,
gloo) trains the weights one process trains with the same global batch and seed, each rank
reading its own row groups, and a run resumes under another world size."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from contract.config import ModelConfig
from model.__main__ import main
from model.checkpoint import load_checkpoint, read_train_state
from model.distributed import World, log_digest, read_own_groups, read_shard, shard_groups
from model.log_io import read_logs, row_groups, write_logs
from model.simulated_logs import generate_logs
from model.world import WorldConfig

pytestmark = pytest.mark.integration

ROWS_PER_GROUP = 40  # 8 row groups of train: rank 0 reads 0, 2, 4, 6; rank 1 reads 1, 3, 5, 7
# The two runs' gradients differ by float rounding (sums in another order), which Adam's
# division by sqrt(v) enlarges on parameters with small gradients. A real difference is
# far larger: the pair-mean L_o (lambda2 > 0), whose normaliser is not a fixed count per
# row, moves the weights by 1e-2 in 5 steps; rounding, by 1e-6 in 10.
ATOL = 1e-5


@pytest.fixture(scope="module")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset in the log schema, in small row groups."""
    _, logs = generate_logs(WorldConfig(n_items=800, n_users=100), 5, 400, progress=False)
    d = tmp_path_factory.mktemp("logs")
    schema = ModelConfig().schema
    write_logs(logs.take(slice(0, 320)), d / "train.parquet", schema, ROWS_PER_GROUP)
    write_logs(logs.take(slice(320, 400)), d / "valid.parquet", schema, ROWS_PER_GROUP)
    return d


def _args(data: Path, out: Path, epochs: int) -> list[str]:
    # L_n only: a mean over the same number of slots in every row (see ATOL for L_o)
    return ["train", "--stage", "pretrain", "--lambda2", "0", "--data", str(data),
            "--out", str(out), "--epochs", str(epochs), "--batch-size", "64", "--seed", "3",
            "--threads", "1"]  # fmt: skip


def _torchrun(data: Path, out: Path, epochs: int) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--standalone", "-m", "model",
            *_args(data, out, epochs)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    """The trained weights less the attention's key biases: the softmax is blind to them,
    so their gradient is zero but for rounding, which Adam (dividing by sqrt(v)) turns into
    steps of up to the learning rate that differ between any two summation orders."""
    model, _, _ = load_checkpoint(directory)
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in [k for k in out if k.endswith(("qkv.bias", "cross.kv.bias"))]:
        parts = out[name].chunk(3 if name.endswith("qkv.bias") else 2)  # (q,) k, v
        out[name] = torch.cat([parts[-1], *parts[:-2]])  # without k
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst, name = max((float((a[k] - b[k]).abs().max()), k) for k in a)
    print(f"largest weight difference {worst:.3g} ({name})")
    assert worst < ATOL, f"largest weight difference {worst:.3g} ({name})"


def test_ranks_read_disjoint_row_groups_that_cover_the_log(logs_dir: Path) -> None:
    path = logs_dir / "train.parquet"
    schema = ModelConfig().schema
    whole = read_logs(path, schema)
    (shard0, digests0), (shard1, digests1) = (
        read_own_groups(path, schema, World(rank, 2)) for rank in (0, 1)
    )
    ids0, ids1 = set(shard0.batch.request_id.tolist()), set(shard1.batch.request_id.tolist())
    assert not ids0 & ids1
    assert ids0 | ids1 == set(whole.request_id.tolist())
    assert shard0.groups == (0, 2, 4, 6) and shard1.groups == (1, 3, 5, 7)
    for s in (shard0, shard1):  # each local row sits at its log-wide index
        assert (whole.request_id[s.rows] == s.batch.request_id).all()
        assert s.total == len(whole)
    # the whole log's digest is the same combined from two ranks' row groups or one's
    alone = read_shard(path, schema, World())
    assert log_digest(digests0 + digests1) == alone.digest
    assert alone.groups == tuple(range(8)) and (alone.rows == np.arange(320)).all()
    with pytest.raises(ValueError, match="fewer than the 9 ranks"):
        shard_groups(row_groups(path), World(0, 9))


def test_a_global_batch_splits_into_weighted_rank_parts(logs_dir: Path) -> None:
    path, schema = logs_dir / "train.parquet", ModelConfig().schema
    shards = [read_own_groups(path, schema, World(rank, 2))[0] for rank in (0, 1)]
    batch_rows = np.random.default_rng(0).permutation(320)[:64]
    parts = [s.part(batch_rows, World(rank, 2)) for rank, s in enumerate(shards)]
    assert sum(len(b) for b, _ in parts) == 64
    # the ranks' weighted means average to the batch mean: weights sum to the world size
    assert sum(w for _, w in parts) == pytest.approx(2.0)
    only_rank0 = shards[0].rows[:5]  # a batch rank 1 holds nothing of: one row at weight 0
    batch, weight = shards[1].part(only_rank0, World(1, 2))
    assert len(batch) == 1 and weight == 0.0


@pytest.mark.slow  # two torch processes start (tens of seconds on 2 busy cores)
def test_two_processes_train_the_single_process_weights(
    logs_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(_args(logs_dir, single, 1)) == 0
    single_epoch0 = _weights(single / "last")
    assert main(_args(logs_dir, single, 2)) == 0  # resumes: epoch 1
    done = _torchrun(logs_dir, ddp, 1)
    # the same run for every world size: a resume under another one continues it
    fingerprint = read_train_state(ddp / "last")["fingerprint"]
    assert fingerprint == read_train_state(single / "last")["fingerprint"]

    # each rank read its own row groups, and only its own
    read = dict(re.findall(r"\[rank (\d)\] model\.distributed: rank \d/2 reads row groups "
                           r"(\[[\d, ]*\]) of 8", done.stderr))  # fmt: skip
    assert read.keys() == {"0", "1"}, done.stderr[-2000:]
    assert read["0"] == "[0, 2, 4, 6]" and read["1"] == "[1, 3, 5, 7]"
    # rank 0 alone reports and writes
    assert "[rank 1] model.train" not in done.stderr
    assert done.stdout.count('"best"') == 1

    _assert_same(_weights(ddp / "last"), single_epoch0)
    # validation is the whole validation log's, reduced over the ranks
    (ddp_epoch0,) = json.loads((ddp / "history.json").read_text())
    single_epoch0_metrics = json.loads((single / "history.json").read_text())[0]
    for key in ("valid_loss", "valid_auc", "valid_ndcg@10", "valid_map@10"):
        assert ddp_epoch0[key] == pytest.approx(single_epoch0_metrics[key], abs=1e-5), key
    # the two-process run resumes in one process (another world size, same global batch)
    caplog.set_level(logging.INFO, logger="model.train")
    assert main(_args(logs_dir, ddp, 2)) == 0
    assert "resumed" in caplog.text and "starting fresh" not in caplog.text
    assert read_train_state(ddp / "last")["epoch"] == 1
    _assert_same(_weights(ddp / "last"), _weights(single / "last"))
    shutil.rmtree(tmp_path)
