"""Data-parallel training under torchrun: the process group, each rank's shard of the logs,
and what the ranks reduce together.

`torchrun --nproc_per_node N -m model train ...` starts N copies of the trainer; each finds
its rank in the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK) and joins one
process group: gloo, as the trainer runs on CPU (`backend` gives nccl for a CUDA device).
A plain `python -m model train` is a world of one and joins nothing.

What a world of W ranks trains is what one process trains with the same global batch:
- the data order is global: epoch e visits the log's rows in the permutation of
  (seed, e) over all rows, as a single process does, whatever W is;
- each rank holds only its own row groups of the Parquet log (row group g goes to rank
  g mod W, LogShard), and takes from every global batch the rows it holds;
- its mean loss is weighted by its share of the batch's rows (W · n_rank / n_batch), so
  DistributedDataParallel's mean of the ranks' gradients is the gradient of the whole
  batch's per-row mean: equal to one process's gradient when the loss is a mean over rows
  or over a fixed number of slots per row (L_n, the head-alignment KL), close to it when
  the count it averages over varies by row (L_o's and DPO's means over pairs);
- validation metrics are reduced over the ranks (sums of losses and counts; the ranked
  labels, scores and clicks gathered for NDCG, MAP and AUC), so every rank takes the same
  early-stopping decision;
- rank 0 alone writes checkpoints, the train state, history.json and progress bars.
Because nothing in the trained run depends on W, a run resumes under another world size
with the same global batch (the run fingerprint holds no W, and the log's digest is the same
for every W).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from contract.features import FeatureSchema
from model.checkpoint import arrays_digest
from model.data import ListBatch
from model.evaluate import ListPolicy, clicks_by_candidate, exposed_only, rerank
from model.log_format import PathLike
from model.log_io import RowGroup, empty_batch, read_row_group, row_groups
from model.ranking_metrics import auc, list_metrics, ranked_labels
from model.tensors import to_inputs

log = logging.getLogger(__name__)


# ---- the process group ----------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (a world of one when alone)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """True when torchrun (or another launcher setting WORLD_SIZE > 1) started us."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend(device: torch.device) -> str:
    """nccl for CUDA tensors, gloo for CPU ones."""
    return "nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device | None = None) -> World:
    """Join the process group torchrun describes in the environment (a no-op in a world of
    one, or when already joined); returns this process's World."""
    if not launched():
        return World()
    if not tdist.is_initialized():
        device = device or torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group(backend=backend(device))
    return current()


def current() -> World:
    """The World of this process: the joined process group's, else a world of one."""
    if tdist.is_available() and tdist.is_initialized():
        return World(tdist.get_rank(), tdist.get_world_size())
    return World()


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every rank (after rank 0 wrote what the others read next)."""
    if world.parallel:
        tdist.barrier()


def sum_over_ranks(world: World, values: Sequence[float]) -> list[float]:
    """Element-wise sum of `values` over the ranks (float64)."""
    if not world.parallel:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def gather(world: World, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (numpy arrays and plain data only:
    all_gather_object serialises them)."""
    if not world.parallel:
        return [obj]
    out: list[Any] = [None] * world.size
    tdist.all_gather_object(out, obj)
    return out


# ---- each rank's part of the logs --------------------------------------------------------


