"""The decode loops: greedy (OMTP, n items per pass) and beam search, written over one
`next_scores(tokens) -> head scores` step and one deadline rule (gpt-fast's
decode_n_tokens, in numpy over the batch).

Both reproduce the torch reference (model.decode.greedy_decode / beam_decode, checked by
`python -m export verify`), including its deadline step. The rule (`Deadlines`): before a
pass, a row whose own deadline a pass as long as the last one would overrun leaves the
loop, its list completed from head 0's last scores in one sort (`complete`), and the
result says completed_early; its batch-mates go on, so a tight budget never cuts them.

Requests with different k share a greedy batch: greedy lists are prefix-stable, so each
request keeps its first min(k, m) items. Beam search runs per group of equal k (a beam's
best list of length k is not a prefix of the best of length k + 1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np


class Passes(Protocol):
    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (B, T) int64 -> head scores at the last position (B, n, M)."""
        ...


class ReorderablePasses(Passes, Protocol):
    def reorder(self, src: np.ndarray) -> None:
        """Row b of the next pass continues row src[b] of this one."""
        ...


@dataclass
class Decoded:
    order: np.ndarray  # (B, K) int64, -1 where nothing was left
    scores: np.ndarray  # (B, K) float32, -inf at -1 slots
    passes: int  # passes run
    early_at: np.ndarray  # (B,) list length when the row's deadline step ran; -1 = never
    row_passes: np.ndarray  # (B,) passes each row took part in


class Deadlines:
    """The one deadline rule of both loops. deadlines (B,) time.perf_counter() values (inf
    = none) or None; pass_s: the expected time of the next pass (first: the encoder call
    that ran the BOS pass, an overestimate; then the last pass's)."""

    def __init__(self, deadlines: np.ndarray | None, pass_s: float) -> None:
        self.deadlines = deadlines
        self.pass_s = pass_s
        # the earliest deadline of a row still decoding: one float compare per pass
        self._earliest = math.inf if deadlines is None else float(deadlines.min())

    def due(self, going: np.ndarray) -> np.ndarray | None:
        """The rows of `going` (B,) bool whose deadline the next pass would overrun."""
        if self.deadlines is None:
            return None
        now = time.perf_counter()
        if now + self.pass_s <= self._earliest:
            return None
        late = going & (now + self.pass_s > self.deadlines)
        rest = going & ~late
        self._earliest = float(self.deadlines[rest].min()) if rest.any() else math.inf
        return np.flatnonzero(late) if late.any() else None

    def near(self) -> bool:
        """Could the next pass overrun a deadline? (One clock read: due() only then.)"""
        return time.perf_counter() + self.pass_s > self._earliest

    def timed(self, since: float) -> None:
        """A pass that started at `since` just ended: the next one is expected as long."""
        self.pass_s = time.perf_counter() - since


def complete(
    head0: np.ndarray, blocked: np.ndarray, order: np.ndarray, scores: np.ndarray, at: int
) -> None:
    """The deadline step: slots at.. get the best still-available candidates by head 0,
    in one stable sort (greedy_decode's _complete). Fills order/scores in place."""
    s = head0 + blocked  # (B, M)
    top = np.argsort(-s, axis=1, kind="stable")[:, : order.shape[1] - at]
    order[:, at:] = top  # -inf slots (nothing left) become -1 in the caller
    scores[:, at:] = np.take_along_axis(s, top, axis=1)


_SCALAR_WRITES = 16  # picks per pass up to which Python item writes beat fancy indexing


