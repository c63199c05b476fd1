"""Training stages, checkpoints (safetensors, nothing unpickled), resume and determinism."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from contract.config import ModelConfig
from contract.features import FeatureSchema
from model.checkpoint import (
    build_model,
    load_checkpoint,
    read_config,
    read_train_state,
    save_checkpoint,
    save_train_state,
)
from model.data import ListBatch
from model.evaluate import ListPolicy, generate_lists, logged_metrics
from model.train import TrainConfig, train

train_module = importlib.import_module("model.train")  # the module (`train` is the function)

SCHEMA = FeatureSchema(item_id_buckets=4096, user_id_buckets=1024)
CFG = ModelConfig(schema=SCHEMA, d_model=16, n_attn_heads=2, omtp_heads=2)


@pytest.fixture(scope="module")
def splits() -> tuple[ListBatch, ListBatch]:
    from model.simulated_logs import generate_logs
    from model.world import WorldConfig

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
        ListPolicy("gref", "gen_reranker", dpo_model, items_per_pass=2), va, SCHEMA, k=10
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
    metrics = logged_metrics(ListPolicy(stage, kind, model), va, SCHEMA)
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
        ref, _ = generate_lists(ListPolicy("t", "gen_reranker", teacher, 1), va, SCHEMA, k=10)
        got, _ = generate_lists(ListPolicy("s", "gen_reranker", model, 2), va, SCHEMA, k=10)
        return float((ref == got).mean())

    assert agreement(student) > agreement(teacher)


# ---- resume only the same run --------------------------------------------------------


def _weights(directory: Path) -> list[torch.Tensor]:
    return list(load_checkpoint(directory)[0].state_dict().values())


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _fingerprint(run_dir: Path) -> dict[str, str]:
    fp: dict[str, str] = read_train_state(run_dir / "last").get("fingerprint", {})
    return fp


def _random_init(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(directory, build_model("gen_reranker", CFG), CFG)


@pytest.fixture
def small(
    splits: tuple[ListBatch, ListBatch], caplog: pytest.LogCaptureFixture
) -> tuple[ListBatch, ListBatch]:
    """600 train rows (the resume tests train several times) and model.train's log."""
    caplog.set_level(logging.INFO, logger="model.train")
    return splits[0].take(slice(0, 600)), splits[1]


def test_resume_starts_fresh_when_the_config_or_data_changed(
    tmp_path: Path, small: tuple[ListBatch, ListBatch], caplog: pytest.LogCaptureFixture
) -> None:
    tr, va = small
    tc = replace(_tc("pretrain"), epochs=1)
    old = train(CFG, tc, tr, va, tmp_path / "r", progress=False)
    fp_old = _fingerprint(tmp_path / "r")

    # another learning rate: trained again, the same as a fresh run with it
    caplog.clear()
    new = train(CFG, replace(tc, lr=1e-3), tr, va, tmp_path / "r", progress=False)
    assert new.history[0]["valid_loss"] != old.history[0]["valid_loss"]
    fresh = train(CFG, replace(tc, lr=1e-3), tr, va, tmp_path / "fresh", progress=False)
    assert new.history == fresh.history
    assert _same(_weights(new.best_dir), _weights(fresh.best_dir))
    assert read_config(new.best_dir)["train_config"]["lr"] == 1e-3
    assert "not resuming" in caplog.text and "train_config" in caplog.text
    fp_lr = _fingerprint(tmp_path / "r")
    assert fp_lr["train_config"] != fp_old["train_config"] and fp_lr["run"] != fp_old["run"]
    assert fp_lr["train_data"] == fp_old["train_data"]
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.old"))

    # other training data
    caplog.clear()
    other = train(CFG, replace(tc, lr=1e-3), tr.take(slice(0, 500)), va, tmp_path / "r",
                  progress=False)  # fmt: skip
    assert other.history[0]["valid_loss"] != new.history[0]["valid_loss"]
    assert "not resuming" in caplog.text and "train_data" in caplog.text
    assert _fingerprint(tmp_path / "r")["train_data"] != fp_lr["train_data"]

    # a train state written by older code (no fingerprint) is not resumed either
    state = tmp_path / "r" / "last" / "train_state.json"
    payload = json.loads(state.read_text())
    del payload["state"]["fingerprint"]
    state.write_text(json.dumps(payload))
    caplog.clear()
    train(CFG, replace(tc, lr=1e-3), tr, va, tmp_path / "r", progress=False)
    assert "no run fingerprint" in caplog.text
    assert _fingerprint(tmp_path / "r") == fp_lr


