"""The library's imports point down its layers (docs/ARCHITECTURE.md, "Layers"): an upward import, an
import cycle (even inside a function), a private name imported from another module, or Dagster in the
library fails here. Read from the source (AST): nothing is imported to check it."""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: bottom to top; a package may import its own modules and those of the packages before it. The
#: top-level modules (config.py, the settings) are the bottom layer.
LAYERS = ["config", "data", "engine", "pseudo_labels", "quality", "features", "prerank", "evaluation", "cli"]
#: the imports of the orchestration layer the library's CLI still makes (issue 33, "settings as values":
#: `gpl run`, `gpl evaluate` and `gpl bench pseudo-labels` drive the asset graph); the list may only shrink
CLI_IMPORTS_OF_ASSETS = {
    ("gpl_platform.cli.main", "assets.runner"),
    ("gpl_platform.cli.bench", "assets.definitions"),
    ("gpl_platform.cli.bench", "assets.runner"),
}


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(root: Path, path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in the file, at any depth (functions included)."""
    found = []
    name = _module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolved against the importing package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{module}" if module else base
            found.append((module, [alias.name for alias in node.names], node.lineno))
    return found


def library(root: Path) -> dict[str, Path]:
    return {_module_name(root, path): path for path in (root / "gpl_platform").rglob("*.py")}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS[1:]) else "config"


def upward_imports(root: Path) -> list[str]:
    found = []
    for module, path in library(root).items():
        for target, _, line in _imports(root, path):
            if target.startswith("gpl_platform.") and LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
                found.append(f"{path.relative_to(root)}:{line} imports {target}")
    return found


def private_imports(root: Path) -> list[str]:
    found = []
    for module, path in library(root).items():
        for target, names, line in _imports(root, path):
            if target.startswith("gpl_platform") and target != module:
                found += [f"{path.relative_to(root)}:{line} {target}.{n}" for n in names if n.startswith("_")]
    return found


def import_cycles(root: Path) -> list[str]:
    modules = library(root)
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for target, names, _ in _imports(root, path):
            # `from package import module` imports that module; `from module import name`, the module
            candidates = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]
            # a package's __init__ exporting its own modules is how packages export, not a cycle
            graph[module] |= {c for c in candidates if c in modules and c != module and not module.startswith(c + ".")}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    return cycles


def test_the_library_imports_only_down_its_layers():
    assert upward_imports(ROOT) == []


def test_no_private_name_is_imported_from_another_module():
    assert private_imports(ROOT) == []


def test_no_import_cycle_between_library_modules():
    assert import_cycles(ROOT) == []


def test_the_library_imports_no_dagster_and_no_tests_and_only_the_listed_assets():
    found = set()
    for module, path in library(ROOT).items():
        for target, _, line in _imports(ROOT, path):
            top = target.split(".")[0]
            assert top not in {"dagster", "dagster_webserver", "tests", "bench"}, f"{path}:{line} imports {target}"
            if top == "assets":
                found.add((module, target))
    assert found <= CLI_IMPORTS_OF_ASSETS, sorted(found - CLI_IMPORTS_OF_ASSETS)


def test_the_checks_see_what_they_forbid(tmp_path):
    """The checker itself, on a planted library: an upward import inside a function, a private name from
    another module, and a cycle through a function-level import."""
    lib = tmp_path / "gpl_platform"
    (lib / "data").mkdir(parents=True)
    (lib / "config.py").write_text("from gpl_platform.data.reader import read\n")
    (lib / "data" / "reader.py").write_text(
        "from gpl_platform.data.writer import _helper\n\ndef read():\n    from gpl_platform.evaluation import m\n"
    )
    (lib / "data" / "writer.py").write_text("def _helper():\n    from gpl_platform.data import reader\n")
    assert upward_imports(tmp_path) == [
        "gpl_platform/config.py:1 imports gpl_platform.data.reader",
        "gpl_platform/data/reader.py:4 imports gpl_platform.evaluation",
    ]
    assert private_imports(tmp_path) == ["gpl_platform/data/reader.py:1 gpl_platform.data.writer._helper"]
    assert import_cycles(tmp_path) == [
        "gpl_platform.data.reader -> gpl_platform.data.writer -> gpl_platform.data.reader"
    ]


#: the most lines a module of the product (library, orchestration, Feast repository, benchmarks) may have
MAX_MODULE_LINES = 450


def long_modules(root: Path) -> list[str]:
    found = []
    for folder in ("gpl_platform", "assets", "bench", "feature_repo"):
        for path in sorted((root / folder).rglob("*.py")):
            n = len(path.read_text().splitlines())
            if n > MAX_MODULE_LINES:
                found.append(f"{path.relative_to(root)}: {n} lines")
    return found


def test_no_module_is_longer_than_the_limit(tmp_path):
    assert long_modules(ROOT) == []
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "long.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert long_modules(tmp_path) == [f"bench/long.py: {MAX_MODULE_LINES + 1} lines"]