def _take(
    head: np.ndarray,
    blocked: np.ndarray,
    order: np.ndarray,
    scores: np.ndarray,
    at: int,
    c: int,
    rows: np.ndarray,
) -> np.ndarray:
    """Slots at..at+c from heads 0..c-1: head j takes the best candidate not yet chosen
    (ties: the lowest index, as torch's argmax). blocked (B, M): 0 = available, -inf =
    chosen or padding; updated in place. rows: arange(B)[:, None]. Returns the picks
    (B, c) int64, the next pass's tokens.

    A few numpy calls per pass, not per head: every head's favourite at once; where no
    two heads of a row share one, no head's pick was taken by an earlier head, so these
    are the picks in turn. Rows whose heads do share one (or that ran out) take turns in
    Python over each head's c best (_in_turn: c <= n list steps). A small batch's picks
    are written item by item (a numpy item write costs a fraction of a fancy index)."""
    s = head[:, :c] + blocked[:, None, :]  # (B, c, M)
    favourites = s.argmax(axis=2).tolist()  # (B, c)
    for b, row in enumerate(favourites):
        if len(set(row)) < c:  # a shared favourite (or a row that ran out)
            favourites[b] = _in_turn(s[b])
    if len(favourites) * c > _SCALAR_WRITES:
        picks = np.array(favourites, np.int64)
        order[:, at : at + c] = picks
        scores[:, at : at + c] = s[rows, np.arange(c), picks]
        blocked[rows, picks] = -np.inf
        return picks
    for b, row in enumerate(favourites):
        for j, i in enumerate(row):
            order[b, at + j] = i
            scores[b, at + j] = s[b, j, i]
            blocked[b, i] = -np.inf
    return np.array(favourites, np.int64)


def _in_turn(s: np.ndarray) -> list[int]:
    """One row's picks when its heads share a favourite: head j takes its best candidate
    not taken by heads 0..j-1 (a stable sort: ties to the lowest index, as argmax). A head
    with nothing left takes a blocked candidate, at -inf (the slot becomes -1). s (c, M)."""
    c = s.shape[0]
    ranked = np.argsort(-s, axis=1, kind="stable")[:, :c].tolist()  # (c, c)
    taken: list[int] = []
    for best in ranked:
        taken.append(next(i for i in best if i not in taken))
    return taken


