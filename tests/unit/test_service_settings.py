"""service/settings.py: defaults, the artifacts-dir resolution, and refusals with the
variable named."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from model.network import GenReranker
from service.settings import Settings
from tests.support.bundle import BUNDLE_CFG as CFG


def test_defaults_and_environment(
    tiny_bundle: tuple[Path, GenReranker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tiny_bundle[0]
    monkeypatch.setenv("RERANK_BUNDLE", str(path))
    monkeypatch.setenv("RERANK_REDIS_TIMEOUT_MS", "5")
    monkeypatch.setenv("RERANK_REDIS_URL", "")
    s = Settings()
    assert s.bundle == path and s.redis_timeout_ms == 5 and s.redis_url is None
    assert s.candidate_limit == CFG.max_candidates
    assert Settings(bundle=path, max_candidates=30).candidate_limit == 30


def test_an_artifacts_dir_resolves_to_its_latest(tiny_bundle: tuple[Path, GenReranker]) -> None:
    path = tiny_bundle[0]
    assert Settings(bundle=path.parent).bundle_dir == path


def test_the_admin_port_is_on_by_default_and_0_turns_it_off(
    tiny_bundle: tuple[Path, GenReranker],
) -> None:
    assert Settings(bundle=tiny_bundle[0]).admin_port == 9000
    assert Settings(bundle=tiny_bundle[0], admin_port=0).admin_port == 0


def test_every_field_is_documented() -> None:
    for name, info in Settings.model_fields.items():
        assert info.description, name


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"max_candidates": CFG.max_candidates + 1}, "max_candidates"),
        ({"max_k": CFG.max_steps + 1}, "max_k"),
        ({"items_per_pass": CFG.omtp_heads + 1}, "items_per_pass"),
        ({"max_candidates": 0}, "max_candidates"),
        ({"redis_url": "http://localhost:6379"}, "redis_url"),
        ({"redis_timeout_ms": 0}, "redis_timeout_ms"),
        ({"breaker_failures": 0}, "breaker_failures"),
        ({"default_budget_ms": -1}, "default_budget_ms"),
        ({"device": "tpu"}, "device"),
        ({"port": 70000}, "port"),
        ({"admin_port": 70000}, "admin_port"),
        ({"admin_port": -1}, "admin_port"),
        ({"admin_port": 8000}, "admin_port=8000 is also port"),
        ({"port": 9000}, "admin_port=9000 is also port"),
        ({"workers": 0}, "workers"),
        ({"log_level": "loud"}, "log_level"),
        ({"max_body_bytes": 10}, "max_body_bytes"),
        ({"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_nonsense_is_refused(
    tiny_bundle: tuple[Path, GenReranker],
    overrides: dict[str, object],
    words: str,
) -> None:
    with pytest.raises(ValidationError, match=words):
        Settings(bundle=tiny_bundle[0], **overrides)  # type: ignore[arg-type]


def test_a_bundle_path_that_is_neither_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="neither a bundle"):
        Settings(bundle=tmp_path)
    (tmp_path / "latest").write_text("v-missing\n")
    with pytest.raises(ValidationError, match="v-missing"):
        Settings(bundle=tmp_path)
