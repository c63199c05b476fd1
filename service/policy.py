"""Decode policies: fixed (the default) and load-adaptive (design §8, the "dynamic beam
serving" idea).

`fixed` always decodes at one level: greedy, the settings' items per pass (default every
head, one greedy.onnx call). It is the default because, for the default recipe on the
development worlds, the slower levels buy no true utility while they cost several times
the engine time, which a tight request arriving meanwhile waits for (an engine call cannot
be interrupted); the figures and their command are in docs/operations.md ("Decode
policy") and tests/bench/bench_ladder_quality.py measures them again.

`adaptive` (RERANK_DECODE_POLICY=adaptive) is for a model whose slower levels do measure
better. It picks, before every engine call, how the batch is decoded: a ladder of levels
from the slowest to the fastest, e.g. with RERANK_BEAM=3

    beam 3 (one item per pass)  ->  greedy n = 1  ->  n = 2 per pass  ->  n = 4 per pass

It reads the recent load — an exponentially weighted average of what a request spent
waiting for the engine plus the engine call itself, and the queue depth — and steps one
level faster when that nears the budget, one level slower only after the
load has stayed low for a while (hysteresis, so it does not flap). A shed request (queue
full, or its budget spent waiting) is pressure too. Past the fastest level
the batcher sheds to the upstream order (reason `overload`) before the queue grows
without bound; that part lives in service/rerank.py.

Each call also fits the tightest budget it carries: the policy keeps the recent cost of
one engine call at each level (per size of the largest candidate list in the call), and a
call whose tightest request could not finish at the load's level takes the first faster
level that fits, for that call only. A request with a 10 ms budget then gets a full list
from a faster level, not a slow level's list completed early at its deadline.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeLevel:
    items_per_pass: int  # 1..n heads
    beam: int = 1  # > 1: beam search, one item per pass

    @property
    def name(self) -> str:
        return f"beam{self.beam}" if self.beam > 1 else f"n{self.items_per_pass}"


def ladder(heads: int, max_beam: int) -> tuple[DecodeLevel, ...]:
    """Slowest first: beam (if > 1), then greedy 1, 2, 4 .. heads items per pass."""
    levels = [DecodeLevel(1, max_beam)] if max_beam > 1 else []
    p = 1
    while p < heads:
        levels.append(DecodeLevel(p))
        p *= 2
    levels.append(DecodeLevel(heads))
    return tuple(levels)


@dataclass(frozen=True)
class PolicyConfig:
    budget_s: float  # the default request budget
    high: float = 0.5  # step faster when the smoothed latency passes high * budget
    low: float = 0.2  # step slower when it stays under low * budget ...
    calm_batches: int = 50  # ... for this many engine calls in a row
    alpha: float = 0.2  # EWMA weight of the newest engine call
    queue_limit: int = 64  # step faster at once when this many requests are waiting
    fit: float = 0.8  # a level fits a call when its recent cost is <= fit * the budget left


class DecodePolicy:
    """Chooses a DecodeLevel per engine call from the recent load. Thread-safe: `choose`
    and `observe` run in the engine thread, `level` is read by the metrics endpoint."""

    def __init__(self, levels: tuple[DecodeLevel, ...], config: PolicyConfig, start: int = 0):
        if not levels:
            raise ValueError("a decode policy needs at least one level")
        self.levels, self.config = levels, config
        self._index = min(max(start, 0), len(levels) - 1)
        self._ewma = 0.0
        self._calm = 0
        # (level, size class of the call's longest list) -> EWMA seconds of one engine call
        self._cost: dict[tuple[DecodeLevel, int], float] = {}
        self._lock = threading.Lock()

    @property
    def level(self) -> DecodeLevel:
        return self.levels[self._index]

    @property
    def index(self) -> int:
        return self._index

    @property
    def smoothed_s(self) -> float:
        return self._ewma

    def choose(self, waiting: int, budget_left_s: float = math.inf, m: int = 0) -> DecodeLevel:
        """The level for the next engine call; `waiting` = requests queued behind it,
        `budget_left_s` the tightest budget left among its requests, `m` its longest
        candidate list. The load's level, or the first faster one whose recent cost at
        this size fits the budget (a level not yet seen at this size is taken to fit)."""
        with self._lock:
            if waiting >= self.config.queue_limit and self._index < len(self.levels) - 1:
                self._index += 1
                self._calm = 0
            i, size, room = self._index, _size_class(m), self.config.fit * budget_left_s
            while i < len(self.levels) - 1 and self._cost.get((self.levels[i], size), 0.0) > room:
                i += 1
            return self.levels[i]

    def cost(self, level: DecodeLevel, m: int) -> float | None:
        """The recent cost of one engine call at `level` with lists of up to m candidates."""
        return self._cost.get((level, _size_class(m)))

    def pressure(self) -> None:
        """A request was shed (overload, or its budget ran out while it queued): the
        engine is not keeping up, whatever the requests it did run saw. Step faster and
        start the calm count over, so shedding never lets the policy drift back to the
        costly levels (the requests that reach the engine then look fast)."""
        with self._lock:
            if self._index < len(self.levels) - 1:
                self._index += 1
            self._calm = 0
            self._ewma = max(self._ewma, self.config.high * self.config.budget_s)

    def late(self, waited_s: float) -> None:
        """A request's budget ran out after it waited `waited_s` in the service (Redis,
        queue): pressure, unless that wait was short against the default budget: then the
        client's own budget was tiny, and one client's tiny budgets must not take the
        slower levels from everyone else's requests."""
        if waited_s >= self.config.low * self.config.budget_s:
            self.pressure()

    def observe(
        self, queue_s: float, engine_s: float, level: DecodeLevel | None = None, m: int = 0
    ) -> None:
        """After an engine call: the longest queue wait of its requests and its duration;
        `level` and `m` (its longest list), when given, update that level's cost."""
        c = self.config
        with self._lock:
            if level is not None:
                key = (level, _size_class(m))
                old = self._cost.get(key)
                self._cost[key] = (
                    engine_s if old is None else (1 - c.alpha) * old + c.alpha * engine_s
                )
            self._ewma = (1 - c.alpha) * self._ewma + c.alpha * (queue_s + engine_s)
            if self._ewma > c.high * c.budget_s:
                if self._index < len(self.levels) - 1:
                    self._index += 1
                    # start the average over at the new level's cost, not the old one's
                    self._ewma = c.low * c.budget_s + (c.high - c.low) * c.budget_s / 2
                self._calm = 0
            elif self._ewma < c.low * c.budget_s:
                self._calm += 1
                if self._calm >= c.calm_batches and self._index > 0:
                    self._index -= 1
                    self._calm = 0
            else:
                self._calm = 0


def _size_class(m: int) -> int:
    """Lists of similar length cost alike: 1..32, 33..64, 65..128, ... one class each."""
    return max(m - 1, 31).bit_length()


def fixed(level: DecodeLevel, budget_s: float) -> DecodePolicy:
    """A policy that never moves (policy off)."""
    return DecodePolicy((level,), PolicyConfig(budget_s=budget_s))