class _Lists:
    """A greedy batch's lists as they grow: order/scores (B, K), blocked (B, M) (0 =
    available, -inf = chosen or padding), and the rows that left at their deadline."""

    def __init__(self, cand_mask: np.ndarray, K: int) -> None:
        B = cand_mask.shape[0]
        self.blocked = np.where(cand_mask, np.float32(0), np.float32(-np.inf))
        self.order = np.empty((B, K), np.int64)
        self.scores = np.empty((B, K), np.float32)
        self.rows = np.arange(B)[:, None]  # (B, 1)
        # the deadline step's bookkeeping, made when a deadline is first near
        self.live: np.ndarray | None = None  # (B,) rows still decoding
        self.early_at: np.ndarray | None = None  # (B,) list length at the deadline step
        self.early_passes: np.ndarray | None = None  # (B,) passes a row that left ran
        self.finished: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def deadline_step(
        self, clock: Deadlines, head: np.ndarray, k: np.ndarray, chosen: int, run: int
    ) -> bool:
        """The deadline rule before a pass: the rows it would make late leave, their tails
        from head 0's last scores. True when no row is left to decode."""
        if not clock.near():
            return False
        if self.live is None:
            B = len(k)
            self.live = np.ones(B, bool)
            self.early_at, self.early_passes = np.full(B, -1, np.int64), np.zeros(B, np.int64)
        late = clock.due(self.live & (k > chosen))
        if late is None:
            return False
        o, sc = self.order[late], self.scores[late]  # copies
        complete(head[late, 0], self.blocked[late], o, sc, chosen)
        self.finished.append((late, o, sc))
        self.live[late] = False
        self.early_at[late], self.early_passes[late] = chosen, run  # type: ignore[index]
        return not (self.live & (k > chosen)).any()

    def result(self, chosen: int, run: int, k: np.ndarray, items_per_pass: int) -> Decoded:
        order, scores = self.order, self.scores
        full: np.ndarray = np.minimum(run, -(-k // items_per_pass))  # ceil(k / p) passes
        if self.early_at is None:  # no deadline step: every list ran to K
            order[scores == -np.inf] = -1  # a request with fewer than K candidates ran out
            return Decoded(order, scores, run, np.full(len(k), -1, np.int64), full)
        early_at = self.early_at
        for rows, o, sc in self.finished:  # the rows that left keep their completed lists
            order[rows], scores[rows] = o, sc
        order[:, chosen:][early_at < 0] = -1  # rows that never needed these slots
        scores[:, chosen:][early_at < 0] = -np.inf
        order[scores == -np.inf] = -1
        row_passes = np.where(early_at >= 0, cast(np.ndarray, self.early_passes), full)
        return Decoded(order, scores, run, early_at, row_passes)


def greedy(
    passes: Passes,
    first: np.ndarray | None,
    cand_mask: np.ndarray,
    k: np.ndarray,
    items_per_pass: int,
    clock: Deadlines,
) -> Decoded:
    """OMTP greedy decoding of a batch. first: the BOS pass's head scores (B, n, M) when
    the encoder ran it (None: the loop runs it); cand_mask (B, M); k (B,) list lengths."""
    K = int(k.max())
    lists = _Lists(cand_mask, K)
    tokens, head, folded = np.full((len(k), 1), -1, np.int64), None, first
    chosen = run = 0
    while chosen < K:
        if head is not None and lists.deadline_step(clock, head, k, chosen, run):
            break
        t0 = time.perf_counter()
        timed = folded is None  # the folded BOS pass keeps the encoder's time as estimate
        head = passes.step(tokens) if folded is None else folded  # (B, n, M)
        folded = None
        run += 1
        c = min(items_per_pass, K - chosen)
        # the picks are the next pass's tokens (B, c): raw argmax, as torch
        tokens = _take(head, lists.blocked, lists.order, lists.scores, chosen, c, lists.rows)
        chosen += c
        if timed:
            clock.timed(t0)
    return lists.result(chosen, run, k, items_per_pass)


Widen = Callable[[np.ndarray, int], tuple[ReorderablePasses, np.ndarray | None]]


def beam(
    widen: Widen,
    cand_mask: np.ndarray,
    k: np.ndarray,
    width: int,
    deadlines: np.ndarray | None,
    first_pass_s: float,
) -> Decoded:
    """Beam search (one item per pass, head 0, as model.decode.beam_decode), per group of
    equal k. widen(rows, W): host passes over those rows repeated W times (row b*W + w is
    beam w of request b) and the BOS pass's head scores for them, or None."""
    B = cand_mask.shape[0]
    K = int(k.max())
    order = np.full((B, K), -1, np.int64)
    scores = np.full((B, K), -np.inf, np.float32)
    early_at = np.full(B, -1, np.int64)
    row_passes = np.zeros(B, np.int64)
    run = 0
    for kk in np.unique(k):
        rows = np.flatnonzero(k == kk)
        passes, first = widen(rows, width)
        clock = Deadlines(None if deadlines is None else deadlines[rows], first_pass_s)
        mask = np.repeat(cand_mask[rows], width, axis=0)
        dec = _beam_group(passes, first, mask, int(kk), width, clock)
        order[rows, :kk], scores[rows, :kk] = dec.order, dec.scores
        run = max(run, dec.passes)
        early_at[rows], row_passes[rows] = dec.early_at, dec.row_passes
    return Decoded(order, scores, run, early_at, row_passes)


@dataclass
class _Beams:
    """B requests x W beams as B*W rows: each row's list so far and its summed log-prob."""

    total: np.ndarray  # (B*W,) summed masked log-probs of head 0
    blocked: np.ndarray  # (B*W, M) 0 = available, -inf = chosen or padding
    hist: np.ndarray  # (B*W, K) items so far, -1 after an exhausted beam
    hist_scores: np.ndarray  # (B*W, K) head 0's raw score of each item
    W: int

    @staticmethod
    def start(cand_mask: np.ndarray, K: int, W: int) -> _Beams:
        """B requests' beams before the first pass: only beam 0 of each is live."""
        BW = cand_mask.shape[0]
        total = np.full((BW // W, W), -np.inf, np.float32)
        total[:, 0] = 0.0
        return _Beams(
            total=total.reshape(BW),
            blocked=np.where(cand_mask, np.float32(0), np.float32(-np.inf)),
            hist=np.full((BW, K), -1, np.int64),
            hist_scores=np.full((BW, K), -np.inf, np.float32),
            W=W,
        )

    def best(self, rows: np.ndarray) -> np.ndarray:
        """The B*W row of each request's best beam."""
        return rows * self.W + self.total.reshape(-1, self.W)[rows].argmax(axis=1)

    def completed(
        self, rows: np.ndarray, head0: np.ndarray, step: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The deadline step: each request's best beam, its tail from head 0's scores."""
        best = self.best(rows)
        order, scores = self.hist[best], self.hist_scores[best]  # copies
        complete(head0[best], self.blocked[best], order, scores, step)
        order[scores == -np.inf] = -1
        return order, scores

    def extend(self, head0: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Every beam extended by every candidate, the W best kept per request; returns
        src, the row each surviving beam continues (the KV cache follows it), and the
        item it took (the next pass's token)."""
        W = self.W
        BW, M = self.blocked.shape
        exhausted: np.ndarray = np.all(self.blocked == -np.inf, axis=1)  # (B*W,)
        logp = _masked_log_softmax(head0, self.blocked)
        logp[exhausted] = -np.inf
        logp[exhausted, 0] = 0.0  # an exhausted beam extends by "nothing" at no cost
        cand = (self.total[:, None] + logp).reshape(BW // W, W * M)
        top = np.argsort(-cand, axis=1, kind="stable")[:, :W]  # (B, W) best first
        self.total = np.take_along_axis(cand, top, axis=1).reshape(BW)
        src = ((np.arange(BW // W) * W)[:, None] + top // M).reshape(BW)
        item = (top % M).reshape(BW)
        dead, head0 = exhausted[src], head0[src]
        self.blocked, self.hist, self.hist_scores = (
            self.blocked[src], self.hist[src], self.hist_scores[src])  # fmt: skip
        self.hist[:, step] = np.where(dead, -1, item)
        self.hist_scores[:, step] = np.where(dead, -np.inf, head0[np.arange(BW), item])
        self.blocked[np.arange(BW), item] = -np.inf
        return src, item


def _beam_group(
    passes: ReorderablePasses,
    first: np.ndarray | None,
    cand_mask: np.ndarray,
    K: int,
    W: int,
    clock: Deadlines,
) -> Decoded:
    """Beam search of one group of equal k: B x W rows decode as one batch (cand_mask
    (B*W, M)); beams ranked by summed masked log-probs of head 0. A request frozen at its
    deadline rides along until all stop; its batch-mates keep their beams."""
    BW = cand_mask.shape[0]
    B = BW // W
    beams = _Beams.start(cand_mask, K, W)
    out_order = np.full((B, K), -1, np.int64)
    out_scores = np.full((B, K), -np.inf, np.float32)
    early_at = np.full(B, -1, np.int64)
    live = np.ones(B, bool)
    tokens, head0, steps = np.full((BW, 1), -1, np.int64), None, K
    for step in range(K):
        late = None if head0 is None else clock.due(live)
        if late is not None:
            out_order[late], out_scores[late] = beams.completed(late, head0, step)
            early_at[late], live[late] = step, False
            if not live.any():
                steps = step
                break
        t0 = time.perf_counter()
        head = first if step == 0 and first is not None else passes.step(tokens)
        src, item = beams.extend(head[:, 0], step)
        passes.reorder(src)
        head0 = head[src, 0]  # (B*W, M)
        tokens = item[:, None]
        if step or first is None:
            clock.timed(t0)
    if live.any():  # the rows that ran to the end: their best beam
        rows = np.flatnonzero(live)
        best = beams.best(rows)
        out_order[rows], out_scores[rows] = beams.hist[best], beams.hist_scores[best]
    row_passes = np.where(early_at >= 0, early_at, K)
    return Decoded(out_order, out_scores, steps, early_at, row_passes)


def valid_lists(order: np.ndarray, scores: np.ndarray, m: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(B,) bool: row b's first k[b] slots are distinct candidates of its m[b], each with
    a finite score. A NaN or infinite score (an item or user feature so large that the
    network overflows) breaks the argmax: the same candidate, or a padding slot, would be
    chosen again and again. One vectorized check per batch."""
    K = order.shape[1]
    used = np.arange(K)[None, :] < k[:, None]  # (B, K) the slots each list has
    fine = (order >= 0) & (order < m[:, None]) & np.isfinite(scores)
    ok = ~(used & ~fine).any(axis=1)
    # distinct: unused slots get distinct negative fillers, then sorted neighbours differ
    filled = np.sort(np.where(used, order, -1 - np.arange(K)[None, :]), axis=1)
    return ok & ~(filled[:, 1:] == filled[:, :-1]).any(axis=1)


def _masked_log_softmax(scores: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    """log softmax over available candidates (blocked == 0), -inf elsewhere; a row with
    nothing available stays finite before the fill (as model.losses.masked_log_softmax)."""
    filled = np.where(blocked == 0, scores, np.finfo(scores.dtype).min)
    shifted = filled - filled.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return np.where(blocked == 0, logp, -np.inf).astype(np.float32)
