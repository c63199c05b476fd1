"""Load shapes as pure functions of the run time: (users, spawn rate) now, or None to stop.
The locustfile wraps the one LOADTEST_SHAPE names in a locust LoadTestShape; they read
locust's -u (peak users), -r (spawn rate) and -t (duration).

    steady  the peak for the whole run (after the ramp at the spawn rate)
    step    STEPS equal plateaus rising to the peak: where throughput stops growing with
            users and latency climbs is the knee
    spike   a quarter of the peak, the peak at once for the middle fifth of the run, then
            back: how queueing, shedding (overload) and recovery look
"""

from __future__ import annotations

import math
from collections.abc import Callable

Plan = Callable[[float, int, float, float], "tuple[int, float] | None"]
STEPS = 5


def steady(t: float, users: int, spawn_rate: float, duration: float) -> tuple[int, float] | None:
    return (users, spawn_rate) if t < duration else None


def step(t: float, users: int, spawn_rate: float, duration: float) -> tuple[int, float] | None:
    if t >= duration:
        return None
    plateau = min(STEPS - 1, int(t * STEPS / duration))
    # each plateau is reached at once, so most of it is measured at its user count
    return max(1, math.ceil(users * (plateau + 1) / STEPS)), max(spawn_rate, float(users))


def spike(t: float, users: int, spawn_rate: float, duration: float) -> tuple[int, float] | None:
    if t >= duration:
        return None
    base = max(1, users // 4)
    if 0.4 * duration <= t < 0.6 * duration:
        return users, max(spawn_rate, 10.0 * users)  # all at once: a spike, not a ramp
    return base, max(spawn_rate, 10.0 * users)  # and shed at once after it


SHAPES: dict[str, Plan] = {"steady": steady, "step": step, "spike": spike}
# the duration when none is given (locust's web UI without -t): steady runs until stopped
OPEN_ENDED_S = {"steady": math.inf, "step": 300.0, "spike": 300.0}
