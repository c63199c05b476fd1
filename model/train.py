"""Training: one loop for every stage and model, readable top to bottom.

Stages (TrainConfig.stage):
- pretrain  Gen-Reranker on logged exposure orders, L_omtp = λ1·L_n + λ2·L_o (Eq. 6, 9, 10);
- dpo       Rerank-DPO from a checkpoint against its frozen copy (Eq. 7, 8);
            with no init checkpoint it is "DPO only" (reference = the random init);
- value     the list-aware stage: the Gen-Reranker as a prefix-conditioned value model,
            teacher-forced on the logged exposure; head j's score of the item logged at
            slot t + j, given the prefix, is a logit of that item's feedback value
            (losses.value_loss), usually from a pre-trained checkpoint;
- clicks    Seq2Slate-like: Gen-Reranker (n = 1) on click-sorted exposures (or sorted
            by U with scorer_label="utility"), no exposure pre-training;
- dnn, prm  pointwise DNN / PRM: BCE on clicks of exposed items;
- nar       NAR4Rec-like: per-position cross-entropy on the preferred (Eq. 7) order;
- distill   head alignment after DPO (our addition): the OMTP heads learn, by
            self-distillation, what the frozen DPO model's n = 1 greedy decode would
            put at positions t+1..t+n, so an n-per-pass decode follows the DPO policy.
Each epoch ends with validation: the own loss, logged NDCG/AUC of reranking the exposed
items, and the debiased estimates of model.estimators (position-based IPS of the exposed
items' new order, and, when the logs carry the logging policy's propensities, the
item-level IPS of whole generated lists). Every stage but pretrain and distill selects its
epoch on the debiased estimate (select_on); the best epoch is kept (early stopping), and the last
epoch's weights + optimizer state are saved so an interrupted run resumes. A run resumes
only if it is the same run: the train state holds a fingerprint of the train config, the
model config, the init checkpoint's weights and the data (run_fingerprint); anything else
starts fresh and clears the run's old checkpoints.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from contract.config import ModelConfig
from model import distributed
from model.checkpoint import (
    arrays_digest,
    build_model,
    has_train_state,
    load_checkpoint,
    load_train_state,
    read_train_state,
    recover_dir,
    remove_dir,
    replace_dir,
    save_checkpoint,
    save_train_state,
    staging_dir,
    weights_digest,
)
from model.data import ListBatch, feedback_utility
from model.distributed import LogShard
from model.evaluate import ListPolicy
from model.tensors import Inputs, to_inputs

log = logging.getLogger(__name__)

# stage -> the kind of model it trains
STAGE_KIND = {
    "pretrain": "gen_reranker",
    "dpo": "gen_reranker",
    "clicks": "gen_reranker",
    "dnn": "dnn",
    "prm": "prm",
    "nar": "nar4rec",
    "distill": "gen_reranker",
    "value": "gen_reranker",
}
STAGE_LR = {"dpo": 1e-4, "distill": 5e-4}  # the rest: 2e-3
STAGES = tuple(STAGE_KIND)


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "pretrain"
    epochs: int = 6
    batch_size: int = 512  # paper: 1024; 512 trains faster per epoch on 2 CPU cores
    lr: float = 0.0  # 0 = the stage's default: STAGE_LR, else 2e-3 (dpo drifts fast)
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    patience: int = 2  # epochs without a validation gain before stopping
    lambda1: float = 1.0  # L_n weight (Eq. 10)
    lambda2: float = 0.5  # L_o weight (Eq. 10); 0 = "L_n only"
    beta: float = 0.1  # DPO temperature (paper default)
    # An NLL (L_n) term on Y_w during DPO, against likelihood displacement (both sequences'
    # probabilities falling while the margin grows; measured: plain DPO collapses after
    # one epoch, weight 1.0 stops DPO from moving at all, 0.05 keeps most of its gain).
    dpo_nll: float = 0.05
    dpo_heads: int = 1  # heads DPO post-trains (0 = all n); the NLL term keeps the rest aligned
    alpha: float = 1.0  # Eq. 7 position term
    gamma: float = 1.0  # Eq. 7 feedback term
    w_click: float = 1.0  # feedback utility U: click, like, long view weights
    w_like: float = 1.5
    w_long_view: float = 0.8
    # dnn / prm: the per-slot BCE target. "click" (the baselines as LibRerank trains them),
    # or "utility": U / (w_click + w_like + w_long_view), a soft target in [0, 1], the same
    # label GReF's DPO, L_o and NAR4Rec-like learn from (a like-for-like comparison).
    # clicks (Seq2Slate-like): the exposure sorted by clicks, or by U with "utility".
    scorer_label: str = "click"
    seed: int = 0
    threads: int = 2
    max_valid: int = 20_000  # validation rows used each epoch
    # "" = the stage's default: valid_loss for pretrain and distill, else the debiased
    # estimate (valid_list_ips when the logs carry propensities, else valid_ips)
    select_on: str = ""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r} not in {STAGES}")
        if self.scorer_label not in ("click", "utility"):
            raise ValueError(f"scorer_label {self.scorer_label!r}: click | utility")

    @property
    def learning_rate(self) -> float:
        return self.lr or STAGE_LR.get(self.stage, 2e-3)


# TrainConfig fields a resume may change. `epochs`: extending a run is what resume is for,
# and the epochs it has trained do not depend on it (each epoch's data order depends on
# (seed, epoch) only, and there is no schedule over the epochs); a saved run that trained
# more epochs than asked does not resume (train() checks). `threads`: how fast, not what,
# is trained. Every other field changes the run, so it is in the fingerprint.
RESUMABLE_FIELDS = frozenset({"epochs", "threads"})
FINGERPRINT_VERSION = 1


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def data_digest(batch: ListBatch) -> str:
    """arrays_digest (hex) over every array of a batch, in field order."""
    return arrays_digest((f.name, np.asarray(getattr(batch, f.name))) for f in fields(batch)).hex()


def _data_digest(data: ListBatch | LogShard) -> str:
    """A sharded log's digest is its whole content's, the same for every world size."""
    return data.digest if isinstance(data, LogShard) else data_digest(data)


def run_fingerprint(
    model_cfg: ModelConfig,
    tc: TrainConfig,
    train_data: ListBatch | LogShard,
    valid_data: ListBatch | LogShard,
    init_from: str | Path | None,
) -> dict[str, str]:
    """What makes a training run this run, as sha256 digests per component, and "run" over
    them all: the train config (less RESUMABLE_FIELDS), the model config, the init
    checkpoint's weights, the train data and the validation rows used."""
    parts = {
        # the effective learning rate too: lr = 0 means the stage's default, which may change
        "train_config": _json_digest(
            {
                **{k: v for k, v in asdict(tc).items() if k not in RESUMABLE_FIELDS},
                "learning_rate": tc.learning_rate,
            }
        ),
        "model_config": _json_digest(model_cfg.to_dict()),
        "init_checkpoint": "none" if init_from is None else weights_digest(init_from),
        "train_data": _data_digest(train_data),
        "valid_data": _data_digest(valid_data),
    }
    return {**parts, "run": _json_digest({"version": FINGERPRINT_VERSION, **parts})}


