"""Reference decoding in torch: what the ONNX engine in service/ must reproduce.

Encode once per request (cross-attention keys/values included); each decoder pass feeds
the items chosen by the previous pass (BOS first) through the KV cache and reads the n
OMTP heads at the last position.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from model.losses import masked_log_softmax
from model.network import KV, Encoded, GenReranker
from model.tensors import Inputs


class DecodeResult(NamedTuple):
    order: torch.Tensor  # (B, k) int64 candidate indices, -1 past a request's candidates
    item_scores: torch.Tensor  # (B, k) float: the choosing head's raw score, -inf at -1 slots
    passes: int  # decoder passes run
    completed_early: bool  # max_passes hit: the tail was sorted by head 0 in one step


def _pick(
    scores: torch.Tensor, available: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Argmax over the available candidates, marked taken in place.
    scores, available (B, M) -> idx, score, ok (B, 1); ok False when nothing was left."""
    s = scores.masked_fill(~available, float("-inf"))
    idx = s.argmax(dim=-1, keepdim=True)  # ties: lowest index
    ok = available.gather(1, idx)
    available.scatter_(1, idx, False)
    return idx, s.gather(1, idx), ok


def _complete(
    head0: torch.Tensor, available: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The deadline step: the `count` best available candidates by head 0, in one sort.
    head0, available (B, M) -> idx, score, ok (B, count)."""
    s = head0.masked_fill(~available, float("-inf"))
    top = torch.sort(s, dim=-1, descending=True, stable=True)
    idx = top.indices[:, :count]
    return idx, top.values[:, :count], available.gather(1, idx)


@torch.no_grad()
def greedy_decode(
    model: GenReranker,
    inp: Inputs,
    k: int,
    items_per_pass: int | None = None,
    max_passes: int | None = None,
) -> DecodeResult:
    """OMTP greedy decoding: each pass emits `items_per_pass` items (head j picks the best
    candidate not yet chosen, including by heads < j), so k items take ceil(k / p) passes.
    After `max_passes` passes the rest of the list comes from head 0's last scores."""
    n = model.cfg.omtp_heads
    p = n if items_per_pass is None else items_per_pass
    if not 1 <= p <= n:
        raise ValueError(f"items_per_pass={p} must be in [1, {n}]")
    if max_passes is not None and max_passes < 1:
        raise ValueError(f"max_passes={max_passes} must be >= 1")
    enc = model.encode(model.embed_items(inp), inp)
    available = inp.cand_mask.clone()  # (B, M)
    k_eff = min(k, int(inp.cand_mask.sum(dim=1).max()))  # one sync, before the loop
    tokens = torch.full((inp.batch_size, 1), -1, dtype=torch.long, device=available.device)
    past: list[KV] | None = None
    picks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (B, c) idx, score, ok
    chosen, passes, completed_early = 0, 0, False
    while chosen < k_eff:
        out, past = model.decode(enc, tokens, past)
        passes += 1
        last = out[:, -1]  # (B, n, M)
        this_pass = [_pick(last[:, j], available) for j in range(min(p, k_eff - chosen))]
        picks += this_pass
        chosen += len(this_pass)
        if chosen < k_eff and passes == max_passes:  # deadline: finish from head 0 at once
            picks.append(_complete(last[:, 0], available, k_eff - chosen))
            completed_early = True
            break
        tokens = torch.cat([idx for idx, _, _ in this_pass], dim=1)  # (B, p): next pass input
    return _result(picks, inp.batch_size, k, passes, completed_early, available.device)


def _result(
    picks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    B: int,
    k: int,
    passes: int,
    completed_early: bool,
    device: torch.device,
) -> DecodeResult:
    """(B, c) chunks of idx, score, ok -> the (B, k) result, -1 / -inf where not ok."""
    order = torch.full((B, k), -1, dtype=torch.long, device=device)
    item_scores = torch.full((B, k), float("-inf"), device=device)
    if picks:
        idx, score, ok = (torch.cat(parts, dim=1) for parts in zip(*picks, strict=True))
        c = idx.shape[1]
        order[:, :c] = torch.where(ok, idx, -1)
        item_scores[:, :c] = torch.where(ok, score, float("-inf"))
    return DecodeResult(order, item_scores, passes, completed_early)


def _repeat(enc: Encoded, beam: int) -> Encoded:
    """Each request's encoding repeated `beam` times along the batch: (B, ...) -> (B*W, ...)."""

    def rep(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(beam, dim=0)

    return Encoded(
        z=rep(enc.z),
        bos=rep(enc.bos),
        cross_kv=tuple((rep(k), rep(v)) for k, v in enc.cross_kv),
        cand_mask=rep(enc.cand_mask),
    )


@torch.no_grad()
def beam_decode(model: GenReranker, inp: Inputs, k: int, beam: int = 4) -> DecodeResult:
    """Beam search, one item per pass (head 0); beams ranked by their summed masked
    log-probs; B x beam rows decode as one batch, the KV cache follows the survivors."""
    if beam < 1:
        raise ValueError(f"beam={beam} must be >= 1")
    B, M, W = inp.batch_size, inp.m, beam
    dev = inp.cand_mask.device
    enc = _repeat(model.encode(model.embed_items(inp), inp), W)
    available = enc.cand_mask.clone()  # (B*W, M)
    k_eff = min(k, int(inp.cand_mask.sum(dim=1).max()))
    # only beam 0 is live at the start, so the first step expands one BOS, not W copies
    total = torch.full((B, W), float("-inf"), device=dev)
    total[:, 0] = 0.0
    total = total.view(B * W)
    # an exhausted beam extends by "nothing" at no cost: log-prob 0 on column 0 only
    stay = torch.full((M,), float("-inf"), device=dev)
    stay[0] = 0.0
    rows = (torch.arange(B, device=dev) * W)[:, None]  # (B, 1): first row of each request
    hist = torch.full((B * W, k_eff), -1, dtype=torch.long, device=dev)
    hist_scores = torch.full((B * W, k_eff), float("-inf"), device=dev)
    tokens = torch.full((B * W, 1), -1, dtype=torch.long, device=dev)  # BOS
    past: list[KV] | None = None
    for step in range(k_eff):
        out, past = model.decode(enc, tokens, past)
        head0 = out[:, -1, 0]  # (B*W, M)
        exhausted = ~available.any(dim=1)  # (B*W,)
        logp = masked_log_softmax(head0, ~available)
        logp = torch.where(exhausted[:, None], stay, logp)
        cand = (total[:, None] + logp).view(B, W * M)
        total, top = cand.topk(W, dim=1)  # (B, W)
        src = (rows + top // M).view(B * W)  # surviving beam rows
        item = (top % M).view(B * W)
        total = total.view(B * W)
        past = [(pk[src], pv[src]) for pk, pv in past]
        available = available[src]
        dead = exhausted[src]
        hist, hist_scores = hist[src], hist_scores[src]
        hist[:, step] = torch.where(dead, -1, item)
        hist_scores[:, step] = torch.where(
            dead, float("-inf"), head0[src].gather(1, item[:, None])[:, 0]
        )
        available.scatter_(1, item[:, None], False)
        tokens = item[:, None]
    best = rows[:, 0] + total.view(B, W).argmax(dim=1)  # (B,)
    ok = hist[best] >= 0
    return _result([(hist[best], hist_scores[best], ok)], B, k, k_eff, False, dev)


def rank_scores(order: torch.Tensor, m: int) -> torch.Tensor:
    """A per-candidate score from a generated order, for AUC on logged data:
    k - rank for the chosen items (k for the first), 0 for the rest. (B, k) -> (B, M)."""
    B, k = order.shape
    col = torch.where(order >= 0, order, m)  # -1 slots write to a spare column
    value = torch.arange(k, 0, -1, device=order.device, dtype=torch.float32).expand(B, k)
    out = torch.zeros(B, m + 1, device=order.device).scatter_(1, col, value)
    return out[:, :m]