@dataclass(frozen=True)
class LogShard:
    """The requests of a log that one rank holds: `batch` in log order, `rows` the log-wide
    index of each (ascending), `total` the requests of the whole log, `digest` a digest of
    the whole log's content that every rank, for every world size, computes the same."""

    batch: ListBatch
    rows: np.ndarray  # (n,) int64, ascending
    total: int
    digest: str
    groups: tuple[int, ...] = ()  # the log-wide numbers of the row groups read

    def __len__(self) -> int:
        return len(self.batch)

    def head(self, n: int) -> LogShard:
        """This rank's part of the log's first n requests (the digest stays the whole
        log's: n itself is part of the train config)."""
        keep = int(np.searchsorted(self.rows, n))
        return LogShard(
            self.batch.take(slice(0, keep)), self.rows[:keep], min(n, self.total), self.digest
        )

    def part(self, batch_rows: np.ndarray, world: World) -> tuple[ListBatch, float]:
        """This rank's rows of a global batch (log-wide indices, in the batch's order) and
        the weight of its mean loss: world.size · n_rank / n_batch, so that the ranks'
        mean gradient is the whole batch's. A rank holding none of the rows gets one row
        at weight 0 (every rank must run the step for the gradients to be reduced)."""
        pos = np.searchsorted(self.rows, batch_rows).clip(max=max(len(self.rows) - 1, 0))
        mine = self.rows[pos] == batch_rows if len(self.rows) else np.zeros(0, bool)
        local = pos[mine]
        if local.size == 0:
            return self.batch.take(slice(0, 1)), 0.0
        return self.batch.take(local), world.size * local.size / len(batch_rows)


def batch_digest(batch: ListBatch) -> str:
    """arrays_digest (hex) over every array of a batch, in field order."""
    return arrays_digest((f.name, np.asarray(getattr(batch, f.name))) for f in fields(batch)).hex()


def shard_groups(groups: list[RowGroup], world: World) -> list[int]:
    """The log-wide numbers of the row groups rank `world.rank` reads: g mod size == rank."""
    if len(groups) < world.size:
        raise ValueError(
            f"the log has {len(groups)} row groups, fewer than the {world.size} ranks: "
            "rewrite it with smaller row groups (write_logs' row_group_size)"
        )
    return [g for g in range(len(groups)) if g % world.size == world.rank]


def read_own_groups(
    path_or_paths: PathLike | Sequence[PathLike], schema: FeatureSchema, world: World
) -> tuple[LogShard, list[tuple[int, str]]]:
    """This rank's row groups of a log (one or more Parquet files), read and validated, and
    the digest of each (log-wide number, digest); no communication. The shard's digest is
    left empty: read_shard combines every rank's."""
    groups = row_groups(path_or_paths)
    mine = shard_groups(groups, world)
    parts, rows, digests = [], [], []
    for g in mine:
        part = read_row_group(groups[g], schema)
        parts.append(part)
        rows.append(np.arange(groups[g].first, groups[g].first + groups[g].rows))
        digests.append((g, batch_digest(part)))
    total = sum(g.rows for g in groups)
    nonempty = [p for p in parts if len(p)]
    log.info(
        "rank %d/%d reads row groups %s of %d (%d of %d requests)",
        world.rank,
        world.size,
        mine,
        len(groups),
        sum(len(p) for p in parts),
        total,
    )
    shard = LogShard(
        batch=ListBatch.concat(nonempty) if nonempty else empty_batch(schema),
        rows=np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64),
        total=total,
        digest="",
        groups=tuple(mine),
    )
    return shard, digests


def log_digest(group_digests: Sequence[tuple[int, str]]) -> str:
    """The digest of a whole log from its row groups' (log-wide number, digest)."""
    h = hashlib.sha256()
    for number, digest in sorted(group_digests):
        h.update(f"{number}:{digest};".encode())
    return h.hexdigest()


def read_shard(
    path_or_paths: PathLike | Sequence[PathLike], schema: FeatureSchema, world: World
) -> LogShard:
    """This rank's row groups of a log (read_own_groups), with the digest of the whole log
    combined from every rank's row-group digests (gathered): the same for every world
    size. Under torchrun every rank calls it (a collective)."""
    shard, digests = read_own_groups(path_or_paths, schema, world)
    everyone = [d for ds in gather(world, digests) for d in ds]
    return replace(shard, digest=log_digest(everyone))


def as_shard(data: ListBatch | LogShard, world: World, digest: str) -> LogShard:
    """A LogShard as is; an in-memory batch (which every rank holds whole) as the rows
    i mod size == rank of it, with `digest` standing for its content."""
    if isinstance(data, LogShard):
        return data
    rows = np.arange(world.rank, len(data), world.size, dtype=np.int64)
    batch = data if not world.parallel else data.take(rows)
    return LogShard(batch, rows, len(data), digest)


