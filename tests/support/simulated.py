"""A small simulated world for the simulator's tests: fast to generate, big enough for
every effect they check."""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from model.world import WorldConfig

SMALL = WorldConfig(n_items=2_000, n_users=300, n_creators=200)


def array_fields(obj: object) -> dict[str, np.ndarray]:
    """The numpy fields of a dataclass (a World, a ListBatch), by name."""
    return {
        f.name: getattr(obj, f.name)
        for f in fields(obj)
        if isinstance(getattr(obj, f.name), np.ndarray)
    }
