"""GReF losses as pure functions of tensors (paper arXiv 2510.25220, equation numbers cited).

Shapes: B requests, K target slots, n heads, M candidates. Teacher-forced scores are
(B, K, n, M) from GenReranker.forward: position t has consumed order[:, :t] and head j
predicts order[:, t + j]. Order padding is -1; cand_mask (B, M) is True for real
candidates. A target counts only when it exists (>= 0) and is available to its head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def head_targets(order: torch.Tensor, n: int) -> torch.Tensor:
    """(B, K) -> (B, K, n): [b, t, j] = order[b, t + j], -1 past the end."""
    padded = F.pad(order, (0, n - 1), value=-1)  # (B, K + n - 1)
    return padded.unfold(1, n, 1)  # (B, K, n)


def unavailable_mask(order: torch.Tensor, cand_mask: torch.Tensor, n: int) -> torch.Tensor:
    """(B, K, n, M) bool, True where candidate i is NOT available to head j at position t:
    padding candidates and the items order[:, :t + j] (the prefix plus the targets of the
    earlier heads of the same pass, which decoding makes head j skip)."""
    B, K = order.shape
    M = cand_mask.shape[1]
    slot = torch.arange(K, device=order.device)
    col = torch.where(order >= 0, order, M)  # padding slots write to a spare column M
    first = order.new_full((B, M + 1), K).scatter_reduce(1, col, slot.expand(B, K), reduce="amin")[
        :, :M
    ]  # (B, M): slot where candidate i is taken, K if never
    limit = slot[:, None] + torch.arange(n, device=order.device)[None, :]  # (K, n): t + j
    taken = first[:, None, None, :] < limit[None, :, :, None]  # (B, K, n, M)
    return taken | ~cand_mask[:, None, None, :]


def masked_log_softmax(scores: torch.Tensor, unavailable: torch.Tensor) -> torch.Tensor:
    """log softmax over the available candidates (last axis); -inf where unavailable.
    The softmax runs on a finite fill, so a row with nothing available stays finite in
    both the forward and the backward pass."""
    filled = scores.masked_fill(unavailable, torch.finfo(scores.dtype).min)
    return filled.log_softmax(dim=-1).masked_fill(unavailable, float("-inf"))


def _target_logprob(
    logp: torch.Tensor, target: torch.Tensor, unavailable: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logp (..., M), target (...) -> (log-prob of target, 0 where invalid; valid mask)."""
    idx = target.clamp(min=0).unsqueeze(-1)
    valid = (target >= 0) & ~unavailable.gather(-1, idx).squeeze(-1)
    lp = logp.gather(-1, idx).squeeze(-1)
    # where, not multiply: lp is -inf at invalid targets
    return torch.where(valid, lp, torch.zeros_like(lp)), valid


