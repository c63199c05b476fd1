"""Who may import whom, read from the source (ast), not from what a test run happens to load.

- `contract/` is torch-free: the standard library and numpy only, none of the project's
  other packages (it is what they share).
- `service/` imports nothing from `model/` (nor torch): the serving image needs the contract
  package, never the offline one.
- `export/` imports `service` only in its parity module (export/verify.py).
- `model/` has no import circle (imports inside functions count: a circle broken only by
  a late import is still one).
- No test module imports another: what tests share lives in tests/support/ (the chaos
  suite's stack and scenarios included); no benchmark script imports another, and
  `loadtest/` (the load generator they share) needs neither the tests nor the offline
  code.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("contract", "model", "export", "service", "loadtest")
PARITY_MODULE = "export.verify"
# Circles allowed for now (none): a new one fails test_model_has_no_import_circle.
KNOWN_CIRCLES: list[set[str]] = []


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_in(text: str, module: str, is_package: bool = False) -> set[str]:
    """Every module the source `text` of `module` imports, anywhere (top level or in a
    function); relative imports resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join([*base, *([node.module] if node.module else [])])
            found.add(name)
            # `from pkg import mod`: mod may be a submodule
            found |= {f"{name}.{alias.name}" for alias in node.names}
    return found


def imports(path: Path) -> set[str]:
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def project_imports(path: Path, package: str) -> set[str]:
    return {m for m in imports(path) if m == package or m.startswith(package + ".")}


def test_the_import_reader_sees_every_form() -> None:
    """The reader must not miss a form, or the rules below would hold vacuously."""
    text = "import model.world\nfrom model import avito\ndef f():\n    from .engine import Engine\n"
    got = imports_in(text, "service.app")
    assert {"model.world", "model", "model.avito", "service.engine"} <= got
    assert imports_in("from . import bundle\n", "contract", is_package=True) >= {"contract.bundle"}


def test_contract_is_numpy_only() -> None:
    allowed = set(sys.stdlib_module_names) | {"numpy", "contract"}
    bad = {
        (module_name(path), m)
        for path in sources("contract")
        for m in imports(path)
        if m.split(".")[0] not in allowed and m != "__future__"
    }
    assert not bad, f"contract/ imports beyond the standard library and numpy: {sorted(bad)}"


def test_service_imports_nothing_offline() -> None:
    bad = {
        (module_name(path), m)
        for path in sources("service")
        for m in imports(path)
        if m.split(".")[0] in ("model", "export", "torch")
    }
    assert not bad, f"service/ imports offline code: {sorted(bad)}"


def test_export_imports_service_only_for_parity() -> None:
    bad = {
        (module_name(path), m)
        for path in sources("export")
        if module_name(path) != PARITY_MODULE
        for m in project_imports(path, "service")
    }
    assert not bad, f"export/ imports service outside {PARITY_MODULE}: {sorted(bad)}"


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_circle_finder() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [{"a", "b", "c"}]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_model_has_no_import_circle() -> None:
    modules = {module_name(p): p for p in sources("model")}
    graph = {
        name: {m for m in project_imports(path, "model") if m in modules and m != name}
        for name, path in modules.items()
    }
    unknown = [c for c in circles(graph) if c not in KNOWN_CIRCLES]
    assert not unknown, f"import circles in model/: {[sorted(c) for c in unknown]}"


def test_no_test_module_imports_another() -> None:
    """Shared fixtures and builders live in tests/support/, never in a test module."""
    bad = {
        (module_name(path), m)
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for m in project_imports(path, "tests")
        if any(part.startswith("test_") or part == "conftest" for part in m.split("."))
    }
    assert not bad, f"test modules imported as a library: {sorted(bad)}"


def shares_outside_support(module: str, imported: str) -> bool:
    """`module` (under tests/) imports `imported` from the tests, and not from
    tests/support/: allowed only for a benchmark's own test (test_bench_x -> bench_x)."""
    if imported in ("tests", "tests.support") or imported.startswith("tests.support."):
        return False
    package, _, stem = module.rpartition(".")
    own = f"{package}.{stem.removeprefix('test_')}"
    return not (package == "tests.bench" and (imported == own or imported.startswith(own + ".")))


def test_shared_test_code_lives_in_support() -> None:
    """What more than one test module uses (the chaos suite's stack and scenarios too) is
    in tests/support/; a module elsewhere in tests/ imports only from there, or is the
    benchmark that its own test_bench_x.py runs."""
    assert shares_outside_support("tests.chaos.test_chaos", "tests.chaos.harness")
    assert not shares_outside_support("tests.chaos.test_chaos", "tests.support.chaos.run")
    assert not shares_outside_support("tests.bench.test_bench_x", "tests.bench.bench_x")
    assert shares_outside_support("tests.bench.test_bench_x", "tests.bench.bench_y")
    bad = {
        (module_name(path), m)
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for m in project_imports(path, "tests")
        if shares_outside_support(module_name(path), m)
    }
    assert not bad, f"test code shared from outside tests/support/: {sorted(bad)}"


def test_loadtest_needs_neither_the_tests_nor_the_offline_code() -> None:
    """loadtest/ is the load generator the benchmarks share: it runs from the package alone."""
    bad = {
        (module_name(path), m)
        for path in sources("loadtest")
        for m in imports(path)
        if m.split(".")[0] in ("tests", "model", "export", "torch")
    }
    assert not bad, f"loadtest/ imports tests or offline code: {sorted(bad)}"


def test_benchmarks_share_their_machinery_through_loadtest_and_support() -> None:
    """A benchmark script imports no other one (what they share is in loadtest/ and
    tests/support/load.py); test_bench_x.py imports only bench_x.py."""
    bad = set()
    for path in sorted((ROOT / "tests" / "bench").glob("*.py")):
        own = f"tests.bench.{path.stem.removeprefix('test_')}"
        bad |= {(module_name(path), m) for m in project_imports(path, "tests.bench")
                if m != own and not m.startswith(own + ".")}  # fmt: skip
    assert not bad, f"benchmarks importing one another: {sorted(bad)}"
