"""Training stages, checkpoints (safetensors, nothing unpickled), resume and determinism."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_checkpoint, read_config
from model.config import ModelConfig
from model.data import ListBatch
from model.evaluate import Reranker, generate_lists, logged_metrics
from model.features import FeatureSchema
from model.train import TrainConfig, train

SCHEMA = FeatureSchema(item_id_buckets=4096, user_id_buckets=1024)
CFG = ModelConfig(schema=SCHEMA, d_model=16, n_attn_heads=2, omtp_heads=2)


@pytest.fixture(scope="module")
def splits() -> tuple[ListBatch, ListBatch]:
    from model.world import WorldConfig, generate_logs

    cfg = WorldConfig(n_items=2000, n_users=300)
    _, logs = generate_logs(cfg, seed=3, n_requests=1500, progress=False)
    return logs.take(slice(0, 1200)), logs.take(slice(1200, 1500))


def _tc(stage: str, **kw: object) -> TrainConfig:
    return TrainConfig(stage=stage, epochs=2, batch_size=256, seed=7, threads=1, **kw)  # type: ignore[arg-type]


def test_pretrain_then_dpo_checkpoints(tmp_path: Path, splits: tuple[ListBatch, ListBatch]) -> None:
    tr, va = splits
    pre = train(CFG, _tc("pretrain"), tr, va, tmp_path / "pre", progress=False)
    assert (pre.best_dir / "model.safetensors").exists()
    assert len(pre.history) == 2
    assert pre.history[0]["valid_loss"] > 0
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
    model, cfg, config = load_checkpoint(pre.best_dir)
    assert cfg == CFG and config["kind"] == "gen_reranker"
    assert config["train_config"]["stage"] == "pretrain"

    dpo = train(CFG, _tc("dpo"), tr, va, tmp_path / "dpo", init_from=pre.best_dir, progress=False)
    dpo_model, _, _ = load_checkpoint(dpo.best_dir)
    # the reference is the frozen pre-trained model
    ref, _, _ = load_checkpoint(tmp_path / "dpo" / "reference")
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # DPO moved the policy away from the reference
    moved = any(
        not torch.equal(a, b)
        for a, b in zip(dpo_model.state_dict().values(), ref.state_dict().values(), strict=True)
    )
    assert moved
    order, passes = generate_lists(
        Reranker("gref", "gen_reranker", dpo_model, items_per_pass=2), va, SCHEMA, k=10
    )
    assert passes == 5
    assert all(len(set(row.tolist())) == 10 for row in order)


def test_training_is_seeded_and_resumable(
    tmp_path: Path, splits: tuple[ListBatch, ListBatch]
) -> None:
    tr, va = splits
    a = train(CFG, _tc("pretrain"), tr, va, tmp_path / "a", progress=False)
    b = train(CFG, _tc("pretrain"), tr, va, tmp_path / "b", progress=False)
    del a, b
    wa = load_checkpoint(tmp_path / "a" / "last")[0]
    wb = load_checkpoint(tmp_path / "b" / "last")[0]
    for x, y in zip(wa.state_dict().values(), wb.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    # interrupted after epoch 0, then resumed: the same weights as an uninterrupted run
    train(CFG, replace(_tc("pretrain"), epochs=1), tr, va, tmp_path / "c", progress=False)
    c = train(CFG, _tc("pretrain"), tr, va, tmp_path / "c", progress=False)
    assert [h["epoch"] for h in c.history] == [0, 1]
    wc = load_checkpoint(tmp_path / "c" / "last")[0]
    for x, y in zip(wa.state_dict().values(), wc.state_dict().values(), strict=True):
        assert torch.allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("stage", ["dnn", "prm", "nar", "clicks"])
def test_baseline_stages_train_and_evaluate(
    stage: str, tmp_path: Path, splits: tuple[ListBatch, ListBatch]
) -> None:
    tr, va = splits
    cfg = replace(CFG, omtp_heads=1) if stage == "clicks" else CFG
    res = train(cfg, _tc(stage), tr, va, tmp_path / stage, progress=False)
    model, _, config = load_checkpoint(res.best_dir)
    kind = config["kind"]
    metrics = logged_metrics(Reranker(stage, kind, model), va, SCHEMA)
    assert 0.0 <= metrics["ndcg@10"] <= 1.0
    assert 0.0 <= metrics["auc"] <= 1.0
    first, last = res.history[0]["valid_loss"], res.history[-1]["valid_loss"]
    assert np.isfinite(first) and np.isfinite(last)


def test_checkpoint_refuses_foreign_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"checkpoint_version": 99}')
    with pytest.raises(ValueError, match="checkpoint_version"):
        read_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        read_config(tmp_path / "nowhere")


def test_distill_aligns_heads_to_the_teachers_n1_decode(
    tmp_path: Path, splits: tuple[ListBatch, ListBatch]
) -> None:
    tr, va = splits
    pre = train(CFG, _tc("pretrain"), tr, va, tmp_path / "pre", progress=False)
    with pytest.raises(ValueError, match="init_from"):
        train(CFG, _tc("distill"), tr, va, tmp_path / "x", progress=False)
    aligned = train(
        CFG, replace(_tc("distill"), epochs=3), tr, va, tmp_path / "al", init_from=pre.best_dir,
        progress=False,
    )  # fmt: skip
    losses = [h["valid_loss"] for h in aligned.history]
    assert losses[-1] < losses[0]  # the heads move towards the teacher's decode
    teacher = load_checkpoint(tmp_path / "al" / "reference")[0]
    student = load_checkpoint(aligned.best_dir)[0]

    def agreement(model: torch.nn.Module) -> float:
        """Share of list slots where the n = 2 decode equals the teacher's n = 1 decode."""
        ref, _ = generate_lists(Reranker("t", "gen_reranker", teacher, 1), va, SCHEMA, k=10)
        got, _ = generate_lists(Reranker("s", "gen_reranker", model, 2), va, SCHEMA, k=10)
        return float((ref == got).mean())

    assert agreement(student) > agreement(teacher)
