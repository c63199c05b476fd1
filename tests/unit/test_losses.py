"""GReF losses (model/losses.py) on small cases computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import losses
from model.losses import (
    dpo_loss,
    exposure_ce,
    masked_log_softmax,
    omtp_loss,
    preferred_order,
    sequence_logprob,
    unavailable_mask,
)
from tests.support.inputs import make_inputs, make_model, random_orders


def logp_over(scores: torch.Tensor, allowed: list[int], target: int) -> float:
    """log softmax of scores restricted to `allowed`, at `target` (the by-hand reference)."""
    sub = scores[allowed]
    return float(sub[allowed.index(target)] - torch.logsumexp(sub, dim=0))


def test_unavailable_mask_tiny() -> None:
    order = torch.tensor([[2, 0, 1]])
    cand_mask = torch.tensor([[True, True, True, False]])
    T, F_ = True, False
    expected = torch.tensor(
        [
            [[F_, F_, F_, T], [F_, F_, T, T]],  # t=0: head 0 nothing taken; head 1 skips 2
            [[F_, F_, T, T], [T, F_, T, T]],  # t=1: prefix {2}; head 1 also skips 0
            [[T, F_, T, T], [T, T, T, T]],  # t=2: prefix {2, 0}; head 1 has nothing left
        ]
    )[None]
    assert torch.equal(unavailable_mask(order, cand_mask, 2), expected)
    # -1 padding in the order takes nothing
    padded = unavailable_mask(torch.tensor([[1, -1]]), torch.ones(1, 3, dtype=torch.bool), 1)
    assert torch.equal(padded[0, :, 0], torch.tensor([[F_, F_, F_], [F_, T, F_]]))


def test_masked_log_softmax_rows() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], requires_grad=True)
    unavailable = torch.tensor([[False, True, False], [True, True, True]])
    out = masked_log_softmax(scores, unavailable)
    assert out[0, 1] == float("-inf") and (out[1] == float("-inf")).all()
    assert math.isclose(float(out[0, 0].detach()), 1 - math.log(math.e + math.e**3), rel_tol=1e-6)
    out[0, 0].backward()
    assert torch.isfinite(scores.grad).all()


def test_exposure_ce_by_hand() -> None:
    # 3 candidates, exposure [2, 0]; head 0 only
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 4.0]])[None, :, None, :]  # (1, 2, 1, 3)
    order = torch.tensor([[2, 0]])
    cand_mask = torch.ones(1, 3, dtype=torch.bool)
    step0 = -(3 - math.log(math.e**1 + math.e**2 + math.e**3))
    step1 = -(0.5 - math.log(math.e**0.5 + math.e**1))  # candidate 2 is taken
    got = exposure_ce(scores, order, cand_mask)
    assert math.isclose(float(got), (step0 + step1) / 2, rel_tol=1e-6)
    # padding in the order and extra heads change nothing
    wide = torch.cat([scores, torch.randn(1, 2, 2, 3)], dim=2)
    padded_scores = torch.cat([wide, torch.randn(1, 1, 3, 3)], dim=1)
    padded = exposure_ce(padded_scores, torch.tensor([[2, 0, -1]]), cand_mask)
    assert math.isclose(float(padded), float(got), rel_tol=1e-6)


def test_preferred_order_by_hand() -> None:
    # a click at position 3 (S = 1/3 + 1) moves above unclicked positions 1 (S = 1), 2 (1/2)
    exposed = torch.tensor([[5, 3, 7, -1], [4, 1, 0, 2]])
    utility = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    order_w, differs = preferred_order(exposed, utility)
    assert torch.equal(order_w, torch.tensor([[7, 5, 3, -1], [4, 1, 0, 2]]))
    assert torch.equal(differs, torch.tensor([True, False]))
    # a weak click does not overcome α / P: α = 1, γ = 0.1 keeps the logged order
    _, differs = preferred_order(exposed, utility, alpha=1.0, gamma=0.1)
    assert not differs.any()


def test_sequence_logprob_is_the_sum_of_steps() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 3, 2, 5, generator=g)
    order = torch.tensor([[3, 1, 2]])
    cand_mask = torch.tensor([[True, True, True, True, False]])
    allowed = [0, 1, 2, 3]
    by_hand = 0.0
    for t, y in enumerate(order[0].tolist()):
        by_hand += logp_over(scores[0, t, 0], allowed, y)
        allowed.remove(y)
    got = sequence_logprob(scores, order, cand_mask)
    assert math.isclose(float(got), by_hand, rel_tol=1e-6)
    # head 1 at t predicts order[t + 1], having skipped order[:t + 1]
    allowed = [0, 1, 2, 3]
    by_hand_1 = 0.0
    for t in range(2):
        allowed.remove(order[0, t].item())
        by_hand_1 += logp_over(scores[0, t, 1], allowed, int(order[0, t + 1]))
    got_1 = sequence_logprob(scores, order, cand_mask, head=1)
    assert math.isclose(float(got_1), by_hand_1, rel_tol=1e-6)


def test_l_n_by_hand() -> None:
    g = torch.Generator().manual_seed(1)
    n, K = 3, 4
    scores = torch.randn(2, K, n, 6, generator=g)
    order = torch.tensor([[5, 2, 0, 1], [3, 4, -1, -1]])
    cand_mask = torch.tensor([[True] * 6, [True] * 5 + [False]])
    utility = torch.zeros(2, K)
    _, parts = omtp_loss(scores, order, cand_mask, utility)
    expected = 0.0
    for j in range(n):
        nll = []
        for b in range(2):
            real = [y for y in order[b].tolist() if y >= 0]
            for t in range(len(real) - j):
                allowed = [i for i in range(6) if cand_mask[b, i] and i not in real[: t + j]]
                nll.append(-logp_over(scores[b, t, j], allowed, real[t + j]))
        expected += sum(nll) / len(nll)
    assert math.isclose(float(parts["L_n"]), expected, rel_tol=1e-5)
    assert float(parts["L_o"]) == 0.0  # equal utilities: no ordered pairs


def test_l_o_by_hand_and_direction() -> None:
    # one position, heads (0, 1) with targets a = 0 (U = 0) then b = 1 (U = 1): w = (b, a)
    order = torch.tensor([[0, 1]])
    utility = torch.tensor([[0.0, 1.0]])
    cand_mask = torch.ones(1, 3, dtype=torch.bool)

    def l_o(s0: list[float], s1: list[float]) -> float:
        scores = torch.zeros(1, 2, 2, 3)
        scores[0, 0, 0], scores[0, 0, 1] = torch.tensor(s0), torch.tensor(s1)
        return float(omtp_loss(scores, order, cand_mask, utility)[1]["L_o"])

    s0, s1 = [0.3, 1.2, -0.4], [0.9, 0.1, 0.5]
    s0_t, s1_t = torch.tensor(s0), torch.tensor(s1)
    logp_l = logp_over(s0_t, [0, 1, 2], 0) + logp_over(s1_t, [1, 2], 1)  # (a, b)
    logp_w = logp_over(s0_t, [0, 1, 2], 1) + logp_over(s1_t, [0, 2], 0)  # (b, a): a's normaliser
    expected = -F.logsigmoid(torch.tensor(logp_w - logp_l)).item()
    assert math.isclose(l_o(s0, s1), expected, rel_tol=1e-5)
    # heads favouring the higher-utility item first give a lower L_o than the reverse
    right = l_o([0.0, 2.0, 0.0], [2.0, 0.0, 0.0])  # head 0 likes b, head 1 likes a
    wrong = l_o([2.0, 0.0, 0.0], [0.0, 2.0, 0.0])
    assert right < wrong


def test_dpo_is_log2_when_policy_equals_reference() -> None:
    g = torch.Generator().manual_seed(2)
    scores_w, scores_l = torch.randn(3, 4, 2, 6, generator=g), torch.randn(3, 4, 2, 6, generator=g)
    order_l = torch.tensor([[0, 1, 2, 3], [4, 2, 0, -1], [1, 0, 3, 2]])
    order_w, differs = preferred_order(order_l, torch.tensor([[0.0, 0, 1, 0]] * 3))
    cand_mask = torch.ones(3, 6, dtype=torch.bool)
    for heads in (1, 2):
        loss, stats = dpo_loss(
            scores_w, scores_l, scores_w, scores_l, order_w, order_l, cand_mask, differs,
            heads=heads,
        )  # fmt: skip
        assert math.isclose(float(loss), math.log(2), rel_tol=1e-6)
        assert float(stats["reward_margin"]) == 0.0


def test_dpo_falls_when_the_preferred_sequence_gains_probability() -> None:
    g = torch.Generator().manual_seed(3)
    ref_w, ref_l = torch.randn(2, 3, 1, 5, generator=g), torch.randn(2, 3, 1, 5, generator=g)
    order_l = torch.tensor([[0, 1, 2], [3, 4, 1]])
    order_w = torch.tensor([[2, 0, 1], [1, 3, 4]])
    cand_mask = torch.ones(2, 5, dtype=torch.bool)
    pair = torch.tensor([True, True])
    base, _ = dpo_loss(ref_w, ref_l, ref_w, ref_l, order_w, order_l, cand_mask, pair)
    nudged_w = ref_w.clone()
    nudged_w[:, :, 0].scatter_add_(2, order_w[:, :, None], torch.full((2, 3, 1), 0.5))
    loss, stats = dpo_loss(nudged_w, ref_l, ref_w, ref_l, order_w, order_l, cand_mask, pair)
    assert loss < base
    assert float(stats["reward_margin"]) > 0 and float(stats["reward_accuracy"]) == 1.0
    # requests outside pair_mask do not count
    only0, _ = dpo_loss(
        nudged_w, ref_l, ref_w, ref_l, order_w, order_l, cand_mask, torch.tensor([True, False])
    )
    alone, _ = dpo_loss(
        nudged_w[:1], ref_l[:1], ref_w[:1], ref_l[:1], order_w[:1], order_l[:1],
        cand_mask[:1], pair[:1],
    )  # fmt: skip
    assert math.isclose(float(only0), float(alone), rel_tol=1e-6)


def test_omtp_loss_reaches_every_parameter() -> None:
    model = make_model()
    inp = make_inputs(B=4, M=10, m=torch.tensor([10, 8, 10, 6]))
    order = random_orders(inp, K=6)
    utility = torch.rand(4, 6, generator=torch.Generator().manual_seed(4)).round()
    model.train()
    loss, parts = omtp_loss(model(inp, order), order, inp.cand_mask, utility, lambda2=0.5)
    assert torch.isfinite(loss) and float(parts["L_o"]) > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_head_distill_is_zero_when_each_head_matches_the_teacher_shifted() -> None:
    torch.manual_seed(3)
    B, K, n, M = 3, 6, 3, 9
    order = torch.stack([torch.randperm(M)[:K] for _ in range(B)])
    order[2, 4:] = -1  # a shorter list
    cand_mask = torch.ones(B, M, dtype=torch.bool)
    teacher = torch.randn(B, K, n, M)
    student = torch.randn(B, K, n, M)
    for j in range(n):  # head j at t := the teacher's head 0 at t + j
        student[:, : K - j, j] = teacher[:, j:, 0]
    loss, parts = losses.head_distill_loss(student, teacher, order, cand_mask)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert set(parts) == {"kl0", "kl1", "kl2"}
    # a student that differs is pulled back, and only the student gets gradients
    moved = student.clone().requires_grad_(True)
    with torch.no_grad():
        moved[:, :, 1] += torch.randn(B, K, M)
    loss, parts = losses.head_distill_loss(moved, teacher, order, cand_mask)
    assert float(parts["kl1"]) > 0.01 and float(parts["kl0"]) == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert moved.grad is not None and moved.grad[:, :, 1].abs().sum() > 0
    assert not teacher.requires_grad


def test_head_distill_ignores_unavailable_candidates() -> None:
    # candidate 3 is padding: whatever either model scores it, the loss does not change
    order = torch.tensor([[0, 1, 2]])
    cand_mask = torch.tensor([[True, True, True, False]])
    teacher = torch.randn(1, 3, 2, 4)
    student = teacher.clone()
    student[:, :2, 1] = teacher[:, 1:, 0]
    a, _ = losses.head_distill_loss(student, teacher, order, cand_mask)
    student[..., 3] += 50.0
    teacher[..., 3] -= 50.0
    b, _ = losses.head_distill_loss(student, teacher, order, cand_mask)
    assert torch.isfinite(a) and float(a) == pytest.approx(float(b), abs=1e-6)


def test_value_loss_fits_each_heads_logged_target() -> None:
    """value_loss: head j at position t is scored on the item logged at slot t + j, against
    that item's value, by BCE; nothing else (other candidates, padding) gets gradient."""
    B, K, n, M = 2, 3, 2, 5
    scores = torch.randn(B, K, n, M, requires_grad=True)
    order = torch.tensor([[4, 0, 2], [1, 3, -1]])
    cand_mask = torch.ones(B, M, dtype=torch.bool)
    target = torch.tensor([[1.0, 0.0, 0.5], [0.2, 1.0, -1.0]])
    loss, parts = losses.value_loss(scores, order, cand_mask, target)
    # by hand: head 0 at t reads order[t]; head 1 at t reads order[t + 1]
    want = 0.0
    for j in range(n):
        terms = []
        for b in range(B):
            for t in range(K - j):
                item = int(order[b, t + j])
                if item < 0:
                    continue
                terms.append(
                    F.binary_cross_entropy_with_logits(
                        scores[b, t, j, item], target[b, t + j].clamp(0, 1)
                    )
                )
        head = torch.stack(terms).mean()
        assert float(parts[f"bce{j}"]) == pytest.approx(float(head), rel=1e-5)
        want = want + head
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    loss.backward()
    grad = scores.grad
    assert grad is not None
    touched = grad.abs() > 0
    assert int(touched.sum()) == 5 + 3  # head 0: 3 + 2 real slots; head 1: 2 + 1
    assert not touched[1, :, :, 0].any()  # candidate 0 is never logged in request 1