def _head_logprob(
    scores: torch.Tensor, order: torch.Tensor, cand_mask: torch.Tensor, head: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head `head`'s masked log-prob of its target order[:, t + head] at every position t:
    (B, K) log-probs (0 where invalid) and the (B, K) valid mask."""
    n = head + 1
    target = head_targets(order, n)[:, :, head]  # (B, K)
    unavailable = unavailable_mask(order, cand_mask, n)[:, :, head]  # (B, K, M)
    logp = masked_log_softmax(scores[:, :, head], unavailable)
    return _target_logprob(logp, target, unavailable)


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, torch.zeros_like(x)).sum() / valid.sum().clamp(min=1)


def exposure_ce(scores: torch.Tensor, order: torch.Tensor, cand_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 6, exposure-order pre-training: mean over positions of
    -log p(y_t | y_<t) under head 0 with teacher forcing. scores (B, K, n, M)."""
    lp, valid = _head_logprob(scores, order, cand_mask, head=0)
    return _masked_mean(-lp, valid)


def omtp_loss(
    scores: torch.Tensor,
    order: torch.Tensor,
    cand_mask: torch.Tensor,
    utility: torch.Tensor,
    lambda1: float = 1.0,
    lambda2: float = 1.0,
    n_heads: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 9 + 10: L_omtp = λ1·L_n + λ2·L_o.

    L_n (Eq. 9): sum over heads j of the mean cross-entropy of head j on order[:, t + j].
    L_o (Eq. 10): for every position t and adjacent heads (j, j + 1) whose targets
    a = order[t + j], b = order[t + j + 1] differ in utility, the joint log-prob of an
    ordering (first, second) is log p_j(first) + log p_{j+1}(second | first also taken);
    with w the ordering putting the higher-utility item first and l the other,
    L_o = mean of -log σ(log p(w) - log p(l)).
    utility (B, K) is U of each slot of `order`. Returns (loss, detached parts).
    """
    n = scores.shape[2] if n_heads is None else n_heads
    scores = scores[:, :, :n]  # (B, K, n, M)
    target = head_targets(order, n)  # (B, K, n)
    unavailable = unavailable_mask(order, cand_mask, n)  # (B, K, n, M)
    logp = masked_log_softmax(scores, unavailable)  # (B, K, n, M)
    lp, valid = _target_logprob(logp, target, unavailable)  # (B, K, n)
    L_n = sum(_masked_mean(-lp[:, :, j], valid[:, :, j]) for j in range(n))

    u = head_targets(utility, n)  # (B, K, n); padding slots read -1, masked by `valid`
    cand = torch.arange(scores.shape[-1], device=scores.device)
    margins, pair_valid = [], []
    for j in range(n - 1):
        a, b = target[:, :, j], target[:, :, j + 1]  # (B, K)
        ab = lp[:, :, j] + lp[:, :, j + 1]  # head j+1's own mask already excludes a
        lp_b, _ = _target_logprob(logp[:, :, j], b, unavailable[:, :, j])
        # head j+1 after head j took b instead of a: its normaliser excludes b, not a
        swapped = unavailable[:, :, j] | (cand == b.unsqueeze(-1))  # (B, K, M)
        lp_a, _ = _target_logprob(masked_log_softmax(scores[:, :, j + 1], swapped), a, swapped)
        ba = lp_b + lp_a
        ok = valid[:, :, j] & valid[:, :, j + 1] & (u[:, :, j] != u[:, :, j + 1])
        margin = torch.where(u[:, :, j] > u[:, :, j + 1], ab - ba, ba - ab)
        margins.append(torch.where(ok, margin, torch.zeros_like(margin)))  # before logsigmoid
        pair_valid.append(ok)
    if margins:
        m, ok = torch.stack(margins), torch.stack(pair_valid)  # (n - 1, B, K)
        L_o = _masked_mean(-F.logsigmoid(m), ok)
    else:
        L_o = scores.new_zeros(())
    loss = lambda1 * L_n + lambda2 * L_o
    return loss, {"L_n": L_n.detach(), "L_o": L_o.detach()}


def head_distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    order: torch.Tensor,
    cand_mask: torch.Tensor,
    n_heads: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Head alignment by self-distillation (our addition to the method; see README).

    After DPO post-trains head 0, heads 1..n-1 still predict the logged exposure order,
    so an n-per-pass decode mixes the two policies. `order` is the teacher's own n = 1
    greedy list; at position t, student head j is pulled towards the teacher's head-0
    distribution at position t + j, i.e. towards the item the n = 1 decode would put
    there. Both are normalised over the same candidates (unavailable_mask[t, j] is
    exactly unavailable_mask[t + j, 0]), and head 0 itself (j = 0) is anchored to the
    teacher. Loss: sum over heads of the mean KL(teacher || student) over real slots.
    student, teacher (B, K, n, M) teacher-forced scores on `order` (B, K)."""
    n = student.shape[2] if n_heads is None else n_heads
    K = order.shape[1]
    unavailable = unavailable_mask(order, cand_mask, n)  # (B, K, n, M)
    t_logp = masked_log_softmax(teacher[:, :, 0], unavailable[:, :, 0])  # (B, K, M)
    parts = {}
    total = student.new_zeros(())
    for j in range(n):
        blocked = unavailable[:, : K - j, j]  # (B, K - j, M)
        s_logp = masked_log_softmax(student[:, : K - j, j], blocked)
        p_logp = t_logp[:, j:]
        # where, not multiply: both log-probs are -inf on blocked candidates
        kl = torch.where(blocked, 0.0, p_logp.exp() * (p_logp - s_logp)).sum(dim=-1)
        head = _masked_mean(kl, order[:, j:] >= 0)
        parts[f"kl{j}"] = head.detach()
        total = total + head
    return total, parts


def preferred_order(
    exposed: torch.Tensor, utility: torch.Tensor, alpha: float = 1.0, gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7: S_i = α / P_i + γ·U_i (P_i the 1-based exposed position). Sorting the
    exposure by S (descending, stable) gives Y_w; padding (-1) stays at the end.
    exposed, utility (B, K) -> (order_w (B, K), differs (B,) bool: Y_w != Y_l)."""
    K = exposed.shape[1]
    P = torch.arange(1, K + 1, device=exposed.device, dtype=utility.dtype)
    S = alpha / P + gamma * utility  # (B, K)
    S = S.masked_fill(exposed < 0, float("-inf"))
    idx = torch.sort(S, dim=1, descending=True, stable=True).indices
    order_w = exposed.gather(1, idx)
    return order_w, (order_w != exposed).any(dim=1)


def sequence_logprob(
    scores: torch.Tensor, order: torch.Tensor, cand_mask: torch.Tensor, head: int = 0
) -> torch.Tensor:
    """log π(Y) (B,): the SUM over positions t of head `head`'s masked log-prob of its
    target order[:, t + head] (averaging over positions is a known cause of collapse)."""
    return _head_logprob(scores, order, cand_mask, head)[0].sum(dim=1)


def dpo_loss(
    policy_w: torch.Tensor,
    policy_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    order_w: torch.Tensor,
    order_l: torch.Tensor,
    cand_mask: torch.Tensor,
    pair_mask: torch.Tensor,
    beta: float = 0.1,
    heads: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 8, Rerank-DPO:
    -log σ(β[(log πθ(Y_w) - log πref(Y_w)) - (log πθ(Y_l) - log πref(Y_l))]).

    policy_*/ref_* are teacher-forced scores (B, K, n, M) on order_w (preferred, Eq. 7)
    and order_l (logged). Averaged over requests with pair_mask (B,) True and over heads
    0..heads-1, each with its own sequence factorisation (so every OMTP head is
    post-trained). Stats (detached): mean reward margin and pairwise accuracy."""
    pair = pair_mask.to(torch.bool)
    losses, margins = [], []
    for h in range(heads):
        reward_w = sequence_logprob(policy_w, order_w, cand_mask, h) - sequence_logprob(
            ref_w, order_w, cand_mask, h
        )
        reward_l = sequence_logprob(policy_l, order_l, cand_mask, h) - sequence_logprob(
            ref_l, order_l, cand_mask, h
        )
        margin = beta * (reward_w - reward_l)  # (B,)
        losses.append(-F.logsigmoid(margin))
        margins.append(margin)
    loss_bh, margin_bh = torch.stack(losses), torch.stack(margins)  # (heads, B)
    pair_bh = pair.expand_as(loss_bh)
    stats = {
        "reward_margin": _masked_mean(margin_bh, pair_bh).detach(),
        "reward_accuracy": _masked_mean((margin_bh > 0).to(margin_bh.dtype), pair_bh).detach(),
    }
    return _masked_mean(loss_bh, pair_bh), stats


def value_loss(
    scores: torch.Tensor,
    order: torch.Tensor,
    cand_mask: torch.Tensor,
    target: torch.Tensor,
    n_heads: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Prefix-conditioned value regression (the list-aware stage).

    Teacher-forced on the logged order (B, K): at position t (the prefix order[:, :t]
    consumed), head j's raw score of the item logged at slot t + j is a logit of that
    item's feedback value target (B, K) in [0, 1] (U scaled), fitted by binary cross
    entropy. The slot is an input (the decoder's step embedding), so the position bias of
    the logged feedback is absorbed, and greedy decoding ranks the available candidates
    by their value given what is already above them. Returns (loss summed over heads,
    detached per-head parts)."""
    n = scores.shape[2] if n_heads is None else n_heads
    idx = head_targets(order, n)  # (B, K, n)
    tgt = head_targets(target, n)  # (B, K, n), -1 past the end
    valid = idx >= 0
    avail = cand_mask.gather(1, idx.clamp(min=0).flatten(1)).view_as(idx)
    valid = valid & avail
    logit = scores[:, :, :n].gather(-1, idx.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, K, n)
    bce = F.binary_cross_entropy_with_logits(logit, tgt.clamp(0.0, 1.0), reduction="none")
    parts = {}
    total = scores.new_zeros(())
    for j in range(n):
        head = _masked_mean(bce[:, :, j], valid[:, :, j])
        parts[f"bce{j}"] = head.detach()
        total = total + head
    return total, parts
