"""contract/limits.py: the one check that serving limits fit a model, as the settings (at
start) and a bundle reload (before the swap) both use it."""

from __future__ import annotations

import pytest

from contract.limits import limits_misfit
from tests.support.tiny import tiny_config

CFG = tiny_config()  # max_candidates 32, max_steps 16, 3 heads


@pytest.mark.parametrize(
    ("max_candidates", "max_k", "items_per_pass"),
    [(None, 16, None), (32, 16, 3), (1, 1, 1)],
)
def test_limits_within_the_model_fit(
    max_candidates: int | None, max_k: int, items_per_pass: int | None
) -> None:
    assert limits_misfit(CFG, max_candidates, max_k, items_per_pass) is None


@pytest.mark.parametrize(
    ("limits", "named"),
    [
        ((33, 10, None), "max_candidates=33 > the model's max_candidates 32"),
        ((None, 17, None), "max_k=17 > the model's max_steps 16"),
        ((None, 10, 4), "items_per_pass=4 > the model's 3 heads"),
    ],
)
def test_a_limit_beyond_the_model_is_named(
    limits: tuple[int | None, int, int | None], named: str
) -> None:
    assert limits_misfit(CFG, *limits) == named
