"""How large code may grow before it says why, read from the source (ast).

- A function on the serving path (service/ and the contract/ it loads) longer than
  MAX_FUNCTION_LINES lines of code (its docstring not counted) says why in its docstring,
  with the words "Long because": a hot-path function may stay whole where splitting it
  would cost calls per request, but the reader is told so.
- A module outside the tests longer than MAX_MODULE_LINES lines states in its docstring
  that it is "one idea" (and which); a module of two ideas is two modules.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVING = ("service", "contract")
PACKAGES = ("contract", "model", "export", "service", "loadtest")
MAX_FUNCTION_LINES = 45
MAX_MODULE_LINES = 500
FUNCTION_REASON = "long because"
MODULE_REASON = "one idea"
# Long functions not split yet (path, name): a new one fails the rule; one split is removed
KNOWN_LONG: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Function:
    name: str
    line: int
    lines: int  # of code: from `def` to its last line, less the docstring's lines
    docstring: str


def functions_in(text: str) -> list[Function]:
    """Every function and method of `text` (nested ones too), with its length in lines."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        assert node.end_lineno is not None
        lines = node.end_lineno - node.lineno + 1
        first = node.body[0]
        docstring = ast.get_docstring(node, clean=False)
        if docstring is not None and first.end_lineno is not None:
            lines -= first.end_lineno - first.lineno + 1
        found.append(Function(node.name, node.lineno, lines, ast.get_docstring(node) or ""))
    return found


def too_long(text: str) -> list[Function]:
    """The functions of `text` over MAX_FUNCTION_LINES whose docstring gives no reason."""
    return [
        f
        for f in functions_in(text)
        if f.lines > MAX_FUNCTION_LINES and FUNCTION_REASON not in f.docstring.lower()
    ]


def too_large(text: str) -> bool:
    """`text` is a module over MAX_MODULE_LINES whose docstring does not say it is one idea."""
    docstring = ast.get_docstring(ast.parse(text)) or ""
    return len(text.splitlines()) > MAX_MODULE_LINES and MODULE_REASON not in docstring.lower()


def sources(packages: tuple[str, ...]) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def _function(body_lines: int, docstring: str = "") -> str:
    doc = f'    """{docstring}"""\n' if docstring else ""
    return "def f():\n" + doc + "    x = 1\n" * (body_lines - 1)


def test_the_rules_see_what_they_are_for() -> None:
    """The readers must not miss a case, or the rules below would hold vacuously."""
    assert [f.lines for f in functions_in(_function(46, "What f does."))] == [46]
    assert [f.name for f in too_long(_function(46))] == ["f"]
    method = "class A:\n" + textwrap.indent(_function(46), "    ")
    assert [f.name for f in too_long(method)] == ["f"]
    assert too_long(_function(46, "Long because it is the hot path.")) == []
    assert too_long(_function(45)) == []
    long_docstring = "\n".join(["One line of the docstring."] * 60)
    assert too_long(_function(10, long_docstring)) == []  # a docstring is not code
    body = "x = 1\n" * MAX_MODULE_LINES
    assert too_large('"""A module."""\n' + body)
    assert not too_large('"""A module: one idea, the cache."""\n' + body)
    assert not too_large('"""A module."""\n' + body[6:])


def test_no_long_function_on_the_serving_path_without_a_reason() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{f.line} {f.name} ({f.lines} lines)"
        for path in sources(SERVING)
        for f in too_long(path.read_text())
        if (str(path.relative_to(ROOT)), f.name) not in KNOWN_LONG
    ]
    assert not bad, (
        f"functions over {MAX_FUNCTION_LINES} lines whose docstring does not say "
        f'"{FUNCTION_REASON} ...": split them into named steps, or say why: {bad}'
    )


def test_the_known_long_functions_are_still_long() -> None:
    """An entry of KNOWN_LONG whose function was split (or given a reason) goes."""
    still = {
        (str(path.relative_to(ROOT)), f.name)
        for path in sources(SERVING)
        for f in too_long(path.read_text())
    }
    assert still >= KNOWN_LONG, f"remove from KNOWN_LONG: {sorted(KNOWN_LONG - still)}"


def test_no_large_module_without_one_idea_stated() -> None:
    bad = [
        f"{path.relative_to(ROOT)} ({len(path.read_text().splitlines())} lines)"
        for path in sources(PACKAGES)
        if too_large(path.read_text())
    ]
    assert not bad, (
        f"modules over {MAX_MODULE_LINES} lines whose docstring does not say they are "
        f'"{MODULE_REASON}" (and which): split them along their ideas, or say so: {bad}'
    )