def _resume_mismatch(state: dict[str, Any], fingerprint: dict[str, str], tc: TrainConfig) -> str:
    """Why a saved train state is not this run ("" = it is)."""
    saved = state.get("fingerprint")
    if not isinstance(saved, dict):
        return "it has no run fingerprint (written by older code)"
    if saved.get("run") != fingerprint["run"]:
        differs = [k for k in fingerprint if k != "run" and saved.get(k) != fingerprint[k]]
        return "its " + (", ".join(differs) or "fingerprint version") + " differ from this run's"
    done = int(state["epoch"]) + 1
    if done > tc.epochs:
        return f"it trained {done} epochs, more than the {tc.epochs} asked"
    return ""


def _start_fresh(out: Path) -> None:
    """Remove what an earlier run left in out, so nothing stale is reused."""
    for name in ("last", "best", "reference"):
        remove_dir(out / name)
    (out / "history.json").unlink(missing_ok=True)


@dataclass
class TrainResult:
    best_dir: Path
    history: list[dict[str, Any]]
    seconds: float


def _utility(batch: ListBatch, tc: TrainConfig) -> np.ndarray:
    return feedback_utility(batch, tc.w_click, tc.w_like, tc.w_long_view)


def _click_sorted(batch: ListBatch, label: np.ndarray | None = None) -> np.ndarray:
    """Exposure reordered by a per-slot label, highest first (stable; clicks when label
    is None): Seq2Slate's supervision."""
    exposed = batch.exposed
    key = np.where(exposed >= 0, -(batch.click if label is None else label), np.inf)
    return np.take_along_axis(exposed, np.argsort(key, axis=1, kind="stable"), axis=1)


