"""Fixtures of the service's end-to-end tests: the tiny exported bundle of
tests/unit/test_export.py (a session fixture, shared with the engine tests)."""

from __future__ import annotations

from tests.unit.test_export import tiny_bundle  # noqa: F401 - the fixture