def test_resume_continues_when_only_epochs_grow(
    tmp_path: Path, small: tuple[ListBatch, ListBatch], caplog: pytest.LogCaptureFixture
) -> None:
    tr, va = small
    one = train(CFG, replace(_tc("pretrain"), epochs=1), tr, va, tmp_path / "r", progress=False)
    fp = _fingerprint(tmp_path / "r")
    caplog.clear()
    two = train(CFG, replace(_tc("pretrain"), threads=2), tr, va, tmp_path / "r", progress=False)
    assert "resumed" in caplog.text and "not resuming" not in caplog.text
    assert two.history[:1] == one.history and [h["epoch"] for h in two.history] == [0, 1]
    assert _fingerprint(tmp_path / "r") == fp
    # fewer epochs than the saved run trained: not that run's result, so fresh
    caplog.clear()
    again = train(CFG, replace(_tc("pretrain"), epochs=1), tr, va, tmp_path / "r",
                  progress=False)  # fmt: skip
    assert again.history == one.history
    assert "more than the 1 asked" in caplog.text


def test_changed_init_or_fresh_start_rewrites_the_reference(
    tmp_path: Path, small: tuple[ListBatch, ListBatch], caplog: pytest.LogCaptureFixture
) -> None:
    tr, va = small
    init_a, init_b = _random_init(tmp_path / "a", 1), _random_init(tmp_path / "b", 2)
    tc = replace(_tc("dpo"), epochs=1)
    ref_dir = tmp_path / "dpo" / "reference"
    train(CFG, tc, tr, va, tmp_path / "dpo", init_from=init_a, progress=False)
    assert _same(_weights(ref_dir), _weights(init_a))
    fp_a = _fingerprint(tmp_path / "dpo")

    # a new init checkpoint (say a re-trained pre-train): DPO again, from it
    caplog.clear()
    res = train(CFG, tc, tr, va, tmp_path / "dpo", init_from=init_b, progress=False)
    assert _same(_weights(ref_dir), _weights(init_b))
    fresh = train(CFG, tc, tr, va, tmp_path / "fresh", init_from=init_b, progress=False)
    assert _same(_weights(res.best_dir), _weights(fresh.best_dir))
    assert "not resuming" in caplog.text and "init_checkpoint" in caplog.text
    assert _fingerprint(tmp_path / "dpo")["init_checkpoint"] != fp_a["init_checkpoint"]

    # resume=False over an earlier run: the reference is the current init's
    train(CFG, tc, tr, va, tmp_path / "dpo", init_from=init_a, progress=False, resume=False)
    assert _same(_weights(ref_dir), _weights(init_a))

    # a stale reference without a train state (a run killed in its first epoch)
    shutil.rmtree(tmp_path / "dpo" / "last")
    shutil.rmtree(ref_dir)
    shutil.copytree(init_b, ref_dir)
    train(CFG, tc, tr, va, tmp_path / "dpo", init_from=init_a, progress=False)
    assert _same(_weights(ref_dir), _weights(init_a))