class StageLoss:
    """Loss of one batch for a stage. Holds the frozen reference model for DPO."""

    def __init__(self, tc: TrainConfig, model: nn.Module, ref: nn.Module | None) -> None:
        self.tc, self.model, self.ref = tc, model, ref

    def __call__(self, batch: ListBatch, inp: Inputs) -> tuple[torch.Tensor, dict[str, float]]:
        from model import losses

        tc, model = self.tc, self.model
        exposed = torch.from_numpy(batch.exposed.astype(np.int64))
        utility = torch.from_numpy(_utility(batch, tc))
        if tc.stage == "pretrain":
            scores = model(inp, exposed)
            loss, parts = losses.omtp_loss(
                scores, exposed, inp.cand_mask, utility, lambda1=tc.lambda1, lambda2=tc.lambda2
            )
            return loss, {k: float(v) for k, v in parts.items()}
        if tc.stage == "value":
            scale = tc.w_click + tc.w_like + tc.w_long_view
            scores = model(inp, exposed)
            loss, parts = losses.value_loss(scores, exposed, inp.cand_mask, utility / scale)
            return loss, {k: float(v) for k, v in parts.items()}
        if tc.stage == "clicks":
            label = _utility(batch, tc) if tc.scorer_label == "utility" else None
            target = torch.from_numpy(_click_sorted(batch, label).astype(np.int64))
            loss = losses.exposure_ce(model(inp, target), target, inp.cand_mask)
            return loss, {}
        if tc.stage == "dpo":
            order_w, differs = losses.preferred_order(exposed, utility, tc.alpha, tc.gamma)
            if not bool(differs.any()):
                return torch.zeros((), requires_grad=True), {}
            if self.ref is None:
                raise ValueError("the dpo stage needs a reference model")
            with torch.no_grad():
                ref_w, ref_l = self.ref(inp, order_w), self.ref(inp, exposed)
            policy_w = model(inp, order_w)
            loss, stats = losses.dpo_loss(
                policy_w,
                model(inp, exposed),
                ref_w,
                ref_l,
                order_w,
                exposed,
                inp.cand_mask,
                differs,
                beta=tc.beta,
                heads=tc.dpo_heads or model.cfg.omtp_heads,  # type: ignore[union-attr]
            )
            if tc.dpo_nll > 0:
                nll, _ = losses.omtp_loss(
                    policy_w, order_w, inp.cand_mask, utility, lambda1=1.0, lambda2=0.0
                )
                loss = loss + tc.dpo_nll * nll
                stats["nll"] = nll.detach()
            return loss, {k: float(v) for k, v in stats.items()}
        if tc.stage == "distill":
            from model.decode import greedy_decode

            if self.ref is None:
                raise ValueError("the distill stage needs the frozen DPO model as teacher")
            with torch.no_grad():
                order = greedy_decode(self.ref, inp, batch.k, items_per_pass=1).order  # type: ignore[arg-type]
                teacher = self.ref(inp, order)
            loss, parts = losses.head_distill_loss(model(inp, order), teacher, order, inp.cand_mask)
            return loss, {k: float(v) for k, v in parts.items()}
        click = torch.from_numpy(batch.click.astype(np.float32))
        if tc.scorer_label == "utility":  # the scorers' soft target: U scaled into [0, 1]
            click = utility / (tc.w_click + tc.w_like + tc.w_long_view)
        target = None
        if tc.stage == "nar":
            target, _ = losses.preferred_order(exposed, utility, tc.alpha, tc.gamma)
        return model.loss(inp, exposed, click, target), {}  # type: ignore[operator]


def _list_policy(model: nn.Module, kind: str) -> ListPolicy:
    return ListPolicy(name=kind, kind=kind, model=model)


