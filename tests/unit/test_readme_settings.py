"""README.md's settings table against `service.settings.Settings`.

settings.py says the README's table is generated from the Settings fields; nothing did
that or checked it. Here: one row per field (the environment name RERANK_<FIELD>, none
missing, none extra, none twice) and each row's default equal to the field's. Defaults are
rendered as `str(default)`, with None as an empty cell (``), so every field is compared,
not only the plain numbers, strings and booleans: Path("artifacts") -> artifacts,
64 << 20 -> 67108864, False -> False, None -> (empty). No server, no bundle.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from service.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = re.compile(r"^#+ Settings\b")
CELL_SPLIT = re.compile(r"(?<!\\)\|")  # `\|` inside a cell is not a column boundary


def _unquote(cell: str) -> str:
    """`x` -> x; `` (an empty code span) -> the empty string."""
    cell = cell.strip()
    if len(cell) >= 2 and cell[0] == "`" and cell[-1] == "`":
        return cell[1:-1]
    return cell


def readme_settings_rows() -> list[tuple[str, str]]:
    """(variable, default) of each row of the table under the README's `Settings` heading."""
    lines = README.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if HEADING.match(line)]
    assert len(starts) == 1, f"{README.name}: want one `Settings` heading, found {len(starts)}"
    rows: list[tuple[str, str]] = []
    for line in lines[starts[0] + 1 :]:
        if line.startswith("#"):  # the next section
            break
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in CELL_SPLIT.split(line.strip().strip("|"))]
        name = _unquote(cells[0])
        if not name.startswith("RERANK_"):  # the header and the |---| rule
            continue
        assert len(cells) == 3, f"README settings row {name}: want 3 columns, got {cells}"
        rows.append((name, _unquote(cells[1])))
    assert rows, f"{README.name}: no RERANK_ rows under the Settings heading"
    return rows


def env_name(field: str) -> str:
    prefix = Settings.model_config.get("env_prefix", "")
    return f"{prefix}{field}".upper()


def rendered_default(value: Any) -> str:
    return "" if value is None else str(value)


def test_env_names_are_prefix_and_field_name() -> None:
    """The table is keyed by RERANK_<FIELD>: true only while no field has an alias."""
    assert Settings.model_config.get("env_prefix") == "RERANK_"
    aliased = {
        name: (f.alias, f.validation_alias)
        for name, f in Settings.model_fields.items()
        if f.alias is not None or f.validation_alias is not None
    }
    assert not aliased, f"fields with an alias (env name is not RERANK_<FIELD>): {aliased}"


def test_readme_has_one_row_per_setting() -> None:
    names = [name for name, _ in readme_settings_rows()]
    twice = sorted({n for n in names if names.count(n) > 1})
    assert not twice, f"README settings rows given twice: {twice}"
    expected = {env_name(f) for f in Settings.model_fields}
    missing = sorted(expected - set(names))
    extra = sorted(set(names) - expected)
    assert not missing, f"Settings fields without a README row: {missing}"
    assert not extra, f"README rows for no Settings field: {extra}"


def test_readme_defaults_match_the_fields() -> None:
    readme = dict(readme_settings_rows())
    wrong = {}
    for field, info in Settings.model_fields.items():
        name = env_name(field)
        if name not in readme:
            continue  # reported by test_readme_has_one_row_per_setting
        want = rendered_default(info.get_default(call_default_factory=True))
        if readme[name] != want:
            wrong[name] = f"README {readme[name]!r}, Settings {want!r}"
    assert not wrong, f"README defaults differ from Settings: {wrong}"