def test_weights_and_train_state_are_saved_together(
    tmp_path: Path,
    small: tuple[ListBatch, ListBatch],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crash while an epoch is saved resumes from the previous epoch's weights and
    state, never epoch e's weights with epoch e-1's state."""
    tr, va = small
    whole = train(CFG, _tc("pretrain"), tr, va, tmp_path / "whole", progress=False)

    # crash in the second epoch's save_train_state, after its weights were written
    calls: list[int] = []

    def crash_on_second(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("crash")
        save_train_state(*args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(train_module, "save_train_state", crash_on_second)
        with pytest.raises(RuntimeError, match="crash"):
            train(CFG, _tc("pretrain"), tr, va, tmp_path / "r", progress=False)
    resumed = train(CFG, _tc("pretrain"), tr, va, tmp_path / "r", progress=False)
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    for x, y in zip(_weights(tmp_path / "r" / "last"), _weights(whole.best_dir.parent / "last"),
                    strict=True):  # fmt: skip
        assert torch.allclose(x, y, atol=1e-6)

    # a crash between the two renames: the old `last` waits at last.old, a half-written
    # last.tmp beside it; the next run resumes from last.old
    last = tmp_path / "r" / "last"
    shutil.rmtree(last)
    shutil.copytree(tmp_path / "whole" / "last", tmp_path / "r" / "last.old")
    (tmp_path / "r" / "last.tmp").mkdir()
    (tmp_path / "r" / "last.tmp" / "model.safetensors").write_bytes(b"half")
    caplog.clear()
    three = train(CFG, replace(_tc("pretrain"), epochs=3), tr, va, tmp_path / "r", progress=False)
    assert three.history[:2] == whole.history and len(three.history) == 3
    assert "resumed" in caplog.text
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["best", "history.json", "last"]


def test_scorers_can_learn_from_the_utility_label(splits: tuple[ListBatch, ListBatch]) -> None:
    """scorer_label="utility": DNN / PRM fit U scaled into [0, 1] (GReF's label) instead of
    clicks, for a like-for-like baseline; the default stays clicks."""
    from model.baselines import PRM, exposure_bce
    from model.data import feedback_utility
    from model.tensors import to_inputs

    batch = splits[0].take(slice(0, 64))
    inp = to_inputs(batch, SCHEMA)
    torch.manual_seed(0)
    model = PRM(CFG)
    exposed = torch.from_numpy(batch.exposed.astype(np.int64))
    u = torch.from_numpy(feedback_utility(batch)) / (1.0 + 1.5 + 0.8)
    click = torch.from_numpy(batch.click.astype(np.float32))
    with torch.no_grad():
        loss_of = train_module.StageLoss
        on_u, _ = loss_of(_tc("prm", scorer_label="utility"), model, None)(batch, inp)
        on_click, _ = loss_of(_tc("prm"), model, None)(batch, inp)
        logits = model(inp)
        assert float(on_u) == pytest.approx(float(exposure_bce(logits, inp.cand_mask, exposed, u)))
        want = float(exposure_bce(logits, inp.cand_mask, exposed, click))
        assert float(on_click) == pytest.approx(want)
    assert float(on_u) != pytest.approx(float(on_click))  # the like / long-view weights count
    with pytest.raises(ValueError, match="scorer_label"):
        _tc("prm", scorer_label="likes")


def test_value_stage_trains_and_selects_on_the_debiased_estimate(
    tmp_path: Path, splits: tuple[ListBatch, ListBatch]
) -> None:
    """The value stage warm-starts from pre-training, reports the debiased estimates and
    selects its epoch on the list IPS estimate when the logs carry propensities (on the
    exposed-items IPS when they do not)."""
    from model.simulated_logs import generate_logs
    from model.world import WorldConfig

    cfg = WorldConfig(n_items=2000, n_users=300)
    _, logs = generate_logs(cfg, seed=3, n_requests=900, progress=False, propensity=True)
    tr, va = logs.take(slice(0, 700)), logs.take(slice(700, 900))
    pre = train(CFG, replace(_tc("pretrain"), epochs=1), tr, va, tmp_path / "pre", progress=False)
    val = train(
        CFG, _tc("value"), tr, va, tmp_path / "value", init_from=pre.best_dir, progress=False
    )
    h = val.history
    assert all(np.isfinite(r["valid_list_ips"]) and np.isfinite(r["valid_ips"]) for r in h)
    best = max(range(len(h)), key=lambda i: h[i]["valid_list_ips"])
    assert h[best]["improved"]
    _, _, config = load_checkpoint(val.best_dir)
    assert config["train_config"]["stage"] == "value"
    # without the propensity column: the exposed-items IPS chooses
    one = replace(_tc("value"), epochs=1)
    plain = train(CFG, one, splits[0], splits[1], tmp_path / "v2", progress=False)
    assert "valid_list_ips" not in plain.history[0] and "valid_ips" in plain.history[0]