# ---- the step and the reductions ---------------------------------------------------------


class _Step(nn.Module):
    """One training step's loss as a module, so that DistributedDataParallel sees a single
    forward per backward however often the loss calls the model (DPO: Y_w and Y_l)."""

    def __init__(self, model: nn.Module, loss_fn: Any) -> None:
        super().__init__()
        self.model = model  # the trained parameters (a frozen reference holds none)
        self.loss_fn = loss_fn

    def forward(self, batch: ListBatch, inp: Any) -> Any:
        return self.loss_fn(batch, inp)


def step_fn(model: nn.Module, loss_fn: Any, world: World) -> Any:
    """The callable `(batch, inputs) -> (loss, parts)` the training loop steps with: the
    loss itself in a world of one, else wrapped in DistributedDataParallel (gradients
    averaged over the ranks during backward; parameters broadcast from rank 0 at start)."""
    if not world.parallel:
        return loss_fn
    # find_unused_parameters: a step may leave parameters out (DPO on a batch whose orders
    # all agree returns a constant; heads DPO does not train)
    return nn.parallel.DistributedDataParallel(_Step(model, loss_fn), find_unused_parameters=True)


def logged_metrics(
    r: ListPolicy,
    batch: ListBatch,
    schema: FeatureSchema,
    world: World,
    chunk: int = 4096,
    exam: np.ndarray | None = None,
) -> dict[str, float]:
    """evaluate.logged_metrics over the union of the ranks' batches: each rank reranks its
    own requests; the ranked clicks, item scores, labels and IPS estimates are gathered, so
    NDCG/MAP/IPS (means over requests) and AUC (over all items) are the whole validation
    set's. `exam`: the slots' examination propensities (None: harvested from the union)."""
    from model.estimators import examination_propensities, rerank_ips

    if not world.parallel:
        from model.evaluate import logged_metrics as single

        return single(r, batch, schema, chunk, exam=exam)
    if exam is None:
        exam = examination_propensities(batch, reduce=sum_cells(world))
    exp = exposed_only(batch)
    labels = clicks_by_candidate(batch)
    ranked, scores, clicks, ips = [], [], [], []
    for start in range(0, len(exp), chunk):
        sl = slice(start, start + chunk)
        part = exp.take(sl)
        out = rerank(r, to_inputs(part, schema), batch.k)
        ranked.append(ranked_labels(out.order, labels[sl]))
        scores.append(out.item_scores[part.cand_mask])
        clicks.append(labels[sl][part.cand_mask])
        ips.append(rerank_ips(batch.take(sl), out.order, exam))
    mine = (ranked, scores, clicks, ips)
    everyone = gather(world, mine)
    all_ranked = [a for ranked_of_rank, *_ in everyone for a in ranked_of_rank]
    width = max((a.shape[1] for a in all_ranked), default=0)
    padded = [np.pad(a, [(0, 0), (0, width - a.shape[1])]) for a in all_ranked]
    metrics = list_metrics(np.concatenate(padded))
    metrics["auc"] = auc(
        np.concatenate([s for _, ss, _, _ in everyone for s in ss]),
        np.concatenate([c for _, _, cs, _ in everyone for c in cs]),
    )
    all_ips = [a for *_, ips_of_rank in everyone for a in ips_of_rank]
    metrics["ips"] = float(np.concatenate(all_ips).mean()) if all_ips else float("nan")
    return metrics


def sum_cells(world: World) -> Any:
    """examination_propensities' `reduce`: the (upstream rank, slot) cells' impressions and
    utility sums added over the ranks (rows padded to the widest rank's), so each rank fits
    the whole logs' cells and every rank gets the same propensities."""

    def reduce(n: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not world.parallel:
            return n, c
        parts = gather(world, (n, c))
        rows = max(a.shape[0] for a, _ in parts)

        def pad(a: np.ndarray) -> np.ndarray:
            return np.pad(a, [(0, rows - a.shape[0]), (0, 0)])

        return sum(pad(a) for a, _ in parts), sum(pad(b) for _, b in parts)  # type: ignore[return-value]

    return reduce