def validate(
    loss_fn: StageLoss,
    valid: ListBatch,
    model_cfg: ModelConfig,
    kind: str,
    tc: TrainConfig,
    exam: np.ndarray | None = None,
) -> dict[str, float]:
    """Validation loss, logged NDCG/AUC/MAP and the debiased estimates (exam: the slots'
    examination propensities; None = estimated from `valid`); under torchrun `valid` is
    this rank's part and every figure is reduced over the ranks (distributed.py)."""
    from model.estimators import examination_propensities, list_ips
    from model.evaluate import generate_lists

    world = distributed.current()
    if exam is None:
        exam = examination_propensities(
            valid, tc.w_click, tc.w_like, tc.w_long_view, reduce=distributed.sum_cells(world)
        )
    model = loss_fn.model
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(valid), tc.batch_size * 4):
            part = valid.take(slice(start, start + tc.batch_size * 4))
            loss, _ = loss_fn(part, to_inputs(part, model_cfg.schema))
            total += float(loss) * len(part)
            n += len(part)
    total, rows = distributed.sum_over_ranks(world, (total, n))
    out = {"valid_loss": total / max(rows, 1)}
    r, schema = _list_policy(model, kind), model_cfg.schema
    out.update(
        {
            f"valid_{k}": v
            for k, v in distributed.logged_metrics(r, valid, schema, world, exam=exam).items()
            if k in ("ndcg@10", "auc", "map@10", "ips")
        }
    )
    if valid.has_propensity:  # the same log on every rank
        order, _ = generate_lists(r, valid, schema, valid.k)
        ips_sum, count = distributed.sum_over_ranks(
            world, (float(np.sum(list_ips(valid, order, exam))), len(valid))
        )
        out["valid_list_ips"] = ips_sum / max(count, 1)
    model.train()
    return out


def _selection_score(tc: TrainConfig, metrics: dict[str, float]) -> float:
    key = tc.select_on
    if not key:
        debiased = "valid_list_ips" if "valid_list_ips" in metrics else "valid_ips"
        key = "valid_loss" if tc.stage in ("pretrain", "distill") else debiased
    value = metrics[key]
    return -value if key.endswith("loss") else value


