"""The simulated world (model/world.py): its config, determinism, persistence and tables."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from contract.features import FeatureSchema
from model.user_model import true_utility
from model.world import World, WorldConfig
from tests.support.simulated import SMALL, array_fields


def test_config_round_trip_and_validation() -> None:
    cfg = replace(SMALL, satiation=0.3)
    assert WorldConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="k"):
        WorldConfig(m=5, k=10)
    with pytest.raises(ValueError, match="unknown"):
        WorldConfig.from_dict({**cfg.to_dict(), "nonsense": 1})


def test_generate_is_deterministic_for_a_seed(world: World) -> None:
    same = World.generate(SMALL, seed=7)
    other = World.generate(SMALL, seed=8)
    for name, a in array_fields(world).items():
        np.testing.assert_array_equal(a, getattr(same, name), err_msg=name)
    assert any(
        not np.array_equal(a, getattr(other, name)) for name, a in array_fields(world).items()
    )
    assert not np.array_equal(world.item_latent, other.item_latent)


def test_save_load_round_trip(world: World, tmp_path) -> None:
    path = tmp_path / "world.bin"  # any name: save must not append a suffix
    world.save(path)
    loaded = World.load(path)
    assert loaded.cfg == world.cfg
    assert loaded.seed == world.seed
    for name, a in array_fields(world).items():
        b = getattr(loaded, name)
        assert b.dtype == a.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    users, items = np.arange(5), np.arange(50).reshape(5, 10)
    np.testing.assert_array_equal(
        true_utility(world, users, items), true_utility(loaded, users, items)
    )


def test_world_tables(world: World) -> None:
    cfg, schema = world.cfg, FeatureSchema()
    N, U, C = cfg.n_items, cfg.n_users, cfg.n_categories
    assert world.item_cat.shape == (N, len(schema.item_categorical))
    assert world.item_dense.shape == (N, len(schema.item_dense))
    assert world.user_features.shape == (U, len(schema.user_dense))
    np.testing.assert_allclose(world.item_popularity.sum(), 1.0)
    np.testing.assert_allclose(world.user_activity.sum(), 1.0)
    comp = world.complement_matrix
    np.testing.assert_array_equal(comp, comp.T)
    assert np.all(np.diag(comp) == 0) and 0 < (comp > 0).sum() < C * C / 2
    assert np.all((world.user_diversity > 0) & (world.user_diversity < 1))
    assert np.all((world.user_patience > 0) & (world.user_patience < 1))
    # a creator's items sit mostly in its home category: the creator feature carries signal
    home = world.creator_category[world.item_creator] == world.item_category
    assert home.mean() > 0.7
    # observed preferences are noisy copies of the latent ones
    d = cfg.latent_dim
    corr = np.corrcoef(world.user_features[:, :d].ravel(), world.user_pref.ravel())[0, 1]
    assert 0.7 < corr < 0.99
