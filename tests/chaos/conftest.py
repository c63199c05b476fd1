"""The fault suite's fixtures: the tiny exported bundle (the short suite runs on it)."""

from __future__ import annotations

from tests.unit.test_export import tiny_bundle  # noqa: F401 - the fixture