def train(
    model_cfg: ModelConfig,
    tc: TrainConfig,
    train_data: ListBatch | LogShard,
    valid_data: ListBatch | LogShard,
    out_dir: str | Path,
    init_from: str | Path | None = None,
    progress: bool = True,
    resume: bool = True,
) -> TrainResult:
    """Train one model; returns the directory of the best checkpoint (`out_dir/best`).

    resume: continue from `out_dir/last` if its train state has this run's fingerprint
    (run_fingerprint; only `epochs` may have grown). Otherwise, or with resume=False, the
    run starts fresh: `last`, `best` and `reference` of an earlier run are removed first.

    Under torchrun (distributed.init joined the process group) the data are this rank's
    LogShards (distributed.read_shard) and the run is data-parallel; see distributed.py."""
    world = distributed.current()
    progress = progress and world.is_main
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    kind = STAGE_KIND[tc.stage]

    if init_from is not None:
        model, loaded_cfg, _ = load_checkpoint(init_from)
        if loaded_cfg != model_cfg:
            log.info("using the init checkpoint's model config (it differs from the given one)")
        model_cfg = loaded_cfg
    else:
        model = build_model(kind, model_cfg)
    ref = None
    if tc.stage == "distill" and init_from is None:
        raise ValueError("the distill stage aligns a trained model's heads: give init_from")
    # frozen reference: the init (DPO: pre-trained, or random for DPO only; distill: teacher)
    if tc.stage in ("dpo", "distill"):
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    loss_fn = StageLoss(tc, model, ref)

    history: list[dict[str, Any]] = []
    best, start_epoch, stale = -float("inf"), 0, 0
    last_dir, best_dir, ref_dir = out / "last", out / "best", out / "reference"
    if isinstance(valid_data, LogShard):
        valid: ListBatch | LogShard = valid_data.head(tc.max_valid)
    else:
        valid = valid_data.take(slice(0, tc.max_valid))
    fingerprint = run_fingerprint(model_cfg, tc, train_data, valid, init_from)
    shard = distributed.as_shard(train_data, world, fingerprint["train_data"])
    from model.estimators import examination_propensities

    # the slots' examination propensities, harvested from the training logs once (under
    # torchrun from every rank's part: the cells are summed over the ranks)
    exam = examination_propensities(
        shard.batch, tc.w_click, tc.w_like, tc.w_long_view, reduce=distributed.sum_cells(world)
    )
    valid = distributed.as_shard(valid, world, fingerprint["valid_data"]).batch
    step = distributed.step_fn(model, loss_fn, world)
    if world.is_main:
        for d in (last_dir, best_dir, ref_dir):
            recover_dir(d)  # a crash inside replace_dir
    distributed.barrier(world)
    resumed = False
    if resume and has_train_state(last_dir):
        why = _resume_mismatch(read_train_state(last_dir), fingerprint, tc)
        if why:
            log.warning("%s: not resuming the saved run, %s: starting fresh", out, why)
        else:
            last_model, _, _ = load_checkpoint(last_dir)
            model.load_state_dict(last_model.state_dict())
            state = load_train_state(last_dir, opt)
            history, best = state["history"], state["best"]
            start_epoch, stale = state["epoch"] + 1, state["stale"]
            resumed = True
            log.info("resumed %s at epoch %d", out, start_epoch)
    distributed.barrier(world)  # every rank has read the saved run before rank 0 clears it
    if not resumed and world.is_main:
        _start_fresh(out)
    if ref is not None:
        if resumed and ref_dir.exists():
            ref.load_state_dict(load_checkpoint(ref_dir)[0].state_dict())
        elif world.is_main:  # a fresh start always writes the current reference
            tmp = staging_dir(ref_dir)
            save_checkpoint(tmp, ref, model_cfg, asdict(tc), {"role": f"{tc.stage} reference"})
            replace_dir(tmp, ref_dir)
    distributed.barrier(world)

    for epoch in range(start_epoch, tc.epochs):
        if stale >= tc.patience:
            break
        # the permutation depends on (seed, epoch) only, so a resumed run sees the same data,
        # and it is over the whole log's rows whatever the world size
        perm = np.random.default_rng([tc.seed, epoch]).permutation(shard.total)
        steps = range(0, len(perm), tc.batch_size)
        bar = tqdm(
            steps, desc=f"{tc.stage} {out.name} ep{epoch}", disable=not progress, leave=False
        )
        running = 0.0
        for i, start in enumerate(bar):
            # this rank's rows of the global batch; weight 1.0 in a world of one
            batch, weight = shard.part(perm[start : start + tc.batch_size], world)
            loss, parts = step(batch, to_inputs(batch, model_cfg.schema))
            opt.zero_grad(set_to_none=True)
            (loss * weight).backward()
            nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            lv = loss.item()
            running = 0.9 * running + 0.1 * lv if i else lv
            if i % 20 == 0:
                bar.set_postfix(loss=f"{running:.4f}", **{k: f"{v:.3f}" for k, v in parts.items()})
        metrics = validate(loss_fn, valid, model_cfg, kind, tc, exam)
        score = _selection_score(tc, metrics)
        improved = score > best
        if improved:
            best, stale = score, 0
            if world.is_main:
                tmp = staging_dir(best_dir)
                save_checkpoint(tmp, model, model_cfg, asdict(tc), {"epoch": epoch, **metrics})
                replace_dir(tmp, best_dir)
        else:
            stale += 1
        history.append({"epoch": epoch, "train_loss": running, **metrics, "improved": improved})
        if world.is_main:
            log.info("%s epoch %d: %s", out.name, epoch, json.dumps(history[-1]))
            # weights and train state of one epoch, published together (replace_dir)
            tmp = staging_dir(last_dir)
            save_checkpoint(tmp, model, model_cfg, asdict(tc), {"epoch": epoch})
            state = {"epoch": epoch, "best": best, "stale": stale, "history": history}
            save_train_state(tmp, opt, {**state, "fingerprint": fingerprint})
            replace_dir(tmp, last_dir)
    if world.is_main:
        (out / "history.json").write_text(json.dumps(history, indent=2))
    distributed.barrier(world)  # the checkpoints are there for every rank
    return TrainResult(best_dir, history, time.perf_counter() - t0)
